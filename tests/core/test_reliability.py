"""Reliability (issue 14): strict loading, damaged input, --force safety, locks, stale
temporaries, heal resume, Ctrl-C during GPTQ. Tiny random models; real processes for the
interrupt and concurrency cases."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from shrink.core.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]
TOK_FILES = ("tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, embedded_dir) -> Path:
    """A 3-layer tied Llama (hidden 16) with the embedded model's tokenizer; read-only."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                         max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    folder = tmp_path_factory.mktemp("tiny-rel")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in TOK_FILES:
        shutil.copy(embedded_dir / name, folder / name)
    return folder


@pytest.fixture
def model_dir(tiny_src, tmp_path) -> Path:
    """A private copy of the tiny model, free to damage."""
    dst = tmp_path / "M"
    shutil.copytree(tiny_src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, drop=(), add=None, replace=None) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    for k in drop:
        del sd[k]
    sd.update(add or {})
    sd.update(replace or {})
    save_file(sd, f, metadata={"format": "pt"})


# ---------------------------------------------------------------------------- 1. strict loading


def test_load_model_accepts_a_good_tied_checkpoint(model_dir):
    from shrink.core.models import check_model_folder, load_model

    loaded = load_model(str(model_dir))  # lm_head.weight is tied: not in the file, not missing
    assert loaded.model.config.num_hidden_layers == 3
    check_model_folder(model_dir)


def test_missing_tensor_is_an_error_naming_it(model_dir):
    from shrink.core.models import check_model_folder, load_model

    _edit_tensors(model_dir, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ShrinkError, match=r"1 tensors missing \(model\.layers\.1\.mlp\.up_proj"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        check_model_folder(model_dir)


def test_config_with_more_layers_than_the_checkpoint_is_an_error(model_dir):
    from shrink.core.models import load_model

    _edit_config(model_dir, num_hidden_layers=5)
    with pytest.raises(ShrinkError, match=r"model\.safetensors does not match .*tensors missing "
                                          r"\(model\.layers\.3\."):
        load_model(str(model_dir))


def test_unexpected_tensor_is_an_error(model_dir):
    from shrink.core.models import load_model

    _edit_tensors(model_dir, add={"model.layers.9.extra.weight": torch.zeros(2)})
    with pytest.raises(ShrinkError, match=r"1 unexpected \(model\.layers\.9\.extra\.weight\)"):
        load_model(str(model_dir))


def test_wrong_shape_is_an_error_naming_the_tensor(model_dir):
    from shrink.core.models import load_model

    _edit_tensors(model_dir, replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 16)})
    with pytest.raises(ShrinkError, match=r"wrong shape .*model\.layers\.0\.mlp\.up_proj\.weight "
                                          r"\[8, 16\] vs \[32, 16\]"):
        load_model(str(model_dir))


def test_pickle_only_weights_are_refused_by_every_loader(model_dir):
    from shrink.core.models import check_model_folder, load_model
    from shrink.runtime.verify import verify_model_dir

    sd = {k: v.clone() for k, v in
          __import__("safetensors.torch", fromlist=["load_file"]).load_file(
              model_dir / "model.safetensors").items()}
    (model_dir / "model.safetensors").unlink()
    torch.save(sd, model_dir / "pytorch_model.bin")
    line = r"has weights only in pytorch_model\.bin, not safetensors: shrink reads safetensors only"
    for call in (lambda: load_model(str(model_dir)), lambda: check_model_folder(model_dir),
                 lambda: verify_model_dir(model_dir)):
        with pytest.raises(ShrinkError, match=line):
            call()


def test_generate_refuses_pickle_weights(model_dir):
    from shrink.runtime.generate import generate

    _edit_tensors(model_dir)  # unchanged safetensors...
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")  # ...now only .bin
    with pytest.raises(ShrinkError, match="not safetensors"):
        generate(model_dir, "Hello", max_new_tokens=2)


def test_missing_tokenizer_is_named(model_dir):
    from shrink.core.models import load_model
    from shrink.runtime.verify import verify_model_dir

    for name in TOK_FILES:
        (model_dir / name).unlink()
    with pytest.raises(ShrinkError, match=f"the tokenizer is missing in {model_dir}"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match="the tokenizer is missing"):
        verify_model_dir(model_dir)


# ---------------------------------------------------------------------------- 2. damaged input


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_safetensors_is_named(model_dir, damage):
    from shrink.core.models import load_model
    from shrink.streaming.checkpoint import Checkpoint

    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[:len(data) // 2],
                   "random": os.urandom(4096)}[damage])
    with pytest.raises(ShrinkError, match=f"{f}.*(not a (valid )?safetensors file|truncated)"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match=f"{f}.*(not a (valid )?safetensors file|truncated)"):
        Checkpoint(model_dir)


def test_bad_index_json_is_named(model_dir):
    from shrink.core.models import load_model
    from shrink.streaming.checkpoint import Checkpoint

    index = model_dir / "model.safetensors.index.json"
    index.write_text("{not json")
    for call in (lambda: load_model(str(model_dir)), lambda: Checkpoint(model_dir)):
        with pytest.raises(ShrinkError, match=f"{index} is damaged"):
            call()
    index.write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(ShrinkError, match="lists shards that are not in .*model-00002"):
        load_model(str(model_dir))


def test_streaming_checkpoint_must_match_its_config(model_dir):
    from transformers import AutoConfig

    from shrink.streaming.checkpoint import check_complete

    check_complete(model_dir, AutoConfig.from_pretrained(model_dir))
    _edit_tensors(model_dir, drop=["model.layers.2.self_attn.q_proj.weight"])
    with pytest.raises(ShrinkError, match=r"missing \(model\.layers\.2\.self_attn\.q_proj"):
        check_complete(model_dir, AutoConfig.from_pretrained(model_dir))


@pytest.mark.parametrize("body", ["{broken", "[1, 2]", '{"stages": 3}'])
def test_damaged_shrink_json_is_named(model_dir, body):
    from shrink.core.models import read_shrink_json

    (model_dir / "shrink.json").write_text(body)
    with pytest.raises(ShrinkError, match=f"{model_dir / 'shrink.json'} is damaged"):
        read_shrink_json(model_dir)


def test_latin1_jsonl_is_named(tmp_path):
    from shrink.core.data import load_texts

    f = tmp_path / "t.jsonl"
    f.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ShrinkError, match=f"{f} is not UTF-8 text \\(line 2"):
        load_texts(str(f))


def test_seq_len_beyond_the_context_is_refused(model_dir):
    from transformers import AutoConfig, GPT2Config

    from shrink.core.models import check_seq_len

    cfg = AutoConfig.from_pretrained(model_dir)  # max_position_embeddings 64
    check_seq_len(cfg, 64)
    with pytest.raises(ShrinkError, match=r"--seq-len 128 is beyond the model's context "
                                          r"\(max_position_embeddings = 64\)"):
        check_seq_len(cfg, 128)
    with pytest.raises(ShrinkError, match=r"context \(\w+ = 32\)"):
        check_seq_len(GPT2Config(n_positions=32), 33)


def test_estimate_refuses_an_encoder(tmp_path):
    from transformers import BertConfig

    from shrink.analysis.estimate import load_config

    BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ShrinkError, match=r"unsupported architecture .*bert.*decoder-only"):
        load_config(str(tmp_path))


def test_nan_perplexity_is_an_error(model_dir):
    from shrink.core.models import load_model
    from shrink.core.perplexity import perplexity

    model = load_model(str(model_dir)).model
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ShrinkError, match=r"perplexity is not finite \(nan\): the model produces "
                                          r"NaN/inf logits"):
        perplexity(model, torch.randint(0, 100, (2, 8)), show_progress=False)
