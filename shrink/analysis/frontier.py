"""The size/speed/quality frontier: which artifacts are worth shipping, and which one fits a budget.

Pure arithmetic on measured points (no model is loaded here). A point is one artifact: its bytes on
disk, its decode tokens/s, and its perplexity on each held-out domain. Point A *dominates* B on an
axis when A is at least as good on that axis (smaller, or faster) and has no higher perplexity on
any domain, and is strictly better somewhere. The front is the set of points no other point
dominates; an artifact off the front has a better alternative that is no larger (or no slower).

Quality across domains is compared domain by domain (dominance); when one point must be chosen
among non-dominated ones, the chooser uses the geometric mean of the perplexities, which weighs a
10% loss the same on either domain.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from shrink.core.errors import ShrinkError

AXES = ("bytes", "speed")


@dataclass
class Point:
    """One measured artifact."""

    label: str  # e.g. "dense q4_k_m", "drop 6 healed iq4_nl"
    family: str  # dense | dense-healed | pruned | pruned-healed
    drop: int  # decoder layers removed
    healed: bool
    format: str  # GGUF type, e.g. q4_k_m
    bytes: int  # the artifact's weight file on disk
    ppl: dict[str, float]  # domain label -> perplexity
    imatrix: bool = False
    decode_tps: float | None = None  # decode tokens/s (median over interleaved fresh processes)
    peak_rss: int | None = None  # bytes
    path: str | None = None
    dominated_by: dict[str, str] = field(default_factory=dict)  # axis -> label of a dominator

    def quality(self) -> float:
        """Geometric mean of the perplexities over the domains (lower is better)."""
        vals = list(self.ppl.values())
        if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
            return math.inf
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    def on_front(self, axis: str = "bytes") -> bool:
        return axis not in self.dominated_by

    def to_dict(self) -> dict:
        return {**asdict(self), "quality": self.quality()}

    @classmethod
    def from_dict(cls, d: dict) -> Point:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _cost(p: Point, axis: str) -> float:
    """Smaller is better on every axis: bytes, or seconds per token."""
    if axis == "bytes":
        return float(p.bytes)
    if axis == "speed":
        return 1.0 / p.decode_tps if p.decode_tps else math.inf
    raise ValueError(f"unknown axis {axis!r}")


def dominates(a: Point, b: Point, axis: str = "bytes") -> bool:
    """True when ``a`` is no worse than ``b`` on ``axis`` and on every domain's perplexity, and
    strictly better on at least one of them. Domains missing from either point count as worse."""
    domains = set(a.ppl) | set(b.ppl)
    ca, cb = _cost(a, axis), _cost(b, axis)
    if not math.isfinite(ca) or ca > cb:
        return False
    strictly = ca < cb
    for d in domains:
        pa, pb = a.ppl.get(d, math.inf), b.ppl.get(d, math.inf)
        if pa > pb:
            return False
        strictly = strictly or pa < pb
    return strictly


def mark_front(points: list[Point], axes: tuple[str, ...] = AXES) -> list[Point]:
    """Fill ``dominated_by`` for every point on every axis (the smallest dominator is named)."""
    for axis in axes:
        for p in points:
            p.dominated_by.pop(axis, None)
            better = [q for q in points if q is not p and dominates(q, p, axis)]
            if better:
                p.dominated_by[axis] = min(
                    better, key=lambda q: (_cost(q, axis), q.quality())
                ).label
    return points


def front(points: list[Point], axis: str = "bytes") -> list[Point]:
    """The non-dominated points on ``axis``, ordered from cheapest to dearest."""
    mark_front(points, (axis,))
    return sorted((p for p in points if p.on_front(axis)), key=lambda p: _cost(p, axis))


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_size(text: str | int | float) -> int:
    """'80MB' -> 80_000_000 (decimal units as disks are sold; MiB/GiB are binary)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ShrinkError(f"--target-size: '{text}' is not a size (e.g. 80MB, 1.5GB)")
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
    n = value * _UNITS[unit]
    if not (math.isfinite(n) and n >= 1):
        raise ShrinkError(f"--target-size: '{text}' must be a positive size")
    return int(n)


def parse_speed(text: str) -> tuple[float, str]:
    """'1.3x' -> (1.3, 'x') relative to the dense reference; '40' or '40tok/s' -> (40, 'tok/s')."""
    s = str(text).strip().lower()
    unit = "x" if s.endswith("x") else "tok/s"
    num = s.removesuffix("x").removesuffix("tok/s").removesuffix("t/s").strip()
    try:
        v = float(num)
    except ValueError:
        raise ShrinkError(
            f"--target-speed: '{text}' is not a speed (e.g. 1.3x or 40tok/s)"
        ) from None
    if not (math.isfinite(v) and v > 0):
        raise ShrinkError(f"--target-speed: '{text}' must be a positive number")
    return v, unit


@dataclass
class Choice:
    """What the budget picked, and every candidate it rejected with the reason."""

    chosen: Point | None
    rejected: list[tuple[Point, str]]
    budget: str
    max_bytes: int | None = None
    min_tps: float | None = None

    def lines(self) -> list[str]:
        out = [f"budget: {self.budget}"]
        if self.chosen is not None:
            c = self.chosen
            out.append(
                f"chosen: {c.label} ({c.bytes / 1e6:.1f} MB, "
                + ", ".join(f"{d} {v:.2f}" for d, v in c.ppl.items())
                + (f", {c.decode_tps:.1f} tok/s" if c.decode_tps else "")
                + ")"
            )
        for p, why in self.rejected:
            out.append(f"rejected: {p.label}: {why}")
        return out

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "max_bytes": self.max_bytes,
            "min_tps": self.min_tps,
            "lines": self.lines(),
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "rejected": [{"label": p.label, "why": why} for p, why in self.rejected],
        }


def speed_floor(points: list[Point], value: float, unit: str, reference: str) -> float:
    """A speed budget in tokens/s: absolute, or ``value`` times the reference point's speed."""
    if unit != "x":
        return value
    ref = next((p for p in points if p.label == reference), None)
    if ref is None or not ref.decode_tps:
        raise ShrinkError(
            f"--target-speed {value}x needs the measured speed of '{reference}' in the frontier"
        )
    return value * ref.decode_tps


def choose(
    points: list[Point],
    *,
    max_bytes: int | None = None,
    min_tps: float | None = None,
    budget: str = "",
) -> Choice:
    """The best artifact within the budget: among the points that fit (size at most
    ``max_bytes``, decode at least ``min_tps``), drop the dominated ones, then pick the lowest
    geometric-mean perplexity. Every other candidate is returned with why it lost."""
    rejected: list[tuple[Point, str]] = []
    fit: list[Point] = []
    for p in points:
        if max_bytes is not None and p.bytes > max_bytes:
            rejected.append((p, f"{p.bytes / 1e6:.1f} MB is over {max_bytes / 1e6:.1f} MB"))
        elif min_tps is not None and not (p.decode_tps and p.decode_tps >= min_tps):
            speed = f"{p.decode_tps:.1f}" if p.decode_tps else "unmeasured"
            rejected.append((p, f"{speed} tok/s is under {min_tps:.1f} tok/s"))
        else:
            fit.append(p)
    axes = tuple(
        a
        for a, on in (
            ("bytes", max_bytes is not None or min_tps is None),
            ("speed", min_tps is not None),
        )
        if on
    )
    survivors = []
    for p in fit:
        dom = next((q for q in fit for a in axes if q is not p and dominates(q, p, a)), None)
        if dom is not None:
            rejected.append(
                (p, f"dominated by {dom.label} (no larger or slower, no worse on any domain)")
            )
        else:
            survivors.append(p)
    if not survivors:
        return Choice(None, rejected, budget, max_bytes, min_tps)
    best = min(survivors, key=lambda p: (p.quality(), p.bytes))
    for p in survivors:
        if p is not best:
            rejected.append(
                (
                    p,
                    f"fits, but quality {p.quality():.2f} is worse than "
                    f"{best.quality():.2f} (geometric mean of perplexities)",
                )
            )
    return Choice(best, rejected, budget, max_bytes, min_tps)
