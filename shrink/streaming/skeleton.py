"""The weightless model skeleton and loading one module's weights into it from the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.quiet import third_party_quiet
from shrink.streaming.checkpoint import DTYPES, INDEX, SINGLE, Checkpoint, readinto
from shrink.streaming.memory import trim_memory


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM with every parameter on the meta device (no memory is allocated, not even
    transiently), and its few non-persistent buffers (rotary frequencies, Gemma's embedding
    scale) rebuilt for real on the CPU."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), third_party_quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in model.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            for key, buf in fresh.named_buffers(recurse=False):
                module._buffers[key] = buf
        elif hasattr(module, "scalar_embed_scale"):
            module._buffers["embed_scale"] = torch.tensor(module.scalar_embed_scale)
        metas = [k for k, b in module.named_buffers(recurse=False) if b.is_meta]
        if metas and metas[0] in module._non_persistent_buffers_set:
            raise ShrinkError(
                f"streaming cannot rebuild the buffer {name}.{metas[0]} of "
                f"{type(module).__name__}; use --no-streaming"
            )
    model.eval()
    return model


def module_name(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ShrinkError(f"module {type(module).__name__} not found in the model")  # pragma: no cover


class Loader:
    """Loads a module's weights from the checkpoint into the skeleton, in place of its meta
    parameters, cast to the skeleton's dtype (as from_pretrained casts).

    Decoder layers reuse one pool of device tensors: layer i+1 is read into the storage layer i
    used (same shapes), so memory stays at one layer and the allocator never fragments. Bytes go
    straight from the file into the tensor when dtype and device match, else through one reusable
    CPU staging buffer."""

    def __init__(self, ck: Checkpoint, device: str):
        self.ck, self.device = ck, torch.device(device)
        self.pool: dict[str, torch.Tensor] = {}
        self.staging = torch.empty(0, dtype=torch.uint8)

    def _slots(self, module: nn.Module):
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.is_meta:
                owner, _, attr = name.rpartition(".")
                yield name, module.get_submodule(owner) if owner else module, attr, p

    def load(self, module: nn.Module, prefix: str, reuse: bool = True) -> int:
        slots = list(self._slots(module))
        missing = [prefix + n for n, *_ in slots if prefix + n not in self.ck.tensors]
        if missing:
            raise ShrinkError(
                f"tensor '{missing[0]}' is not in the checkpoint {self.ck.folder}: "
                "its names do not follow the transformers layout; use --no-streaming"
            )
        total = 0
        handles: dict[Path, object] = {}
        try:
            place = {n: self.ck.tensors[prefix + n] for n, *_ in slots}
            for name, owner, attr, meta in sorted(
                slots, key=lambda s: (str(place[s[0]].file), place[s[0]].start)
            ):
                info = place[name]
                if list(meta.shape) != info.shape:
                    raise ShrinkError(
                        f"tensor '{prefix + name}' has shape {info.shape} in the "
                        f"checkpoint but {list(meta.shape)} in the config"
                    )
                dst = self.pool.get(name) if reuse else None
                if dst is None or dst.shape != meta.shape or dst.dtype != meta.dtype:
                    dst = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
                    if reuse:
                        self.pool[name] = dst
                f = handles.get(info.file)
                if f is None:
                    f = handles[info.file] = open(info.file, "rb", buffering=0)
                src_dtype = DTYPES.get(info.dtype)
                if src_dtype is None:
                    raise ShrinkError(
                        f"unsupported safetensors dtype {info.dtype} in {info.file.name}"
                    )
                if src_dtype == dst.dtype and dst.device.type == "cpu":
                    readinto(f, info, dst.view(-1).view(torch.uint8))
                else:
                    if self.staging.numel() < info.nbytes:
                        self.staging = torch.empty(info.nbytes, dtype=torch.uint8)
                    buf = self.staging[: info.nbytes]
                    readinto(f, info, buf)
                    dst.copy_(buf.view(src_dtype).view(info.shape))
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(dst, requires_grad=False)
                else:
                    owner._buffers[attr] = dst
                total += dst.numel() * dst.element_size()
        finally:
            for h in handles.values():
                h.close()
        for n, b in module.named_buffers():  # real non-persistent buffers (e.g. embed_scale)
            if not b.is_meta and b.device != self.device:
                owner, _, attr = n.rpartition(".")
                (module.get_submodule(owner) if owner else module)._buffers[attr] = b.to(
                    self.device
                )
        return total

    @staticmethod
    def free(module: nn.Module) -> None:
        """Put the module's weights back on meta (their storage stays in the pool, if pooled)."""
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and not p.is_meta:
                    m._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)
        trim_memory()


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that save_pretrained leaves out because they are tied to another."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()


def copy_tokenizer(src: Path, dst: Path, trust_remote_code: bool) -> None:
    """Save the tokenizer the way the in-memory path does (load + save_pretrained)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no tokenizer: a weights-only folder is still valid
        return
    tok.save_pretrained(dst)


def write_random_checkpoint(
    config,
    folder: str | Path,
    max_shard_bytes: int = 500 << 20,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """Save a random-weight checkpoint of ``config`` without ever holding the whole model:
    tensors are made one at a time and written one shard at a time (norm weights 1, others
    N(0, std)). Layers may split across shards. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(config, dtype)
    names = [(k, v.shape) for k, v in skeleton.state_dict().items()]
    skip = tied_keys(skeleton)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []

    def flush(final: bool) -> None:
        nonlocal size
        if shards[-1]:
            name = f"shard-{len(files):05d}.tmp"
            save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
            files.append(name)
        shards[-1] = {}
        size = 0

    weight_map: dict[str, str] = {}
    for key, shape in names:
        if key in skip:
            continue
        owner = key.rpartition(".")[0].rpartition(".")[2]
        if "norm" in owner:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush(False)
        shards[-1][key] = t
        weight_map[key] = str(len(files))
        size += nbytes
    flush(True)
    n = len(files)
    final_names = {
        str(i): (SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        for i in range(n)
    }
    for i, name in enumerate(files):
        os.replace(folder / name, folder / final_names[str(i)])
    if n > 1:
        total = sum((folder / f).stat().st_size for f in final_names.values())
        (folder / INDEX).write_text(
            json.dumps(
                {
                    "metadata": {"total_size": total},
                    "weight_map": {k: final_names[v] for k, v in sorted(weight_map.items())},
                },
                indent=2,
            )
            + "\n"
        )
    cfg = skeleton.config
    cfg.architectures = [type(skeleton).__name__]
    cfg.save_pretrained(folder)
    return folder
