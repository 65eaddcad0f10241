"""The artifact kinds shrink runs: one object per format (Hugging Face, GPTQ, ONNX, GGUF), each
knowing how to recognise, load, score, generate with, benchmark, verify and describe its
artifacts (:class:`shrink.runtime.kinds.base.Kind`). Everything outside this package asks the
registry instead of naming formats::

    kind = kinds.detect(path)          # the kind of a folder or file, or one ShrinkError line
    kind.generate(path, prompt, ...)
    kinds.verify(path, **kw)           # the one fresh-process check of any written artifact

A new kind is one module with a :class:`Kind` subclass and one :func:`register_kind` call.
Kinds are tried in registration order; the first whose ``detect`` says yes wins.
"""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.hfconfig import quant_method
from shrink.runtime.artifacts import artifact_path
from shrink.runtime.kinds.base import Card, Kind, Measure
from shrink.runtime.kinds.gguf import GgufKind
from shrink.runtime.kinds.gptq import GptqKind
from shrink.runtime.kinds.hf import HfKind
from shrink.runtime.kinds.onnx import OnnxKind

__all__ = [
    "Card",
    "Kind",
    "Measure",
    "all_kinds",
    "artifact_kind",
    "describe",
    "detect",
    "for_model",
    "get",
    "register_kind",
    "verify",
]

_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add ``kind`` (an instance) to the registry under ``kind.name``; returns it."""
    if not kind.name:
        raise ShrinkError(f"{type(kind).__name__} has no name")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (a test's toy kind) from the registry."""
    _KINDS.pop(name, None)


def all_kinds() -> list[Kind]:
    return list(_KINDS.values())


def get(name: str) -> Kind:
    """The registered kind called ``name``."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ShrinkError(f"unknown artifact kind '{name}' (known: {', '.join(_KINDS)})") from None


def detect(path: str | Path) -> Kind:
    """The kind of the artifact at ``path`` (a folder, a file, or the embedded model's name)."""
    p = artifact_path(path)
    for kind in _KINDS.values():
        if p.exists() and kind.detect(p):
            return kind
    if not p.exists():
        raise ShrinkError(
            f"'{path}' is not a folder; give a model folder written by shrink ({_names()})"
        )
    method = quant_method(p) if p.is_dir() else ""
    if method:
        raise ShrinkError(
            f"'{path}' is quantized with '{method}', which shrink does not run; "
            f"shrink runs {_names()} artifacts"
        )
    raise ShrinkError(
        f"'{path}' is not a model folder of any kind shrink runs ({_names()}: "
        "no config.json, genai_config.json, .onnx or .gguf file in it)"
    )


def _names() -> str:
    return ", ".join(_KINDS)


def artifact_kind(path: str | Path) -> str:
    """The name of :func:`detect`'s kind."""
    return detect(path).name


def for_model(model: str | Path) -> Kind:
    """The kind of ``model`` when it is a local path; a name that is not (a hub id, an alias)
    is a Hugging Face model, which :func:`shrink.core.models.load_model` resolves."""
    return detect(model) if Path(model).expanduser().exists() else get("hf")


def verify(path: str | Path, kind: str | None = None, **kw) -> dict:
    """Check a written artifact in a fresh process with its kind's real consumer (transformers,
    GPTQModel, onnxruntime, llama.cpp); ``kw`` goes to the kind's ``verify``. Raises
    ShrinkError when the check fails; returns its record."""
    k = get(kind) if kind else detect(path)
    return k.verify(Path(path), **kw)


def describe(path: str | Path) -> dict:
    """Format, bytes, weight bytes and precision of the artifact at ``path``."""
    p = artifact_path(path)
    return detect(p).describe(p)


for _kind in (GgufKind(), OnnxKind(), GptqKind(), HfKind()):
    register_kind(_kind)
