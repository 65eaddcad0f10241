"""Results as tables: rich tables for the terminal, and the bench table as markdown. The CLI
prints them; bench's rich and markdown tables share one column list."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from shrink.analysis.estimate import Estimate
    from shrink.core.scores import LayerScores
    from shrink.stages.bench import ArtifactResult, BenchReport, SweepPoint
    from shrink.stages.build import BuildResult


def scores_table(scores: LayerScores, metric: str, chosen: list[int]) -> Table:
    """Per layer: BI, relative magnitude, perplexity increase, rank by ``metric``, removed."""
    table = Table(
        title=f"{scores.model}: layer scores ({scores.tokens} tokens, {scores.samples} samples)"
    )
    table.add_column("layer", justify="right")
    for col in ("BI", "relmag") + (("ppl +",) if scores.ppl is not None else ()):
        table.add_column(col, justify="right")
    table.add_column(f"rank ({metric})", justify="right")
    table.add_column("removed")
    if metric == "angular":
        rank = {i: None for i in range(scores.num_layers)}
    else:
        vals = scores.values(metric)
        order = sorted(range(len(vals)), key=lambda i: (vals[i], i))
        rank = {layer: r + 1 for r, layer in enumerate(order)}
    for i in range(scores.num_layers):
        row = [str(i), f"{scores.bi[i]:.4f}", f"{scores.relmag[i]:.4f}"]
        if scores.ppl is not None:
            row.append(f"{scores.ppl[i]:+.3f}")
        row += [str(rank[i]) if rank[i] else "", "[bold red]x[/]" if i in chosen else ""]
        table.add_row(*row)
    return table


# ----------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class BenchColumn:
    """One column of the bench table: its title in the terminal and in markdown (None: not in
    that one) and its cell."""

    title: str | None
    markdown: str | None
    cell: Callable[[ArtifactResult], str]
    left: bool = False


def _ppl(r: ArtifactResult) -> str:
    ppl = r.median.get("perplexity")
    return "n/a" if ppl is None else f"{ppl:.2f}"


def _roofline(r: ArtifactResult) -> str:
    roof = r.median.get("roofline_fraction")
    return "-" if roof is None else f"{roof:.0%}"


def _load(r: ArtifactResult) -> str:
    load = r.median.get("load_avg_1m")
    return "-" if not load else f"{load[0]:.1f}-{load[1]:.1f}"


def _flops_ratio(r: ArtifactResult) -> str:
    return f"{r.ratios['flops_per_token'] if 'flops_per_token' in r.ratios else float('nan'):.3f}"


BENCH_COLUMNS = (
    BenchColumn("artifact", None, lambda r: Path(r.name).name or r.name, left=True),
    BenchColumn(None, "artifact", lambda r: r.name),
    BenchColumn("kind", "kind", lambda r: r.kind, left=True),
    BenchColumn("layers", "layers", lambda r: str(r.layers or "?")),
    BenchColumn("threads", "threads", lambda r: str(r.threads or "default")),
    BenchColumn("size MB", "size MB", lambda r: f"{r.size_bytes / 1e6:.0f}"),
    BenchColumn("TTFT ms", "TTFT ms", lambda r: f"{1000 * r.median['ttft_s']:.1f}"),
    BenchColumn("decode tok/s", "decode tok/s", lambda r: f"{r.median['decode_tokens_per_s']:.1f}"),
    BenchColumn(None, "prefill tok/s", lambda r: f"{r.median['prefill_tokens_per_s']:.0f}"),
    BenchColumn("roofline", "roofline", _roofline),
    BenchColumn(None, "cores busy", lambda r: f"{r.median.get('cores_busy', 0):.2f}"),
    BenchColumn(
        "peak RSS MB", "peak RSS MB", lambda r: f"{r.median['peak_rss_bytes'] / 2**20:.0f}"
    ),
    BenchColumn("ppl", "perplexity", _ppl),
    BenchColumn(
        "GFLOP/tok",
        "GFLOP/token",
        lambda r: "?" if r.flops_per_token is None else f"{r.flops_per_token / 1e9:.3f}",
    ),
    BenchColumn("decode x", "decode x", lambda r: f"{r.ratios.get('decode_tokens_per_s', 1):.2f}"),
    BenchColumn(None, "FLOPs x", _flops_ratio),
    BenchColumn(None, "load", _load),
    BenchColumn("size x", None, lambda r: f"{r.ratios['size_bytes']:.2f}"),
)


def bench_table(report: BenchReport, settings: dict) -> Table:
    """The terminal table of ``shrink bench``: medians and ratios to the baseline."""
    s = settings
    table = Table(
        title=f"benchmark ({s['device']}, prompt {s['prompt_len']}, generate "
        f"{s['gen_len']}, batch {s['batch']}, {s['repeats']} repeats, medians; "
        f"ppl on austen:evaluation, {s['ppl_samples']} x 256 tokens, seed 0; "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    columns = [c for c in BENCH_COLUMNS if c.title is not None]
    for c in columns:
        table.add_column(c.title, justify="left" if c.left else "right")
    for r in report.results:
        table.add_row(*(c.cell(r) for c in columns))
    return table


def bench_markdown(report: BenchReport) -> str:
    """The bench table as markdown, with the settings and the measured memory bandwidth."""
    s = report.settings
    lines = [
        f"Device {s['device']}, prompt {s['prompt_len']} tokens, {s['gen_len']} generated, "
        f"batch {s['batch']}, {s['repeats']} interleaved repeats (medians); ratios are to "
        f"`{report.baseline}` at the same thread count.",
        "",
    ]
    for t, bw in report.bandwidth.items():
        lines.append(
            f"- memory bandwidth, {t} thread(s): "
            f"{bw['read_bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']})"
        )
    if report.bandwidth:
        lines.append("")
    columns = [c for c in BENCH_COLUMNS if c.markdown is not None]
    lines += ["| " + " | ".join(c.markdown for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in report.results:
        lines.append("| " + " | ".join(c.cell(r) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(points: list[SweepPoint], model: str) -> Table:
    """``shrink bench --sweep-drop``: perplexity and speed per number of layers removed."""
    table = Table(title=f"{model}: layers removed by BI")
    for col in (
        "drop",
        "perplexity",
        "decode tok/s",
        "prefill tok/s",
        "GFLOP/token",
        "speedup",
        "ideal (FLOPs)",
    ):
        table.add_column(col, justify="right")
    base = points[0]
    for p in points:
        ideal = (base.flops_per_token / p.flops_per_token) if p.flops_per_token else None
        table.add_row(
            str(p.drop),
            f"{p.perplexity:.2f}",
            f"{p.decode_tokens_per_s:.1f}",
            f"{p.prefill_tokens_per_s:.0f}",
            f"{p.flops_per_token / 1e9:.3f}" if p.flops_per_token else "?",
            f"{p.decode_tokens_per_s / base.decode_tokens_per_s:.2f}",
            f"{ideal:.2f}" if ideal else "?",
        )
    return table


# ----------------------------------------------------------------------------- build


def build_table(result: BuildResult) -> Table:
    """Per stage of a build: ran or resumed, and its seconds."""
    table = Table(title=f"shrink build -> {result.output}")
    for col in ("stage", "status", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for st in result.stages:
        table.add_row(
            st.name, "resumed (done earlier)" if st.skipped else "ran", f"{st.seconds:.1f}"
        )
    return table


# ----------------------------------------------------------------------------- estimate


def count(n: float) -> str:
    """A parameter count: 1.234 B, 12.3 M or 1,234."""
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,.0f}"


def gigabytes(n_bytes: float) -> str:
    from shrink.analysis.estimate import GB

    return f"{n_bytes / GB:.2f} GB"


def gflops(n: float) -> str:
    return f"{n / 1e9:.2f} GFLOP"


def estimate_tables(est: Estimate) -> list[Table]:
    """``shrink estimate``: parameters, memory, FLOPs per token and the GPU roofline."""
    return [_parameters_table(est), _memory_table(est), _flops_table(est), _gpu_table(est)]


def _parameters_table(est: Estimate) -> Table:
    p = est.params
    table = Table(title="Parameters")
    for col in ("part", "params", "share"):
        table.add_column(col, justify="left" if col == "part" else "right")
    parts = [
        ("embedding", p.embedding),
        ("attention", p.attention),
        ("MLP", p.mlp),
        ("norms", p.norms),
        ("head" + (" (tied)" if est.shape.tied else ""), p.head),
    ]
    for name, value in parts:
        table.add_row(name, count(value), f"{value / p.total:.1%}")
    table.add_row("[bold]total[/]", f"[bold]{count(p.total)}[/]", "100%")
    table.add_row("per layer", count(p.per_layer), f"{p.per_layer / p.total:.1%}")
    return table


def _memory_table(est: Estimate) -> Table:
    w = est.weights
    table = Table(title="Memory (GB = 1e9 bytes)")
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_row(
        f"attention + MLP weights ({w.bits_per_linear_weight:.2f} bits/weight)",
        gigabytes(w.linear_bytes),
    )
    table.add_row("embedding, head, norms, biases (16-bit)", gigabytes(w.other_bytes))
    table.add_row("[bold]weights[/]", f"[bold]{gigabytes(w.total_bytes)}[/]")
    table.add_row(
        f"KV cache fp16 ({est.context} tokens x {est.batch})", gigabytes(est.kv_cache_bytes)
    )
    table.add_row(
        "[bold]weights + KV cache[/]", f"[bold]{gigabytes(w.total_bytes + est.kv_cache_bytes)}[/]"
    )
    return table


def _flops_table(est: Estimate) -> Table:
    f = est.flops
    table = Table(title="Forward FLOPs per token")
    table.add_column("part")
    table.add_column("FLOPs", justify="right")
    table.add_row("matmul 2*(L*(attn+MLP) + d*V)", gflops(f.matmul))
    table.add_row(f"attention over context 4*L*h*d_h*{f.context}", gflops(f.attention))
    table.add_row("[bold]total[/]", f"[bold]{gflops(f.total)}[/]")
    return table


def _gpu_table(est: Estimate) -> Table:
    table = Table(title="GPUs (roofline: upper bounds)")
    for col in ("GPU", "memory", "usable", "needed", "fits", "decode tok/s", "prefill tok/s"):
        table.add_column(col, justify="left" if col in ("GPU", "fits") else "right")
    for g in est.gpus:
        prefill = "n/a" if g.prefill_tokens_per_s is None else f"{g.prefill_tokens_per_s:,.0f}"
        table.add_row(
            g.gpu,
            f"{g.memory_gb:g} GB",
            f"{g.usable_gb:.1f} GB",
            f"{g.needed_gb:.2f} GB",
            "[green]yes[/]" if g.fits else "[red]no[/]",
            f"{g.decode_tokens_per_s:,.1f}",
            prefill,
        )
    return table


# ----------------------------------------------------------------------------- claims

VERDICT_COLORS = {"holds": "green", "approximately": "yellow", "wrong": "red"}


def claims_table(checks: list) -> Table:
    """``shrink claims``: each paper claim, stated vs exact, and the verdict."""
    from shrink.analysis.claims import format_exact, format_stated

    table = Table(title="Paper claims vs exact arithmetic")
    for col in ("#", "claim", "stated", "exact", "stated/exact", "verdict"):
        table.add_column(col, justify="left" if col in ("claim", "verdict") else "right")
    for i, c in enumerate(checks, 1):
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        color = VERDICT_COLORS[c.verdict]
        table.add_row(
            str(i), c.claim, format_stated(c), format_exact(c), ratio, f"[{color}]{c.verdict}[/]"
        )
    return table
