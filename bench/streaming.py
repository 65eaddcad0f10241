"""Benchmark: streamed layer-by-layer scoring of a model larger than a memory cap.

Builds synthetic Llama checkpoints with random weights (written tensor by tensor, one shard at a
time, so the builder never holds the model), then scores them in fresh processes:

- the big model (default 32 layers, ~6.3 GB of float32 weights) streamed under a private-memory
  cap (RLIMIT_DATA, default 1.5 GB absolute, i.e. including Python + torch), which it must pass;
- the same model loaded in memory (from_pretrained + score_layers) under the same cap: it fails;
- optionally (--big-in-memory) the big model in memory without a cap: its peak RSS;
- a small model that fits (4 layers, same widths) in memory and streamed, uncapped: time and
  peak-memory ratios.

RLIMIT_DATA rather than RLIMIT_AS: torch reserves far more address space than it touches, while
RLIMIT_DATA counts private writable memory, which is what a process really allocates.

Usage: python bench/streaming.py [--workdir DIR] [--layers 32] [--cap-gb 1.5] [--samples 4]
       [--seq-len 128] [--big-in-memory] [--repeats 2] [--out bench/results/streaming.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch, transformers
from transformers.models.llama import modeling_llama  # noqa: F401  (counted in the baseline)
import shrink.core.scores, shrink.streaming
mode, folder = sys.argv[1], sys.argv[2]
cap, samples, seq_len = (int(a) for a in sys.argv[3:6])
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = vm("VmData:")
if cap:
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
ids = torch.randint(3, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
out = {"mode": mode, "baseline_data": base, "baseline_rss": vm("VmRSS:"), "cap": cap}
t0 = time.perf_counter()
try:
    if mode == "stream":
        s = shrink.streaming.stream_score(folder, ids, batch_size=4, device="cpu",
                                          show_progress=False)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        out["load_seconds"] = time.perf_counter() - t0
        s = shrink.core.scores.score_layers(m.eval(), ids, batch_size=4, show_progress=False)
    out.update(ok=True, bi=s.bi, angular1=s.angular[0])
except (MemoryError, RuntimeError, OSError) as e:
    out.update(ok=False, error=(type(e).__name__ + ": " + str(e).splitlines()[0])[:240])
out["seconds"] = time.perf_counter() - t0
out["peak_rss"] = vm("VmHWM:")
out["tokens_per_second"] = samples * seq_len / out["seconds"] if out["ok"] else None
print(json.dumps(out))
"""


def build(folder: Path, layers: int) -> tuple[Path, float]:
    import torch
    import transformers as tf

    from shrink.streaming import write_random_checkpoint

    if (folder / "config.json").is_file():
        return folder, 0.0
    t0 = time.perf_counter()
    config = tf.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    write_random_checkpoint(config, folder, max_shard_bytes=1 << 30, dtype=torch.float32)
    return folder, time.perf_counter() - t0


def child(mode: str, folder: Path, cap: int, samples: int, seq_len: int) -> dict:
    env = {**os.environ, "SHRINK_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder), str(cap), str(samples), str(seq_len)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:  # killed before it could report (e.g. std::bad_alloc abort)
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {
            "mode": mode,
            "ok": False,
            "error": f"exit {p.returncode}: {tail[:240]}",
            "cap": cap,
        }
    return json.loads(lines[-1])


def gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/shrink-bench-streaming")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--small-layers", type=int, default=4)
    ap.add_argument("--cap-gb", type=float, default=1.5)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--big-in-memory", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/streaming.md")
    args = ap.parse_args()
    from shrink.streaming import Checkpoint

    work = Path(args.workdir)
    big, t_big = build(work / f"llama-{args.layers}L", args.layers)
    small, t_small = build(work / f"llama-{args.small_layers}L", args.small_layers)
    w_big, w_small = Checkpoint(big).nbytes, Checkpoint(small).nbytes
    cap = int(args.cap_gb * 1e9)
    n, s = args.samples, args.seq_len
    print(
        f"big {gb(w_big)} (built in {t_big:.0f} s), small {gb(w_small)}, cap {gb(cap)}", flush=True
    )
    runs = {}
    runs["big_stream_capped"] = child("stream", big, cap, n, s)
    print(runs["big_stream_capped"], flush=True)
    runs["big_memory_capped"] = child("memory", big, cap, n, s)
    print(runs["big_memory_capped"], flush=True)
    # The CPU is shared with other jobs: alternate the two paths and keep each one's fastest run.
    for _ in range(args.repeats):
        for key, mode in (("small_memory", "memory"), ("small_stream", "stream")):
            r = child(mode, small, 0, n, s)
            if key not in runs or r["seconds"] < runs[key]["seconds"]:
                runs[key] = {**r, "peak_rss": max(r["peak_rss"], runs.get(key, r)["peak_rss"])}
    if args.big_in_memory:
        runs["big_memory"] = child("memory", big, 0, n, s)
        runs["big_stream"] = child("stream", big, 0, n, s)
    for k in ("small_memory", "small_stream", "big_memory", "big_stream"):
        if k in runs:
            print(k, {x: runs[k].get(x) for x in ("ok", "seconds", "peak_rss")}, flush=True)
    sm, ss = runs["small_memory"], runs["small_stream"]
    diff_bi = max(abs(a - b) for a, b in zip(sm["bi"], ss["bi"]))
    diff_ang = max(abs(a - b) for a, b in zip(sm["angular1"], ss["angular1"]))
    bs = runs["big_stream_capped"]
    cmd = "python bench/streaming.py " + " ".join(sys.argv[1:])
    lines = [
        "# Streamed layer-by-layer scoring under a memory cap",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"no GPU; float32 on CPU. Calibration: {n} samples x {s} tokens (random token ids), batch 4. "
        "Synthetic Llama (hidden 2048, FFN 5632, 16 heads / 4 KV heads, vocab 32000, untied "
        "head), random weights written shard by shard (1 GB shards) by "
        "`shrink.streaming.write_random_checkpoint`. Each run is a fresh process; peak RSS is "
        "its VmHWM. The cap is RLIMIT_DATA (private writable memory: heap, anonymous mappings), "
        "set as an absolute limit after importing torch/transformers/shrink (baseline "
        f"{gb(bs.get('baseline_data'))} of it, RSS {gb(bs.get('baseline_rss'))}).",
        "",
        f"## Model {args.layers} layers: {gb(w_big)} of weights, cap {gb(cap)} "
        f"({w_big / cap:.1f}x the cap)",
        "",
        "| run | result | time | tokens/s | peak RSS |",
        "|---|---|---|---|---|",
    ]

    def row(name, r):
        res = "ok" if r.get("ok") else f"FAILED: {r.get('error', '')}"
        tps = f"{r['tokens_per_second']:.1f}" if r.get("tokens_per_second") else "-"
        secs = f"{r['seconds']:.1f} s" if r.get("seconds") else "-"
        return f"| {name} | {res} | {secs} | {tps} | {gb(r.get('peak_rss'))} |"

    lines.append(row("streamed (`stream_score`), capped", bs))
    lines.append(
        row("in memory (`from_pretrained` + `score_layers`), capped", runs["big_memory_capped"])
    )
    if "big_memory" in runs:
        lines.append(row("in memory, no cap", runs["big_memory"]))
        lines.append(row("streamed, no cap (run right after it)", runs["big_stream"]))
    lines += [
        "",
        f"## Model {args.small_layers} layers: {gb(w_small)} of weights (fits), no cap",
        "",
        f"| run (fastest of {args.repeats}, alternated) | time | tokens/s | peak RSS |",
        "|---|---|---|---|",
        f"| in memory | {sm['seconds']:.1f} s (load {sm.get('load_seconds', 0):.1f} s) | "
        f"{sm['tokens_per_second']:.1f} | {gb(sm['peak_rss'])} |",
        f"| streamed | {ss['seconds']:.1f} s | {ss['tokens_per_second']:.1f} | "
        f"{gb(ss['peak_rss'])} |",
        "",
        f"Streamed / in memory: time {ss['seconds'] / sm['seconds']:.2f}x, peak RSS "
        f"{ss['peak_rss'] / sm['peak_rss']:.2f}x. Scores: max |BI difference| {diff_bi:.1e}, "
        f"max |angular (n=1) difference| {diff_ang:.1e}.",
        "",
        "Peak RSS of the streamed run is about baseline + one decoder layer "
        f"({gb(w_big / args.layers * 0.96)} here) + the embeddings while layer-0 inputs are made "
        f"({gb(32000 * 2048 * 4)}) + activations; it does not grow with the number of layers.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(
        json.dumps(
            {"weights_big": w_big, "weights_small": w_small, "cap": cap, "runs": runs}, indent=1
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
