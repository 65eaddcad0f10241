"""Worker-side timing helpers shared by every artifact kind's ``measure`` (see
:mod:`shrink.stages.bench`): the process's memory and CPU time, the benchmark's prompt, and the
greedy decode loop timed for PyTorch models."""

from __future__ import annotations

import os
import time
from pathlib import Path

from shrink.core.data import EVALUATION


def vm_bytes(field_name: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (the timed run's peak is its own)."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    t = os.times()
    return t.user + t.system


def prompt_ids(tokenizer, prompt_len: int, batch: int):
    """The benchmark's prompt: ``batch`` blocks of ``prompt_len`` tokens of the evaluation text."""
    from shrink.core.data import token_blocks

    return token_blocks(tokenizer, EVALUATION, batch, prompt_len, seed=1234).input_ids


def eval_blocks(tokenizer, samples: int, seq_len: int):
    """The benchmark's perplexity blocks (the evaluation text, seed 0)."""
    from shrink.core.data import token_blocks

    return token_blocks(tokenizer, EVALUATION, samples, seq_len, seed=0)


def time_hf(model, ids, gen_len: int, device: str) -> tuple[float, float]:
    """(time to first token, decode seconds for gen_len - 1 further tokens): prefill, then one
    token at a time with the KV cache, greedy, never stopping at EOS."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(gen_len - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1
