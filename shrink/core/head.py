"""The LM head of a causal LM, when it can be applied apart from the decoder: a plain bias-free
Linear on the decoder's (normalized) last hidden states, with nothing applied to its output.
Then the loss or the perplexity can be computed a chunk of positions at a time, without the
float32 logits of every position (``tokens x vocab x 4`` bytes, 1 GB for 4 x 512 tokens of a
128,256-token vocabulary, held again by their log-softmax)."""

from __future__ import annotations

from torch import nn

# families whose causal-LM forward is ``lm_head(decoder(ids))`` with nothing after the head;
# a config that scales or soft-caps the logits (Gemma 2, Cohere, Granite) is refused as well
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def plain_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, head) of ``model`` (a transformers causal LM, perhaps wrapped by peft) when
    ``head(decoder(...).last_hidden_state)`` is its logits; None otherwise."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", "") not in PLAIN_HEAD_TYPES:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, text):
        if any(getattr(c, name, None) not in (None, 1, 1.0) for name in _AFTER_HEAD):
            return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if decoder is None or decoder is lm:
        return None
    return decoder, head
