"""The ``prune`` stage: choose layers (scoring them first when the strategy needs it), remove
them, and write a valid transformers checkpoint; in memory, or streamed layer by layer from the
safetensors files when the model does not fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from shrink.core.data import token_blocks
from shrink.core.errors import ShrinkError, first_line
from shrink.core.layers import check_remove, prune_model
from shrink.core.models import (
    ALIASES,
    check_seq_len,
    load_config,
    load_model,
    meta_model,
    num_layers,
    read_shrink_json,
    resolve,
)
from shrink.core.perplexity import perplexity
from shrink.core.progress import stderr
from shrink.core.scores import LayerScores
from shrink.runtime.verify import verify_in_subprocess
from shrink.stages.configs import ModelOptions, PruneConfig
from shrink.stages.pipeline import Artifact, BuildContext, Stage
from shrink.stages.runner import StageOutput, claimed_output, run_stage
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
        return {
            "output": str(self.output),
            "strategy": self.strategy,
            "reason": self.reason,
            "removed_layers": self.removed,
            "removed_original_layers": self.removed_original,
            "num_layers": [self.num_layers_before, len(self.kept)],
            "params": [self.params_before, self.params_after],
            "streamed": self.streamed,
            "bridge": self.bridge,
            "quality": self.quality,
            "verification": self.verification,
        }


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


def prune(
    model: str,
    output: str | Path,
    config: PruneConfig | None = None,
    *,
    load: ModelOptions | None = None,
    force: bool = False,
    verify: bool = True,
    show_progress: bool = True,
) -> PruneResult:
    """Score (when the strategy needs it), remove layers, save a checkpoint, verify it in a fresh
    process, and move it into place at ``output``."""
    config = config or PruneConfig()
    settings = config.settings()  # as asked (bridge "auto" is resolved below)
    load = load or ModelOptions()
    resolved = resolve(model)
    with claimed_output(output, force, resolved.path):
        job = _plan_prune(model, output, config, load, resolved, show_progress)
        return run_stage(
            "prune",
            output,
            partial(_write_pruned, job),
            source=resolved.path,
            settings=settings,
            force=force,
            verify=verify,
            log=stderr.print if show_progress else None,
        )


@dataclass
class _PruneJob:
    """Everything the writing half of a prune needs, decided before anything is written."""

    model: str
    output: str | Path
    config: PruneConfig
    load: ModelOptions
    resolved: object
    num_layers: int
    remove: list[int]
    kept: list[int]
    label: str
    reason: str
    scores: LayerScores | None
    record: dict
    previous: dict | None
    streamed: bool
    show_progress: bool
    loaded: object = None  # the in-memory model (None when streamed)
    blocks: object = None  # calibration blocks, when choosing the layers tokenized them
    fitted: list | None = None  # bridges --strategy auto fitted for the chosen layers


def _plan_prune(
    model: str, output, config: PruneConfig, load: ModelOptions, resolved, show_progress: bool
) -> _PruneJob:
    """Check, decide streaming, choose the layers and start the record."""
    L = check(model, config, load)
    config, bridge_note = _resolve_bridge(config, resolved, load)
    if bridge_note and show_progress:
        stderr.print(f"--bridge auto: {bridge_note}", highlight=False)
    previous = read_shrink_json(resolved.path)
    strategy = get_strategy(config.strategy)
    streamed = False
    if config.streaming is not False:
        from shrink.streaming import decide_streaming

        streamed = decide_streaming(
            resolved,
            load.device,
            load.load_kwargs()["dtype"],
            config.streaming,
            method=config.strategy,
            can_stream=config.layers is not None or strategy.streams,
            show_progress=show_progress,
        )
    loaded = blocks = fitted = None
    if streamed:
        remove, reason, label, scores, calib = _choose_streamed(
            model, resolved, L, config, strategy, load, show_progress
        )
    else:
        loaded = load_model(model, **load.load_kwargs())
        remove, reason, label, scores, calib, blocks, fitted = _choose_in_memory(
            model, loaded, L, config, strategy, show_progress
        )
    kept = [i for i in range(L) if i not in remove]
    orig = original_layers(previous, L)
    record = {
        "source": resolved.location,
        "strategy": label,
        "reason": reason,
        "num_layers_before": L,
        "num_layers_after": len(kept),
        "removed_layers": remove,
        "kept_layers": kept,
        "removed_original_layers": [orig[i] for i in remove],
        "kept_original_layers": [orig[i] for i in kept],
        "seed": config.seed,
        "skip_first": config.skip_first,
        "calibration": calib,
        "scores": scores.to_dict() if scores is not None else None,
    }
    if bridge_note:
        record["bridge_note"] = bridge_note
    return _PruneJob(
        model=model,
        output=output,
        config=config,
        load=load,
        resolved=resolved,
        num_layers=L,
        remove=remove,
        kept=kept,
        label=label,
        reason=reason,
        scores=scores,
        record=record,
        previous=previous,
        streamed=streamed,
        show_progress=show_progress,
        loaded=loaded,
        blocks=blocks,
        fitted=fitted,
    )


def _write_pruned(job: _PruneJob, tmp: Path) -> StageOutput:
    """The runner's computation: write the pruned checkpoint into ``tmp``."""
    write = _write_streamed if job.streamed else _write_in_memory
    before, after, hf_config, check_it = write(job, tmp)
    job.record.update(params_before=before, params_after=after)
    result = PruneResult(
        output=Path(job.output),
        removed=job.remove,
        kept=job.kept,
        removed_original=job.record["removed_original_layers"],
        strategy=job.label,
        reason=job.reason,
        num_layers_before=job.num_layers,
        params_before=before,
        params_after=after,
        scores=job.scores,
        streamed=job.streamed,
        bridge=job.record.get("bridge"),
        quality=job.record.get("quality"),
    )
    return StageOutput(
        result,
        job.record,
        check_it,
        {
            "source_model": job.model,
            "base_model": base_model_id(job.resolved, hf_config, job.previous),
        },
    )


def _write_streamed(job: _PruneJob, tmp: Path):
    """Copy the kept layers shard by shard (and fit the bridge streamed); no quality guard
    here: it needs the whole model."""
    from shrink.streaming.prune import (
        plan_stream_prune,
        verify_streamed,
        write_stream_prune,
    )

    config, load, record = job.config, job.load, job.record
    plan = plan_stream_prune(job.resolved.path, job.remove, load.trust_remote_code)
    replace = fitted = None
    if config.bridge == "linear":
        from shrink.streaming.bridge import bridge_model_streaming

        kw = load.load_kwargs()
        fitted = bridge_model_streaming(
            job.resolved,
            job.remove,
            config.data,
            config.samples,
            config.seq_len,
            config.seed,
            config.batch_size,
            config.skip_first,
            config.ridge,
            kw["dtype"],
            kw["device"],
            load.trust_remote_code,
            job.show_progress,
        )
        record["bridge"] = [r.to_dict() for r in fitted.runs]
        replace = fitted.tensors
    record["streaming"] = write_stream_prune(
        plan,
        tmp,
        replace=replace,
        trust_remote_code=load.trust_remote_code,
        show_progress=job.show_progress,
    )
    if fitted is not None:
        record["streaming"]["bridge"] = fitted.settings
    after = plan.params_after
    return (
        plan.params_before,
        after,
        plan.skeleton.config,
        lambda folder: verify_streamed(folder, after),
    )


def _write_in_memory(job: _PruneJob, tmp: Path):
    """Remove the layers (bridged or not) from the loaded model, judge it, save it."""
    config, loaded, record = job.config, job.loaded, job.record
    hf = loaded.model
    before = sum(p.numel() for p in hf.parameters())
    guard = _guard_blocks(loaded.tokenizer) if config.guard else None
    source_ppl = (
        perplexity(hf, guard.input_ids, show_progress=False).perplexity
        if guard is not None
        else None
    )
    if config.bridge == "linear" and job.fitted is not None:
        from shrink.core.bridge import prune_with_fitted

        prune_with_fitted(hf, job.remove, job.fitted)  # auto fitted them on the same blocks
        record["bridge"] = [r.to_dict() for r in job.fitted]
    elif config.bridge == "linear":
        from shrink.core.bridge import bridge_and_prune

        if job.blocks is None:
            job.blocks = token_blocks(
                loaded.tokenizer, config.data, config.samples, config.seq_len, config.seed
            )
        runs = bridge_and_prune(
            hf,
            job.remove,
            job.blocks.input_ids,
            skip_first=config.skip_first,
            ridge=config.ridge,
            batch_size=config.batch_size,
            show_progress=job.show_progress,
        )
        record["bridge"] = [r.to_dict() for r in runs]
    else:
        prune_model(hf, job.remove)
    if guard is not None:
        record["quality"] = _quality(hf, source_ppl, guard, config.guard)
        if not record["quality"]["ok"] and job.show_progress:
            stderr.print(f"[bold red]{record['quality']['message']}[/]", highlight=False)
    after = sum(p.numel() for p in hf.parameters())
    source_dtype = getattr(hf.config, "dtype", None)
    if isinstance(source_dtype, torch.dtype) and source_dtype != next(hf.parameters()).dtype:
        hf.to(source_dtype)  # save in the checkpoint's own dtype
    hf.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    return before, after, hf.config, verify_in_subprocess


def _resolve_bridge(
    config: PruneConfig, resolved, load: ModelOptions
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
        verdict = quality_ratio(
            model, source_ppl, guard.input_ids, threshold=threshold, blocks=guard.describe()
        )
    except ShrinkError as e:  # a model producing NaN/inf: the worst verdict there is
        return {
            "ok": False,
            "verdict": "degraded",
            "message": f"QUALITY GUARD: {e}",
            "threshold": threshold,
            "source_perplexity": source_ppl,
            "ratio": None,
        }
    return verdict.to_dict()


def _choose_in_memory(
    model: str, loaded, L: int, config: PruneConfig, strategy, show_progress: bool
):
    if config.layers is not None:
        return sorted(config.layers), "listed by the user", "explicit", None, None, None, None
    blocks = (
        token_blocks(loaded.tokenizer, config.data, config.samples, config.seq_len, config.seed)
        if strategy.needs_scores or not strategy.streams
        else None
    )
    heldout = None
    if config.strategy == "auto":
        from shrink.stages.auto import heldout_blocks

        heldout = heldout_blocks(
            loaded.tokenizer,
            8,
            config.seq_len,
            source=config.data,
            calib_samples=config.samples,
            calib_seq_len=config.seq_len,
            calib_seed=config.seed,
        ).input_ids
    calib = blocks.describe() if blocks is not None else None
    scores = scores_for(
        strategy,
        loaded.model,
        blocks.input_ids if blocks else None,
        batch_size=config.batch_size,
        skip_first=config.skip_first,
        model_name=model,
        settings={"data": calib},
        show_progress=show_progress,
    )
    details: dict = {}
    remove, reason = choose_layers(
        config.strategy,
        config.drop,
        L,
        scores,
        config.seed,
        model=loaded.model,
        input_ids=blocks.input_ids if blocks else None,
        batch_size=config.batch_size,
        skip_first=config.skip_first,
        show_progress=show_progress,
        details=details,
        heldout_input_ids=heldout,
        bridge=config.bridge == "linear",
        ridge=config.ridge,
    )
    fitted = details.pop("auto_fitted", None)
    if details and calib is not None:
        calib.update(details)
    return remove, reason, config.strategy, scores, calib, blocks, fitted


def _choose_streamed(
    model: str,
    resolved,
    L: int,
    config: PruneConfig,
    strategy,
    load: ModelOptions,
    show_progress: bool,
):
    if config.layers is not None:
        return sorted(config.layers), "listed by the user", "explicit", None, None
    if not strategy.streams:
        raise ShrinkError(
            f"strategy '{config.strategy}' needs the whole model in memory and "
            "cannot stream; use --no-streaming or a strategy that streams"
        )
    scores = calib = None
    if strategy.needs_scores:
        from shrink.streaming import score_model_streaming

        kw = load.load_kwargs()
        scores = score_model_streaming(
            model,
            resolved,
            config.data,
            config.samples,
            config.seq_len,
            config.seed,
            config.batch_size,
            config.skip_first,
            kw["dtype"],
            kw["device"],
            load.trust_remote_code,
            show_progress,
        )
        calib = scores.settings.get("data")
    remove, reason = choose_layers(config.strategy, config.drop, L, scores, config.seed)
    return remove, reason, config.strategy, scores, calib


class PruneStage(Stage):
    """The build's first stage: choose and remove layers (bridged where configured)."""

    name = "prune"

    def check(self, ctx: BuildContext) -> None:
        ctx.source_layers = check(ctx.config.model, self.settings(ctx), ctx.config.model_options())

    def describe(self, ctx: BuildContext) -> str:
        p = self.settings(ctx)
        what = (
            f"layers {p.layers}"
            if p.layers is not None
            else f"{p.drop} of {ctx.count_source_layers()} layers by {p.strategy}"
        )
        bridge = {
            "linear": ", bridged by a linear map",
            "auto": ", bridged where the architecture allows",
            "none": "",
        }[p.bridge]
        return f"prune ({what}, scored on {p.samples} x {p.seq_len} tokens of {p.data}{bridge})"

    def output_part(self, config) -> str:
        return f"drop{self.settings_of(config).count()}"

    def disk_bytes(self, ctx: BuildContext) -> int:
        return ctx.source_bytes()

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        c = ctx.config
        r = prune(
            ctx.model,
            work_dir / "model",
            self.settings(ctx),
            load=c.model_options(),
            force=True,
            show_progress=ctx.show_progress,
        )
        if (
            r.quality is not None
            and not r.quality["ok"]
            and c.heal is not None
            and not c.allow_degraded
        ):
            raise ShrinkError(
                f"{r.quality['message']}. The build stops before healing; "
                "pass --allow-degraded to heal it anyway, or choose another "
                "strategy (--strategy auto measures the candidates)"
            )
        return {
            "model": str(work_dir / "model"),
            "removed": r.removed,
            "reason": r.reason,
            "bridge": r.bridge,
            "quality": r.quality,
            "strategy": r.strategy,
            "num_layers": [r.num_layers_before, len(r.kept)],
            "params": [r.params_before, r.params_after],
            "scores": r.scores.to_dict() if r.scores is not None else None,
        }

    def apply(self, ctx: BuildContext, result: dict) -> None:
        ctx.model = ctx.float_model = result["model"]
        ctx.layers = result["num_layers"][1]
        ctx.scores = result.get("scores")
        ctx.add(Artifact("hf", Path(result["model"]), "pruned"))

    def report(self, ctx: BuildContext, result: dict) -> dict:
        from shrink.core.outputs import safetensors_bytes
        from shrink.report.buildreport import arithmetic, model_config

        return {
            "removed_layers": result["removed"],
            "strategy": result["strategy"],
            "reason": result["reason"],
            "num_layers": result["num_layers"],
            "bridge": result.get("bridge"),
            "quality": result.get("quality"),
            "params": result["params"],
            "sizes_bytes": {"pruned": safetensors_bytes(Path(result["model"]))},
            "arithmetic": arithmetic("pruned", model_config(result["model"])),
        }

    def absent_report(self, ctx: BuildContext) -> dict:
        """A build without pruning keeps every layer (the card still tells the counts)."""
        from math import prod

        from shrink.core.models import check_weights_files

        L = ctx.count_source_layers()
        n = (
            sum(prod(shape) for _, shape in check_weights_files(ctx.source.path).values())
            if ctx.source.path is not None
            else None
        )
        return {
            "removed_layers": [],
            "strategy": "none",
            "reason": "not pruned",
            "num_layers": [L, L],
            "bridge": None,
            "quality": None,
            "params": [n, n],
        }
