"""The checkpoint on disk: which safetensors file holds which tensor, where, and reading and
writing tensors without loading the model."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from shrink.core.errors import ShrinkError, first_line
from shrink.core.models import check_decoder_only
from shrink.core.safetensors import INDEX, parse_header, scan

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SINGLE = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
COPY_CHUNK = 64 << 20


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: list[int]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.nbytes // max(self.numel, 1) if self.numel else 1


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, data start) of a safetensors file, from its JSON header only, checked
    against the file (:func:`shrink.core.safetensors.parse_header`)."""
    return parse_header(path)


class Checkpoint:
    """A folder of safetensors weights (one ``model.safetensors`` or shards + index json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file() and not any(self.folder.glob("*.safetensors")):
            raise ShrinkError(
                f"no safetensors weights in {self.folder} ({SINGLE} or {INDEX}): "
                "streaming reads safetensors checkpoints only"
            )
        _, headers = scan(self.folder)  # shards agree with the index and with each other
        self.files = sorted(headers)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict] = {}
        for path, (header, meta, start) in headers.items():
            self.metadata[path] = meta
            for key, info in header.items():
                a, b = info["data_offsets"]
                self.tensors[key] = TensorInfo(
                    path, info["dtype"], list(info["shape"]), start + a, start + b
                )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def weights_bytes(folder: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the checkpoint's weights take in memory when loaded in ``dtype``."""
    ck = Checkpoint(folder)
    if dtype is None:
        return ck.nbytes
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel * size if t.dtype.startswith(("F", "BF")) else t.nbytes for t in ck.tensors.values()
    )


def readinto(f, info: TensorInfo, out: torch.Tensor) -> None:
    """Read the tensor's byte range from an open file into the uint8 tensor ``out``."""
    view = memoryview(out.numpy())
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise ShrinkError(f"{info.file} is truncated")
        done += n


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (the inverse of ``DTYPES``)."""
    for code, t in DTYPES.items():
        if t == dtype:
            return code
    raise ShrinkError(f"safetensors cannot store {dtype}")  # pragma: no cover


def _layout(t: TensorInfo | torch.Tensor) -> tuple[str, list[int], int, int]:
    """(dtype code, shape, bytes, bytes per element) of a byte range or an in-memory tensor."""
    if isinstance(t, TensorInfo):
        return t.dtype, t.shape, t.nbytes, t.itemsize
    return dtype_code(t.dtype), list(t.shape), t.numel() * t.element_size(), t.element_size()


def write_safetensors(
    out: Path, entries: list[tuple[str, TensorInfo | torch.Tensor]], metadata: dict
) -> int:
    """Write a safetensors file whose tensors are byte ranges of other files, copied in 64 MiB
    chunks (the format: 8-byte header length, JSON header padded to 8, then the data), or
    tensors in memory (a modified tensor substituted for its original), written as they are."""
    entries = sorted(entries, key=lambda e: (-_layout(e[1])[3], e[0]))  # keeps tensors aligned
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in entries:
        code, shape, nbytes, _ = _layout(t)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    handles: dict[Path, object] = {}
    try:
        with open(out, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, t in entries:
                if isinstance(t, torch.Tensor):
                    f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
                    continue
                src = handles.get(t.file)
                if src is None:
                    src = handles[t.file] = open(t.file, "rb")
                src.seek(t.start)
                left = t.nbytes
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise ShrinkError(f"{t.file} is truncated")
                    f.write(chunk)
                    left -= len(chunk)
    finally:
        for h in handles.values():
            h.close()
    return offset


def load_folder_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ShrinkError(f"cannot read the config of {folder}: {first_line(e)}") from None
    check_decoder_only(config)
    if config.model_type not in SUPPORTED:
        raise ShrinkError(
            f"streaming does not support {config.model_type} yet (supported: "
            f"{', '.join(SUPPORTED)}); use --no-streaming"
        )
    return config


def check_complete(folder: str | Path, config, trust_remote_code: bool = False) -> Checkpoint:
    """The checkpoint of ``folder``, after checking that it holds every tensor ``config`` asks
    for, with its shape, and nothing else (ShrinkError naming them): streamed scoring and pruning
    read tensors by name and must not copy a checkpoint that does not match its config."""
    from shrink.core.models import check_checkpoint, meta_model

    ck = Checkpoint(folder)
    tensors = {k: (t.dtype, tuple(t.shape)) for k, t in ck.tensors.items()}
    check_checkpoint(folder, meta_model(config, trust_remote_code), tensors)
    return ck
