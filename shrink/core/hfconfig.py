"""Reading a Hugging Face folder's config.json and its quantization method, shared by the
runtime kinds (which tell a float folder from a GPTQ or AWQ one) and the memory planner (which
reads a quantized folder whole, never layer by layer)."""

from __future__ import annotations

import json
from pathlib import Path

from shrink.core.errors import ShrinkError


def read_config(path: str | Path) -> dict | None:
    """A folder's config.json, or None when it has none."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ShrinkError(f"cannot read {f}: {e}") from None
    if not isinstance(config, dict):
        raise ShrinkError(
            f"cannot read {f}: it holds a JSON {type(config).__name__}, not an object"
        )
    return config


def quant_method(path: str | Path) -> str:
    """The ``quant_method`` of a folder's quantization_config ('' when not quantized)."""
    cfg = read_config(path) or {}
    return str((cfg.get("quantization_config") or {}).get("quant_method", "")).lower()
