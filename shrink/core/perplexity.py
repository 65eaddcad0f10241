"""Perplexity of next-token prediction on token blocks: one arithmetic for every runtime."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.progress import progress_bar


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    seconds: float
    data: dict | None = None
    model: str = ""
    second: PerplexityResult | None = None  # the same model on a second held-out domain

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_size: int = 4,
    show_progress: bool = True,
) -> PerplexityResult:
    """Token-weighted perplexity of next-token prediction over (samples, seq_len) blocks."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for start in progress_bar(
        range(0, input_ids.shape[0], batch_size), "perplexity", enabled=show_progress
    ):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ShrinkError("perplexity needs at least one predicted token (every block is padding)")
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise ShrinkError(f"perplexity is not finite ({mean}): the model produces NaN/inf logits")
    ppl = math.exp(mean) if mean < 709 else math.inf
    if not math.isfinite(ppl):
        raise ShrinkError(
            f"perplexity is not finite (mean NLL {mean:.1f} nats per token): the "
            "model's predictions are far from the text"
        )
    return PerplexityResult(ppl, mean, total_tokens, time.perf_counter() - t0)
