"""What kind of artifact a folder is: a Hugging Face folder, a GPTQ checkpoint or an ONNX export."""
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


def artifact_kind(path: str | Path) -> str:
    """``"gguf"`` (a .gguf file, or a folder holding one), ``"onnx"`` (a folder with a .onnx
    model), ``"gptq"`` (an HF folder whose config has a GPTQ ``quantization_config``) or ``"hf"``
    (any other HF model folder)."""
    p = artifact_path(path)
    if gguf_file(p) is not None:
        return "gguf"
    if not p.is_dir():
        raise ShrinkError(f"'{path}' is not a folder; give a model folder written by shrink "
                          "(Hugging Face, GPTQ or ONNX)")
    if is_onnx_folder(p):
        return "onnx"
    config = p / "config.json"
    if not config.is_file():
        raise ShrinkError(f"'{path}' is not a model folder (no config.json, genai_config.json or "
                          ".onnx file in it)")
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise ShrinkError(f"cannot read {config}: {e}") from None
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return "gptq"
    if method:
        raise ShrinkError(f"'{path}' is quantized with '{method}', which shrink does not run; "
                          "shrink runs plain HF, GPTQ and ONNX folders")
    return "hf"


def onnx_record(path: Path) -> dict:
    """The last ``export`` stage of an ONNX folder's shrink.json (empty if none)."""
    f = Path(path) / "shrink.json"
    if not f.is_file():
        return {}
    for stage in reversed(json.loads(f.read_text()).get("stages", [])):
        if stage.get("stage") == "export":
            return stage
    return {}
