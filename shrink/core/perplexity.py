"""Perplexity of next-token prediction on token blocks: one arithmetic for every runtime."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.head import plain_head
from shrink.core.progress import progress_bar

LOGIT_BYTES = 128 << 20  # fp32 logits of one chunk of positions (the loss needs about twice that)


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
    parts = plain_head(model)
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for start in progress_bar(
        range(0, input_ids.shape[0], batch_size), "perplexity", enabled=show_progress
    ):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += _batch_nll(model, parts, ids, mask, targets)
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


def _batch_nll(
    model: nn.Module,
    parts: tuple[nn.Module, nn.Linear] | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
) -> float:
    """Summed next-token NLL of one batch. With a plain head (``parts``, see
    :func:`shrink.core.head.plain_head`) the head runs on ``LOGIT_BYTES`` of logits at a time,
    as the streamed perplexity does; else the model's own logits of every position."""
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    chunk = chunk_positions(ids.shape[0], head.out_features)
    return chunked_nll(lambda h: head(h).float(), hidden, targets, chunk)


def chunk_positions(batch: int, vocab: int) -> int:
    """Positions per chunk that keep a batch's fp32 logits under ``LOGIT_BYTES``."""
    return max(1, LOGIT_BYTES // (batch * vocab * 4))


def chunked_nll(logits_of, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> float:
    """Summed next-token NLL of one batch from its last hidden states (batch, S, d),
    ``chunk`` positions at a time: ``logits_of(hidden[:, s:e])`` gives their fp32 logits and
    ``targets`` (batch, S - 1) the next tokens, -100 where nothing is predicted."""
    total = 0.0
    for s in range(0, hidden.shape[1] - 1, chunk):
        e = min(s + chunk, hidden.shape[1] - 1)
        logits = logits_of(hidden[:, s:e])
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets[:, s:e].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
    return total
