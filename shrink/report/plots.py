"""Pictures of layer scores: BI bar chart and the angular-distance heatmap (Gromov et al. style)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shrink.core.scores import LayerScores  # noqa: E402


def plot_scores(scores: LayerScores, path: str | Path, chosen: list[int] | None = None) -> Path:
    chosen = chosen or []
    L = scores.num_layers
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1]})
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
    im = ax2.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                    extent=(-0.5, L - 0.5, 0.5, L + 0.5))
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
    plt.close(fig)
    return path
