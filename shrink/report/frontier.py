"""Render a measured frontier: markdown table, JSON, and plots of perplexity against bytes and
against decode tokens/s, with the Pareto front drawn and every point labelled."""

from __future__ import annotations

import json
import math
from pathlib import Path

from shrink.analysis.frontier import Point, front, mark_front

FAMILY_STYLE = {
    "dense": ("tab:blue", "o"),
    "dense-healed": ("tab:cyan", "s"),
    "pruned": ("tab:orange", "v"),
    "pruned-healed": ("tab:red", "^"),
}


def points_of(result: dict) -> list[Point]:
    return mark_front([Point.from_dict(d) for d in result["points"]])


def _ppl(p: Point, domain: str) -> str:
    v = p.ppl.get(domain)
    return f"{v:.2f}" if v is not None else "-"


def domains_of(points: list[Point]) -> list[str]:
    seen: list[str] = []
    for p in points:
        seen += [d for d in p.ppl if d not in seen]
    return seen


def pruning_verdicts(points: list[Point]) -> list[str]:
    """For every pruned point: the best dense quant-only file of the same size or smaller, and
    whether pruning beat it on both domains (pays), on one, or on none; for a healed point, the
    same against the dense model given the same fine-tune (the control), so that what the
    fine-tune did is not credited to pruning."""
    domains = domains_of(points)
    lines = []
    for p in sorted((q for q in points if q.drop > 0), key=lambda q: q.bytes):
        lines.append(_verdict(p, [d for d in points if d.family == "dense"], domains, ""))
        if p.healed and any(d.family == "dense-healed" for d in points):
            control = [d for d in points if d.family == "dense-healed"]
            lines.append(_verdict(p, control, domains, "fine-tuned dense control file"))
    return lines


def _verdict(p: Point, rivals: list[Point], domains: list[str], what: str) -> str:
    head = f"- {p.label} ({p.bytes / 1e6:.1f} MB)"
    fit = [d for d in rivals if d.bytes <= p.bytes]
    if not fit:
        smallest = min(rivals, key=lambda d: d.bytes)
        return (
            f"{head}: smaller than every {what or 'dense file'} measured (the smallest: "
            f"{smallest.label}, {smallest.bytes / 1e6:.1f} MB): pruning is the only road "
            "to this size here"
        )
    best = min(fit, key=lambda d: d.quality())
    wins = [d for d in domains if p.ppl.get(d, math.inf) < best.ppl.get(d, math.inf)]
    verdict = (
        "pays on both domains"
        if len(wins) == len(domains)
        else f"pays only on {', '.join(wins)}"
        if wins
        else "does not pay"
    )
    diff = ", ".join(
        f"{d} {p.ppl.get(d, math.nan):.2f} vs {best.ppl.get(d, math.nan):.2f}" for d in domains
    )
    return f"{head}: {verdict} against {best.label} ({best.bytes / 1e6:.1f} MB): {diff}"


def _mark(p: Point, axis: str) -> str:
    if axis == "speed" and not p.decode_tps:
        return "-"
    return "**yes**" if p.on_front(axis) else f"no: {p.dominated_by[axis]}"


def markdown(result: dict) -> str:
    points = points_of(result)
    domains = domains_of(points)
    head = (
        ["artifact", "format", "imatrix", "MB"]
        + [f"ppl {d}" for d in domains]
        + ["decode tok/s", "peak RSS MB", "front (size)", "front (speed)"]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda q: -q.bytes):
        cells = [p.label, p.format, "yes" if p.imatrix else "no", f"{p.bytes / 1e6:.1f}"]
        cells += [_ppl(p, d) for d in domains]
        cells += [
            f"{p.decode_tps:.1f}" if p.decode_tps else "-",
            f"{p.peak_rss / 1e6:.0f}" if p.peak_rss else "-",
            _mark(p, "bytes"),
            _mark(p, "speed"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    settings = result.get("settings", {})
    text = [
        f"# Frontier: {result['model']}",
        "",
        f"{result['layers']} layers; pruned depths {result['drops']}; CPU {result.get('cpu')}; "
        f"load average {', '.join(f'{x:.2f}' for x in result.get('load_average', []))}; "
        f"speed with {settings.get('threads')} thread(s), median of "
        f"{settings.get('repeats')} interleaved fresh-process runs; "
        f"{result.get('seconds', 0) / 60:.0f} min in all.",
        "",
        "Perplexity on the fixed evaluation sets (8 x 512 tokens each). A point is on the "
        "front when no other artifact is at least as small (or fast) and no worse on both "
        "domains; otherwise the table names one that dominates it.",
        "",
        *rows,
        "",
        "## Does pruning pay?",
        "",
        *pruning_verdicts(points),
        "",
    ]
    return "\n".join(text)


def plot(result: dict, path: str | Path, axis: str = "bytes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = points_of(result)
    if axis == "speed":
        points = [p for p in points if p.decode_tps]
        if not points:
            return
    domains = domains_of(points)
    fig, axes = plt.subplots(1, len(domains), figsize=(7 * len(domains), 5.5), squeeze=False)
    x = (lambda p: p.bytes / 1e6) if axis == "bytes" else (lambda p: p.decode_tps)
    line = front(points, axis)
    for ax, d in zip(axes[0], domains):
        for fam, (color, marker) in FAMILY_STYLE.items():
            fp = [p for p in points if p.family == fam and d in p.ppl]
            ax.scatter(
                [x(p) for p in fp],
                [p.ppl[d] for p in fp],
                c=color,
                marker=marker,
                label=fam,
                zorder=3,
                edgecolors=["black" if p.on_front(axis) else "none" for p in fp],
            )
        for p in points:
            if d in p.ppl:
                ax.annotate(
                    p.label, (x(p), p.ppl[d]), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        on = [p for p in line if d in p.ppl]
        ax.plot([x(p) for p in on], [p.ppl[d] for p in on], "k--", lw=1, label="front")
        ax.set_xlabel("size on disk (MB)" if axis == "bytes" else "decode tokens/s")
        ax.set_ylabel(f"perplexity ({d})")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(f"{result['model']}: {d}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_frontier(result: dict, out: Path) -> list[Path]:
    """frontier.json, frontier.md, frontier-size.png and frontier-speed.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("frontier.json", json.dumps(result, indent=1)),
        ("frontier.md", markdown(result)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written.append(out / name)
    for axis, name in (("bytes", "frontier-size.png"), ("speed", "frontier-speed.png")):
        plot(result, out / name, axis)
        if (out / name).exists():
            written.append(out / name)
    return written
