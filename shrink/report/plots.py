"""Pictures of layer scores: BI bar chart and the angular-distance heatmap (Gromov et al. style)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from shrink.core.scores import LayerScores

if TYPE_CHECKING:
    from shrink.stages.bench import BenchReport, SweepPoint


def _subplots(*args, figsize, **kw):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)


# Figures are drawn with matplotlib's object API (Figure, no pyplot): nothing global changes in
# the host program (no backend switch, no open figures left behind).


def plot_scores(scores: LayerScores, path: str | Path, chosen: list[int] | None = None) -> Path:
    chosen = chosen or []
    L = scores.num_layers
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1]})
    colors = ["tab:red" if i in chosen else "tab:blue" for i in range(L)]
    ax1.bar(range(L), scores.bi, color=colors)
    ax1.set_yscale("log")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("Block Influence  1 - cos(in, out)  (log)")
    title = f"{scores.model}: Block Influence"
    if chosen:
        title += f" (red: {len(chosen)} removed)"
    ax1.set_title(title)
    grid = np.full((L, L), np.nan)
    for n in range(1, L + 1):
        row = scores.angular[n - 1]
        grid[n - 1, : len(row)] = row
    im = ax2.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis", extent=(-0.5, L - 0.5, 0.5, L + 0.5)
    )
    best = [int(np.nanargmin(grid[n - 1])) for n in range(1, L + 1)]
    ax2.plot(best, range(1, L + 1), "r.", markersize=5, label="argmin over l (best block)")
    ax2.set_xlabel("first layer of the block, l")
    ax2.set_ylabel("block size n")
    ax2.set_title("angular distance d(x_l, x_l+n) / pi, last token")
    ax2.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_losses(losses: list[dict], path: Path, title: str) -> Path:

    fig, ax = _subplots(figsize=(7, 4))
    steps = [r["step"] for r in losses]
    ax.plot(steps, [r["loss"] for r in losses], label="training loss", color="tab:blue", lw=1)
    if any("lm_loss" in r for r in losses) and any("kd_loss" in r for r in losses):
        ax.plot(
            steps,
            [r.get("lm_loss") for r in losses],
            label="LM loss",
            color="tab:green",
            lw=0.8,
            alpha=0.7,
        )
        ax.plot(
            steps,
            [r.get("kd_loss") for r in losses],
            label="KD loss (T^2 KL)",
            color="tab:orange",
            lw=0.8,
            alpha=0.7,
        )
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        vals = [r["loss"] for r in losses]
        smooth = [
            sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1])
            for i in range(len(vals))
        ]
        ax.plot(steps, smooth, color="black", lw=1.5, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_bench(report: BenchReport, path: str | Path) -> Path:

    def label(r) -> str:
        name = r.name if len(r.name) < 28 else "..." + r.name[-25:]
        return name + (f" @{r.threads}t" if r.threads else "")

    names = [label(r) for r in report.results]
    fig, axes = _subplots(1, 3, figsize=(14, 4))
    vals = [
        ("decode tokens/s", [r.median["decode_tokens_per_s"] for r in report.results]),
        ("peak RSS (MB)", [r.median["peak_rss_bytes"] / 2**20 for r in report.results]),
        ("size on disk (MB)", [r.size_bytes / 1e6 for r in report.results]),
    ]
    for ax, (title, v) in zip(axes, vals):
        ax.bar(range(len(v)), v, color=["tab:gray"] + ["tab:blue"] * (len(v) - 1))
        ax.set_xticks(range(len(v)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_sweep(points: list[SweepPoint], path: str | Path, model: str = "") -> Path:

    x = [p.drop for p in points]
    fig, ax1 = _subplots(figsize=(7, 4.2))
    ax1.plot(x, [p.perplexity for p in points], "o-", color="tab:red", label="perplexity")
    ax1.set_yscale("log")
    ax1.set_xlabel("layers removed (lowest Block Influence)")
    ax1.set_ylabel("perplexity on held-out text (log)", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(
        x, [p.decode_tokens_per_s for p in points], "s--", color="tab:blue", label="decode tokens/s"
    )
    ax2.set_ylabel("decode tokens/s", color="tab:blue")
    ax1.set_title(f"{model}: quality and speed vs layers removed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
