"""One point of the size/quality plane: a model through one GGUF type, measured in llama.cpp.

:func:`gguf_point` gives the bytes on disk, the perplexity on each evaluation set and the tensor
types (what fell back to what) of a model folder quantized to a GGUF type. The quantized file is
cached under shrink's cache folder, keyed by a hash of the weights, the type and the importance
matrix settings, so the dense model's point is made once and reused by every build and frontier
that compares against it.

:func:`compare_with_dense` puts an exported file next to the dense model through the same type
and the same importance matrix, on the same evaluation sets: what pruning bought over
quantization alone ("dense q4_k_m: 105.5 MB, 47.58; this model: 91.0 MB, 52.28").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from shrink.stages.configs import EvaluateConfig
from shrink.stages.export.gguf import check_type, export_gguf, gguf_file_name, imatrix_spec


@dataclass(frozen=True)
class DenseComparison:
    """Measure an export against ``dense_dir`` (the unpruned model) through the same type."""

    dense_dir: Path
    evaluation: EvaluateConfig = field(default_factory=EvaluateConfig)


def evaluation_sets(evaluation: EvaluateConfig) -> list[dict]:
    """The evaluation's text sets (the primary one, then the second domain if any)."""
    sources = [evaluation.data] + ([evaluation.second] if evaluation.second else [])
    return [
        {
            "data": d,
            "samples": evaluation.samples,
            "seq_len": evaluation.seq_len,
            "seed": evaluation.seed,
        }
        for d in sources
    ]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_gguf(
    model_dir: str | Path, gguf_type: str, *, imatrix=None, threads: int | None = None, log=None
) -> Path:
    """``model_dir`` through ``gguf_type`` as a file in shrink's cache, written once (by the
    export stage, unverified: measuring it loads it in llama.cpp)."""
    return _cached_gguf(model_dir, gguf_type, imatrix=imatrix, threads=threads, log=log)[0]


def _cached_gguf(
    model_dir: str | Path, gguf_type: str, *, imatrix=None, threads: int | None = None, log=None
) -> tuple[Path, dict]:
    """:func:`cached_gguf` and the work it did now: {written, imatrix_tokens} (the tokens the
    importance matrix was computed on in this call, 0 when it came from its cache)."""
    from shrink.core.models import cache_dir
    from shrink.stages.export.imatrix import weights_hash

    model_dir = Path(model_dir).expanduser()
    gguf_type = check_type(gguf_type)
    spec = imatrix_spec(gguf_type, imatrix)
    key = _key(weights_hash(model_dir), gguf_type, spec.settings() if spec else None)
    folder = cache_dir() / "gguf" / key
    file = folder / gguf_file_name(model_dir, gguf_type)
    work = {"written": False, "imatrix_tokens": 0}
    if not file.is_file():
        if log:
            log(f"writing {model_dir.name} as GGUF {gguf_type} into the cache ({folder})")
        g = export_gguf(
            model_dir,
            folder,
            gguf_type,
            force=True,
            verify=False,
            threads=threads,
            imatrix=spec if spec else False,
            log=log,
        )
        im = g.get("imatrix") or {}
        work = {"written": True, "imatrix_tokens": 0 if im.get("cached") else im.get("tokens", 0)}
    return file, work


def gguf_point(
    model_dir: str | Path,
    gguf_type: str,
    *,
    imatrix=None,
    evaluation: EvaluateConfig | None = None,
    threads: int | None = None,
    gguf_file: str | Path | None = None,
    measured: dict | None = None,
    log=None,
) -> dict:
    """``model_dir`` through ``gguf_type``: {bytes, perplexity: {text set: value}, tensor_types,
    imatrix settings, file}. ``gguf_file``: measure this file (already written from
    ``model_dir``) instead of the cached one; ``measured``: its perplexity on each set, as its
    check in llama.cpp measured it ({data: value}; nothing is measured again). ``imatrix``: as
    for ``export_gguf``."""
    from shrink.runtime.gguf_measure import measure_in_subprocess

    evaluation = evaluation or EvaluateConfig()
    gguf_type = check_type(gguf_type)
    spec = imatrix_spec(gguf_type, imatrix)
    sets = evaluation_sets(evaluation)
    cached = gguf_file is None
    if cached:
        file, work = _cached_gguf(
            model_dir, gguf_type, imatrix=spec if spec else False, threads=threads, log=log
        )
    else:
        file, work = Path(gguf_file), {"written": False, "imatrix_tokens": 0}
    memo = file.parent / f"measured-{_key(sets)}.json"
    work["measured_tokens"] = 0
    if cached and memo.is_file():
        m = json.loads(memo.read_text())
    elif measured is not None and not cached:
        from shrink.runtime.gguf_quant import tensor_type_counts

        m = {
            "bytes": file.stat().st_size,
            "tensor_types": tensor_type_counts(file),
            "perplexity": {s["data"]: measured[s["data"]] for s in sets},
        }
        work["measured_tokens"] = sum(int(s["samples"]) * int(s["seq_len"]) for s in sets)
        work["in_check"] = True
    else:
        work["measured_tokens"] = sum(int(s["samples"]) * int(s["seq_len"]) for s in sets)
        if log:
            log(f"measuring {file.name} in llama.cpp on {', '.join(s['data'] for s in sets)}")
        m = measure_in_subprocess(file, model_dir, sets, threads=threads)
        if cached:
            memo.write_text(json.dumps(m))
    return {
        "model": str(model_dir),
        "type": gguf_type,
        "imatrix": spec.settings() if spec else None,
        "file": str(file),
        "bytes": m["bytes"],
        "perplexity": m["perplexity"],
        "tensor_types": m["tensor_types"],
        "evaluation": sets,
        "work": work,
    }


def comparison_line(gguf_type: str, dense: dict, this: dict) -> str:
    """``dense q4_k_m: 105.5 MB, 47.58 / 22.03; this model: 91.0 MB, 52.28 / 23.88``
    (perplexity on each evaluation set, in order)."""

    def part(p: dict) -> str:
        ppl = " / ".join(f"{v:.2f}" for v in p["perplexity"].values())
        return f"{p['bytes'] / 1e6:.1f} MB, {ppl}"

    return f"dense {gguf_type}: {part(dense)}; this model: {part(this)}"


def compare_with_dense(
    file: str | Path,
    model_dir: str | Path,
    gguf_type: str,
    compare: DenseComparison,
    *,
    imatrix=None,
    threads: int | None = None,
    measured: dict | None = None,
    log=None,
) -> dict:
    """``file`` (written from ``model_dir``) and the dense model through the same type and
    importance matrix settings, on the same evaluation sets: {dense, this, line}.
    ``measured``: ``file``'s perplexities from its check (see :func:`gguf_point`)."""
    imatrix = imatrix if imatrix else False
    this = gguf_point(
        model_dir,
        gguf_type,
        imatrix=imatrix,
        evaluation=compare.evaluation,
        threads=threads,
        gguf_file=file,
        measured=measured,
        log=log,
    )
    dense = gguf_point(
        compare.dense_dir,
        gguf_type,
        imatrix=imatrix,
        evaluation=compare.evaluation,
        threads=threads,
        log=log,
    )
    return {
        "dense": dense,
        "this": this,
        "line": comparison_line(gguf_type, dense, this),
        "sets": [s["data"] for s in evaluation_sets(compare.evaluation)],
    }
