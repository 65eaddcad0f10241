"""The healing loss without the logits: the same value and the same adapter gradients as the
model's own loss, and only where the head is a frozen plain Linear."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from shrink.stages.heal import headloss  # noqa: E402
from shrink.stages.heal.headloss import chunk_rows, fused_parts, lm_loss  # noqa: E402

needs_op = pytest.mark.skipif(
    not hasattr(torch.nn.functional, "linear_cross_entropy"), reason="torch before 2.13"
)


def _lora(config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lcfg = LoraConfig(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    for name, p in model.named_parameters():  # B = 0 at initialisation: give it a value
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_op
def test_same_loss_and_gradients_as_the_model(arch, tiny_config, monkeypatch):
    # chunks of 16 rows: 4 chunks over these 2 x 33 tokens, so the chunking is exercised
    monkeypatch.setattr(headloss, "HEAD_CHUNK_BYTES", 16 * 49152 * 4)
    assert chunk_rows(49152) == 16
    model = _lora(tiny_config(arch, 3))
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (2, 33))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions leave the mean
    parts = fused_parts(model)
    assert parts is not None, arch

    reference = model(input_ids=ids, labels=labels, use_cache=False).loss
    reference.backward()
    want = _grads(model)
    model.zero_grad()
    got = lm_loss(parts, ids, labels)
    got.backward()
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, g in _grads(model).items():
        assert torch.allclose(g, want[name], rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in want.values())


@needs_op
def test_only_a_frozen_plain_head(tiny_config):
    model = _lora(tiny_config("llama", 2))
    assert fused_parts(model) is not None
    trained = copy.deepcopy(model)  # last-layers trains the head: its gradient is needed
    trained.get_base_model().get_output_embeddings().weight.requires_grad_(True)
    assert fused_parts(trained) is None
    capped = copy.deepcopy(model)  # something applied to the logits after the head
    capped.get_base_model().config.final_logit_softcapping = 30.0
    assert fused_parts(capped) is None
    scaled = copy.deepcopy(model)
    scaled.get_base_model().config.logit_scale = 0.5
    assert fused_parts(scaled) is None
    other = copy.deepcopy(model)  # a family the list does not name
    other.get_base_model().config.model_type = "cohere"
    assert fused_parts(other) is None
    biased = copy.deepcopy(model)
    head = biased.get_base_model().lm_head
    head.bias = nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    assert fused_parts(biased) is None


@needs_op
def test_the_trainer_uses_it_without_a_teacher(tiny_model_dir, tmp_path, monkeypatch):
    """A heal without a teacher computes its loss through lm_loss, and its logged loss is
    that loss."""
    from shrink.stages.configs import EvaluateConfig, HealConfig
    from shrink.stages.heal import heal

    calls: list[float] = []
    real = headloss.lm_loss

    def spy(*a, **kw):
        loss = real(*a, **kw)
        calls.append(loss.item())
        return loss

    monkeypatch.setattr(headloss, "lm_loss", spy)
    config = HealConfig(steps=2, seq_len=32, batch_size=2)
    r = heal(
        str(tiny_model_dir("llama", 2)),
        tmp_path / "healed",
        config,
        evaluation=EvaluateConfig(samples=2, seq_len=32),
        show_progress=False,
        verify=False,
    )
    assert len(calls) == 2
    assert [x["loss"] for x in r.losses] == pytest.approx(calls, rel=1e-4)
