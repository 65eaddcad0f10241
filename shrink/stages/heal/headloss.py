"""The healing LM loss without the (tokens x vocabulary) logits: torch's chunked linear
cross-entropy (``F.linear_cross_entropy``) from the decoder's last hidden states, when the LM
head is a frozen bias-free Linear (LoRA does not train it) and nothing is applied to the logits
after it. The model's own forward materializes float32 logits for every position and keeps
them and their log-softmax for the backward pass: ``2 T V 4`` bytes (T tokens of a batch, V
the vocabulary; 4 x 512 tokens x 128,256 for Llama 3 is 2.1 GB), and on a CPU that traffic costs
more than the head's matmul. The chunked path holds one chunk's logits at a time and computes
the hidden states' gradient in the forward; it skips the head's weight gradient, which LoRA does
not need.

The loss is the model's own (the mean over predicted tokens of the next-token cross-entropy,
labels -100 ignored), to float rounding: a test compares both, and the adapters' gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.head import plain_head

# Rows of hidden states per chunk: the float32 logits of one chunk stay under this many bytes.
# Measured on a 2-core AVX-512 CPU (SmolLM2's 49,152-token head, 576 wide, 1,024 tokens): the
# head's forward and backward took 0.41-0.49 s in chunks of 128 or 256 rows, 0.53-0.62 s in
# chunks of 64, 1.2 s with torch's default chunking on a CPU (16 rows) and 0.56-0.70 s with the
# logits at once.
HEAD_CHUNK_BYTES = 64 << 20


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a head of ``vocab`` outputs (at least 16)."""
    return max(16, HEAD_CHUNK_BYTES // (vocab * 4))


def fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, head) when the loss can skip the logits (see the module docstring): a plain
    head (:func:`shrink.core.head.plain_head`) that is not trained, and torch 2.13 or later.
    ``model`` may be wrapped by peft."""
    if not hasattr(F, "linear_cross_entropy"):  # torch before 2.13
        return None
    parts = plain_head(model)
    if parts is None or parts[1].weight.requires_grad:
        return None
    return parts


def lm_loss(
    parts: tuple[nn.Module, nn.Linear],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next-token cross-entropy of the decoder's hidden states through the frozen head, in
    chunks of :func:`chunk_rows` rows, averaged over the labels that are not -100."""
    decoder, head = parts
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    target = labels[:, 1:].reshape(-1).to(h.device)
    options = nn.LinearCrossEntropyOptions(
        chunking_method=None, batch_chunk_size=chunk_rows(head.out_features)
    )
    return F.linear_cross_entropy(
        h, head.weight, target, ignore_index=-100, reduction="mean", options=options
    )


def loss_without_logits(model: nn.Module, inputs: dict, one_process: bool) -> torch.Tensor | None:
    """:func:`lm_loss` of a training batch when :func:`fused_parts` applies and training runs in
    one process (a model wrapped for distributed training must be called through its wrapper,
    which synchronizes the gradients); None when the model's own forward must compute it."""
    parts = fused_parts(model) if one_process else None
    if parts is None:
        return None
    return lm_loss(parts, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"))
