"""The quality guard: is a pruned (or later-stage) model still a language model?

It compares the model's perplexity with the source model's on the same few fixed blocks. Above a
ratio (default 3x) the verdict is "degraded": the model is likely to generate nonsense, whatever a
reload check says (finite logits and a consistent KV cache do not mean useful text). The guard
only reports; callers decide (``shrink build`` stops before healing unless told otherwise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from shrink.core.data import EVALUATION, token_blocks
from shrink.core.errors import ShrinkError
from shrink.core.perplexity import perplexity

DEFAULT_MAX_RATIO = 3.0
# A few fixed blocks: cheap enough for every stage, and the same ones for the source and the result.
GUARD_SOURCE = EVALUATION
GUARD_SAMPLES = 4
GUARD_SEQ_LEN = 256
GUARD_SEED = 0


@dataclass
class QualityVerdict:
    perplexity: float
    source_perplexity: float
    ratio: float  # perplexity / source_perplexity
    threshold: float
    ok: bool
    message: str
    blocks: dict | None = None

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "degraded"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def guard_blocks(
    tokenizer,
    source: str = GUARD_SOURCE,
    samples: int = GUARD_SAMPLES,
    seq_len: int = GUARD_SEQ_LEN,
    seed: int = GUARD_SEED,
):
    """The guard's fixed blocks (the same for every stage, so ratios are comparable)."""
    return token_blocks(tokenizer, source, samples, seq_len, seed)


def quality_ratio(
    model: nn.Module,
    source: float | nn.Module,
    input_ids: torch.Tensor,
    *,
    threshold: float = DEFAULT_MAX_RATIO,
    batch_size: int = 4,
    blocks: dict | None = None,
) -> QualityVerdict:
    """Perplexity of ``model`` over the source's on ``input_ids``; ``source`` is the source
    model's perplexity on the same blocks, or the source model itself (measured here)."""
    if not threshold > 1.0:
        raise ShrinkError(f"the quality threshold must be a ratio above 1, got {threshold}")
    if isinstance(source, nn.Module):
        src = perplexity(source, input_ids, batch_size=batch_size, show_progress=False).perplexity
    else:
        src = float(source)
    if not (math.isfinite(src) and src > 0):
        raise ShrinkError(f"the source perplexity must be a positive number, got {src}")
    ppl = perplexity(model, input_ids, batch_size=batch_size, show_progress=False).perplexity
    ratio = ppl / src if math.isfinite(ppl) else math.inf
    ok = ratio <= threshold
    if ok:
        message = (
            f"quality ok: perplexity {ppl:.4g} is {ratio:.2f}x the source model's "
            f"{src:.4g} (limit {threshold:g}x)"
        )
    else:
        message = (
            f"QUALITY GUARD: perplexity {ppl:.4g} is {ratio:.3g}x the source model's "
            f"{src:.4g}, above the {threshold:g}x limit: this model is badly degraded and "
            "likely to generate nonsense"
        )
    return QualityVerdict(ppl, src, ratio, threshold, ok, message, blocks)
