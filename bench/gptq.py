"""GPTQ (GPTQModel) on the embedded SmolLM2-135M: size on disk, bits per weight, perplexity fp32 vs
4-bit vs 8-bit, and time to quantize on this machine's CPU.

Each bit width goes through ``shrink.stages.quantize.quantize_gptq`` exactly as ``shrink quantize``
runs it: checks, perplexity of the source, GPTQ, save, reload with transformers in a fresh process
and perplexity there. Writes bench/results/gptq.md and bench/results/gptq.json.

    python bench/gptq.py [--bits 4 8] [--samples 32] [--seq-len 256] [--eval-samples 8]
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=512)
    args = p.parse_args()
    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")

    import torch

    from shrink.core.models import ensure_embedded
    from shrink.stages.quantize import quantize_gptq

    src = ensure_embedded()
    runs = []
    with tempfile.TemporaryDirectory(prefix="shrink-bench-gptq-") as tmp:
        for bits in args.bits:
            t0 = time.perf_counter()
            r = quantize_gptq(
                str(src),
                Path(tmp) / f"q{bits}",
                bits=bits,
                group_size=args.group_size,
                samples=args.samples,
                seq_len=args.seq_len,
                eval_samples=args.eval_samples,
                eval_seq_len=args.eval_seq_len,
                show_progress=False,
            )
            d = r.to_dict()
            d["total_seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(d)
            print(
                json.dumps(
                    {
                        k: d[k]
                        for k in (
                            "bits",
                            "group_size",
                            "seconds",
                            "bits_per_weight",
                            "size_bytes_after",
                            "perplexity_before",
                            "perplexity_after",
                        )
                    }
                ),
                file=sys.stderr,
            )

    cmd = "python bench/gptq.py " + " ".join(sys.argv[1:])
    first = runs[0]
    lines = [
        "# GPTQ quantization of the embedded SmolLM2-135M (GPTQModel through `shrink quantize`)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}; load average at the end: "
        f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, "
        f"GPTQModel {version('gptqmodel')}, optimum {version('optimum')}.",
        "",
        f"Calibration: {first['calibration']['samples']} x {first['calibration']['seq_len']} "
        f"tokens of {first['calibration']['source']}. Perplexity: "
        f"{first['evaluation']['samples']} x {first['evaluation']['seq_len']} tokens of "
        f"{first['evaluation']['source']} (held out); fp32 measured on the source in shrink's "
        "process, the GPTQ models after a reload with `transformers.AutoModelForCausalLM."
        "from_pretrained` in a fresh process (bfloat16 activations on CPU).",
        "",
        "| model | group size | weights on disk | bits/weight (quantized Linears) | perplexity "
        "| vs fp32 | GPTQ time | whole command |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 source | - | {first['size_bytes_before'] / 1e6:.1f} MB | 32 | "
        f"{first['perplexity_before']:.3f} | 1.000 | - | - |",
    ]
    for d in runs:
        lines.append(
            f"| GPTQ {d['bits']}-bit | {d['group_size']} | {d['size_bytes_after'] / 1e6:.1f} MB | "
            f"{d['bits_per_weight']:.3f} | {d['perplexity_after']:.3f} | "
            f"{d['perplexity_after'] / d['perplexity_before']:.3f} | {d['seconds']:.1f} s | "
            f"{d['total_seconds']:.1f} s |"
        )
    notes = [n for n in {d["group_size_note"] for d in runs} if n]
    lines += [
        "",
        "Weights on disk = bytes of the *.safetensors files. The fp32 embedding (49152 x 576, tied "
        "with the head) stays 16-bit in the GPTQ files: it is 28 M of the 134.5 M parameters, so the "
        "file shrinks far less than the quantized Linears do. Bits/weight counts qweight, qzeros, "
        "16-bit scales and g_idx over the weights of the quantized Linears. 'GPTQ time' is "
        "GPTQModel's quantize() alone; 'whole command' adds loading, perplexity of the source, "
        "saving and the fresh-process reload with its perplexity.",
    ]
    if notes:
        lines += ["", "Group size: " + "; ".join(notes) + "."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gptq.json").write_text(json.dumps({"command": cmd, "runs": runs}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
