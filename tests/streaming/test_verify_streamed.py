"""The streamed verification passes a good model and catches NaN tensors and wrong shapes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shrink.core.errors import ShrinkError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_good_model_passes(arch, tiny_model_dir):
    from shrink.streaming.verify import verify_streamed

    record = verify_streamed(tiny_model_dir(arch))
    assert record["ok"] and record["cache_matches_no_cache"] and record["finite_tensors"]
    assert record["cache_layers"] == [0, 5] and record["tensors_checked"] > 50
    assert record["prompt_perplexity"] > 1 and record["cache_relative_logit_diff"] < 1e-5


def test_layer_subset_and_bad_layers(tiny_model_dir):
    from shrink.streaming.verify import verify_streamed

    assert verify_streamed(tiny_model_dir("gemma3"), layers=[1, 2, 4])["cache_layers"] == [1, 2, 4]
    with pytest.raises(ShrinkError, match="among 0..5"):
        verify_streamed(tiny_model_dir("llama"), layers=[7])


def test_nan_tensor_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.3.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match=r"NaN or inf .*model\.layers\.3\.mlp\.up_proj"):
        verify_streamed(folder)


def test_wrong_shape_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match="o_proj"):
        verify_streamed(folder)


def test_missing_tokenizer_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ShrinkError, match="tokenizer"):
        verify_streamed(folder)


def test_broken_cache_is_caught(tiny_model_dir, monkeypatch):
    """Two layers sharing one cache slot (a wrong layer_idx) make the cached logits differ."""
    import shrink.core.layers as layers_mod
    from shrink.streaming.verify import verify_streamed

    swap = layers_mod.swap_layers

    def broken(model, keep):
        undo = swap(model, keep)
        for m in model.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = 0
        return undo

    monkeypatch.setattr(layers_mod, "swap_layers", broken)
    with pytest.raises(ShrinkError, match="KV cache"):
        verify_streamed(tiny_model_dir("llama"))
