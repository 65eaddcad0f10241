"""Helpers of llama.cpp's quantizer: importance matrices, stored as ``.npz`` (one float32 array
per GGUF tensor name) and handed to ``llama_model_quantize`` through its C API, and the tensor
types of a quantized file (which tensors fell back to which type).

llama.cpp takes the importance matrix as an array of ``llama_model_imatrix_data`` {name, data,
size} ended by a NULL name (``llama_model_quantize_params.imatrix``); llama-cpp-python declares
that structure in ctypes, so the arrays are passed directly, with no imatrix file in llama.cpp's
own format and no ``llama-quantize`` binary (llama-cpp-python ships none). What the arrays hold
(the mean squared input per column) is computed by :mod:`shrink.stages.export.imatrix`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shrink.core.errors import ShrinkError, install_hint


def save_imatrix(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write {tensor name: array} to ``path`` (.npz), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """An importance matrix written by :func:`save_imatrix`."""
    try:
        with np.load(path) as z:
            return {name: np.ascontiguousarray(z[name], dtype=np.float32) for name in z.files}
    except (OSError, ValueError) as e:
        raise ShrinkError(f"cannot read the importance matrix {path}: {e}") from None


def imatrix_entries(llama_cpp, imatrix: dict):
    """``llama_model_quantize_params.imatrix``: an array of {name, data, size} ended by a NULL
    name, as llama-quantize builds it. Returns (pointer, the objects it points into: keep them
    alive until llama.cpp has returned)."""
    import ctypes

    if not hasattr(llama_cpp, "llama_model_imatrix_data"):
        raise ShrinkError(
            "this llama-cpp-python takes no importance matrix through its C API; "
            f"upgrade it: {install_hint('gguf')}"
        )
    arrays = {str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
    names = [name.encode() for name in arrays]
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for entry, name, (key, arr) in zip(entries, names, arrays.items()):
        if not np.isfinite(arr).all():
            raise ShrinkError(f"the importance matrix of {key} has non-finite values")
        entry.name = name
        entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = arr.size
    entries[len(arrays)].name = None
    pointer = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return pointer, (entries, names, arrays)


def imatrix_overrides(llama_cpp, dataset: str, entries: int, chunks: int):
    """The metadata llama-quantize records with an imatrix (quantize.imatrix.*), as KV
    overrides that llama.cpp writes into the quantized file."""
    import ctypes

    keys = [
        ("quantize.imatrix.file", "shrink (computed in PyTorch)"),
        ("quantize.imatrix.dataset", dataset[:127]),
        ("quantize.imatrix.entries_count", int(entries)),
        ("quantize.imatrix.chunks_count", int(chunks)),
    ]
    arr = (llama_cpp.llama_model_kv_override * (len(keys) + 1))()
    for o, (key, value) in zip(arr, keys):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = value.encode()
    arr[len(keys)].key = b""
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_kv_override)), arr


def tensor_type_counts(path: str | Path) -> dict[str, int]:
    """How many tensors of each type the GGUF file holds, e.g. {"Q5_0": 150, "Q8_0": 1, ...}:
    with a k-quant type, which tensors fell back to another type (rows not a multiple of 256)."""
    from shrink.runtime import gguf_header

    return gguf_header.tensor_type_counts(gguf_header.read_header(path))


def types_line(types: dict[str, int]) -> str:
    """``Q5_0 150, F32 61, Q8_0 1``: a file's tensor types, most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
