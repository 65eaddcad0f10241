"""Perplexity on held-out text."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import EVALUATION, token_blocks
from .models import load_model
from .progress import progress_bar


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    seconds: float
    data: dict | None = None
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, batch_size: int = 4, show_progress: bool = True) -> PerplexityResult:
    """Token-weighted perplexity of next-token prediction over (samples, seq_len) blocks."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for start in progress_bar(range(0, input_ids.shape[0], batch_size), "perplexity",
                              enabled=show_progress):
        ids = input_ids[start:start + batch_size].to(device)
        mask = attention_mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, time.perf_counter() - t0)


def onnx_perplexity(onnx_dir: str | Path, input_ids: torch.Tensor,
                    show_progress: bool = True) -> PerplexityResult:
    """Perplexity of an ONNX artifact (onnxruntime-genai or plain onnxruntime), teacher-forced on
    the same blocks and with the same arithmetic as :func:`perplexity`."""
    from .generate import onnx_runner

    runner = onnx_runner(onnx_dir)
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for row in progress_bar(input_ids, "perplexity (ONNX)", enabled=show_progress):
        logits = torch.from_numpy(runner.logits(row.tolist())).float()
        total_nll += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
        total_tokens += row.numel() - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, time.perf_counter() - t0)


def evaluate(model: str, data: str = EVALUATION, samples: int = 16, seq_len: int = 512,
             seed: int = 0, batch_size: int = 4, dtype: str | None = None, device: str | None = None,
             trust_remote_code: bool = False, show_progress: bool = True) -> PerplexityResult:
    """Perplexity of a model on a text source (default: the held-out novel). ``model`` is anything
    load_model takes, or an ONNX folder written by ``shrink export``."""
    from .generate import is_onnx_folder

    folder = Path(model).expanduser()
    if is_onnx_folder(folder):
        from transformers import AutoTokenizer

        blocks = token_blocks(AutoTokenizer.from_pretrained(folder), data, samples, seq_len, seed)
        result = onnx_perplexity(folder, blocks.input_ids, show_progress=show_progress)
        result.data = blocks.describe()
        result.model = model
        return result
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    blocks = token_blocks(loaded.tokenizer, data, samples, seq_len, seed)
    result = perplexity(loaded.model, blocks.input_ids, batch_size=batch_size,
                        show_progress=show_progress)
    result.data = blocks.describe()
    result.model = model
    return result
