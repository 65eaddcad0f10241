"""Choose layers to remove and remove them, leaving a valid transformers checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shrink.core.data import CALIBRATION, token_blocks
from shrink.core.errors import ShrinkError
from shrink.core.models import ALIASES, load_config, load_model, num_layers, read_shrink_json, resolve
from shrink.core.outputs import atomic_output, check_output, copy_license_files, write_record
from shrink.core.progress import stderr
from shrink.core.scores import LayerScores, removal_perplexity, score_layers
from shrink.runtime.verify import verify_in_subprocess
from shrink.core.layers import check_remove, prune_model
from shrink.stages.strategies import NEEDS_SCORES, STRATEGIES, choose_layers, iterative_bi

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


def base_model_id(resolved, config, previous: dict | None) -> str | None:
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
        remove = check_remove(list(layers), L)
        strategy, reason = "explicit", "listed by the user"
    else:
        if drop is None:
            raise ShrinkError("give --drop N or --layers LIST")
        if strategy not in STRATEGIES:
            raise ShrinkError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
        choose_layers("last", drop, L)  # validates drop against L
    if streaming is not False:  # layer by layer from the safetensors files (shrink.streaming)
        from shrink.streaming import decide_streaming, prune_streaming

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
                              base_model=base_model_id(resolved, hf.config, previous))
    return PruneResult(Path(output), remove, kept, removed_original, strategy, reason, L,
                       params_before, params_after, scores, verification, record)
