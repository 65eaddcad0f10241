"""Strategies that choose the layers to remove: a registry.

Adding a strategy is one function in one file, registered once::

    from shrink.stages.strategies import Selection, register_strategy

    @register_strategy("middle", help="the n layers around the middle", streams=True)
    def middle(sel: Selection) -> tuple[list[int], str]:
        start = (sel.num_layers - sel.n) // 2
        return list(range(start, start + sel.n)), "the middle of the stack"

The CLI's choices (``shrink prune --strategy``, ``shrink build --strategy``), whether a strategy
needs layer scores, and whether it can run streamed (layer by layer, for models larger than
memory) all come from here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.layers import without_layers
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar
from shrink.core.scores import LayerScores, removal_perplexity, score_layers


@dataclass
class Selection:
    """What a strategy may look at. ``scores`` is filled when the strategy ``needs_scores``;
    ``model`` and ``input_ids`` (calibration blocks) only on the in-memory path."""

    n: int
    num_layers: int
    scores: LayerScores | None = None
    model: nn.Module | None = None
    input_ids: torch.Tensor | None = None
    seed: int = 0
    batch_size: int = 4
    skip_first: int = 1
    show_progress: bool = True
    heldout_input_ids: torch.Tensor | None = None  # calibration blocks scoring did not read
    bridge: bool = False  # candidates are measured bridged (auto)
    ridge: float = 0.1
    details: dict = field(default_factory=dict)  # anything the strategy wants recorded


Choose = Callable[[Selection], tuple[list[int], str]]


@dataclass(frozen=True)
class Strategy:
    name: str
    choose: Choose
    help: str
    needs_scores: bool = False  # BI / relmag / angular computed first
    needs_ppl: bool = False  # removal perplexity computed too (L+1 passes)
    streams: bool = True  # works on the streamed path (no whole model in memory)


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str,
    *,
    help: str,
    needs_scores: bool = False,
    needs_ppl: bool = False,
    streams: bool = True,
) -> Callable[[Choose], Choose]:
    """Register ``fn(selection) -> (layers, reason)`` under ``name``."""

    def deco(fn: Choose) -> Choose:
        STRATEGIES[name] = Strategy(
            name, fn, help, needs_scores or needs_ppl, needs_ppl, streams and not needs_ppl
        )
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ShrinkError(
            f"unknown strategy '{name}'; use one of {', '.join(STRATEGIES)}"
        ) from None


def check_drop(n: int, num_layers: int) -> None:
    if not 1 <= n < num_layers:
        raise ShrinkError(
            f"--drop must be between 1 and {num_layers - 1} "
            f"(the model has {num_layers} layers), got {n}"
        )


def choose_layers(
    strategy: str,
    n: int,
    num_layers: int,
    scores: LayerScores | None = None,
    seed: int = 0,
    **context,
) -> tuple[list[int], str]:
    """Layers to remove (sorted) and a one-line reason."""
    check_drop(n, num_layers)
    st = get_strategy(strategy)
    if st.needs_scores and scores is None:
        raise ShrinkError(f"strategy '{strategy}' needs layer scores")
    chosen, reason = st.choose(Selection(n, num_layers, scores, seed=seed, **context))
    chosen = sorted(chosen)
    if len(chosen) != n or len(set(chosen)) != n or not all(0 <= i < num_layers for i in chosen):
        raise ShrinkError(
            f"strategy '{strategy}' returned {chosen}: not {n} distinct layers of "
            f"0..{num_layers - 1}"
        )
    return chosen, reason


# ----------------------------------------------------------------------------- the strategies


@register_strategy(
    "bi", help="the N layers with the lowest Block Influence (ShortGPT)", needs_scores=True
)
def _bi(sel: Selection):
    return sel.scores.lowest("bi", sel.n), f"the {sel.n} layers with the lowest Block Influence"


@register_strategy(
    "angular", help="Gromov et al.'s best contiguous block of N layers", needs_scores=True
)
def _angular(sel: Selection):
    start, d = sel.scores.best_block(sel.n)
    return list(range(start, start + sel.n)), (
        f"the block of {sel.n} layers starting at {start} has the smallest angular distance "
        f"between its input and output ({d:.4f}, last token)"
    )


@register_strategy(
    "relmag", help="the N layers with the lowest relative magnitude", needs_scores=True
)
def _relmag(sel: Selection):
    return sel.scores.lowest(
        "relmag", sel.n
    ), f"the {sel.n} layers with the lowest relative magnitude"


@register_strategy(
    "ppl",
    help="the N layers whose removal alone raises perplexity least (L+1 forward passes)",
    needs_ppl=True,
)
def _ppl(sel: Selection):
    return sel.scores.lowest(
        "ppl", sel.n
    ), f"the {sel.n} layers with the lowest perplexity increase when removed alone"


@register_strategy(
    "iterative", help="remove the lowest-BI layer, score again, repeat", streams=False
)
def _iterative(sel: Selection):
    if sel.model is None or sel.input_ids is None:
        raise ShrinkError("strategy 'iterative' needs the whole model in memory")
    removed, steps = iterative_bi(
        sel.model,
        sel.input_ids,
        sel.n,
        batch_size=sel.batch_size,
        skip_first=sel.skip_first,
        show_progress=sel.show_progress,
    )
    sel.details["iterative_steps"] = steps
    return removed, (
        f"removed one lowest-BI layer at a time, re-scoring after each removal ({sel.n} steps)"
    )


@register_strategy(
    "last", help="the N layers before the final one (Gromov et al.'s simple heuristic)"
)
def _last(sel: Selection):
    L, n = sel.num_layers, sel.n
    return list(
        range(L - 1 - n, L - 1)
    ), f"the {n} layers before the final one (Gromov et al.'s simple heuristic)"


@register_strategy("random", help="N layers drawn at random (a baseline)")
def _random(sel: Selection):
    chosen = sorted(random.Random(sel.seed).sample(range(sel.num_layers), sel.n))
    return chosen, f"{sel.n} layers drawn at random (seed {sel.seed}), a baseline"


@register_strategy(
    "auto",
    help="measure the bi, angular and relmag candidates' perplexity on "
    "held-out calibration blocks (bridged with --bridge linear) and "
    "keep the best",
    needs_scores=True,
    streams=False,
)
def _auto(sel: Selection):
    from shrink.stages.auto import choose_auto

    if sel.model is None or sel.heldout_input_ids is None:
        raise ShrinkError("strategy 'auto' needs the whole model and held-out calibration blocks")

    def propose(name: str) -> tuple[list[int], str]:
        return choose_layers(
            name,
            sel.n,
            sel.num_layers,
            sel.scores,
            sel.seed,
            model=sel.model,
            input_ids=sel.input_ids,
            batch_size=sel.batch_size,
            skip_first=sel.skip_first,
            show_progress=sel.show_progress,
        )

    res = choose_auto(
        sel.model,
        sel.n,
        sel.heldout_input_ids,
        propose,
        bridge=sel.bridge,
        calib_input_ids=sel.input_ids,
        skip_first=sel.skip_first,
        ridge=sel.ridge,
        batch_size=sel.batch_size,
        show_progress=sel.show_progress,
    )
    sel.details["auto"] = res.to_dict()
    if res.fitted is not None:  # not recorded: the prune stage folds them instead of refitting
        sel.details["auto_fitted"] = res.fitted
    shown = ", ".join(
        f"{c.strategy} {c.perplexity:.2f}" for c in res.candidates if c.perplexity is not None
    )
    return res.layers, (
        f"auto: {res.strategy} had the lowest held-out perplexity "
        f"{'(bridged) ' if res.bridged else ''}({shown})"
    )


def iterative_bi(
    model: nn.Module,
    input_ids: torch.Tensor,
    n: int,
    *,
    batch_size: int = 4,
    skip_first: int = 1,
    show_progress: bool = True,
) -> tuple[list[int], list[dict]]:
    """Remove the lowest-BI layer, re-score the smaller model, repeat n times.

    Returns the removed layers (original numbering) and the BI scores seen at each step. The model
    is left unchanged."""
    L = len(find_layers(model)[2])
    removed: list[int] = []
    steps: list[dict] = []
    for step in progress_bar(range(n), "iterative BI", enabled=show_progress):
        kept = [i for i in range(L) if i not in removed]
        with without_layers(model, removed) if removed else nullcontext(model):
            scores = score_layers(
                model, input_ids, batch_size=batch_size, skip_first=skip_first, show_progress=False
            )
        low = scores.lowest("bi", 1)[0]
        steps.append({"step": step, "kept": kept, "bi": scores.bi, "removed": kept[low]})
        removed.append(kept[low])
    return sorted(removed), steps


def scores_for(
    strategy: Strategy,
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    skip_first: int,
    model_name: str,
    settings: dict,
    show_progress: bool,
) -> LayerScores | None:
    """The scores a strategy needs, computed in memory (None when it needs none)."""
    if not strategy.needs_scores:
        return None
    scores = score_layers(
        model,
        input_ids,
        batch_size=batch_size,
        skip_first=skip_first,
        model_name=model_name,
        settings=settings,
        show_progress=show_progress,
    )
    if strategy.needs_ppl:
        scores.dense_ppl, scores.ppl = removal_perplexity(
            model, input_ids, batch_size=batch_size, show_progress=show_progress
        )
    return scores
