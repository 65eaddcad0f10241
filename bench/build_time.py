"""How far each stage of a finished build is from the cost of its own arithmetic.

    python bench/build_time.py OUT [--results bench/results] [--name build_time]

OUT is a finished ``shrink build`` folder: its report.json gives each stage's wall seconds and
settings, OUT/model/config.json the model's shapes. Per stage this computes the floating-point
work the stage must do (the formula is written beside each number), measures this machine's
float32 matmul rate on the model's own shapes in the same run, and reports the floor (FLOPs /
rate) and the ratio wall / floor, with the load average before and after the measurement.
Writes RESULTS/NAME.md and RESULTS/NAME.json.
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

GUARD_LEN = 256
GUARD_TOKENS = 4 * GUARD_LEN  # the quality guard's fixed blocks (shrink.core.guard)
AUTO_HELDOUT_SAMPLES = 8  # held-out blocks per auto candidate (shrink.stages.prune)
AUTO_CANDIDATES = 3  # bi, angular, relmag (shrink.stages.auto.DEFAULT_CANDIDATES)
# the GGUF check in a fresh process (shrink.runtime.gguf.verify_gguf's defaults): one 256-token
# block through llama.cpp and PyTorch for the logit comparison, and perplexity on 4 x 256 tokens
# in llama.cpp unless it measured the evaluation sets instead
RATE_ROUNDS = 8  # matmul-rate measurements; the best one sets the floor
GGUF_CHECK_LEN = 256
GGUF_CHECK_BLOCK_TOKENS = 2 * GGUF_CHECK_LEN
GGUF_VERIFY_TOKENS = 4 * GGUF_CHECK_LEN + GGUF_CHECK_BLOCK_TOKENS


def shapes(cfg: dict) -> dict:
    """Per-layer linear shapes (d_in, d_out) and the LM head of a Llama-style config."""
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or d // H
    linears = {
        "q_proj": (d, H * hd),
        "k_proj": (d, kv * hd),
        "v_proj": (d, kv * hd),
        "o_proj": (H * hd, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    return {
        "d": d,
        "f": f,
        "vocab": V,
        "linears": linears,
        "layer_params": sum(i * o for i, o in linears.values()),
        "head_params": d * V,
        "attn_width": H * hd,
    }


def forward_params(s: dict, layers: int, head: bool = True) -> int:
    return layers * s["layer_params"] + (s["head_params"] if head else 0)


def attention(s: dict, layers: int, n: int) -> int:
    """Causal attention's FLOPs per token of an n-token block, forward: position t multiplies
    its query by t keys and t values (2 t W each, W = heads x head_dim), t = 1..n on average
    (n + 1) / 2, in every layer."""
    return layers * 2 * (n + 1) * s["attn_width"]


def forward(s: dict, layers: int, n: int, head: bool = True) -> int:
    """FLOPs per token of a forward pass over n-token blocks: 2 P + A(n)."""
    return 2 * forward_params(s, layers, head) + attention(s, layers, n)


def _tokens(section: dict | None, samples_key: str = "samples") -> int:
    section = section or {}
    return int(section.get(samples_key) or 0) * int(section.get("seq_len") or 0)


def stage_flops(report: dict, s: dict, prune_record: dict | None = None) -> dict[str, dict]:
    """{stage: {"flops": F, "formula": text}} for the stages the build ran. ``prune_record``:
    the prune stage's record in the output's shrink.json (auto's candidates are in it)."""
    st = report.get("settings") or {}
    L0, L1 = report["num_layers"]
    ev = st.get("evaluate") or {}
    n_eval = int(ev.get("seq_len") or 0)
    T_eval = _tokens(ev) * (2 if ev.get("second", "tech:evaluation") else 1)
    out: dict[str, dict] = {}
    p = st.get("prune") or {}
    if p:
        n = int(p.get("seq_len") or 0)
        T_cal = _tokens(p)
        T_held = AUTO_HELDOUT_SAMPLES * n
        body = forward(s, L0, n, head=False)
        f = body * T_cal + (forward(s, L0, GUARD_LEN) + forward(s, L1, GUARD_LEN)) * GUARD_TOKENS
        formula = "F_dense T_cal (scoring, no head) + (F_dense + F_pruned) T_guard"
        if p.get("strategy") == "auto":
            f += AUTO_CANDIDATES * forward(s, L1, n) * T_held
            formula += f" + {AUTO_CANDIDATES} x F_pruned T_held (candidates)"
        if p.get("bridge") in ("linear", "auto"):
            f += body * T_cal
            formula += " + F_dense T_cal (the dense pass the bridge fits read)"
        walks = candidate_bridge_walks(prune_record or {})
        if walks:
            layer = forward(s, 1, n, head=False)
            f += walks * layer * T_cal
            formula += (
                f" + {walks} layer passes x F_layer T_cal (the auto candidates' bridge fits, "
                "each walking its bridged layers)"
            )
        out["prune"] = {"flops": f, "formula": formula}
    h = st.get("heal") or {}
    if h:
        T = (
            int(h.get("steps") or 0)
            * int(h.get("batch_size") or 0)
            * int(h.get("grad_accum") or 1)
            * int(h.get("seq_len") or 0)
        )
        r = int(h.get("rank") or 8)
        lora = L1 * sum(
            r * (i + o)
            for n, (i, o) in s["linears"].items()
            if n in ("gate_proj", "up_proj", "down_proj")
        )
        n = int(h.get("seq_len") or 0)
        train = 4 * forward_params(s, L1) + 2 * lora + 3 * attention(s, L1, n)
        f = train * T + 2 * forward(s, L1, n_eval) * T_eval
        out["heal"] = {
            "flops": f,
            "formula": "(4 P_pruned + 2 P_lora + 3 A) T_train + 2 F_pruned T_eval (before, after)",
        }
    q = st.get("quantize") or {}
    if q:
        T = _tokens(q)
        hess = sum(2 * i * i * T + i**3 + 2 * o * i * i for i, o in s["linears"].values()) * L1
        f = 2 * forward(s, L1, int(q.get("seq_len") or 0), head=False) * T + hess
        out["quantize"] = {
            "flops": f,
            "formula": "2 F_layers T_cal (inputs, outputs) + per "
            "linear (2 d_in^2 T_cal + d_in^3 + "
            "2 d_out d_in^2)",
        }
    g = (report.get("export") or {}).get("gguf")
    if g:
        out["export"] = _gguf_flops(g, s, (L0, L1), n_eval)
    if ev:
        n = _measured_by_evaluate(report)
        f = sum(forward(s, L0 if label == "dense" else L1, n_eval) * T_eval for label in n)
        out["evaluate"] = {
            "flops": f,
            "formula": f"F T_eval for each of {', '.join(n) or 'none'}",
        }
    return out


def candidate_bridge_walks(prune_record: dict) -> int:
    """Layer passes over the calibration blocks that ``--strategy auto`` spends fitting its
    candidates' bridges (shrink.core.bridge.apply_bridges with the dense states recorded): the
    first run's kept layer k once, then for each later run the kept layers from the previous
    run's k (again, now with its bridge folded in) up to this run's k. The winner's fits are
    reused by the prune, so every candidate counts once."""
    auto = (prune_record.get("calibration") or {}).get("auto") or {}
    total = 0
    for c in auto.get("candidates") or []:
        removed = set(c.get("layers") or [])
        ks = sorted(
            r["folded_into"] for r in c.get("bridge") or [] if r.get("folded_into") is not None
        )
        if not ks:
            continue
        total += 1
        for prev, k in zip(ks, ks[1:]):
            total += sum(1 for i in range(prev, k + 1) if i not in removed)
    return total


def _gguf_flops(g: dict, s: dict, layers: tuple[int, int], n_eval: int) -> dict:
    """The forward passes of a GGUF export: its importance matrix (unless cached), the check in
    a fresh process, and the dense comparison's work done in this build (its file and its
    measurement are cached across builds). llama.cpp's own quantization search is not in it."""
    L0, L1 = layers
    im = g.get("imatrix") or {}
    n_im = int(im.get("seq_len") or GGUF_CHECK_LEN)
    T_im = 0 if im.get("cached") else int(im.get("tokens") or 0)
    comparison = g.get("comparison") or {}
    this = (comparison.get("this") or {}).get("work") or {}
    dense = (comparison.get("dense") or {}).get("work") or {}
    # a check that measured the evaluation sets did not measure its own blocks
    T_verify = GGUF_CHECK_BLOCK_TOKENS if this.get("in_check") else GGUF_VERIFY_TOKENS
    f = forward(s, L1, n_im) * T_im + forward(s, L1, GGUF_CHECK_LEN) * T_verify
    formula = "F_pruned (T_imatrix + T_verify)"
    if this.get("measured_tokens"):
        f += forward(s, L1, n_eval) * this["measured_tokens"]
        formula += " + F_pruned T_eval (the file in llama.cpp)"
    if dense:
        f += forward(s, L0, n_im) * dense.get("imatrix_tokens", 0)
        f += forward(s, L0, n_eval) * dense.get("measured_tokens", 0)
        formula += (
            f" + F_dense (T_imatrix + T_eval) for the dense comparison (done now: "
            f"{dense.get('imatrix_tokens', 0)} + {dense.get('measured_tokens', 0)} tokens)"
        )
    return {"flops": f, "formula": formula}


def _measured_by_evaluate(report: dict) -> list[str]:
    """The artifacts the evaluate stage computed (the perplexity book's ledger when the report
    has one; else every row)."""
    rows = list((report.get("perplexity") or {}).keys())
    ledger = (report.get("perplexity_book") or {}).get("ledger")
    if ledger is None:
        return rows
    paths = {
        row.get("path"): label
        for label, row in (report.get("perplexity") or {}).items()
        if isinstance(row, dict)
    }
    done = {paths.get(r["what"], r["what"]) for r in ledger if r.get("by") == "evaluate"}
    return [label for label in rows if label in done]


def matmul_rate(s: dict, rows: int = 1024, seconds: float = 0.5) -> dict:
    """float32 matmul FLOP/s on the model's shapes: a batch of ``rows`` tokens through every
    linear of a layer and the LM head, each product timed best-of over about ``seconds``."""
    flops = spent = 0.0
    per = {}
    for name, (i, o) in list(s["linears"].items()) + [("lm_head", (s["d"], s["vocab"]))]:
        a, b = torch.randn(rows, i), torch.randn(i, o)
        a @ b
        best, used = float("inf"), 0.0
        while used < seconds / 8 or best == float("inf"):
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            best, used = min(best, dt), used + dt
        f = 2.0 * rows * i * o
        per[name] = round(f / best / 1e9, 2)
        flops, spent = flops + f, spent + best
    return {
        "flops_per_second": flops / spent,
        "per_shape_gflops": per,
        "rows": rows,
        "threads": torch.get_num_threads(),
    }


def best_rate(s: dict, rounds: int = RATE_ROUNDS) -> dict:
    """:func:`matmul_rate` ``rounds`` times; the best one, with every round's figure. On a shared
    machine consecutive rounds differ by up to 40% (171 to 241 GFLOP/s within a few seconds on
    a 2-core VM): the best is what the machine can do, so the floor it gives is the lowest one
    and the ratio the least flattering."""
    runs = [matmul_rate(s) for _ in range(rounds)]
    best = max(runs, key=lambda r: r["flops_per_second"])
    return {**best, "rounds_gflops": [round(r["flops_per_second"] / 1e9, 1) for r in runs]}


def analyse(out_dir: Path) -> dict:
    report = json.loads((out_dir / "report.json").read_text())
    cfg = json.loads((out_dir / "model" / "config.json").read_text())
    record = out_dir / "model" / "shrink.json"
    stages = json.loads(record.read_text()).get("stages") or [] if record.is_file() else []
    prune_record = next((x for x in stages if x.get("stage") == "prune"), None)
    s = shapes(cfg.get("text_config") or cfg)
    load_before = os.getloadavg()
    rate = best_rate(s)
    load_after = os.getloadavg()
    flops = stage_flops(report, s, prune_record)
    rows = []
    for st in report.get("stages", []):
        wall = float(st.get("seconds") or 0.0)
        f = flops.get(st["name"])
        floor = f["flops"] / rate["flops_per_second"] if f else None
        rows.append(
            {
                "stage": st["name"],
                "wall_s": round(wall, 1),
                "flops": f["flops"] if f else None,
                "formula": f["formula"]
                if f
                else "no floating-point floor modelled (conversion and I/O)",
                "floor_s": round(floor, 2) if floor is not None else None,
                "ratio": round(wall / floor, 2) if floor else None,
                "skipped": st.get("skipped", False),
            }
        )
    total_wall = sum(r["wall_s"] for r in rows)
    total_floor = sum(r["floor_s"] or 0.0 for r in rows)
    return {
        "build": str(out_dir),
        "stages": rows,
        "total_wall_s": round(total_wall, 1),
        "total_floor_s": round(total_floor, 2),
        "ratio": round(total_wall / total_floor, 2) if total_floor else None,
        "matmul": rate,
        "load_average": {"before": load_before, "after": load_after},
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": "python " + " ".join(sys.argv),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(r: dict) -> str:
    m = r["matmul"]
    lines = [
        "# Build time against the arithmetic floor",
        "",
        f"Build: `{r['build']}`. Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"torch {r['machine']['torch']}. Command: `{r['command']}`.",
        "",
        f"Matmul rate measured in this run on the model's own shapes ({m['rows']} tokens x each "
        f"linear and the LM head, float32, {m['threads']} threads), the best of "
        f"{len(m.get('rounds_gflops') or [1])} rounds "
        f"({', '.join(str(x) for x in m.get('rounds_gflops') or [])} GFLOP/s): "
        f"**{m['flops_per_second'] / 1e9:.1f} GFLOP/s**. Load average (1, 5, 15 min) before "
        f"{_load(r['load_average']['before'])}, after {_load(r['load_average']['after'])}.",
        "",
        "| stage | wall s | FLOPs | floor s | wall / floor | formula |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in r["stages"]:
        lines.append(
            f"| {s['stage']}{' (resumed)' if s['skipped'] else ''} | {s['wall_s']} | "
            f"{_e(s['flops'])} | {s['floor_s'] if s['floor_s'] is not None else '-'} | "
            f"{s['ratio'] if s['ratio'] is not None else '-'} | {s['formula']} |"
        )
    lines += [
        f"| **total** | {r['total_wall_s']} | | {r['total_floor_s']} | {r['ratio']} | |",
        "",
        "P: weights of the linear layers a token passes (LM head included unless "
        "noted), T: tokens. A: causal attention per token of an n-token block, "
        "2 (n + 1) x heads x head_dim per layer. F = 2 P + A: one forward token. The floor "
        "is the arithmetic alone at the measured matmul rate; loading, saving, process "
        "starts, elementwise work, llama.cpp's quantization search and conversion are "
        "not in it.",
        "",
    ]
    return "\n".join(lines)


def _e(x) -> str:
    return f"{x:.3g}" if x is not None else "-"


def _load(v) -> str:
    return ", ".join(f"{x:.2f}" for x in v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a finished shrink build folder")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="build_time")
    a = ap.parse_args(argv)
    if not (a.out / "report.json").is_file():
        print(f"error: {a.out} has no report.json (not a finished build)", file=sys.stderr)
        return 2
    r = analyse(a.out)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / f"{a.name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (a.results / f"{a.name}.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
