"""ONNX int4 with an 8-bit or a 4-bit LM head, built from the GPTQ checkpoint and from the healed
full-precision model of a `shrink build` folder: perplexity on the build's own evaluation blocks
(8 x 512 tokens of Persuasion) and bytes of model.onnx + its weights.

    shrink build -o out/smollm2-build          # the embedded default (or reuse one)
    python bench/onnx_lm_head.py --build out/smollm2-build [--out bench/results/onnx_lm_head.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="a shrink build folder with heal and GPTQ")
    ap.add_argument("--out", default="bench/results/onnx_lm_head.md")
    a = ap.parse_args()
    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")
    from shrink.core.outputs import folder_bytes
    from shrink.stages.evaluate import evaluate
    from shrink.stages.export.onnx import export_onnx

    build = Path(a.build)
    report = json.loads((build / "report.json").read_text())
    ev = report["settings"]
    sources = {
        "GPTQ checkpoint": build / "stages" / "03-quantize" / "model",
        "healed fp32 (round-to-nearest)": build / "stages" / "02-heal" / "model",
    }
    for src in sources.values():
        if not (src / "config.json").is_file():
            sys.exit(f"{src} is missing: run a build with heal and --gptq (the default recipe)")

    def ppl(path: Path) -> float:
        return evaluate(
            str(path),
            data=ev["eval_data"],
            samples=ev["eval_samples"],
            seq_len=ev["eval_seq_len"],
            seed=0,
            show_progress=False,
        ).perplexity

    rows = []
    work = Path(tempfile.mkdtemp(prefix="shrink-lm-head-"))
    for label, src in sources.items():
        row = {"source": label, "path": str(src), "perplexity_source": ppl(src)}
        for head in ("int8", "int4"):
            out = work / f"{src.parent.name}-{head}"
            r = export_onnx(src, out, precision="int4", lm_head=head, verify=False)
            row[head] = {
                "perplexity": ppl(out),
                "model_bytes": r.model_bytes,
                "folder_bytes": folder_bytes(out),
            }
            print(label, head, json.dumps(row[head]), file=sys.stderr)
        rows.append(row)
    lines = [
        "# ONNX int4: 8-bit vs 4-bit LM head",
        "",
        f"Command: `python bench/onnx_lm_head.py --build {a.build}` on the output of "
        "`shrink build` (embedded SmolLM2-135M, 6 of 30 layers removed, LoRA-healed, GPTQ 4-bit "
        "group 64).",
        "",
        f"Perplexity on {ev['eval_samples']} x {ev['eval_seq_len']} tokens of {ev['eval_data']} "
        "(the build's evaluation blocks, seed 0); size = model.onnx + its weights file "
        "(MB = 1e6 bytes). Perplexity is deterministic; no timing here.",
        "",
        "| ONNX int4 built from | perplexity of the source | LM head int8 (default) | "
        "LM head int4 (`--lm-head int4`) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[h]['perplexity']:.2f} ({r[h]['model_bytes'] / 1e6:.0f} MB)"
            for h in ("int8", "int4")
        ]
        lines.append(f"| {r['source']} | {r['perplexity_source']:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", "```json", json.dumps(rows, indent=1), "```", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
