"""Merging a trained adapter into a full-precision copy of the base (never into 4-bit weights),
and measuring the model before and after on the evaluation blocks."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.core.measures import PerplexityBook, weights_key
from shrink.core.measures import measure as measure_once
from shrink.core.models import from_pretrained_checked
from shrink.core.perplexity import PerplexityResult
from shrink.core.progress import stderr


@dataclass
class Merged:
    model: nn.Module | StreamedModel  # in the source checkpoint's dtype, ready to save
    before: PerplexityResult
    after: PerplexityResult
    check: dict  # max |logit difference| between the adapter model and the merged one
    dtype: torch.dtype


def source_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        dtype = torch.float32
    return dtype


class StreamedModel:
    """A merged model written to ``folder`` by the streamed merge, never loaded: what the heal
    stage needs of a merged model (``save_pretrained``, ``dtype``, ``config``), where saving moves
    the written files into place."""

    def __init__(self, folder: Path, dtype: torch.dtype, config):
        self.folder, self.dtype, self.config = folder, dtype, config

    def save_pretrained(self, out: str | Path, **_) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.folder.iterdir()):
            shutil.move(str(f), str(out / f.name))


def needs_streamed_merge(location: str, device: str, dtype: torch.dtype) -> bool:
    """Whether the base of a local safetensors folder, loaded in ``dtype`` for the merge, would
    not fit the device's available memory (with 30% headroom for the merge and the evaluation)."""
    from shrink.streaming.memory import too_big_to_load

    return too_big_to_load(location, device, dtype)


def merge_streamed(
    location: str,
    trained: Path,
    *,
    device: str,
    eval_ids: torch.Tensor,
    second_ids: torch.Tensor | None,
    show_progress: bool,
    book: PerplexityBook | None = None,
    set_names: tuple[str, str | None] = ("evaluation", "second"),
) -> Merged:
    """The adapter merged tensor by tensor into a folder next to it
    (:func:`shrink.streaming.merge.merge_adapter_streamed`), with perplexity before and after
    measured one layer at a time (through ``book``, keyed by the folders' bytes); nothing is
    loaded whole."""
    from transformers import AutoConfig

    from shrink.streaming.merge import merge_adapter_streamed
    from shrink.streaming.perplexity import stream_perplexity

    hf_config = AutoConfig.from_pretrained(location)

    def measure(folder, what) -> PerplexityResult:
        key = weights_key(folder) if book is not None else None

        def one(ids, name) -> PerplexityResult:
            return measure_once(
                book,
                folder,
                ids,
                name,
                "heal",
                what,
                key=key,
                compute=lambda x: stream_perplexity(
                    folder, x, device=device, dtype=None, show_progress=show_progress
                ),
            )

        result = one(eval_ids, set_names[0])
        if second_ids is not None:
            result.second = one(second_ids, set_names[1])
        return result

    out = Path(trained).parent / "merged"
    shutil.rmtree(out, ignore_errors=True)
    before = measure(location, "before")
    info = merge_adapter_streamed(
        location, trained, out, log=stderr.print if show_progress else None
    )
    after = measure(out, "after")
    check = {
        "max_abs_logit_diff": None,
        "tokens": 0,
        "streamed": True,
        "merged_tensors": len(info["merged_tensors"]),
        "note": "streamed merge: W + scale * B @ A per tensor, equal to peft's "
        "merge_and_unload to float rounding",
    }
    return Merged(
        StreamedModel(out, source_dtype(hf_config), hf_config),
        before,
        after,
        check,
        source_dtype(hf_config),
    )


def merge(
    location: str,
    trained: Path,
    method: str,
    hf_config,
    *,
    device: str,
    on_cuda: bool,
    eval_ids: torch.Tensor,
    load_kw: dict,
    show_progress: bool,
    second_ids: torch.Tensor | None = None,
    book: PerplexityBook | None = None,
    set_names: tuple[str, str | None] = ("evaluation", "second"),
) -> Merged:
    """Reload the base in 16/32 bits, apply the adapter and merge it (``merge_and_unload``); for
    ``last-layers`` the trained model itself is loaded. Perplexity before (the base) and after
    is measured on ``eval_ids`` (and on ``second_ids``, a second domain, into ``.second``), and
    the merge is checked against the adapter model. "After" is the model as it is saved (in the
    source's dtype). ``book`` (named ``set_names``) reuses what the build already measured."""

    def measure(model: nn.Module, what: str) -> PerplexityResult:
        key = weights_key(model) if book is not None else None
        result = measure_once(
            book, model, eval_ids, set_names[0], "heal", what, key=key, show_progress=show_progress
        )
        if second_ids is not None:
            result.second = measure_once(
                book,
                model,
                second_ids,
                set_names[1],
                "heal",
                what,
                key=key,
                show_progress=show_progress,
            )
        return result

    src_dtype = source_dtype(hf_config)
    merge_dtype = torch.float32 if not on_cuda else src_dtype
    if method != "last-layers" and needs_streamed_merge(location, device, merge_dtype):
        return merge_streamed(
            location,
            trained,
            device=device,
            eval_ids=eval_ids,
            second_ids=second_ids,
            show_progress=show_progress,
            book=book,
            set_names=set_names,
        )
    base = from_pretrained_checked(location, dtype=merge_dtype, **load_kw)
    base.to(device).eval()
    before = measure(base, "before")
    probe = eval_ids[:1].to(device)
    if method == "last-layers":
        del base
        merged = from_pretrained_checked(trained, dtype=merge_dtype, **load_kw)
        merged.to(device).eval()
        check = {"max_abs_logit_diff": 0.0, "tokens": 0, "note": "no adapter: trained in place"}
    else:
        from peft import PeftModel

        if show_progress:
            stderr.print(
                f"merging the adapter into a {str(merge_dtype).split('.')[-1]} copy of "
                "the base model"
            )
        pmodel = PeftModel.from_pretrained(base, str(trained)).eval()
        with torch.no_grad():
            peft_logits = pmodel(input_ids=probe, use_cache=False).logits.float()
        merged = pmodel.merge_and_unload()
        merged.eval()
        with torch.no_grad():
            merged_logits = merged(input_ids=probe, use_cache=False).logits.float()
        check = {
            "max_abs_logit_diff": float((peft_logits - merged_logits).abs().max()),
            "tokens": int(probe.numel()),
        }
    if src_dtype != merge_dtype:  # measure the weights that are saved
        merged.to(src_dtype).to(merge_dtype)
    after = measure(merged, "after")
    if merged.dtype != src_dtype:
        merged.to(src_dtype)
    merged.config.use_cache = True
    return Merged(merged, before, after, check, src_dtype)
