"""Merging a LoRA adapter into a checkpoint tensor by tensor, without loading the model.

peft's ``merge_and_unload`` needs the whole base model in memory. Here every LoRA target
``W`` is read alone from the base's safetensors shards, ``W + scale * B @ A`` is computed in
float32 (``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, per module as peft computes
it), cast back to the tensor's dtype and written; every other tensor is copied byte for byte.
Tensors the adapter saves whole (peft's ``modules_to_save``, or the base layer of an adapted
embedding) replace their originals before any LoRA update. The output
is written in shards of at most ``max_shard_bytes`` with an index, the config, the generation
config and the tokenizer. Peak memory: one tensor and its LoRA factors, plus one 64 MiB copy
buffer."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from shrink.core.errors import ShrinkError, first_line
from shrink.streaming.checkpoint import (
    COPY_CHUNK,
    DTYPES,
    INDEX,
    SINGLE,
    Checkpoint,
    TensorInfo,
    dtype_code,
    read_header,
    readinto,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclass
class Lora:
    """The update of one base tensor: ``scale * B @ A`` (transposed for an embedding)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    embedding: bool  # peft's lora_embedding_A/B: the delta is (B @ A).T


@dataclass
class Entry:
    """One tensor of the output: its source bytes, the dtype it is written in, and the LoRA
    update or whole replacement (from the adapter) applied to it."""

    name: str
    info: TensorInfo
    dtype: str
    lora: Lora | None = None
    replace: TensorInfo | None = None

    @property
    def nbytes(self) -> int:
        return self.info.numel * _itemsize(self.dtype)


def _itemsize(code: str) -> int:
    return torch.empty((), dtype=DTYPES[code]).element_size()


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShrinkError(f"no {ADAPTER_CONFIG} in {adapter_dir}: not a peft adapter") from None
    except (OSError, ValueError) as e:
        raise ShrinkError(f"{path} is damaged: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ShrinkError(f"{path} is not a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ShrinkError(
            f"the adapter in {adapter_dir} is {kind}; the streamed merge applies LoRA adapters only"
        )
    for flag, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA biases"),
        ("fan_in_fan_out", "fan_in_fan_out layers"),
    ):
        if cfg.get(flag):
            raise ShrinkError(
                f"the adapter in {adapter_dir} uses {what}, which the streamed "
                "merge does not apply; merge it in memory"
            )
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise ShrinkError(f"{path} has no positive integer 'r'")
    return cfg


def _pattern(patterns: dict, module: str, default):
    """peft's per-module override (``rank_pattern``/``alpha_pattern``): the first key that
    matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_scale(cfg: dict, module: str, rank: int) -> float:
    """peft's ``scaling`` of one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$"
    r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$"
)


def adapter_updates(
    adapter_dir: Path, base: Checkpoint
) -> tuple[dict[str, Lora], dict[str, TensorInfo]]:
    """The adapter's updates keyed by base tensor name: LoRA pairs, and whole tensors
    (``modules_to_save``) that replace their originals. Every name and shape is checked against
    the base before anything is written."""
    cfg = read_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ShrinkError(
            f"no {ADAPTER_WEIGHTS} in {adapter_dir}: the streamed merge reads "
            "safetensors adapters only"
        )
    header, _, start = read_header(adapter_dir / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    whole: dict[str, TensorInfo] = {}
    for key, h in header.items():
        a, b = h["data_offsets"]
        info = TensorInfo(
            adapter_dir / ADAPTER_WEIGHTS, h["dtype"], list(h["shape"]), start + a, start + b
        )
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            module = m.group("module") or m.group("emodule")
            kind = (m.group("kind") or m.group("ekind")).replace("embedding_", "")
            pairs.setdefault(module, {})[kind] = info
            pairs[module]["embedding"] = m.group("ekind") is not None
        elif ".lora_" in name:
            raise ShrinkError(
                f"adapter tensor '{key}' is not a LoRA A/B matrix the streamed "
                "merge knows; merge it in memory"
            )
        else:  # a whole tensor (modules_to_save, or a saved embedding's base layer)
            whole[name.replace(".base_layer.", ".")] = info
    updates: dict[str, Lora] = {}
    for module, p in pairs.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise ShrinkError(f"the adapter has only one of lora_A/lora_B for '{module}'")
        a, b, emb = p["lora_A"], p["lora_B"], p["embedding"]
        target = f"{module}.weight"
        w = base.tensors.get(target)
        if w is None:
            raise ShrinkError(
                f"the adapter changes '{target}', which is not in the base "
                f"checkpoint {base.folder} (a tied or renamed weight?)"
            )
        rank = a.shape[0]
        out_shape = [b.shape[0], a.shape[1]]
        if emb:
            out_shape = out_shape[::-1]
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or w.shape != out_shape:
            raise ShrinkError(
                f"the adapter's factors for '{module}' (A {a.shape}, B {b.shape}) "
                f"do not fit the base tensor's shape {w.shape}"
            )
        updates[target] = Lora(a, b, lora_scale(cfg, module, rank), emb)
    for name, info in whole.items():
        w = base.tensors.get(name)
        if w is None or w.shape != info.shape:
            raise ShrinkError(
                f"the adapter saves '{name}' whole, but the base checkpoint has "
                f"{'no such tensor' if w is None else f'shape {w.shape}'}"
            )
    return updates, whole


def _read(info: TensorInfo, handles: dict) -> torch.Tensor:
    """One tensor from its file, as stored."""
    f = handles.get(info.file)
    if f is None:
        f = handles[info.file] = open(info.file, "rb", buffering=0)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    readinto(f, info, buf)
    return buf.view(DTYPES[info.dtype]).view(info.shape)


def merged_tensor(e: Entry, handles: dict) -> torch.Tensor:
    """The output value of an entry that is not a plain copy."""
    w = _read(e.replace if e.replace is not None else e.info, handles).to(torch.float32)
    if e.lora is not None:
        a = _read(e.lora.a, handles).to(torch.float32)
        b = _read(e.lora.b, handles).to(torch.float32)
        delta = b @ a
        w += e.lora.scale * (delta.T if e.lora.embedding else delta)
    return w.to(DTYPES[e.dtype])


# Loaders that map a whole shard (transformers, GPTQModel) hold its full size in their address
# space, which a data limit counts: small shards keep a model larger than memory loadable.
SHARD_BYTES = 512 << 20


def write_shard(path: Path, entries: list[Entry], metadata: dict, handles: dict) -> int:
    """A safetensors file: header from the planned shapes, then each tensor computed or copied
    in turn, so one tensor is held at a time."""
    entries = sorted(entries, key=lambda e: (-_itemsize(e.dtype), e.name))  # keeps alignment
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": e.info.shape,
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            if e.lora is None and e.replace is None and e.dtype == e.info.dtype:
                _copy_bytes(e.info, f, handles)
            else:
                f.write(merged_tensor(e, handles).contiguous().view(-1).view(torch.uint8).numpy())
    return offset


def _copy_bytes(info: TensorInfo, out, handles: dict) -> None:
    src = handles.get(info.file)
    if src is None:
        src = handles[info.file] = open(info.file, "rb", buffering=0)
    src.seek(info.start)
    left = info.nbytes
    while left:
        chunk = src.read(min(left, COPY_CHUNK))
        if not chunk:
            raise ShrinkError(f"{info.file} is truncated")
        out.write(chunk)
        left -= len(chunk)


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Entries in source order, grouped greedily into shards of at most ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    """config.json (its dtype updated when the weights are cast), generation config, tokenizer."""
    from shrink.streaming.skeleton import copy_tokenizer

    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
        cfg.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    copy_tokenizer(base_dir, out_dir, trust_remote_code=False)


def merge_adapter_streamed(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = SHARD_BYTES,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write ``base_dir`` with the LoRA adapter of ``adapter_dir`` merged into ``out_dir`` (see
    the module docstring). ``dtype`` casts every floating tensor (default: each keeps its
    checkpoint dtype, as the in-memory merge saves in the source dtype). Returns a summary."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise ShrinkError(f"{base_dir} has no config.json: not a model folder")
    base = Checkpoint(base_dir)
    updates, whole = adapter_updates(adapter_dir, base)
    code = dtype_code(dtype) if dtype is not None else None
    entries = []
    for name, info in base.tensors.items():  # source order: file, then offset
        out = code if code is not None and info.dtype in FLOATS else info.dtype
        entries.append(Entry(name, info, out, updates.get(name), whole.get(name)))
    entries.sort(key=lambda e: (str(e.info.file), e.info.start))
    shards = plan_shards(entries, max_shard_bytes)
    if log:
        merged_bytes = sum(e.nbytes for e in entries if e.lora is not None)
        log(
            f"streamed merge: {len(updates)} LoRA tensor(s) ({merged_bytes / 1e9:.2f} GB) into "
            f"{len(shards)} shard(s); peak memory one tensor"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    handles: dict = {}
    try:
        for k, shard in enumerate(shards):
            fname = SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            total += write_shard(out_dir / fname, shard, {"format": "pt"}, handles)
            weight_map.update({e.name: fname for e in shard})
            if log:
                log(f"  wrote {fname}")
    finally:
        for h in handles.values():
            h.close()
    if n > 1:
        (out_dir / INDEX).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
            + "\n"
        )
    _copy_side_files(base_dir, out_dir, dtype)
    return {
        "merged_tensors": sorted(updates),
        "replaced_tensors": sorted(whole),
        "shards": n,
        "bytes_written": total,
        "peak_tensor_bytes": max((e.nbytes for e in entries), default=0),
    }
