"""Healing benchmark: which healing method repairs a pruned SmolLM2-135M best, on two domains.

Prune once (default: 6 of 30 layers, ``--strategy auto --bridge linear`` scored and fitted on
``austen:calibration+tech:calibration``), then heal the pruned model with each method through
the real ``heal`` stage, and, as controls, give the dense model the same fine-tune (the dense
model gains from a fine-tune on the healing text too: that part of a "healing" gain is domain
adaptation, not repair). Every model is measured on the fixed evaluation blocks of both domains
(Persuasion and CPython's reference docs, 8 x 512 tokens, seed 0). Gap closed = (pruned -
healed) / (pruned - dense); "vs control" is healed / (dense + the same fine-tune).

    PYTHONPATH=. python bench/healing.py          # writes bench/results/healing.md and .json

A run is one ``--runs`` entry, ``METHOD@DATA`` (``lora``, ``distill`` = LoRA plus KL to the dense
model, ``last-layers``), optionally ``:lr=...`` and ``:control`` (heal the dense model instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIXED = "austen:healing+tech:calibration"
DEFAULT_RUNS = [
    f"lora@{MIXED}",
    f"last-layers@{MIXED}",
    f"distill@{MIXED}",
    f"lora@{MIXED}:control",
    f"last-layers@{MIXED}:control",
    "lora@austen:healing",
    f"last-layers@{MIXED}:lr=3e-4",
]
LR = {"lora": 1e-3, "distill": 1e-3, "last-layers": 1e-4}


def parse_run(text: str) -> dict:
    head, *opts = text.split(":lr=") if ":lr=" in text else [text]
    control = text.endswith(":control")
    head = head.removesuffix(":control")
    method, data = head.split("@", 1)
    lr = float(opts[0].removesuffix(":control")) if opts else LR[method]
    return {"method": method, "data": data, "lr": lr, "control": control}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drop", type=int, default=6)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--bridge", default="linear")
    ap.add_argument("--prune-data", default="austen:calibration+tech:calibration")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--last-layers", type=int, default=2)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/shrink-bench-healing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "healing"))
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of an earlier run in --out and its pruned model",
    )
    a = ap.parse_args()

    import torch

    from shrink.core.models import EMBEDDED, ensure_embedded
    from shrink.stages.configs import EvaluateConfig, HealConfig, PruneConfig
    from shrink.stages.heal import heal
    from shrink.stages.prune import prune

    torch.set_num_threads(a.threads)
    command = "PYTHONPATH=. python bench/healing.py " + " ".join(sys.argv[1:])
    t_start = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = str(ensure_embedded())
    evaluation = EvaluateConfig()  # the fixed set, both domains
    t0 = time.perf_counter()
    out = Path(a.out)
    rows: list[dict] = []
    if a.append:  # the same pruned model: earlier rows stay comparable
        earlier = json.loads(out.with_suffix(".json").read_text())
        rows, prune_info = earlier["rows"], earlier["meta"]["prune"]
        command = earlier["meta"]["command"] + "; then " + command
        t_start -= earlier["meta"]["seconds"]
    else:
        pconf = PruneConfig(drop=a.drop, strategy=a.strategy, bridge=a.bridge, data=a.prune_data)
        pr = prune(EMBEDDED, work / "pruned", pconf, force=True, verify=False, show_progress=False)
        prune_info = {
            "config": pconf.settings(),
            "removed": pr.removed,
            "strategy": pr.strategy,
            "bridge": pr.bridge,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"pruned {pr.removed} ({pr.strategy}) in {prune_info['seconds']} s", flush=True)

    first = len(rows)
    for i, text in enumerate(a.runs, start=first):
        run = parse_run(text)
        source = dense if run["control"] else str(work / "pruned")
        conf = HealConfig(
            method="lora" if run["method"] == "distill" else run["method"],
            rank=a.rank,
            targets="mlp",
            steps=a.steps,
            batch_size=a.batch_size,
            seq_len=a.seq_len,
            lr=run["lr"],
            warmup=max(1, a.steps // 10),
            data=run["data"],
            seed=0,
            last_layers=a.last_layers if run["method"] == "last-layers" else None,
            teacher=dense if run["method"] == "distill" else None,
        )
        r = heal(
            source,
            work / f"run{i}",
            conf,
            evaluation=evaluation,
            force=True,
            verify=False,
            show_progress=False,
        )
        row = {
            "run": text,
            **run,
            "before": [r.ppl_before, r.ppl_before_second],
            "after": [r.ppl_after, r.ppl_after_second],
            "final_loss": r.final_loss,
            "train_seconds": r.settings.get("train_seconds"),
            "seconds": round(r.seconds, 1),
            "trainable_params": r.settings.get("trainable_params"),
            "epochs": r.settings.get("epochs"),
        }
        rows.append(row)
        print(
            f"{text}: austen {r.ppl_before:.2f} -> {r.ppl_after:.2f}, tech "
            f"{r.ppl_before_second:.2f} -> {r.ppl_after_second:.2f} ({r.seconds:.0f} s)",
            flush=True,
        )
        meta = {
            "command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "threads": a.threads,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.perf_counter() - t_start),
            "prune": prune_info,
            "evaluation": [evaluation.name(), evaluation.name(evaluation.second)],
            "heal": {
                "steps": a.steps,
                "batch_size": a.batch_size,
                "seq_len": a.seq_len,
                "rank": a.rank,
                "last_layers": a.last_layers,
                "targets": "mlp",
                "kd_alpha": 0.5,
                "kd_temperature": 2.0,
                "schedule": "cosine",
                "warmup": max(1, a.steps // 10),
            },
            "complete": i == first + len(a.runs) - 1,
        }
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(meta, rows))
    return 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    pruned = next((r["before"] for r in rows if not r["control"]), [None, None])
    dense = next((r["before"] for r in rows if r["control"]), [None, None])
    controls = {(r["method"], r["data"]): r["after"] for r in rows if r["control"]}
    h, p = meta["heal"], meta["prune"]
    lines = [
        "# Healing a pruned SmolLM2-135M: LoRA, distillation, last layers, on two domains",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, load "
        f"average at the end {meta['loadavg_at_end']}; {meta['seconds']} s in all"
        + ("" if meta["complete"] else " (incomplete: the rows below ran)")
        + ".  ",
        f"Pruned model: {p['config'].get('drop')} layers by `{p['strategy']}` "
        f"(asked: `{p['config'].get('strategy')}`), bridge `{p['config'].get('bridge')}`, scored"
        f" and fitted on `{p['config'].get('data')}`; removed {p['removed']}.  ",
        f"Healing: {h['steps']} steps x batch {h['batch_size']} x {h['seq_len']} tokens, AdamW, "
        f"cosine, {h['warmup']} warm-up steps, seed 0. LoRA: rank {h['rank']}, alpha = rank, MLP "
        f"only. distill: the same LoRA with KL to the dense model (kd_alpha {h['kd_alpha']}, T "
        f"{h['kd_temperature']}). last-layers: the LM head (tied to the embeddings in SmolLM2) "
        f"and the last {h['last_layers']} layers trained in full, no adapter.  ",
        f"Evaluation: `{meta['evaluation'][0]}` and `{meta['evaluation'][1]}` (never trained or "
        "calibrated on).",
        "",
        f"Dense: Austen {_f(dense[0])}, tech {_f(dense[1])}. Pruned, unhealed: Austen "
        f"{_f(pruned[0])}, tech {_f(pruned[1])}.",
        "",
        "| method | healing text | LR | Austen | tech | gap closed (Austen / tech) | x dense "
        "(Austen / tech) | x dense + same fine-tune | trainable | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["after"]
        label = r["method"] + (" (control: dense)" if r["control"] else "")
        if r["control"]:
            gap = "-"
            ctrl = "-"
        else:
            gap = " / ".join(
                f"{(pruned[k] - a[k]) / (pruned[k] - dense[k]):.0%}"
                if None not in (pruned[k], dense[k]) and pruned[k] != dense[k]
                else "-"
                for k in (0, 1)
            )
            c = controls.get(("lora" if r["method"] == "distill" else r["method"], r["data"]))
            ctrl = " / ".join(f"{a[k] / c[k]:.2f}" for k in (0, 1)) if c else "-"
        xd = " / ".join(f"{a[k] / dense[k]:.2f}" for k in (0, 1)) if dense[0] else "-"
        lines.append(
            f"| {label} | `{r['data']}` | {r['lr']:g} | {_f(a[0])} | {_f(a[1])} | {gap} | {xd} | "
            f"{ctrl} | {r['trainable_params'] / 1e6:.1f} M | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "Controls are the dense model given the same fine-tune: the lowest numbers a "
        "healed model of the same text could be expected to reach.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
