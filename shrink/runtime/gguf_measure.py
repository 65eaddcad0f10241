"""Perplexity of a GGUF file in llama.cpp on shrink's text sets, in a fresh process: the
measurement behind :func:`shrink.stages.export.gguf_point.gguf_point`."""

from __future__ import annotations

from pathlib import Path

from shrink.runtime.gguf import GgufRunner
from shrink.runtime.gguf_quant import tensor_type_counts
from shrink.runtime.worker import run_worker


def measure_perplexity(
    gguf_path: str, tokenizer_dir: str, sets: list[dict], threads: int | None = None
) -> dict:
    """Perplexity of the GGUF in llama.cpp on each text set {data, samples, seq_len, seed},
    tokenized by the HF tokenizer in ``tokenizer_dir`` (run it in a fresh process:
    :func:`measure_in_subprocess`). Returns {data: perplexity}, bytes and tensor types."""
    from transformers import AutoTokenizer

    from shrink.core.data import token_blocks

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out: dict = {
        "bytes": Path(gguf_path).stat().st_size,
        "tensor_types": tensor_type_counts(gguf_path),
        "perplexity": {},
    }
    n_ctx = max(int(s["seq_len"]) for s in sets)
    with GgufRunner(gguf_path, n_ctx=n_ctx, n_threads=threads) as runner:
        for s in sets:
            blocks = token_blocks(
                tok, s["data"], int(s["samples"]), int(s["seq_len"]), int(s.get("seed", 0))
            )
            out["perplexity"][s["data"]] = runner.perplexity(blocks.input_ids)["perplexity"]
    return out


def measure_in_subprocess(
    gguf_path: str | Path,
    tokenizer_dir: str | Path,
    sets: list[dict],
    threads: int | None = None,
    timeout: float = 3600,
) -> dict:
    """:func:`measure_perplexity` in a fresh process."""
    return run_worker(
        "shrink.runtime.gguf_measure:measure_perplexity",
        timeout=timeout,
        gguf_path=str(gguf_path),
        tokenizer_dir=str(tokenizer_dir),
        sets=sets,
        threads=threads,
    )
