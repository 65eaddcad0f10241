"""The one reader of safetensors headers and of a model folder's shard layout.

Every path that reads weights (the in-memory loader, streamed score / prune / bridge, GPTQ
sizing, the GGUF writer) asks this module first, so a checkpoint is judged the same way
everywhere: a header that lies about its file (longer than the file, offsets past its end, a
byte range that does not match the tensor's shape and dtype, overlapping tensors, a dtype shrink
cannot read), shards that disagree with their index (a shard missing, a tensor listed under the
wrong file, a shard name that leaves the folder) or with each other (one tensor in two shards)
is a ShrinkError naming the file and the tensor, before any weight is read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from shrink.core.errors import ShrinkError, first_line

INDEX = "model.safetensors.index.json"
# bytes per element of the dtypes shrink reads (the safetensors codes)
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
MAX_INDEX = 64 << 20
_LIST_AT_MOST = 5


def _not_safetensors(path: Path, size: int, why: str) -> ShrinkError:
    what = "empty" if size == 0 else f"{size} bytes"
    return ShrinkError(
        f"{path} is not a valid safetensors file ({what}: {why}); it may be truncated or damaged"
    )


def _check_tensor(path: Path, name, info, data_size: int) -> tuple[int, int]:
    """The (start, end) of one tensor's bytes after checking its entry against the file."""
    if not isinstance(name, str) or not isinstance(info, dict):
        raise ShrinkError(f"{path}: header entry {name!r} is not a tensor description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ShrinkError(
            f"{path}: tensor {name} has dtype {dtype!r}, which shrink cannot read "
            f"(it reads {', '.join(DTYPE_SIZES)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)
    ):
        raise ShrinkError(f"{path}: tensor {name} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ShrinkError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if end > data_size:
        raise ShrinkError(
            f"{path} is truncated: tensor {name} ends at byte {end} of the data, "
            f"the file holds {data_size} bytes of data"
        )
    want = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != want:
        raise ShrinkError(
            f"{path}: tensor {name} takes {end - start} bytes, but its shape "
            f"{shape} in {dtype} needs {want}; the file is damaged"
        )
    return start, end


def parse_header(path: str | Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, data start) of one safetensors file, from its header only, after
    checking every entry against the file (see the module docstring). ``tensors`` maps a name to
    its ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the data start)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ShrinkError(f"{path} is not a regular file; a safetensors file was expected")
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise _not_safetensors(path, size, "too short")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise _not_safetensors(path, size, f"header of {n} bytes in a file of {size}")
            text = f.read(n)
    except OSError as e:
        raise ShrinkError(f"cannot read {path}: {first_line(e)}") from None
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise _not_safetensors(path, size, f"bad header: {first_line(e)}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, size, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _not_safetensors(path, size, "__metadata__ is not an object")
    data_size = size - 8 - n
    spans = sorted((_check_tensor(path, k, v, data_size), k) for k, v in header.items())
    for ((_, end), a), ((start, _), b) in zip(spans, spans[1:]):
        if start < end:
            raise ShrinkError(f"{path}: tensors {a} and {b} overlap in the file; it is damaged")
    return header, meta, 8 + n


def read_header(path: str | Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one checked safetensors file."""
    return parse_header(path)[0]


def _names(keys, at_most: int = _LIST_AT_MOST) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - at_most} more" if len(keys) > at_most else ""
    return ", ".join(keys[:at_most]) + more


def _read_index(folder: Path) -> dict[str, str]:
    index = folder / INDEX
    try:
        if index.stat().st_size > MAX_INDEX:
            raise ValueError(f"larger than {MAX_INDEX >> 20} MB")
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("'weight_map' is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ShrinkError(
            f"{index} is damaged (want JSON with a 'weight_map' object: {first_line(e)})"
        ) from None
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or not shard
            or "/" in shard
            or "\\" in shard
            or shard in (".", "..")
        ):
            raise ShrinkError(
                f"{index} is damaged: tensor {name} is listed in {shard!r}, which "
                "is not a file name in the model folder"
            )
    return weight_map


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index lists (ShrinkError for a
    damaged index or a missing shard), else every top-level ``*.safetensors`` file."""
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        return sorted(folder.glob("*.safetensors"))
    shards = sorted({folder / s for s in _read_index(folder).values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ShrinkError(
            f"{folder / INDEX} lists shards that are not in {folder}: {_names(missing)}"
        )
    return shards


def scan(folder: str | Path) -> tuple[dict[str, Path], dict[Path, tuple[dict, dict, int]]]:
    """({tensor name: the file holding it}, {file: its parse_header}) of a model folder, after
    checking every shard's header, that no tensor is in two shards and that the index (if any)
    agrees with the shards tensor by tensor."""
    folder = Path(folder)
    files = shard_files(folder)
    headers = {f: parse_header(f) for f in files}
    where: dict[str, Path] = {}
    for f, (tensors, _, _) in headers.items():
        for name in tensors:
            if name in where:
                raise ShrinkError(
                    f"tensor {name} is in two shards of {folder}: "
                    f"{where[name].name} and {f.name}; the checkpoint is "
                    "inconsistent (re-download or re-save it)"
                )
            where[name] = f
    if (folder / INDEX).is_file():
        _check_index(folder, _read_index(folder), where)
    return where, headers


def _check_index(folder: Path, weight_map: dict[str, str], where: dict[str, Path]) -> None:
    index = folder / INDEX
    for name, shard in weight_map.items():
        held = where.get(name)
        if held is None:
            raise ShrinkError(
                f"{index} lists tensor {name} in {shard}, which does not hold it; "
                "the checkpoint is inconsistent"
            )
        if held.name != shard:
            raise ShrinkError(
                f"{index} lists tensor {name} in {shard}, but {held.name} holds "
                "it; the checkpoint is inconsistent"
            )
    unlisted = [n for n in where if n not in weight_map]
    if unlisted:
        raise ShrinkError(
            f"{index} does not list {_names(unlisted)}, held by "
            f"{where[unlisted[0]].name}; the checkpoint is inconsistent"
        )


def shard_map(folder: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file that holds it} of a model folder (see :func:`scan`)."""
    return scan(folder)[0]


def folder_tensors(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a model folder, from its checked headers."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for tensors, _, _ in scan(folder)[1].values():
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in tensors.items()})
    return out
