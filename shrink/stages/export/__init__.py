"""The ``export`` stage: artifacts for other runtimes. ``onnx`` (onnxruntime-genai, with KV cache)
lives in :mod:`shrink.stages.export.onnx`, ``gguf`` (llama.cpp, Ollama, LM Studio) in
:mod:`shrink.stages.export.gguf`. One format writes its artifact at the output; several write
one sub-folder each (``OUT/onnx``, ``OUT/gguf``)."""
from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.stages.configs import ExportConfig
from shrink.stages.export.onnx import export_onnx


def export(model_dir: str | Path, output: str | Path, config: ExportConfig, *,
           force: bool = False, verify: bool = True, log=None) -> dict[str, object]:
    """Write every format ``config`` asks for; returns {format: result}."""
    formats = config.formats()
    if not formats:
        raise ShrinkError("choose an export format: --onnx PRECISION and/or --gguf TYPE")
    out = Path(output)
    results: dict[str, object] = {}
    for fmt in formats:
        dest = out if len(formats) == 1 else out / fmt
        if fmt == "onnx":
            results[fmt] = export_onnx(model_dir, dest, config, force=force, verify=verify,
                                       log=log)
        elif fmt == "gguf":
            from shrink.stages.export.gguf import export_gguf

            results[fmt] = export_gguf(model_dir, dest, config.gguf, force=force, verify=verify,
                                       threads=config.threads, log=log)
    return results
