"""Strategies that choose the layers to remove."""
from __future__ import annotations

import random
from contextlib import nullcontext
import torch
from torch import nn
from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar
from shrink.core.scores import LayerScores, score_layers
from shrink.core.layers import without_layers


STRATEGIES = ("bi", "angular", "iterative", "relmag", "ppl", "last", "random")
NEEDS_SCORES = {"bi", "angular", "relmag", "ppl"}


def choose_layers(strategy: str, n: int, num_layers: int, scores: LayerScores | None = None,
                  seed: int = 0) -> tuple[list[int], str]:
    """Layers to remove for a score-based or fixed strategy, and a one-line reason."""
    if not 1 <= n < num_layers:
        raise ShrinkError(f"--drop must be between 1 and {num_layers - 1} "
                          f"(the model has {num_layers} layers), got {n}")
    if strategy == "last":
        chosen = list(range(num_layers - 1 - n, num_layers - 1))
        return chosen, f"the {n} layers before the final one (Gromov et al.'s simple heuristic)"
    if strategy == "random":
        chosen = sorted(random.Random(seed).sample(range(num_layers), n))
        return chosen, f"{n} layers drawn at random (seed {seed}), a baseline"
    if scores is None:
        raise ShrinkError(f"strategy '{strategy}' needs layer scores")
    if strategy == "angular":
        start, d = scores.best_block(n)
        return list(range(start, start + n)), (
            f"the block of {n} layers starting at {start} has the smallest angular distance "
            f"between its input and output ({d:.4f}, last token)")
    if strategy in ("bi", "relmag", "ppl"):
        label = {"bi": "Block Influence", "relmag": "relative magnitude",
                 "ppl": "perplexity increase when removed alone"}[strategy]
        return scores.lowest(strategy, n), f"the {n} layers with the lowest {label}"
    raise ShrinkError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def iterative_bi(model: nn.Module, input_ids: torch.Tensor, n: int, *, batch_size: int = 4,
                 skip_first: int = 1, show_progress: bool = True) -> tuple[list[int], list[dict]]:
    """Remove the lowest-BI layer, re-score the smaller model, repeat n times.

    Returns the removed layers (original numbering) and the BI scores seen at each step. The model
    is left unchanged."""
    L = len(find_layers(model)[2])
    removed: list[int] = []
    steps: list[dict] = []
    for step in progress_bar(range(n), "iterative BI", enabled=show_progress):
        kept = [i for i in range(L) if i not in removed]
        with without_layers(model, removed) if removed else nullcontext(model):
            scores = score_layers(model, input_ids, batch_size=batch_size, skip_first=skip_first,
                                  show_progress=False)
        low = scores.lowest("bi", 1)[0]
        steps.append({"step": step, "kept": kept, "bi": scores.bi, "removed": kept[low]})
        removed.append(kept[low])
    return sorted(removed), steps
