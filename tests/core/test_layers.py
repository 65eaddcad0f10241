"""Removing layers in memory leaves a valid checkpoint: reloaded == in memory, kept weights bitwise
equal, per-layer config sliced, generation with the KV cache works, for every architecture; and
the temporary removal (without_layers) restores the model exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import shrink
from shrink.runtime.verify import verify_in_subprocess

REMOVE = [1, 4]


def _ids():
    return torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def test_prune_reload_equal_and_generate(tiny_model_dir, tmp_path, arch):
    src = tiny_model_dir(arch)
    original = load_file(src / "model.safetensors")
    loaded = shrink.load_model(str(src))
    shrink.prune_model(loaded.model, REMOVE)
    cfg = loaded.model.config
    assert cfg.num_hidden_layers == 4
    layer_types = getattr(AutoConfig.from_pretrained(src), "layer_types", None)
    if layer_types is not None:
        assert cfg.layer_types == [t for i, t in enumerate(layer_types) if i not in REMOVE]
    with torch.no_grad():
        in_memory = loaded.model(_ids()).logits
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, in_memory)
    # kept layers are bitwise the originals, renumbered
    saved = load_file(tmp_path / "model.safetensors")
    kept = [i for i in range(6) if i not in REMOVE]
    for new, old in enumerate(kept):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        names = [k for k in original if k.startswith(prefix_old)]
        assert names
        for k in names:
            assert torch.equal(saved[prefix_new + k[len(prefix_old) :]], original[k])
    assert not any(k.startswith("model.layers.4.") for k in saved)
    # independent check: a model built with 4 layers from the renumbered original weights
    small_cfg = AutoConfig.from_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_config(small_cfg)
    remap = {}
    for k, v in original.items():
        if k.startswith("model.layers."):
            idx = int(k.split(".")[2])
            if idx in REMOVE:
                continue
            k = k.replace(f"model.layers.{idx}.", f"model.layers.{kept.index(idx)}.", 1)
        remap[k] = v
    fresh.load_state_dict(remap, strict=False)
    fresh.tie_weights()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(_ids()).logits, in_memory, atol=1e-5)
    # generation with the KV cache, in a fresh process
    result = verify_in_subprocess(tmp_path)
    assert result["ok"] and result["num_layers"] == 4 and result["cache_matches_no_cache"]


def test_qwen3_window_layers_recounted(tiny_model_dir):
    loaded = shrink.load_model(str(tiny_model_dir("qwen3")))
    assert loaded.model.config.max_window_layers == 3
    shrink.prune_model(loaded.model, [0, 4])
    assert loaded.model.config.max_window_layers == 2  # layers 1, 2 were below the old bound


def test_without_layers_restores(tiny_model_dir):
    loaded = shrink.load_model(str(tiny_model_dir("gemma3")))
    model = loaded.model
    with torch.no_grad():
        before = model(_ids()).logits
        with shrink.without_layers(model, [0, 5]):
            assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4
            assert model.model.layers[0].self_attn.layer_idx == 0
            model(_ids())
        assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6
        assert [l.self_attn.layer_idx for l in model.model.layers] == list(range(6))
        assert torch.equal(model(_ids()).logits, before)
