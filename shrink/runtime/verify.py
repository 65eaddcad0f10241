"""Reload a written model folder in its real consumer (transformers) and check that it works.

``verify_in_subprocess`` runs the check in a fresh Python process (:mod:`shrink.runtime.worker`),
so nothing from the process that wrote the folder can hide a broken checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.runtime.worker import run_worker

PROMPT = "The capital of France is"


def verify_model_dir(path: str | Path, prompt: str = PROMPT, max_new_tokens: int = 8) -> dict:
    """from_pretrained the folder; check finite logits, and that greedy generation with the KV
    cache gives the same tokens as generation without it (a wrong layer_idx breaks the cache).
    A folder too large for this process's memory is checked streamed instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.core.models import check_tokenizer, check_tokenizer_files, from_pretrained_checked

    path = Path(path)
    from shrink.streaming.memory import too_big_to_load

    if too_big_to_load(path):
        from shrink.streaming.verify import verify_streamed

        return verify_streamed(path)
    check_tokenizer_files(path)
    tok = AutoTokenizer.from_pretrained(path)
    check_tokenizer(tok, path)
    model = from_pretrained_checked(path, dtype=torch.float32, auto_class=AutoModelForCausalLM)
    model.eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        finite = bool(torch.isfinite(logits).all())
        kw = dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
    new = cached[0, enc["input_ids"].shape[1] :]
    return {
        "num_layers": model.config.get_text_config().num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "finite_logits": finite,
        "cache_matches_no_cache": bool(torch.equal(cached, uncached)),
        "generated_tokens": int(new.numel()),
        "prompt": prompt,
        "completion": tok.decode(new, skip_special_tokens=True),
        "ok": finite and bool(torch.equal(cached, uncached)) and new.numel() > 0,
    }


def verify_in_subprocess(path: str | Path, timeout: float = 1800) -> dict:
    """Run :func:`verify_model_dir` in a fresh process; raise ShrinkError if the check fails."""
    result = run_worker("shrink.runtime.verify:verify_model_dir", timeout=timeout, path=str(path))
    if not result["ok"]:
        raise ShrinkError(f"verification of {path} failed: {json.dumps(result)}")
    return result
