"""Decode and prefill speed of the embedded model, dense vs pruned by BI (drop 3, 6, 9, 12),
against the ideal speedup from the analytic FLOPs ratio. Target: measured >= 0.9 x ideal.

All settings are measured in one process, interleaved within each repeat (medians), on the same
prompt; layers are removed in memory (shrink.without_layers), so nothing but the layer count
differs. Writes bench/results/pruning_speedup.{md,json}.

    python bench/pruning_speedup.py [--drops 0,3,6,9,12] [--repeats 5] [--prompt-len 256] [--gen-len 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from shrink.stages.bench import sweep_drop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drops", default="0,3,6,9,12")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    drops = [int(x) for x in a.drops.split(",")]
    points = sweep_drop(
        a.model,
        drops,
        prompt_len=a.prompt_len,
        gen_len=a.gen_len,
        repeats=a.repeats,
        ppl_samples=4,
        ppl_seq_len=256,
    )
    base = points[0]
    rows = []
    for p in points:
        ideal = base.flops_per_token / p.flops_per_token
        dec = p.decode_tokens_per_s / base.decode_tokens_per_s
        pre = p.prefill_tokens_per_s / base.prefill_tokens_per_s
        rows.append(
            {
                **asdict(p),
                "ideal_speedup": ideal,
                "decode_speedup": dec,
                "prefill_speedup": pre,
                "decode_vs_ideal": dec / ideal,
                "prefill_vs_ideal": pre / ideal,
            }
        )
    cmd = "python bench/pruning_speedup.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores, CPU, fp32"
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "pruning_speedup.json").write_text(
        json.dumps(
            {"command": cmd.strip(), "machine": machine, "model": a.model, "rows": rows}, indent=2
        )
    )
    lines = [
        f"# Pruning speedup: {a.model}, dense vs BI-pruned\n",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine}. Prompt {a.prompt_len} tokens, {a.gen_len} decoded, batch 1, "
        f"{a.repeats} interleaved repeats (medians). Ideal = dense FLOPs / pruned FLOPs "
        f"(analytic, at context {a.prompt_len + a.gen_len}).\n",
        "| layers removed | perplexity | decode tok/s | prefill tok/s | ideal speedup | "
        "decode speedup | decode / ideal | prefill speedup | prefill / ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['drop']} | {r['perplexity']:.2f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['ideal_speedup']:.3f} | "
            f"{r['decode_speedup']:.3f} | {r['decode_vs_ideal']:.2f} | "
            f"{r['prefill_speedup']:.3f} | {r['prefill_vs_ideal']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "pruning_speedup.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
