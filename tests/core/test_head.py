"""The head applied apart from the decoder: a perplexity a chunk of positions at a time equals
the one from the model's own logits, and only a plain head is taken apart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrink.core import perplexity as ppl
from shrink.core.head import plain_head


def _model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _reference(model, ids, mask) -> float:
    """Mean next-token NLL from the model's logits of every position, by hand."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    return float(-logp[keep].mean())


def test_chunked_perplexity_equals_the_models_logits(arch, tiny_config, monkeypatch):
    model = _model(tiny_config(arch, 3))
    assert plain_head(model) is not None, arch
    # 3 x 49152 x 4 x 5 bytes: chunks of 5 positions over 2 blocks of 3 rows
    monkeypatch.setattr(ppl, "LOGIT_BYTES", 3 * 49152 * 4 * 5)
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (6, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padding leaves the mean
    got = ppl.perplexity(model, ids, mask, batch_size=3, show_progress=False)
    assert got.nll == pytest.approx(_reference(model, ids, mask), rel=1e-6)
    assert got.tokens == int(mask[:, 1:].sum())


def test_a_head_with_something_after_it_keeps_the_models_logits(tiny_config, monkeypatch):
    model = _model(tiny_config("llama", 2))
    model.config.final_logit_softcapping = 30.0
    assert plain_head(model) is None
    called = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: called.append(1) or real(*a, **k))
    ids = torch.randint(0, 49152, (2, 9))
    r = ppl.perplexity(model, ids, show_progress=False)
    assert called == [1]  # one call over every position: the model's own logits
    assert r.nll == pytest.approx(_reference(model, ids, torch.ones_like(ids)), rel=1e-6)
    assert math.isfinite(r.perplexity)


def test_only_a_plain_bias_free_linear(tiny_config):
    model = _model(tiny_config("llama", 2))
    decoder, head = plain_head(model)
    assert head is model.lm_head and decoder is model.model
    model.config.logit_scale = 0.5
    assert plain_head(model) is None
    model.config.logit_scale = None
    model.config.model_type = "cohere"
    assert plain_head(model) is None
    model.config.model_type = "llama"
    model.lm_head.bias = nn.Parameter(torch.zeros(model.lm_head.out_features))
    assert plain_head(model) is None
