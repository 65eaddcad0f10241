"""The ``export`` stage: artifacts for other runtimes. ``onnx`` (onnxruntime-genai, with KV cache)
lives in :mod:`shrink.stages.export.onnx`. One format writes its artifact at the output; several
write one sub-folder each (``OUT/onnx``)."""
from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.stages.configs import ExportConfig
from shrink.stages.export.onnx import OnnxResult, export_onnx

ExportResult = OnnxResult


def export(model_dir: str | Path, output: str | Path, config: ExportConfig, *,
           force: bool = False, verify: bool = True, log=None) -> dict[str, object]:
    """Write every format ``config`` asks for; returns {format: result}."""
    formats = config.formats()
    if not formats:
        raise ShrinkError("choose an export format: --onnx PRECISION")
    out = Path(output)
    results: dict[str, object] = {}
    for fmt in formats:
        dest = out if len(formats) == 1 else out / fmt
        if fmt == "onnx":
            results[fmt] = export_onnx(model_dir, dest, config, force=force, verify=verify,
                                       log=log)
    return results
