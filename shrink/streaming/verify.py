"""Checking a written model that does not fit in memory, without loading it whole.

:func:`shrink.runtime.verify.verify_model_dir` reloads the folder in float32; for a model larger
than RAM this does the same checks a piece at a time:

1. structure: every tensor the config asks for is in the headers, with its shape, and nothing
   else (:func:`shrink.streaming.checkpoint.check_complete`);
2. finiteness: every floating tensor read in 64 MiB chunks and checked for NaN/inf;
3. a streamed forward: the perplexity of the prompt, one layer at a time
   (:func:`shrink.streaming.perplexity.stream_perplexity`), must be finite;
4. the KV cache: a model made of a few of the layers (first and last by default) with the real
   embeddings, norm and head gives the prompt's logits once without the cache and once token by
   token through it; a wrong ``layer_idx`` or a broken cache makes them differ.

Peak memory: the embeddings, the head and the chosen layers in float32."""

from __future__ import annotations

from pathlib import Path

import torch

from shrink.core.errors import ShrinkError
from shrink.streaming.checkpoint import COPY_CHUNK, DTYPES, check_complete, load_folder_config

PROMPT = "The capital of France is"


def nonfinite_tensors(ck) -> list[str]:
    """Names of the floating tensors holding NaN or inf, read a chunk at a time."""
    bad = []
    handles: dict = {}
    try:
        for name, info in sorted(ck.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
            dtype = DTYPES.get(info.dtype)
            if dtype is None or not dtype.is_floating_point or info.nbytes == 0:
                continue
            f = handles.get(info.file)
            if f is None:
                f = handles[info.file] = open(info.file, "rb", buffering=0)
            f.seek(info.start)
            step = COPY_CHUNK - COPY_CHUNK % info.itemsize
            left = info.nbytes
            while left:
                raw = f.read(min(left, step))
                if not raw:
                    raise ShrinkError(f"{info.file} is truncated")
                left -= len(raw)
                chunk = torch.frombuffer(bytearray(raw), dtype=dtype)
                if not bool(torch.isfinite(chunk).all()):
                    bad.append(name)
                    break
    finally:
        for h in handles.values():
            h.close()
    return bad


def _cache_check(folder: Path, layers: list[int], ids: torch.Tensor) -> float:
    """On a model of ``layers`` only: the largest logit difference, relative to the largest
    logit, between one forward over the prompt without the cache and the same prompt fed half
    at once, then one token at a time through the KV cache."""
    from shrink.core.layers import swap_layers
    from shrink.streaming.perplexity import load_head
    from shrink.streaming.score import open_skeleton
    from shrink.streaming.skeleton import Loader

    sk = open_skeleton(folder, torch.float32, "cpu")
    loader = Loader(sk.ck, "cpu")
    for i in layers:
        loader.load(sk.layers[i], f"{sk.prefix}.{i}.", reuse=False)
    load_head(sk, loader)
    if sk.embed.weight.is_meta:  # untied head: the embeddings are still to load
        loader.load(sk.embed, sk.embed_prefix, reuse=False)
    swap_layers(sk.model, layers)
    model = sk.model
    n = ids.shape[1]
    first = max(1, n // 2)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        out = model(input_ids=ids[:, :first], use_cache=True)
        steps, past = [out.logits.float()], out.past_key_values
        for t in range(first, n):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits.float())
            past = out.past_key_values
    diff = (torch.cat(steps, dim=1) - full).abs().max()
    return float(diff / full.abs().max().clamp_min(1e-6))


def _prompt_ids(folder: Path, vocab: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from shrink.core.models import check_tokenizer, check_tokenizer_files

    check_tokenizer_files(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tok, folder)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    if int(ids.max()) >= vocab:
        raise ShrinkError(
            f"the tokenizer in {folder} gives token id {int(ids.max())} but the "
            f"model's vocabulary has {vocab} entries"
        )
    return ids


def verify_streamed(
    model_dir: str | Path, *, layers: list[int] | None = None, tolerance: float = 1e-4
) -> dict:
    """Check the model in ``model_dir`` piece by piece (see the module docstring); raise
    ShrinkError naming what is wrong, or return the record of what was checked."""
    from shrink.streaming.perplexity import stream_perplexity

    folder = Path(model_dir)
    config = load_folder_config(folder)
    ck = check_complete(folder, config)
    bad = nonfinite_tensors(ck)
    if bad:
        raise ShrinkError(
            f"verification of {folder} failed: {len(bad)} tensor(s) hold NaN or "
            f"inf values ({', '.join(bad[:3])})"
        )
    text = config.get_text_config()
    L = text.num_hidden_layers
    ids = _prompt_ids(folder, text.vocab_size)
    if ids.shape[1] < 2:
        raise ShrinkError(f"the tokenizer in {folder} turns the prompt into fewer than 2 tokens")
    ppl = stream_perplexity(folder, ids, device="cpu", dtype=torch.float32)
    layers = sorted({0, L - 1}) if layers is None else sorted(set(layers))
    if not layers or not all(0 <= i < L for i in layers):
        raise ShrinkError(f"the cache check's layers must be among 0..{L - 1}, got {layers}")
    diff = _cache_check(folder, layers, ids)
    same = diff <= tolerance
    record = {
        "reload": "streamed",
        "num_layers": L,
        "parameters": sum(t.numel for t in ck.tensors.values()),
        "tensors_checked": len(ck.tensors),
        "finite_tensors": True,
        "prompt": PROMPT,
        "prompt_perplexity": ppl.perplexity,
        "cache_layers": layers,
        "cache_relative_logit_diff": diff,
        "cache_matches_no_cache": same,
        "ok": same,
    }
    if not same:
        raise ShrinkError(
            f"verification of {folder} failed: logits through the KV cache differ "
            f"from logits without it by {diff:.2e} of the largest (layers {layers}): "
            "a wrong layer_idx or a broken cache"
        )
    return record
