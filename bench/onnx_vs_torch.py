"""ONNX int4 (onnxruntime-genai, CPU; with the default 8-bit LM head and with a 4-bit one)
against PyTorch fp32 (CPU) on the embedded SmolLM2-135M, dense and with 6 layers pruned by
shrink: time to first token, decode tokens/s, peak memory (each runtime measured in its own
fresh process, so RSS is clean), size on disk, perplexity and top-1 agreement.

    python bench/onnx_vs_torch.py [--workdir DIR] [--out bench/results/onnx.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_SOURCE = "austen:evaluation"
PROMPT_TOKENS = 128
NEW_TOKENS = 64
REPEATS = 3


def _prompt_ids(tokenizer) -> list[int]:
    from shrink.core.data import token_blocks

    return token_blocks(tokenizer, PROMPT_SOURCE, 1, PROMPT_TOKENS, seed=1).input_ids[0].tolist()


def measure_torch(path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_prompt_ids(tok)])

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    runs = []
    for rep in range(REPEATS + 1):  # the first run is a warm-up
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                streamer=clock,
                pad_token_id=tok.eos_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        token_times = clock.times[1:]  # the first put() is the prompt
        if rep:
            runs.append(
                (
                    token_times[0] - start,
                    (len(token_times) - 1) / (token_times[-1] - token_times[0]),
                )
            )
    return _summary(runs, load_s, torch.get_num_threads())


def measure_onnx(path: str) -> dict:
    import numpy as np
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = og.Model(path)
    load_s = time.perf_counter() - t0
    ids = np.asarray(_prompt_ids(AutoTokenizer.from_pretrained(path)), dtype=np.int32)
    runs = []
    for rep in range(REPEATS + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS, do_sample=False
        )
        start = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        times = []
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            times.append(time.perf_counter())
        if rep:
            runs.append((times[0] - start, (len(times) - 1) / (times[-1] - times[0])))
    return _summary(runs, load_s, os.cpu_count())


def _peak_rss_mib() -> float:
    """VmHWM of this process. (getrusage's ru_maxrss keeps the parent's peak across fork+exec,
    so it would report the benchmark driver's memory, not this runtime's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(runs, load_s, threads) -> dict:
    return {
        "ttft_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(r[1] for r in runs),
        "load_s": load_s,
        "threads": threads,
        "peak_rss_mib": _peak_rss_mib(),
        "runs": [{"ttft_s": a, "decode_tok_s": b} for a, b in runs],
    }


def _measure_in_subprocess(runtime: str, path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", runtime, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} on {path} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weights_bytes(folder: Path) -> int:
    return sum(
        f.stat().st_size
        for f in folder.iterdir()
        if f.name.endswith((".safetensors", ".onnx", ".onnx.data"))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench/results/onnx.md")
    ap.add_argument("--measure", nargs=2, metavar=("RUNTIME", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        fn = measure_torch if args.measure[0] == "torch" else measure_onnx
        print(json.dumps(fn(args.measure[1])))
        return

    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")
    from shrink.core.models import EMBEDDED, ensure_embedded
    from shrink.stages.export.onnx import export_onnx
    from shrink.stages.prune import prune

    work = Path(args.workdir or tempfile.mkdtemp(prefix="shrink-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = ensure_embedded()
    pruned = work / "pruned6"
    t = time.perf_counter()
    if not (pruned / "config.json").exists():
        prune(EMBEDDED, pruned, drop=6, strategy="bi", samples=16, seq_len=256, show_progress=False)
    print(f"pruned in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for name, hf in (("dense (30 layers)", dense), ("pruned 6 (24 layers)", pruned)):
        targets = [("torch", None, hf)]
        for head in ("int8", "int4"):  # the default 8-bit LM head, and the smallest file
            onnx_dir = work / f"{hf.name}-onnx-int4-head-{head}"
            if (onnx_dir / "shrink.json").is_file():  # reuse an export from an earlier run
                v = json.loads((onnx_dir / "shrink.json").read_text())["stages"][-1]["verification"]
            else:
                t = time.perf_counter()
                v = export_onnx(hf, onnx_dir, precision="int4", lm_head=head).verification
                print(
                    f"exported {name} (LM head {head}) in {time.perf_counter() - t:.0f} s",
                    file=sys.stderr,
                )
            targets.append(("onnx", (head, v), onnx_dir))
        for runtime, extra, path in targets:
            load_before = os.getloadavg()[0]
            m = _measure_in_subprocess(runtime, path)
            m["loadavg_1min"] = round(max(load_before, os.getloadavg()[0]), 1)
            print(name, runtime, json.dumps({k: m[k] for k in m if k != "runs"}), file=sys.stderr)
            head, ver = extra if extra else (None, v)
            rows.append(
                {
                    "model": name,
                    "runtime": runtime,
                    "lm_head": head,
                    "path": str(path),
                    "weights_bytes": _weights_bytes(path),
                    **m,
                    "top1_agreement": ver["top1_agreement"] if runtime == "onnx" else None,
                    "perplexity": ver["perplexity_onnx"]
                    if runtime == "onnx"
                    else ver["perplexity_torch"],
                }
            )
    _write(rows, Path(args.out), v["eval_data"])


def _write(rows: list[dict], out: Path, eval_data: dict) -> None:
    import onnxruntime
    import onnxruntime_genai
    import torch

    def label(r: dict) -> str:
        if r["runtime"] == "torch":
            return "PyTorch fp32"
        return f"ONNX int4, LM head {r['lm_head']} (onnxruntime-genai)"

    lines = [
        "# ONNX int4 vs PyTorch fp32 on CPU (embedded SmolLM2-135M)",
        "",
        "Command: `python bench/onnx_vs_torch.py`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}.",
        "",
        f"Batch 1, greedy, a {PROMPT_TOKENS}-token prompt from Persuasion, {NEW_TOKENS} new "
        f"tokens; median of {REPEATS} runs after one warm-up. Each runtime and model is measured "
        "in its own fresh process; peak memory is that process's max RSS (weights loading "
        "included). Time to first token includes prefill of the prompt. Perplexity and top-1 "
        f"agreement (ONNX vs PyTorch argmax, teacher-forced) come from the export's verification "
        f"on {eval_data['samples']} x {eval_data['seq_len']} held-out tokens.",
        "",
        "A load average above the core count means the run competed for CPU, which hurts "
        "PyTorch (2 intra-op threads) far more than onnxruntime; compare rows measured at "
        "similar load.",
        "",
        "| model | runtime | weights on disk | time to first token | decode tokens/s | "
        "peak RSS | perplexity | top-1 agreement | machine load (1-min avg) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top1 = f"{100 * r['top1_agreement']:.1f}%" if r["top1_agreement"] is not None else "-"
        lines.append(
            f"| {r['model']} | {label(r)} | "
            f"{r['weights_bytes'] / 2**20:.1f} MiB | {1000 * r['ttft_s']:.0f} ms | "
            f"{r['decode_tok_s']:.1f} | {r['peak_rss_mib']:.0f} MiB | "
            f"{r['perplexity']:.2f} | {top1} | {r['loadavg_1min']} |"
        )
    lines += ["", "Raw figures:", "", "```json", json.dumps(rows, indent=1), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
