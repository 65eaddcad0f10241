"""Run any artifact shrink writes and stream its text: a Hugging Face folder (transformers), a GPTQ
folder (transformers + GPTQModel/optimum), a GGUF (llama.cpp), or an ONNX folder (onnxruntime-genai
with its KV cache, or plain onnxruntime for a forward-pass-only export, which re-runs the whole
sequence per token). Each kind runs itself (:mod:`shrink.runtime.kinds`).
"""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.runtime import kinds
from shrink.runtime.artifacts import artifact_path
from shrink.runtime.kinds import artifact_kind  # noqa: F401 - `shrink generate` names the kind
from shrink.runtime.kinds.base import Stream


def generate(
    artifact: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: Stream | None = None,
) -> str:
    """Generate a continuation of ``prompt`` with any artifact shrink writes, calling ``stream``
    with each new piece of text as it is produced; return the whole continuation.
    ``temperature`` 0 means greedy decoding."""
    if max_new_tokens < 1:
        raise ShrinkError("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise ShrinkError("--temperature must be >= 0 (0 means greedy)")
    if not 0 < top_p <= 1:
        raise ShrinkError("--top-p must be in (0, 1]")
    path = artifact_path(artifact)
    return kinds.detect(path).generate(
        path, prompt, max_new_tokens, temperature, top_p, seed, stream
    )
