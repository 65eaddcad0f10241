"""Quality of the pruned embedded model by strategy, with and without the linear bridge, unhealed,
on two domains: the Austen held-out novel (Persuasion) and CPython's reference docs
(tech:evaluation). Writes bench/results/quality.md and quality.json.

    PYTHONPATH=. python bench/quality.py                 # 3, 6 and 9 layers, every strategy

For each number of removed layers n: the layers are scored once (BI, angular, relmag on
austen:calibration, 32 x 256, seed 0); each strategy's layer set is removed temporarily, then
bridged (shrink.core.bridge, fitted on the same 32 x 256 calibration blocks) and measured on
fixed blocks of both evaluation texts. ``auto`` is shrink.stages.auto's rule: the candidate
(bi / angular / relmag) with the lowest perplexity on held-out calibration blocks (8 x 256 blocks
of austen:calibration that scoring did not read), measured without the bridge for "auto" and with
it for "auto + bridge". Gap closed = (pruned - result) / (pruned - dense), pruned = the same layer
set without the bridge. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shrink.core.bridge import DEFAULT_RIDGE, bridged_without  # noqa: E402
from shrink.core.data import token_blocks  # noqa: E402
from shrink.core.layers import without_layers  # noqa: E402
from shrink.core.models import load_model  # noqa: E402
from shrink.core.perplexity import perplexity  # noqa: E402
from shrink.core.scores import score_layers  # noqa: E402
from shrink.stages.auto import choose_auto, heldout_blocks  # noqa: E402
from shrink.stages.strategies import choose_layers  # noqa: E402

DOMAINS = {"austen": "austen:evaluation", "tech": "tech:evaluation"}
AUTO_CANDIDATES = ("bi", "angular", "relmag")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drops", type=int, nargs="+", default=[3, 6, 9])
    ap.add_argument("--strategies", nargs="+", default=["bi", "angular", "relmag", "last"])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--ridge", type=float, default=DEFAULT_RIDGE)
    ap.add_argument("--method", default="mlp")
    ap.add_argument(
        "--bridge-data",
        default="austen:calibration",
        help="comma-separated text sources the bridge is fitted on (the calibration "
        "blocks are split evenly among them); scoring always reads Austen",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "PYTHONPATH=. python bench/quality.py " + " ".join(sys.argv[1:])
    t_start = time.perf_counter()

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    L = len(model.model.layers)
    calib = token_blocks(tok, "austen:calibration", args.calib_samples, args.calib_seq_len, 0)
    held = heldout_blocks(
        tok, 8, 256, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len
    )
    evals = {
        k: token_blocks(tok, src, args.eval_samples, args.eval_seq_len, 0)
        for k, src in DOMAINS.items()
    }
    scores = score_layers(model, calib.input_ids, show_progress=False)
    bridge_kw = {"ridge": args.ridge, "method": args.method}
    sources = args.bridge_data.split(",")
    if sources == ["austen:calibration"]:
        fit_ids, fit_info = calib.input_ids, [calib.describe()]
    else:
        parts = [
            token_blocks(tok, src, args.calib_samples // len(sources), args.calib_seq_len, 0)
            for src in sources
        ]
        fit_ids, fit_info = torch.cat([p.input_ids for p in parts]), [p.describe() for p in parts]

    def measure() -> dict:
        return {
            k: perplexity(model, b.input_ids, show_progress=False).perplexity
            for k, b in evals.items()
        }

    cache: dict = {}

    def evaluate(layers: list[int], bridge: bool) -> dict:
        key = (tuple(layers), bridge)
        if key not in cache:
            t0 = time.perf_counter()
            ctx = (
                bridged_without(model, layers, fit_ids, **bridge_kw)
                if bridge
                else without_layers(model, layers)
            )
            with ctx as runs:
                row = {
                    "heldout_calibration": perplexity(
                        model, held.input_ids, show_progress=False
                    ).perplexity,
                    **measure(),
                }
                if bridge:
                    row["bridge"] = [r.to_dict() for r in runs]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            cache[key] = row
            print(
                f"  {layers} bridge={bridge}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)),
                flush=True,
            )
        return cache[key]

    t0 = time.perf_counter()
    dense = {
        "heldout_calibration": perplexity(model, held.input_ids, show_progress=False).perplexity,
        **measure(),
    }
    dense["seconds"] = round(time.perf_counter() - t0, 1)
    print("dense", dense, flush=True)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], final: bool) -> None:
        total = time.perf_counter() - t_start
        load = os.getloadavg()
        meta = {
            "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": args.threads,
            "loadavg_at_end": [round(x, 2) for x in load],
            "seconds": round(total),
            "complete": final,
            "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 dequantized)",
            "calibration": calib.describe(),
            "heldout": held.describe(),
            "bridge_fit_data": fit_info,
            "evaluation": {k: b.describe() for k, b in evals.items()},
            "bridge": {**bridge_kw, "skip_first": 1},
            "dense": dense,
        }
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(_markdown(meta, rows))
        print(f"wrote {out}.md/.json after {total:.0f} s, load average {load}", flush=True)

    for n in args.drops:
        sets = {s: choose_layers(s, n, L, scores)[0] for s in args.strategies}
        auto_plain = choose_auto(
            model,
            n,
            held.input_ids,
            lambda s, n=n: choose_layers(s, n, L, scores),
            candidates=AUTO_CANDIDATES,
        )
        for s in AUTO_CANDIDATES:
            sets.setdefault(s, choose_layers(s, n, L, scores)[0])
        # auto + bridge: the same rule on bridged held-out perplexity
        bridged_held = {s: evaluate(sets[s], True)["heldout_calibration"] for s in AUTO_CANDIDATES}
        auto_bridge = min(AUTO_CANDIDATES, key=lambda s: (bridged_held[s], s))
        entries = [(s, sets[s]) for s in args.strategies]
        entries.append((f"auto ({auto_plain.strategy})", auto_plain.layers))
        for label, layers in entries:
            plain = evaluate(layers, False)
            bridged = evaluate(layers, True)
            rows.append(_row(n, label, layers, plain, bridged, dense))
        rows.append(
            _row(
                n,
                f"auto+bridge ({auto_bridge})",
                sets[auto_bridge],
                evaluate(sets[auto_bridge], False),
                evaluate(sets[auto_bridge], True),
                dense,
                bridged_only=True,
            )
        )
        rows[-1]["auto_candidates"] = {
            s: {
                "layers": sets[s],
                "heldout_bridged": bridged_held[s],
                "heldout_plain": evaluate(sets[s], False)["heldout_calibration"],
            }
            for s in AUTO_CANDIDATES
        }
        write(rows, n == args.drops[-1])

    return 0


def _gap(pruned: float, result: float, dense: float) -> float | None:
    return (pruned - result) / (pruned - dense) if pruned - dense > 1e-9 else None


def _row(n, label, layers, plain, bridged, dense, bridged_only=False) -> dict:
    row = {
        "drop": n,
        "strategy": label,
        "layers": list(layers),
        "plain": {k: plain[k] for k in ("heldout_calibration", *DOMAINS)},
        "bridged": {k: bridged[k] for k in ("heldout_calibration", *DOMAINS)},
        "bridge": bridged.get("bridge"),
        "bridged_only": bridged_only,
        "seconds": {"plain": plain["seconds"], "bridged": bridged["seconds"]},
    }
    row["gap_closed"] = {k: _gap(plain[k], bridged[k], dense[k]) for k in DOMAINS}
    return row


def _fmt(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _markdown(meta: dict, rows: list[dict]) -> str:
    d = meta["dense"]
    lines = [
        "# Pruning quality by strategy, with and without the linear bridge (unhealed)",
        "",
        f"Command: `{meta['command']}`  ",
        (
            f"Machine: {meta['machine']}, torch threads {meta['torch_threads']}, load average at "
            f"the end {meta['loadavg_at_end']} (the machine is shared), {meta['seconds']} s in all"
            f"{'' if meta.get('complete', True) else ' (stopped early: only the drops listed ran)'}"
            ".  "
        ),
        f"Model: {meta['model']}. Calibration (scoring"
        f"{' and bridge fit' if len(meta['bridge_fit_data']) == 1 else ''}): "
        f"{meta['calibration']['samples']} x {meta['calibration']['seq_len']} tokens of "
        "austen:calibration, seed 0. Held-out calibration (auto's choice only): "
        f"{meta['heldout']['samples']} x {meta['heldout']['seq_len']} other blocks of the same "
        "text. Evaluation: "
        + ", ".join(
            f"{k} = `{v['source']}` {v['samples']} x {v['seq_len']} (seed {v['seed']})"
            for k, v in meta["evaluation"].items()
        )
        + ".  ",
        (
            ""
            if len(meta["bridge_fit_data"]) == 1
            else "Bridge fitted on "
            + " + ".join(
                f"{v['samples']} x {v['seq_len']} of `{v['source']}`"
                for v in meta["bridge_fit_data"]
            )
            + ".  "
        )
        + f"Bridge: method `{meta['bridge']['method']}`, ridge {meta['bridge']['ridge']} (toward "
        "the identity), first token skipped, folded into the preceding kept layer's "
        "down_proj; no training anywhere in this table.",
        "",
        (
            f"Dense: Austen {_fmt(d['austen'])}, tech {_fmt(d['tech'])}, held-out calibration "
            f"{_fmt(d['heldout_calibration'])}."
        ),
        "",
        "Gap closed = (pruned - bridged) / (pruned - dense) on the same layer set.",
        "",
        (
            "| drop | strategy | layers | Austen pruned | Austen + bridge | gap closed | "
            "tech pruned | tech + bridge | gap closed | held-out calib. pruned / + bridge | "
            "bridge fit error (identity) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, b, g = r["plain"], r["bridged"], r["gap_closed"]
        fits = "; ".join(
            f"{_ranges(x['layers'])}: {x['fit_error']:.2f} ({x['identity_error']:.2f})"
            if x["fit_error"] is not None
            else f"{_ranges(x['layers'])}: none"
            for x in (r["bridge"] or [])
        )
        lines.append(
            f"| {r['drop']} | {r['strategy']} | {_ranges(r['layers'])} | {_fmt(p['austen'])} | "
            f"{_fmt(b['austen'])} | {_pct(g['austen'])} | {_fmt(p['tech'])} | "
            f"{_fmt(b['tech'])} | {_pct(g['tech'])} | {_fmt(p['heldout_calibration'])} / "
            f"{_fmt(b['heldout_calibration'])} | {fits} |"
        )
    lines += [
        "",
        (
            "`auto (x)` is the unbridged automatic choice, `auto+bridge (x)` the choice "
            "made on bridged held-out perplexity; x names the candidate(s) it picked."
        ),
        "",
    ]
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def rewrite_markdown(json_path: str | Path) -> None:
    """Regenerate the .md beside a results .json (after a format change)."""
    data = json.loads(Path(json_path).read_text())
    Path(json_path).with_suffix(".md").write_text(_markdown(data["meta"], data["rows"]))


if __name__ == "__main__":
    raise SystemExit(main())
