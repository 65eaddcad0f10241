"""Shared fixtures: tiny random models of several architectures, saved as real HF folders with the
embedded model's tokenizer, and the embedded SmolLM2 itself. Nothing touches the network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SHRINK_NO_PROGRESS", "1")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_config(arch: str, layers: int = 6):
    """A tiny config of each architecture; vocab matches the embedded SmolLM2 tokenizer."""
    import transformers as tf

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(
            **common,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=32,
            max_window_layers=layers // 2,
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"]
            * (layers // 3),
        )
    raise ValueError(arch)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Each supported architecture in turn (a test taking ``arch`` runs once per architecture)."""
    return request.param


@pytest.fixture(scope="session")
def archs() -> tuple[str, ...]:
    """Every supported architecture, for tests that loop over them."""
    return ARCHS


@pytest.fixture(name="tiny_config", scope="session")
def tiny_config_fixture():
    """tiny_config(arch, layers=6) -> the tiny transformers config of that architecture."""
    return tiny_config


@pytest.fixture(scope="session")
def tokenizer_files() -> tuple[str, ...]:
    """The tokenizer files a tiny model folder gets from the embedded model."""
    return TOKENIZER_FILES


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from shrink.core.models import ensure_embedded

    return ensure_embedded()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir):
    """tiny_model_dir(arch, layers=6) -> folder with a random tiny model + the SmolLM2 tokenizer.
    Built once per (arch, layers) per session; treat it as read-only."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    made: dict = {}

    def make(arch: str = "llama", layers: int = 6) -> Path:
        key = (arch, layers)
        if key not in made:
            torch.manual_seed(0)
            config = tiny_config(arch, layers)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.generation_config = GenerationConfig(
                bos_token_id=1, eos_token_id=2, pad_token_id=2
            )
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{layers}")
            model.save_pretrained(folder)
            for name in TOKENIZER_FILES:
                if (embedded_dir / name).exists():
                    shutil.copy(embedded_dir / name, folder / name)
            made[key] = folder
        return made[key]

    return make
