"""The ``export`` stage: artifacts for other runtimes. ``onnx`` (onnxruntime-genai, with KV cache)
lives in :mod:`shrink.stages.export.onnx`, ``gguf`` (llama.cpp, Ollama, LM Studio) in
:mod:`shrink.stages.export.gguf`. One format writes its artifact at the output; several write
one sub-folder each (``OUT/onnx``, ``OUT/gguf``)."""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.progress import stderr
from shrink.stages.configs import ExportConfig
from shrink.stages.export.onnx import export_onnx
from shrink.stages.pipeline import Artifact, BuildContext, Stage


def _onnx(model_dir, dest: Path, config: ExportConfig, force: bool, verify: bool, log):
    return export_onnx(model_dir, dest, config, force=force, verify=verify, log=log)


def _gguf(model_dir, dest: Path, config: ExportConfig, force: bool, verify: bool, log):
    from shrink.stages.export.gguf import export_gguf
    from shrink.stages.export.imatrix import ImatrixSpec

    return export_gguf(
        model_dir,
        dest,
        config.gguf,
        force=force,
        verify=verify,
        threads=config.threads,
        log=log,
        imatrix=ImatrixSpec.from_config(config),
    )


# every format's exporter, by the name config.formats() gives it (the artifact kind it writes)
EXPORTERS = {"onnx": _onnx, "gguf": _gguf}


def export(
    model_dir: str | Path,
    output: str | Path,
    config: ExportConfig,
    *,
    force: bool = False,
    verify: bool = True,
    log=None,
) -> dict[str, object]:
    """Write every format ``config`` asks for; returns {format: result}."""
    formats = config.formats()
    if not formats:
        raise ShrinkError("choose an export format: --onnx PRECISION and/or --gguf TYPE")
    out = Path(output)
    results: dict[str, object] = {}
    for fmt in formats:
        dest = out if len(formats) == 1 else out / fmt
        results[fmt] = EXPORTERS[fmt](model_dir, dest, config, force, verify, log)
    return results


class ExportStage(Stage):
    """Artifacts for other runtimes, each published as its own folder (``OUT/onnx``,
    ``OUT/gguf``)."""

    name = "export"

    def check(self, ctx: BuildContext) -> None:
        if not self.settings(ctx).formats():
            raise ShrinkError("export: choose a format (export: {onnx: int4} or {gguf: q4_k_m})")

    def describe(self, ctx: BuildContext) -> list[str]:
        e = self.settings(ctx)
        return ([f"export ONNX ({e.onnx}, LM head {e.lm_head}, {e.target})"] if e.onnx else []) + (
            [f"export GGUF ({e.gguf}, for llama.cpp)"] if e.gguf else []
        )

    def output_part(self, config) -> str | None:
        e = self.settings_of(config)
        return "-".join(f"{fmt}-{getattr(e, fmt)}" for fmt in e.formats()) or None

    def disk_bytes(self, ctx: BuildContext) -> int:
        e, base = self.settings(ctx), ctx.source_bytes()
        total = (base if e.onnx == "fp32" else base // 2) if e.onnx else 0
        return total + (base * 2 if e.gguf else 0)  # GGUF: the lossless intermediate and file

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        e = self.settings(ctx)
        done: dict = {}
        if e.onnx:
            done["onnx"] = _export_onnx(ctx, e, work_dir / "onnx")
        if e.gguf:
            done["gguf"] = _export_gguf(ctx, e, work_dir / "gguf")
        return done

    def apply(self, ctx: BuildContext, result: dict) -> None:
        for fmt, row in result.items():
            ctx.add(Artifact(fmt, Path(row["path"]), fmt, publish=fmt))

    def report(self, ctx: BuildContext, result: dict) -> dict:
        return {
            "export": {
                fmt: {k: v for k, v in row.items() if k not in ("verification", "path")}
                for fmt, row in result.items()
            }
            or None,
            "sizes_bytes": {fmt: row["size_bytes"] for fmt, row in result.items()},
        }

    def absent_report(self, ctx: BuildContext) -> dict:
        return {"export": None}


def _export_onnx(ctx: BuildContext, config: ExportConfig, dest: Path) -> dict:
    # int4 from the GPTQ checkpoint when there is one (the builder keeps its calibrated
    # weights; measured better than the builder's own round-to-nearest int4), else from the
    # full-precision model
    src = ctx.model if config.onnx == "int4" else ctx.float_model
    r = export_onnx(src, dest, config, force=True, log=_log(ctx))
    return {
        "path": str(dest),
        "kv_cache": r.kv_cache,
        "method": r.method,
        "precision": r.precision,
        "lm_head": r.lm_head,
        "size_bytes": r.folder_bytes,
        "verification": r.verification,
    }


def _export_gguf(ctx: BuildContext, config: ExportConfig, dest: Path) -> dict:
    from shrink.stages.export.gguf import export_gguf
    from shrink.stages.export.gguf_point import (
        DenseComparison,
        compare_with_dense,
        evaluation_sets,
    )
    from shrink.stages.export.imatrix import ImatrixSpec

    # from the full-precision model: llama.cpp quantizes it itself (a GPTQ checkpoint would be
    # dequantized and rounded twice)
    pruned = bool(ctx.layers and ctx.layers != ctx.source_layers)
    name = f"{Path(ctx.config.model.rstrip('/')).name}-{ctx.layers}L" if pruned else None
    # the dense source through the same type, on the same evaluation: what pruning bought
    # over quantization alone (a local source only: a hub id has no folder to quantize)
    dense = getattr(ctx.source, "path", None)
    imatrix = ImatrixSpec.from_config(config)
    compare = pruned and dense
    g = export_gguf(
        ctx.float_model,
        dest,
        config.gguf,
        force=True,
        threads=config.threads,
        log=_log(ctx),
        name=name,
        imatrix=imatrix,
        # the check in llama.cpp measures the evaluation sets too: one fresh process
        measure=evaluation_sets(ctx.config.evaluate) if compare else None,
    )
    comparison = (
        compare_with_dense(
            g.path,
            ctx.float_model,
            config.gguf,
            DenseComparison(Path(dense), ctx.config.evaluate),
            imatrix=imatrix,
            threads=config.threads,
            measured=g.verification.get("measured"),
            log=_log(ctx),
        )
        if compare
        else None
    )
    if comparison is not None:
        _record_measured(ctx, dest, comparison["this"])
    return {
        "path": str(dest),
        "type": g.type,
        "file": g.file,
        "size_bytes": g.bytes,
        "block_count": g.block_count,
        "verification": g.verification,
        "tensor_types": g.tensor_types,
        "imatrix": g.get("imatrix"),
        "comparison": comparison,
    }


def _record_measured(ctx: BuildContext, folder: Path, this: dict) -> None:
    """The exported file's perplexities, measured for the dense comparison, go into the build's
    book, so that the evaluate stage does not measure the same file on the same blocks again."""
    import math

    from shrink.core.measures import weights_key
    from shrink.core.perplexity import PerplexityResult

    if ctx.book is None:
        return
    key = weights_key(folder)
    for s in this["evaluation"]:
        value = this["perplexity"][s["data"]]
        name = f"{s['data']}, {s['samples']} x {s['seq_len']} tokens, seed {s['seed']}"
        data = {
            "source": s["data"],
            "samples": s["samples"],
            "seq_len": s["seq_len"],
            "seed": s["seed"],
            "tokens": s["samples"] * s["seq_len"],
            "set": name,
        }
        result = PerplexityResult(
            value,
            math.log(value),
            s["samples"] * (s["seq_len"] - 1),
            0.0,
            data=data,
            model=str(folder),
        )
        ctx.book.put(key, name, result, by="export", what=f"{folder} (beside the dense model)")


def _log(ctx: BuildContext):
    return stderr.print if ctx.show_progress else None
