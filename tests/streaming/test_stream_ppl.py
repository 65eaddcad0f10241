"""Streamed (layer-by-layer) perplexity equals the in-memory perplexity, pruned and bridged too."""

from __future__ import annotations

import pytest
import torch
from shards import padded_inputs

from shrink.core.errors import ShrinkError


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def in_memory(folder, ids, mask=None, keep=None, replace=None):
    from transformers import AutoModelForCausalLM

    from shrink.core.layers import swap_layers
    from shrink.core.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if replace:
        sd = model.state_dict()
        with torch.no_grad():
            for name, value in replace.items():
                sd[name].copy_(value)
    if keep is not None:
        swap_layers(model, keep)
    return perplexity(model, ids, mask, batch_size=2, show_progress=False)


def test_equals_in_memory(arch, tiny_model_dir):
    from shrink.streaming.perplexity import stream_perplexity

    folder = tiny_model_dir(arch)
    ids, mask = padded_inputs(5)
    ref = in_memory(folder, ids, mask)
    got = stream_perplexity(folder, ids, attention_mask=mask, batch_size=2, chunk=7)
    assert got.tokens == ref.tokens
    assert rel(got.perplexity, ref.perplexity) < 1e-4


def test_removed_layers_and_replaced_tensor(tiny_model_dir):
    """Layers skipped from the dense checkpoint = the pruned model; a substituted tensor (as the
    bridge folds into down_proj) = the same tensor set in memory."""
    from shrink.streaming.perplexity import stream_perplexity

    folder = tiny_model_dir("qwen3")
    ids, mask = padded_inputs(4)
    g = torch.Generator().manual_seed(0)
    name = "model.layers.1.mlp.down_proj.weight"
    value = torch.randn(64, 128, generator=g) * 0.05
    ref = in_memory(folder, ids, mask, keep=[0, 1, 4, 5], replace={name: value})
    got = stream_perplexity(folder, ids, attention_mask=mask, remove=[2, 3], replace={name: value})
    assert rel(got.perplexity, ref.perplexity) < 1e-4
    full = stream_perplexity(folder, ids, attention_mask=mask)
    assert rel(full.perplexity, got.perplexity) > 1e-3  # the removal really changed the model


def test_embedded_smollm2(embedded_dir):
    from transformers import AutoTokenizer

    from shrink.streaming.perplexity import stream_perplexity

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and "
        "the river Seine runs through it. "
    ) * 12
    ids = torch.tensor(tok(text)["input_ids"][:128]).view(2, 64)
    ref = in_memory(embedded_dir, ids)
    got = stream_perplexity(embedded_dir, ids, batch_size=1)
    assert got.tokens == ref.tokens == 126
    assert rel(got.perplexity, ref.perplexity) < 1e-4
    assert got.perplexity < 100  # a real model on real text


def test_bad_inputs(tiny_model_dir):
    from shrink.streaming.perplexity import stream_perplexity

    folder = tiny_model_dir("llama")
    ids, _ = padded_inputs(4)
    with pytest.raises(ShrinkError, match="layer 9"):
        stream_perplexity(folder, ids, remove=[9])
    with pytest.raises(ShrinkError, match="no such tensor"):
        stream_perplexity(folder, ids, replace={"nope.weight": torch.zeros(1)})
    with pytest.raises(ShrinkError, match="seq_len"):
        stream_perplexity(folder, ids[:, :1])
