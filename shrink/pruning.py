"""Choose layers to remove and remove them, leaving a valid transformers checkpoint."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import CALIBRATION, token_blocks
from .errors import ShrinkError
from .models import ALIASES, find_layers, load_config, load_model, num_layers, read_shrink_json, resolve
from .outputs import atomic_output, check_output, copy_license_files, write_record
from .progress import progress_bar, stderr
from .scoring import LayerScores, removal_perplexity, score_layers
from .verify import verify_in_subprocess

STRATEGIES = ("bi", "angular", "iterative", "relmag", "ppl", "last", "random")
NEEDS_SCORES = {"bi", "angular", "relmag", "ppl"}


def _configs(model: nn.Module) -> list:
    """The model config and, for multimodal models, its text config (each once)."""
    cfgs = [model.config]
    text = model.config.get_text_config()
    if text is not model.config:
        cfgs.append(text)
    return cfgs


def _swap_layers(model: nn.Module, keep: list[int]) -> Callable[[], None]:
    """Keep only layers ``keep`` (current numbering); return a function that undoes it.

    Rebuilds the ModuleList, sets num_hidden_layers, renumbers every ``layer_idx`` inside the kept
    layers from 0 (the KV cache is indexed by it), slices every per-layer config list (e.g.
    ``layer_types``) and recounts ``max_window_layers``.
    """
    parent, attr, layers = find_layers(model)
    L = len(layers)
    undo: list[Callable[[], None]] = []
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    undo.append(lambda: setattr(parent, attr, layers))
    for cfg in _configs(model):
        for key, value in list(vars(cfg).items()):
            if isinstance(value, (list, tuple)) and len(value) == L and key != "architectures":
                setattr(cfg, key, type(value)(value[i] for i in keep))
                undo.append(lambda cfg=cfg, key=key, value=value: setattr(cfg, key, value))
        mwl = getattr(cfg, "max_window_layers", None)
        if isinstance(mwl, int):
            cfg.max_window_layers = sum(1 for i in keep if i < mwl)
            undo.append(lambda cfg=cfg, mwl=mwl: setattr(cfg, "max_window_layers", mwl))
        if getattr(cfg, "num_hidden_layers", None) == L:
            cfg.num_hidden_layers = len(keep)
            undo.append(lambda cfg=cfg: setattr(cfg, "num_hidden_layers", L))
    for new_idx, i in enumerate(keep):
        for module in layers[i].modules():
            old = getattr(module, "layer_idx", None)
            if isinstance(old, int):
                module.layer_idx = new_idx
                undo.append(lambda module=module, old=old: setattr(module, "layer_idx", old))

    def restore() -> None:
        for fn in reversed(undo):
            fn()
    return restore


def _check_remove(remove: list[int], L: int) -> list[int]:
    if len(set(remove)) != len(remove):
        dup = sorted({i for i in remove if remove.count(i) > 1})
        raise ShrinkError(f"layer(s) {dup} listed more than once")
    bad = [i for i in remove if not 0 <= i < L]
    if bad:
        raise ShrinkError(f"layer(s) {bad} out of range: the model has layers 0..{L - 1}")
    if len(remove) >= L:
        raise ShrinkError(f"cannot remove {len(remove)} of {L} layers: at least one must stay")
    if not remove:
        raise ShrinkError("no layers to remove")
    return sorted(remove)


def prune_model(model: nn.Module, remove: list[int]) -> nn.Module:
    """Remove decoder layers ``remove`` (0-based) from ``model`` in place and return it."""
    L = len(find_layers(model)[2])
    remove = _check_remove(list(remove), L)
    _swap_layers(model, [i for i in range(L) if i not in remove])
    return model


@contextmanager
def without_layers(model: nn.Module, remove: list[int]) -> Iterator[nn.Module]:
    """Temporarily remove layers (for scoring what-ifs); the model is restored on exit."""
    L = len(find_layers(model)[2])
    remove = _check_remove(list(remove), L)
    restore = _swap_layers(model, [i for i in range(L) if i not in remove])
    try:
        yield model
    finally:
        restore()


def choose_layers(strategy: str, n: int, num_layers: int, scores: LayerScores | None = None,
                  seed: int = 0) -> tuple[list[int], str]:
    """Layers to remove for a score-based or fixed strategy, and a one-line reason."""
    if not 1 <= n < num_layers:
        raise ShrinkError(f"--drop must be between 1 and {num_layers - 1} "
                          f"(the model has {num_layers} layers), got {n}")
    if strategy == "last":
        chosen = list(range(num_layers - 1 - n, num_layers - 1))
        return chosen, f"the {n} layers before the final one (Gromov et al.'s simple heuristic)"
    if strategy == "random":
        chosen = sorted(random.Random(seed).sample(range(num_layers), n))
        return chosen, f"{n} layers drawn at random (seed {seed}), a baseline"
    if scores is None:
        raise ShrinkError(f"strategy '{strategy}' needs layer scores")
    if strategy == "angular":
        start, d = scores.best_block(n)
        return list(range(start, start + n)), (
            f"the block of {n} layers starting at {start} has the smallest angular distance "
            f"between its input and output ({d:.4f}, last token)")
    if strategy in ("bi", "relmag", "ppl"):
        label = {"bi": "Block Influence", "relmag": "relative magnitude",
                 "ppl": "perplexity increase when removed alone"}[strategy]
        return scores.lowest(strategy, n), f"the {n} layers with the lowest {label}"
    raise ShrinkError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def iterative_bi(model: nn.Module, input_ids: torch.Tensor, n: int, *, batch_size: int = 4,
                 skip_first: int = 1, show_progress: bool = True) -> tuple[list[int], list[dict]]:
    """Remove the lowest-BI layer, re-score the smaller model, repeat n times.

    Returns the removed layers (original numbering) and the BI scores seen at each step. The model
    is left unchanged."""
    L = len(find_layers(model)[2])
    removed: list[int] = []
    steps: list[dict] = []
    for step in progress_bar(range(n), "iterative BI", enabled=show_progress):
        kept = [i for i in range(L) if i not in removed]
        with without_layers(model, removed) if removed else nullcontext(model):
            scores = score_layers(model, input_ids, batch_size=batch_size, skip_first=skip_first,
                                  show_progress=False)
        low = scores.lowest("bi", 1)[0]
        steps.append({"step": step, "kept": kept, "bi": scores.bi, "removed": kept[low]})
        removed.append(kept[low])
    return sorted(removed), steps


def parse_layers(text: str) -> list[int]:
    """Parse ``--layers 21,22,25-27`` into a list of ints."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ShrinkError(f"--layers: '{part}' is not a layer number or range like 21-25"
                              ) from None
    return out


@dataclass
class PruneResult:
    output: Path
    removed: list[int]
    kept: list[int]
    removed_original: list[int]
    strategy: str
    reason: str
    num_layers_before: int
    params_before: int
    params_after: int
    scores: LayerScores | None = None
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def _base_model_id(resolved, config, previous: dict | None) -> str | None:
    if previous and previous.get("base_model"):
        return previous["base_model"]
    if resolved.hub_id:
        return resolved.hub_id
    key = resolved.name.lower()
    if key in ALIASES:
        return ALIASES[key]
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return name if name and name.count("/") == 1 and not Path(name).exists() else None


def original_layers(previous: dict | None, L: int) -> list[int]:
    """The source model's layer numbers in the original (unpruned) model, from the
    ``kept_original_layers`` of its last prune stage in ``shrink.json`` (0..L-1 without one)."""
    for st in reversed((previous or {}).get("stages", [])):
        if "kept_original_layers" in st:
            if len(st["kept_original_layers"]) == L:
                return st["kept_original_layers"]
            break
    return list(range(L))


def prune(model: str, output: str | Path, drop: int | None = None, strategy: str = "bi",
          layers: list[int] | None = None, calib: str = CALIBRATION, samples: int = 32,
          seq_len: int = 256, seed: int = 0, skip_first: int = 1, batch_size: int = 4,
          dtype: str | None = None, device: str | None = None, force: bool = False,
          trust_remote_code: bool = False, verify: bool = True,
          show_progress: bool = True, streaming: bool | None = None) -> PruneResult:
    """Score (when the strategy needs it), remove layers, save a checkpoint, verify it in a fresh
    process, and move it into place at ``output``. Either ``drop`` + ``strategy`` or ``layers``."""
    # Cheap checks first: nothing heavy runs and nothing is written if the request is bad.
    check_output(output, force)
    resolved = resolve(model)
    L = num_layers(load_config(resolved, trust_remote_code))
    if layers is not None:
        remove = _check_remove(list(layers), L)
        strategy, reason = "explicit", "listed by the user"
    else:
        if drop is None:
            raise ShrinkError("give --drop N or --layers LIST")
        if strategy not in STRATEGIES:
            raise ShrinkError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
        choose_layers("last", drop, L)  # validates drop against L
    if streaming is not False:  # layer by layer from the safetensors files (shrink.streaming)
        from .streaming import decide_streaming, prune_streaming

        if decide_streaming(resolved, device, dtype, streaming, method=strategy,
                            show_progress=show_progress):
            return prune_streaming(model, output, resolved, L,
                                   remove if layers is not None else None, drop, strategy, calib,
                                   samples, seq_len, seed, skip_first, batch_size, dtype, device,
                                   force, trust_remote_code, verify, show_progress)
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    hf = loaded.model
    previous = read_shrink_json(resolved.path)
    scores = None
    calib_info = None
    if layers is None and strategy in NEEDS_SCORES | {"iterative"}:
        blocks = token_blocks(loaded.tokenizer, calib, samples, seq_len, seed)
        calib_info = blocks.describe()
        if strategy == "iterative":
            remove, steps = iterative_bi(hf, blocks.input_ids, drop, batch_size=batch_size,
                                         skip_first=skip_first, show_progress=show_progress)
            reason = (f"removed one lowest-BI layer at a time, re-scoring after each removal "
                      f"({drop} steps)")
            calib_info["iterative_steps"] = steps
        else:
            scores = score_layers(hf, blocks.input_ids, batch_size=batch_size,
                                  skip_first=skip_first, model_name=model,
                                  settings={"data": calib_info}, show_progress=show_progress)
            if strategy == "ppl":
                scores.dense_ppl, scores.ppl = removal_perplexity(
                    hf, blocks.input_ids, batch_size=batch_size, show_progress=show_progress)
            remove, reason = choose_layers(strategy, drop, L, scores, seed)
    elif layers is None:
        remove, reason = choose_layers(strategy, drop, L, None, seed)
    params_before = sum(p.numel() for p in hf.parameters())
    prune_model(hf, remove)
    kept = [i for i in range(L) if i not in remove]
    params_after = sum(p.numel() for p in hf.parameters())
    orig = original_layers(previous, L)
    removed_original = [orig[i] for i in remove]
    kept_original = [orig[i] for i in kept]

    source_dtype = getattr(hf.config, "dtype", None)
    if isinstance(source_dtype, torch.dtype) and source_dtype != next(hf.parameters()).dtype:
        hf.to(source_dtype)  # save in the checkpoint's own dtype (fp32 compute, fp16 on disk)
    with atomic_output(output, force) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        copy_license_files(resolved.path, tmp)
        stage = {
            "stage": "prune", "source": resolved.location, "strategy": strategy, "reason": reason,
            "num_layers_before": L, "num_layers_after": len(kept),
            "removed_layers": remove, "kept_layers": kept,
            "removed_original_layers": removed_original, "kept_original_layers": kept_original,
            "params_before": params_before, "params_after": params_after,
            "seed": seed, "skip_first": skip_first, "calibration": calib_info,
            "scores": scores.to_dict() if scores is not None else None,
        }
        verification = {}
        if verify:
            if show_progress:
                stderr.print("verifying: reload in a fresh process, logits, cached generation")
            verification = verify_in_subprocess(tmp)
            stage["verification"] = verification
        record = write_record(tmp, previous, stage, source_model=model,
                              base_model=_base_model_id(resolved, hf.config, previous))
    return PruneResult(Path(output), remove, kept, removed_original, strategy, reason, L,
                       params_before, params_after, scores, verification, record)
