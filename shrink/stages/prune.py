"""The ``prune`` stage: choose layers (scoring them first when the strategy needs it), remove
them, and write a valid transformers checkpoint; in memory, or streamed layer by layer from the
safetensors files when the model does not fit."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shrink.core.data import token_blocks
from shrink.core.perplexity import perplexity
from shrink.core.errors import ShrinkError, first_line
from shrink.core.layers import check_remove, prune_model
from shrink.core.models import (ALIASES, check_seq_len, load_config, load_model, meta_model,
                                num_layers, read_shrink_json, resolve)
from shrink.core.outputs import check_output
from shrink.core.progress import stderr
from shrink.core.scores import LayerScores
from shrink.runtime.verify import verify_in_subprocess
from shrink.stages.configs import ModelOptions, PruneConfig
from shrink.stages.runner import StageOutput, run_stage
from shrink.stages.strategies import check_drop, choose_layers, get_strategy, scores_for


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
    streamed: bool = False
    bridge: list[dict] | None = None  # per removed run, with --bridge linear
    quality: dict | None = None  # the quality guard's verdict (perplexity ratio to the source)
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"output": str(self.output), "strategy": self.strategy, "reason": self.reason,
                "removed_layers": self.removed, "removed_original_layers": self.removed_original,
                "num_layers": [self.num_layers_before, len(self.kept)],
                "params": [self.params_before, self.params_after], "streamed": self.streamed,
                "bridge": self.bridge, "quality": self.quality,
                "verification": self.verification}


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


def check(model: str, config: PruneConfig, load: ModelOptions) -> int:
    """Every check that needs no weights: returns the model's layer count."""
    if config.layers is None and config.drop is None:
        raise ShrinkError("give --drop N or --layers LIST")
    resolved = resolve(model)
    hf_config = load_config(resolved, load.trust_remote_code)
    L = num_layers(hf_config)
    if get_strategy(config.strategy).needs_scores or not get_strategy(config.strategy).streams:
        check_seq_len(hf_config, config.seq_len)
    if config.layers is not None:
        check_remove(list(config.layers), L)
    else:
        check_drop(config.drop, L)
    return L


def prune(model: str, output: str | Path, config: PruneConfig | None = None, *,
          load: ModelOptions | None = None, force: bool = False, verify: bool = True,
          show_progress: bool = True) -> PruneResult:
    """Score (when the strategy needs it), remove layers, save a checkpoint, verify it in a fresh
    process, and move it into place at ``output``."""
    config = config or PruneConfig()
    settings = config.settings()  # as asked (bridge "auto" is resolved below)
    load = load or ModelOptions()
    resolved = resolve(model)
    check_output(output, force, resolved.path)
    L = check(model, config, load)
    config, bridge_note = _resolve_bridge(config, resolved, load)
    if bridge_note and show_progress:
        stderr.print(f"--bridge auto: {bridge_note}", highlight=False)
    previous = read_shrink_json(resolved.path)
    strategy = get_strategy(config.strategy)
    streamed = False
    if config.streaming is not False:
        from shrink.streaming import decide_streaming

        streamed = decide_streaming(resolved, load.device, load.load_kwargs()["dtype"],
                                    config.streaming, method=config.strategy,
                                    can_stream=config.layers is not None or strategy.streams,
                                    show_progress=show_progress)
    blocks = None
    if streamed:
        remove, reason, label, scores, calib = _choose_streamed(model, resolved, L, config,
                                                                strategy, load, show_progress)
    else:
        loaded = load_model(model, **load.load_kwargs())
        remove, reason, label, scores, calib, blocks = _choose_in_memory(
            model, loaded, L, config, strategy, show_progress)
    kept = [i for i in range(L) if i not in remove]
    orig = original_layers(previous, L)
    record = {"source": resolved.location, "strategy": label, "reason": reason,
              "num_layers_before": L, "num_layers_after": len(kept),
              "removed_layers": remove, "kept_layers": kept,
              "removed_original_layers": [orig[i] for i in remove],
              "kept_original_layers": [orig[i] for i in kept],
              "seed": config.seed, "skip_first": config.skip_first, "calibration": calib,
              "scores": scores.to_dict() if scores is not None else None}
    if bridge_note:
        record["bridge_note"] = bridge_note

    def compute(tmp: Path) -> StageOutput:
        nonlocal blocks
        if streamed:
            from shrink.streaming.prune import (plan_stream_prune, verify_streamed,
                                                write_stream_prune)

            plan = plan_stream_prune(resolved.path, remove, load.trust_remote_code)
            replace = fitted = None
            if config.bridge == "linear":  # (no quality guard streamed: it needs the whole model)
                from shrink.streaming.bridge import bridge_model_streaming

                kw = load.load_kwargs()
                fitted = bridge_model_streaming(
                    resolved, remove, config.data, config.samples, config.seq_len, config.seed,
                    config.batch_size, config.skip_first, config.ridge, kw["dtype"],
                    kw["device"], load.trust_remote_code, show_progress)
                record["bridge"] = [r.to_dict() for r in fitted.runs]
                replace = fitted.tensors
            record["streaming"] = write_stream_prune(plan, tmp, replace=replace,
                                                     trust_remote_code=load.trust_remote_code,
                                                     show_progress=show_progress)
            if fitted is not None:
                record["streaming"]["bridge"] = fitted.settings
            before, after, hf_config = plan.params_before, plan.params_after, plan.skeleton.config
            check_it = lambda folder: verify_streamed(folder, after)  # noqa: E731
        else:
            hf = loaded.model
            before = sum(p.numel() for p in hf.parameters())
            guard = _guard_blocks(loaded.tokenizer) if config.guard else None
            source_ppl = perplexity(hf, guard.input_ids, show_progress=False).perplexity \
                if guard is not None else None
            bridges = None
            if config.bridge == "linear":
                from shrink.core.bridge import bridge_and_prune

                if blocks is None:
                    blocks = token_blocks(loaded.tokenizer, config.data, config.samples,
                                          config.seq_len, config.seed)
                runs = bridge_and_prune(hf, remove, blocks.input_ids,
                                        skip_first=config.skip_first, ridge=config.ridge,
                                        batch_size=config.batch_size,
                                        show_progress=show_progress)
                bridges = [r.to_dict() for r in runs]
                record["bridge"] = bridges
            else:
                prune_model(hf, remove)
            if guard is not None:
                quality = _quality(hf, source_ppl, guard, config.guard)
                record["quality"] = quality
                if not quality["ok"] and show_progress:
                    stderr.print(f"[bold red]{quality['message']}[/]", highlight=False)
            after = sum(p.numel() for p in hf.parameters())
            source_dtype = getattr(hf.config, "dtype", None)
            if isinstance(source_dtype, torch.dtype) and \
                    source_dtype != next(hf.parameters()).dtype:
                hf.to(source_dtype)  # save in the checkpoint's own dtype
            hf.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            hf_config = hf.config
            check_it = verify_in_subprocess
        record.update(params_before=before, params_after=after)
        result = PruneResult(Path(output), remove, kept, record["removed_original_layers"],
                             label, reason, L, before, after, scores, streamed,
                             record.get("bridge"), record.get("quality"))
        return StageOutput(result, record, check_it,
                           {"source_model": model,
                            "base_model": base_model_id(resolved, hf_config, previous)})

    return run_stage("prune", output, compute, source=resolved.path,
                     settings=settings, force=force, verify=verify,
                     log=stderr.print if show_progress else None)


def _resolve_bridge(config: PruneConfig, resolved, load: ModelOptions
                    ) -> tuple[PruneConfig, str | None]:
    """``--bridge auto``: linear when the architecture's layers can absorb the bridge exactly
    (read from a weightless skeleton), else none, with the reason."""
    if config.bridge != "auto":
        return config, None
    from shrink.core.bridge import check_bridgeable

    hf_config = load_config(resolved, load.trust_remote_code)
    try:
        check_bridgeable(meta_model(hf_config, load.trust_remote_code))
    except ShrinkError as e:
        return config.model_copy(update={"bridge": "none"}), f"not bridged: {first_line(e)}"
    return config.model_copy(update={"bridge": "linear"}), None


def _guard_blocks(tokenizer):
    from shrink.core.guard import guard_blocks

    return guard_blocks(tokenizer)


def _quality(model, source_ppl: float, guard, threshold: float) -> dict:
    """The guard's verdict: held-out perplexity over the source's on the same fixed blocks."""
    from shrink.core.guard import quality_ratio

    try:
        verdict = quality_ratio(model, source_ppl, guard.input_ids, threshold=threshold,
                                blocks=guard.describe())
    except ShrinkError as e:  # a model producing NaN/inf: the worst verdict there is
        return {"ok": False, "verdict": "degraded", "message": f"QUALITY GUARD: {e}",
                "threshold": threshold, "source_perplexity": source_ppl, "ratio": None}
    return verdict.to_dict()


def _choose_in_memory(model: str, loaded, L: int, config: PruneConfig, strategy,
                      show_progress: bool):
    if config.layers is not None:
        return sorted(config.layers), "listed by the user", "explicit", None, None, None
    blocks = token_blocks(loaded.tokenizer, config.data, config.samples, config.seq_len,
                          config.seed) if strategy.needs_scores or not strategy.streams else None
    heldout = None
    if config.strategy == "auto":
        from shrink.stages.auto import heldout_blocks

        heldout = heldout_blocks(loaded.tokenizer, 8, config.seq_len, source=config.data,
                                 calib_samples=config.samples, calib_seq_len=config.seq_len,
                                 calib_seed=config.seed).input_ids
    calib = blocks.describe() if blocks is not None else None
    scores = scores_for(strategy, loaded.model, blocks.input_ids if blocks else None,
                        batch_size=config.batch_size, skip_first=config.skip_first,
                        model_name=model, settings={"data": calib}, show_progress=show_progress)
    details: dict = {}
    remove, reason = choose_layers(
        config.strategy, config.drop, L, scores, config.seed, model=loaded.model,
        input_ids=blocks.input_ids if blocks else None, batch_size=config.batch_size,
        skip_first=config.skip_first, show_progress=show_progress, details=details,
        heldout_input_ids=heldout, bridge=config.bridge == "linear", ridge=config.ridge)
    if details and calib is not None:
        calib.update(details)
    return remove, reason, config.strategy, scores, calib, blocks


def _choose_streamed(model: str, resolved, L: int, config: PruneConfig, strategy,
                     load: ModelOptions, show_progress: bool):
    if config.layers is not None:
        return sorted(config.layers), "listed by the user", "explicit", None, None
    if not strategy.streams:
        raise ShrinkError(f"strategy '{config.strategy}' needs the whole model in memory and "
                          "cannot stream; use --no-streaming or a strategy that streams")
    scores = calib = None
    if strategy.needs_scores:
        from shrink.streaming import score_model_streaming

        kw = load.load_kwargs()
        scores = score_model_streaming(model, resolved, config.data, config.samples,
                                       config.seq_len, config.seed, config.batch_size,
                                       config.skip_first, kw["dtype"], kw["device"],
                                       load.trust_remote_code, show_progress)
        calib = scores.settings.get("data")
    remove, reason = choose_layers(config.strategy, config.drop, L, scores, config.seed)
    return remove, reason, config.strategy, scores, calib
