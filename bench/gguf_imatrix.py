"""How much shrink's importance matrix helps each GGUF type of the embedded SmolLM2-135M (dense):
bytes on disk and perplexity in llama.cpp on both evaluation domains, with and without the
imatrix (q8_0, written by shrink directly, gets none; the 2/3-bit IQ types only exist with one).

Each point is ``shrink.stages.export.gguf_point.gguf_point``: the export stage writes the file
(llama.cpp's quantizer, given the imatrix through its C API), then a fresh process measures it.
Writes bench/results/gguf_imatrix[-<tag>].md and .json with the command, the CPU and the load.

    python bench/gguf_imatrix.py [--types q4_k_m q2_k ...] [--samples 8] [--seq-len 512]
                                 [--threads 2] [--model DIR] [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_0", "q3_k_m", "q2_k", "iq3_s", "iq2_m"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(model_dir: Path, types: list[str], evaluation, spec, threads: int) -> list[dict]:
    from shrink.stages.export.gguf import IMATRIX_TYPES, NEEDS_IMATRIX
    from shrink.stages.export.gguf_point import gguf_point

    rows = []
    for t in types:
        variants = (
            [spec] if t in NEEDS_IMATRIX else [False, spec] if t in IMATRIX_TYPES else [False]
        )
        for imatrix in variants:
            t0 = time.perf_counter()
            p = gguf_point(
                model_dir,
                t,
                imatrix=imatrix,
                evaluation=evaluation,
                threads=threads,
                log=lambda line: print(line, file=sys.stderr),
            )
            row = {
                "type": t,
                "imatrix": bool(imatrix),
                "bytes": p["bytes"],
                "perplexity": p["perplexity"],
                "tensor_types": p["tensor_types"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict], sets: list[str]) -> list[str]:
    from shrink.runtime.gguf_quant import types_line

    plain = {r["type"]: r for r in rows if not r["imatrix"]}
    head = " | ".join(f"perplexity {s}" for s in sets)
    lines = [
        f"| type | imatrix | MB | {head} | change with imatrix | tensor types |",
        "|---|---|---|" + "---|" * len(sets) + "---|---|",
    ]
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][s]:.2f}" for s in sets)
        base = plain.get(r["type"]) if r["imatrix"] else None
        change = (
            " / ".join(
                f"{100 * (r['perplexity'][s] / base['perplexity'][s] - 1):+.1f}%" for s in sets
            )
            if base
            else ""
        )
        lines.append(
            f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | "
            f"{r['bytes'] / 1e6:.1f} | {ppl} | {change} | "
            f"{types_line(r['tensor_types'])} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--samples", type=int, default=8, help="evaluation blocks per domain")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--imatrix-samples", type=int, default=16)
    p.add_argument("--imatrix-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cache",
        action="store_true",
        help="reuse shrink's cache of GGUF files and "
        "measurements (default: everything made afresh in a temporary cache)",
    )
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")
    load_before = os.getloadavg()

    from shrink.core.models import ensure_embedded
    from shrink.stages.configs import EvaluateConfig
    from shrink.stages.export.imatrix import ImatrixSpec

    model_dir = Path(args.model) if args.model else ensure_embedded()
    evaluation = EvaluateConfig(samples=args.samples, seq_len=args.seq_len)
    spec = ImatrixSpec(samples=args.imatrix_samples, seq_len=args.imatrix_seq_len)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shrink-bench-imatrix-") as tmp:
        if not args.cache:
            os.environ["SHRINK_CACHE"] = tmp
        rows = measure(model_dir, args.types, evaluation, spec, args.threads)
    load_after = os.getloadavg()
    sets = list(rows[0]["perplexity"]) if rows else []

    cmd = "python bench/gguf_imatrix.py " + " ".join(sys.argv[1:])
    env = (
        f"{cpu_model()}, {os.cpu_count()} cores, llama.cpp threads {args.threads}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"({time.perf_counter() - t0:.0f} s); llama-cpp-python "
        f"{version('llama-cpp-python')}, gguf {version('gguf')}, torch {version('torch')}"
    )
    lines = [
        f"# Importance matrix and GGUF types: {model_dir.name} (dense)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {env}.",
        "",
        f"Perplexity in llama.cpp on {', '.join(sets)}: {args.samples} blocks x "
        f"{args.seq_len} tokens each (seed 0). Importance matrix: mean squared input per "
        f"column of every quantized matrix, computed by shrink in PyTorch on "
        f"{spec.describe()}, handed to llama.cpp's quantizer through its C API. q8_0 "
        "(written by shrink directly) gets none; the 2- and 3-bit IQ types and q2_k_s "
        "only exist with one. Tensor types: what each file holds (rows 576 wide are not a multiple "
        "of 256, so most k-quant tensors fall back to a 32-wide type).",
        "",
    ]
    lines += table(rows, sets)
    RESULTS.mkdir(exist_ok=True)
    stem = "gguf_imatrix" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": cmd,
                "machine": env,
                "cpu": cpu_model(),
                "load_before": load_before,
                "load_after": load_after,
                "evaluation": evaluation.settings(),
                "imatrix": spec.settings(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
