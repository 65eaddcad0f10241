"""``--strategy auto``: let measurement choose among the layer sets that the cheap metrics propose.

Each candidate (Block Influence, angular distance, relative magnitude, and iterative BI when
calibration blocks are given for it) names a set of n layers; the sets are removed temporarily
(optionally bridged, see shrink.core.bridge), the perplexity is measured on HELD-OUT calibration
blocks (blocks of the calibration text that scoring did not read: never the evaluation text), and
the lowest wins. Identical layer sets are measured once. Every candidate's numbers are returned.

Nothing is computed twice: one dense pass over the calibration blocks and one over the held-out
blocks keep the layer outputs the candidates read (the bridges' targets, and the hidden states
below each candidate's first changed layer), so each candidate computes only from its first
changed layer on. The replayed states are the ones a full pass computes, so the perplexities
and the chosen layers are bit for bit those of measuring every candidate from scratch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from shrink.core.bridge import (
    DEFAULT_RIDGE,
    BridgeRun,
    bridge_dense_layers,
    bridged_without,
    first_changed_layer,
)
from shrink.core.data import CALIBRATION, TokenBlocks, bos_prefix, token_stream
from shrink.core.dense import DenseStates
from shrink.core.errors import ShrinkError
from shrink.core.layers import without_layers
from shrink.core.perplexity import perplexity
from shrink.core.progress import progress_named

CANDIDATES = ("bi", "angular", "relmag", "iterative")
# What --strategy auto measures: the one-pass candidates. iterative re-scores the model once per
# removed layer (6 extra scoring passes at 6 layers): affordable through the API, not by default.
DEFAULT_CANDIDATES = ("bi", "angular", "relmag")


@dataclass
class Candidate:
    strategy: str  # one strategy, or several joined with "=" when they chose the same layers
    layers: list[int]
    perplexity: float | None
    reason: str
    seconds: float
    bridge: list[dict] | None = None  # per-run bridge results when bridged
    note: str = ""


@dataclass
class AutoResult:
    strategy: str  # the winning candidate's strategy name(s)
    layers: list[int]
    perplexity: float
    bridged: bool
    candidates: list[Candidate]
    heldout: dict = field(default_factory=dict)
    # the winner's fitted bridges (transforms included), for pruning without fitting them again
    fitted: list[BridgeRun] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(replace(self, fitted=None))
        d.pop("fitted")
        return d


def heldout_blocks(
    tokenizer,
    samples: int = 8,
    seq_len: int = 256,
    *,
    source: str = CALIBRATION,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    calib_seed: int = 0,
    seed: int = 1,
) -> TokenBlocks:
    """``samples`` blocks of ``source`` that share no token with the ``calib_samples`` blocks of
    ``calib_seq_len`` that :func:`shrink.data.token_blocks` picks with ``calib_seed`` (the blocks
    scoring and the bridge read). Chosen with ``seed``, kept in text order."""
    if "+" in source:  # a mix: each part against the calibration blocks token_blocks took there
        parts = [s.strip() for s in source.split("+") if s.strip()]

        def share(n: int) -> list[int]:
            return [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]

        got = [
            heldout_blocks(
                tokenizer,
                n,
                seq_len,
                source=s,
                calib_samples=c,
                calib_seq_len=calib_seq_len,
                calib_seed=calib_seed,
                seed=seed,
            )
            for s, n, c in zip(parts, share(samples), share(calib_samples))
            if n
        ]
        return TokenBlocks(
            torch.cat([g.input_ids for g in got]),
            f"{source} (held out)",
            seq_len,
            seed,
            sum(g.available for g in got),
        )
    prefix = bos_prefix(tokenizer)
    stream = token_stream(tokenizer, source)
    cbody = calib_seq_len - len(prefix)
    cavail = len(stream) // cbody
    used = sorted(random.Random(calib_seed).sample(range(cavail), min(calib_samples, cavail)))
    taken = [False] * len(stream)
    for i in used:
        for t in range(i * cbody, (i + 1) * cbody):
            taken[t] = True
    body = seq_len - len(prefix)
    free = [j for j in range(len(stream) // body) if not any(taken[j * body : (j + 1) * body])]
    if len(free) < samples:
        raise ShrinkError(
            f"'{source}' has only {len(free)} blocks of {seq_len} tokens that "
            f"calibration did not read; {samples} asked for"
        )
    picks = sorted(random.Random(seed).sample(free, samples))
    rows = [prefix + stream[j * body : (j + 1) * body] for j in picks]
    return TokenBlocks(
        torch.tensor(rows, dtype=torch.long), f"{source} (held out)", seq_len, seed, len(free)
    )


def shared_dense_states(
    model: nn.Module,
    candidates: list[list[int]],
    heldout_input_ids: torch.Tensor,
    calib_input_ids: torch.Tensor | None,
    *,
    bridge: bool,
    batch_size: int,
    show_progress: bool,
) -> tuple[DenseStates | None, DenseStates]:
    """One dense pass over the calibration blocks (when bridging) and one over the held-out
    blocks, keeping every layer output that some candidate's bridge fit or perplexity reads (the
    targets and the unchanged layers below its first change): no candidate recomputes them."""
    calib = None
    if calib_input_ids is not None:
        wanted = set().union(*(bridge_dense_layers(c) for c in candidates))
        calib = DenseStates().record(
            model,
            calib_input_ids,
            None,
            wanted,
            batch_size=batch_size,
            description="auto: dense pass (calibration)",
            show_progress=show_progress,
        )
    starts = {first_changed_layer(c, bridge) for c in candidates}
    held = DenseStates().record(
        model,
        heldout_input_ids,
        None,
        {s - 1 for s in starts if s > 0},
        batch_size=batch_size,
        description="auto: dense pass (held out)",
        show_progress=show_progress,
    )
    return calib, held


def choose_auto(
    model: nn.Module,
    n: int,
    heldout_input_ids: torch.Tensor,
    propose: Callable[[str], tuple[list[int], str]],
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
    bridge: bool = False,
    calib_input_ids: torch.Tensor | None = None,
    *,
    skip_first: int = 1,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 4,
    show_progress: bool = False,
) -> AutoResult:
    """Measure each candidate's held-out perplexity (bridged when ``bridge``) and keep the best.

    ``propose(name)`` gives a candidate strategy's layers and reason (the registry's
    ``choose_layers``). ``calib_input_ids`` (the scoring blocks) are needed to fit bridges and
    for ``iterative``; without them, ``iterative`` is skipped (recorded as such) and
    ``bridge=True`` is refused. The model is left unchanged."""
    if bridge and calib_input_ids is None:
        raise ShrinkError("a bridged automatic strategy needs the calibration blocks to fit on")
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad or not candidates:
        raise ShrinkError(f"unknown auto candidate(s) {bad}; use some of {', '.join(CANDIDATES)}")
    proposals: list[tuple[str, list[int], str]] = []
    skipped: list[Candidate] = []
    for name in candidates:
        if name == "iterative" and calib_input_ids is None:
            skipped.append(
                Candidate(
                    name, [], None, "", 0.0, note="skipped: no calibration blocks given to re-score"
                )
            )
            continue
        layers, reason = propose(name)
        proposals.append((name, layers, reason))
    calib, held = shared_dense_states(
        model,
        [p[1] for p in proposals],
        heldout_input_ids,
        calib_input_ids if bridge else None,
        bridge=bridge,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    measured: list[Candidate] = []
    fitted: dict[str, list[BridgeRun]] = {}
    for name, layers, reason in progress_named(
        proposals, "auto: candidate", lambda p: f"{p[0]} {p[1]}", show_progress
    ):
        same = next((c for c in measured if c.layers == layers), None)
        if same is not None:
            same.strategy += f"={name}"
            continue
        t0 = time.perf_counter()
        ctx = (
            bridged_without(
                model,
                layers,
                calib_input_ids,
                skip_first=skip_first,
                ridge=ridge,
                batch_size=batch_size,
                dense=calib,
            )
            if bridge
            else nullcontext()
        )
        with (
            ctx as runs,
            nullcontext() if bridge else without_layers(model, layers),
            held.start_at(model, first_changed_layer(layers, bridge)),
        ):
            ppl = perplexity(
                model, heldout_input_ids, batch_size=batch_size, show_progress=False
            ).perplexity
        measured.append(
            Candidate(
                name,
                layers,
                ppl,
                reason,
                time.perf_counter() - t0,
                [r.to_dict() for r in runs] if bridge else None,
            )
        )
        if bridge:
            fitted[name] = runs
    best = min(measured, key=lambda c: (c.perplexity, c.strategy))
    return AutoResult(
        best.strategy,
        best.layers,
        best.perplexity,
        bridge,
        measured + skipped,
        {"samples": int(heldout_input_ids.shape[0]), "seq_len": int(heldout_input_ids.shape[1])},
        fitted.get(best.strategy.split("=")[0]),
    )
