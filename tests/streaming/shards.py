"""Helpers shared by the streaming tests: a model saved in small shards, padded inputs, and a
checkpoint read back tensor by tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open


def save_sharded(model, folder: Path, tokenizer_src: Path, tokenizer_files) -> Path:
    """``model`` in ~100 KB shards (its layers split across shards) plus the tokenizer."""
    model.save_pretrained(folder, max_shard_size="100KB")
    for name in tokenizer_files:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, folder / name)
    return folder


def padded_inputs(n: int, s: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a mask with one left-padded and one right-padded row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[3, 17:] = 0  # right padding
    return ids, mask


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out
