"""The importance matrix's effect, read from a frontier's dense ladder (no new measurement).

``shrink frontier MODEL -o DIR`` measures the dense model's GGUF types with shrink's importance
matrix and, for ``--plain-types``, without it, on the same evaluation blocks. This script puts the
pairs side by side with the tensor types each file really holds.

Usage: python bench/frontier_imatrix.py DIR [--out bench/results/gguf_imatrix.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shrink.stages.frontier import DENSE_LADDER  # noqa: E402

ORDER = DENSE_LADDER  # the frontier's dense ladder, in its order


def _result(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data.get("result", data)


def read(work: Path) -> dict:
    rows: dict = {}
    for ev in sorted(work.glob("dense-*.eval.json")):
        slug = ev.name[: -len(".eval.json")]
        if slug.startswith("dense-healed"):
            continue
        r = _result(ev)
        export = _result(work / f"{slug}.export.json")["gguf"]
        name = slug[len("dense-") :]
        plain = name.endswith("-plain")
        rows.setdefault(name.removesuffix("-plain"), {})["plain" if plain else "imatrix"] = {
            "mb": export["bytes"] / 1e6,
            "p": r["perplexity"],
            "t": r["second"]["perplexity"],
            "types": export.get("tensor_types") or {},
        }
    return rows


def markdown(rows: dict, source: str) -> str:
    out = [
        "# GGUF with and without shrink's importance matrix: SmolLM2-135M, dense",
        "",
        f"Read from the dense ladder of `shrink frontier` ({source}; see "
        "[frontier.md](frontier.md) for the command, CPU and load; quality figures do not "
        "depend on the load). Perplexity with llama.cpp on the fixed evaluation sets, "
        "Persuasion | technical prose, 8 x 512 tokens each, seed 0. Importance matrix: mean "
        "squared input per column of every quantized matrix on 16 x 256 tokens of "
        "austen:calibration+tech:calibration, handed to llama.cpp's quantizer.",
        "",
        "| type | MB | plain | with imatrix | change (P / T) | tensor types of the file |",
        "|---|---|---|---|---|---|",
    ]
    for t in sorted(rows, key=lambda k: ORDER.index(k) if k in ORDER else 99):
        im, pl = rows[t].get("imatrix"), rows[t].get("plain")
        if im is None:
            continue
        plain = f"{pl['p']:.2f} / {pl['t']:.2f}" if pl else "-"
        change = (
            f"{(im['p'] / pl['p'] - 1) * 100:+.1f}% / {(im['t'] / pl['t'] - 1) * 100:+.1f}%"
            if pl
            else "-"
        )
        types = ", ".join(f"{k} {v}" for k, v in sorted(im["types"].items(), key=lambda kv: -kv[1]))
        out.append(
            f"| {t} | {im['mb']:.1f} | {plain} | {im['p']:.2f} / {im['t']:.2f} | "
            f"{change} | {types or 'written by shrink'} |"
        )
    out += [
        "",
        "f16 and q8_0 are written by shrink itself (no quantizer, no importance matrix); "
        "iq3_s and iq2_m are refused without one. SmolLM2's rows are 576 wide, not a "
        "multiple of 256, so most k-quant and IQ tensors fall back to 32-wide block types: "
        "the last column shows what each file really holds.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("frontier_dir")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    text = markdown(read(Path(a.frontier_dir) / "work"), f"`{a.frontier_dir}`")
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
