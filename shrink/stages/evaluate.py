"""Perplexity on held-out text."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shrink.core.data import token_blocks
from shrink.core.models import load_model
from shrink.runtime.artifacts import gguf_file, is_onnx_folder
from shrink.stages.configs import EvaluateConfig, ModelOptions
from shrink.core.progress import progress_bar
from shrink.core.perplexity import PerplexityResult, perplexity


def onnx_perplexity(onnx_dir: str | Path, input_ids: torch.Tensor,
                    show_progress: bool = True) -> PerplexityResult:
    """Perplexity of an ONNX artifact (onnxruntime-genai or plain onnxruntime), teacher-forced on
    the same blocks and with the same arithmetic as :func:`perplexity`."""
    from shrink.runtime.generate import onnx_runner

    runner = onnx_runner(onnx_dir)
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for row in progress_bar(input_ids, "perplexity (ONNX)", enabled=show_progress):
        logits = torch.from_numpy(runner.logits(row.tolist())).float()
        total_nll += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
        total_tokens += row.numel() - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, time.perf_counter() - t0)


def evaluate(model: str, config: EvaluateConfig | None = None, *,
             load: ModelOptions | None = None, show_progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``config``'s evaluation set (default: shrink's fixed set,
    Persuasion 8 x 512) and, on ``result.second``, on the second held-out domain
    (``config.second``, default the CPython reference text). ``model`` is anything load_model
    takes, or an ONNX or GGUF folder written by ``shrink export``; every kind is scored on the
    same blocks with the same arithmetic."""
    config = config or EvaluateConfig()
    load = load or ModelOptions()
    folder = Path(model).expanduser()
    gguf = gguf_file(folder) if folder.exists() else None
    sources = [config.data] + ([config.second] if config.second else [])
    results: list[PerplexityResult] = []
    if gguf is not None:
        from transformers import AutoTokenizer

        from shrink.core.models import check_tokenizer_files
        from shrink.runtime.gguf import GgufRunner

        check_tokenizer_files(gguf.parent)  # shrink's GGUF folders carry the HF tokenizer
        tok = AutoTokenizer.from_pretrained(gguf.parent)
        with GgufRunner(gguf, n_ctx=max(1024, config.seq_len)) as runner:
            for source in sources:
                blocks = _blocks(tok, source, config)
                r = runner.perplexity(blocks.input_ids, show_progress=show_progress)
                results.append(_labelled(PerplexityResult(r["perplexity"], r["nll"], r["tokens"],
                                                          r["seconds"]), blocks, config, model))
    elif is_onnx_folder(folder):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        for source in sources:
            blocks = _blocks(tok, source, config)
            results.append(_labelled(onnx_perplexity(folder, blocks.input_ids,
                                                     show_progress=show_progress),
                                     blocks, config, model))
    else:
        loaded = load_model(model, **load.load_kwargs())
        for source in sources:
            blocks = _blocks(loaded.tokenizer, source, config)
            results.append(_labelled(perplexity(loaded.model, blocks.input_ids,
                                                batch_size=config.batch_size,
                                                show_progress=show_progress),
                                     blocks, config, model))
    result = results[0]
    result.second = results[1] if len(results) > 1 else None
    return result


def _blocks(tokenizer, source: str, config: EvaluateConfig):
    return token_blocks(tokenizer, source, config.samples, config.seq_len, config.seed)


def _labelled(result: PerplexityResult, blocks, config: EvaluateConfig,
              model: str) -> PerplexityResult:
    result.data = {**blocks.describe(), "set": config.name(blocks.source)}
    result.model = model
    return result
