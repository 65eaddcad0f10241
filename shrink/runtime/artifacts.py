"""Paths of artifacts: the embedded model's alias, an ONNX folder, the GGUF file of a folder, an
ONNX export's record. Which kind an artifact is: :mod:`shrink.runtime.kinds`."""

from __future__ import annotations

import json
from pathlib import Path

from shrink.core.errors import ShrinkError


def artifact_path(artifact: str | Path) -> Path:
    """A folder path; the embedded model's name (smollm2-135m) also works."""
    from shrink.core.models import EMBEDDED, ensure_embedded

    p = Path(artifact).expanduser()
    if not p.exists() and str(artifact).lower() == EMBEDDED:
        return ensure_embedded()
    return p


def is_onnx_folder(path: str | Path) -> bool:
    """A folder holding an ONNX model (onnxruntime-genai's genai_config.json or a .onnx file)."""
    p = Path(path)
    return p.is_dir() and ((p / "genai_config.json").is_file() or any(p.glob("*.onnx")))


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file of a ``.gguf`` path or of a folder ``shrink export --gguf`` wrote."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir():
        found = sorted(f for f in p.glob("*.gguf") if not f.name.startswith("."))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ShrinkError(f"'{path}' holds {len(found)} GGUF files; give one of them")
    return None


def onnx_record(path: Path) -> dict:
    """The last ``export`` stage of an ONNX folder's shrink.json (empty if none)."""
    f = Path(path) / "shrink.json"
    if not f.is_file():
        return {}
    for stage in reversed(json.loads(f.read_text()).get("stages", [])):
        if stage.get("stage") == "export":
            return stage
    return {}
