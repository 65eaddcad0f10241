"""Decode speed across CPU runtimes: PyTorch fp32 (HF folder), ONNX (onnxruntime-genai folder) and
GGUF files (llama.cpp) at 1 and 2 threads, measured interleaved, each run in a fresh process.

Same loop everywhere (shrink.bench's): prefill a ``--prompt-len`` prompt, then ``--gen-len - 1``
greedy tokens with the KV cache, never stopping at EOS. Reports prefill and decode tokens/s,
peak RSS of the worker process (VmHWM after load; /proc/self/clear_refs), file size, and the
1-minute load average before each run (the machine is shared: read ratios, not absolutes).
llama.cpp's threads spin-wait (busy) between ops; PyTorch uses OpenMP (torch.set_num_threads);
onnxruntime-genai uses its default intra-op threads (not set here).

    python bench/runtimes.py --hf DIR [--onnx DIR] --gguf A.gguf B.gguf [--threads 1 2]
                             [--rounds 3] [--prompt-len 64] [--gen-len 128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _vm(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, path: str, threads: int, prompt_len: int, gen_len: int) -> dict:
    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")
    if kind == "gguf":
        import shrink
        from shrink.runtime.gguf import GgufRunner

        r = GgufRunner(path, n_ctx=prompt_len + gen_len, n_threads=threads, logits_all=False)
        ids = r.encode(shrink.load_texts(shrink.EVALUATION)[0][:20000])[:prompt_len]
        r.time_greedy(ids, 4)  # warm-up
        Path("/proc/self/clear_refs").write_text("5")
        ttft, decode = r.time_greedy(ids, gen_len)
        out = {"ttft_s": ttft, "decode_s": decode, "peak_rss_bytes": _vm("VmHWM")}
        r.close()
        return out
    import torch

    torch.set_num_threads(threads)
    from shrink.stages.bench import measure

    return measure(path, "onnx" if kind == "onnx" else "hf", prompt_len=prompt_len,
                   gen_len=gen_len, ppl_samples=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf")
    p.add_argument("--onnx")
    p.add_argument("--gguf", nargs="*", default=[])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--tag", default="smollm2")
    p.add_argument("--worker", nargs=5, metavar=("KIND", "PATH", "THREADS", "PROMPT", "GEN"))
    args = p.parse_args()
    if args.worker:
        kind, path, t, pl, gl = args.worker
        print(json.dumps(worker(kind, path, int(t), int(pl), int(gl))))
        return

    arts = ([("pytorch fp32", "hf", args.hf)] if args.hf else []) + \
        ([("onnx", "onnx", args.onnx)] if args.onnx else []) + \
        [(f"gguf {Path(g).stem}", "gguf", g) for g in args.gguf]
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for name, kind, path in arts:
            for t in args.threads:
                load = os.getloadavg()[0]
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", kind, str(path), str(t),
                     str(args.prompt_len), str(args.gen_len)], capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["load_avg_1m"] = load
                runs.setdefault((name, t), []).append(r)
                print(json.dumps({"round": rnd, "artifact": name, "threads": t,
                                  "decode_tok_s": (args.gen_len - 1) / r["decode_s"],
                                  "load": load}), file=sys.stderr)

    def size(kind: str, path: str) -> int:
        pth = Path(path)
        if kind == "gguf":
            return pth.stat().st_size
        return sum(f.stat().st_size for f in pth.rglob("*")
                   if f.suffix in (".safetensors", ".onnx", ".data") or f.name.endswith(".onnx.data"))

    cmd = "python bench/runtimes.py " + " ".join(sys.argv[1:])
    lines = [f"# CPU runtimes on {args.tag}: prefill and decode speed, memory, size", "",
             f"Command: `{cmd}`; {os.cpu_count()} cores, shared machine; medians of "
             f"{args.rounds} interleaved rounds, each run in a fresh process; prompt "
             f"{args.prompt_len} tokens, {args.gen_len} generated (greedy, no EOS stop).", "",
             "| artifact | threads | size MB | prefill tok/s | decode tok/s | peak RSS MB | "
             "load avg (min-max) |", "|---|---|---|---|---|---|---|"]
    table = []
    for name, kind, path in arts:
        for t in args.threads:
            rs = runs[(name, t)]
            pre = statistics.median(args.prompt_len / r["ttft_s"] for r in rs)
            dec = statistics.median((args.gen_len - 1) / r["decode_s"] for r in rs)
            rss = statistics.median(r["peak_rss_bytes"] for r in rs)
            loads = [r["load_avg_1m"] for r in rs]
            row = {"artifact": name, "threads": t, "size_bytes": size(kind, path),
                   "prefill_tok_s": pre, "decode_tok_s": dec, "peak_rss_bytes": rss,
                   "load_avg": loads}
            table.append(row)
            lines.append(f"| {name} | {t if kind != 'onnx' else 'default'} | "
                         f"{row['size_bytes'] / 1e6:.1f} | {pre:.0f} | {dec:.1f} | {rss / 1e6:.0f} | "
                         f"{min(loads):.1f}-{max(loads):.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"runtimes-{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"runtimes-{args.tag}.json").write_text(json.dumps(
        {"command": cmd, "rows": table, "runs": {f"{k[0]}@{k[1]}": v for k, v in runs.items()}},
        indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
