"""``shrink build``: a loop over the registered stages (``shrink.stages.pipeline``); by default
score -> prune -> heal -> GPTQ and/or ONNX / GGUF -> evaluate -> report.

Each stage writes into ``OUT/stages/NN-name/`` and, when it completes, a marker
``OUT/stages/NN-name/done.json`` holding a hash of the stage's settings and of the previous
stage's marker. ``resume=True`` skips every stage whose marker matches and reruns the rest, so a
changed setting reruns from the first stage it affects. Every stage is deterministic for a seed,
so an interrupted and resumed build ends with the same weights as an uninterrupted one. Final
artifacts are ``OUT/model`` (the last model: HF or GPTQ folder) and a folder per published
artifact (``OUT/onnx``, ``OUT/gguf``), each moved into place atomically, plus ``OUT/README.md``
(a Hugging Face model card) and ``OUT/report.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.outputs import (
    atomic_output,
    check_not_source,
    check_replaceable,
    check_resumable,
    existing_ancestor,
    folder_bytes,
    lock_output,
    mark_output,
)
from shrink.core.peaks import peaks_since, reset_peak
from shrink.core.progress import stderr
from shrink.report import buildreport
from shrink.stages.configs import BuildConfig
from shrink.stages.pipeline import BuildContext, Stage, build_stages
from shrink.stages.recipes import load_recipe, recipe_config  # noqa: F401 - the API's names

MARKER = "done.json"
BOOK = "perplexities.json"  # the build's perplexity book, kept for --resume


def validate(
    c: BuildConfig, stages: list[Stage] | None = None, show_progress: bool = False
) -> BuildContext:
    """Check every setting before any stage runs; returns the build's context."""
    from shrink.core.models import check_device

    stages = build_stages(c) if stages is None else stages
    ctx = BuildContext(c, show_progress=show_progress)
    check_device(c.device)
    for stage in stages:
        stage.check(ctx)
    ctx.count_source_layers()
    ctx.layers = ctx.source_layers
    return ctx


def estimate_disk(ctx: BuildContext, stages: list[Stage]) -> int:
    """Bytes the build will write at most: every stage's output, then the final copies."""
    return sum(stage.disk_bytes(ctx) for stage in stages) + ctx.source_bytes()


def check_disk(out: Path, need: int) -> None:
    probe = existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ShrinkError(
            f"not enough disk space in {probe}: the build writes about "
            f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
        )


def plan(ctx: BuildContext, stages: list[Stage], out: Path, disk: int) -> str:
    """What the build will do, printed before the first stage."""
    steps: list[str] = []
    for stage in stages:
        lines = stage.describe(ctx)
        steps += [lines] if isinstance(lines, str) else list(lines)
    title = (
        f"shrink build {ctx.config.model} -> {out} (at most {disk / 1e9:.1f} GB of disk "
        "while it runs):"
    )
    lines = [title] + [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    return "\n".join(lines)


def default_output(c: BuildConfig, stages: list[Stage] | None = None) -> str:
    base = Path(c.model.rstrip("/")).name or "model"
    parts = [stage.output_part(c) for stage in (build_stages(c) if stages is None else stages)]
    return "-".join([base] + [p for p in parts if p])


# ----------------------------------------------------------------------------- stage markers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(stage_dir: Path, key: str) -> dict | None:
    f = stage_dir / MARKER
    if not f.is_file():
        return None
    marker = json.loads(f.read_text())
    return marker if marker.get("key") == key else None


def _mark(stage_dir: Path, key: str, info: dict) -> dict:
    marker = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    tmp = stage_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str))
    os.replace(tmp, stage_dir / MARKER)
    return marker


@dataclass
class StageRun:
    name: str
    key: str
    skipped: bool
    seconds: float
    info: dict = field(default_factory=dict)
    peak_rss_bytes: dict | None = None  # {main, workers}: see shrink.core.peaks


@dataclass
class BuildResult:
    output: Path
    settings: BuildConfig
    stages: list[StageRun]
    report: dict

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "settings": self.settings.settings(),
            "stages": [asdict(s) for s in self.stages],
            "report": self.report,
        }


def stage_key(ctx: BuildContext, stage: Stage, previous: str) -> str:
    """A stage's marker key: its settings, the model options and the previous stage's key."""
    return _hash(
        {
            "stage": stage.name,
            "config": stage.key_settings(ctx),
            "load": ctx.config.model_options().settings(),
            "input": previous,
        }
    )


def _run_stage(
    ctx: BuildContext, stage: Stage, stage_dir: Path, key: str, title: str
) -> tuple[dict, bool]:
    """Run one stage (or take its marker on resume); returns (marker, skipped)."""
    marker = _done(stage_dir, key) if ctx.resume else None
    if marker is not None:
        if ctx.show_progress:
            stderr.print(f"{title} [green]done earlier[/] (resume)")
        return marker, True
    t0 = time.perf_counter()
    if stage_dir.exists() and not stage.keeps_work:
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if ctx.show_progress:
        stderr.rule(f"[bold]{title}")
    mark = reset_peak()
    info = stage.run(ctx, stage_dir)
    record = {"stage": stage.name, "info": info, "seconds": time.perf_counter() - t0}
    return _mark(stage_dir, key, {**record, "peak_rss_bytes": peaks_since(mark)}), False


def run_stages(
    ctx: BuildContext, stages: list[Stage], stages_dir: Path
) -> tuple[list[StageRun], list[dict]]:
    """The loop: each stage runs (or resumes), updates the build and gives its report part."""
    runs: list[StageRun] = []
    sections: list[dict] = []
    key = _hash({"source": ctx.source.location, "layers": ctx.source_layers})
    book_file = stages_dir / BOOK
    if ctx.resume and ctx.book is not None and book_file.is_file():
        # what the finished stages measured: evaluate does not measure it again
        ctx.book = type(ctx.book).load(book_file)
    for n, stage in enumerate(stages, 1):
        stage_dir = stages_dir / f"{n:02d}-{stage.name}"
        key = stage_key(ctx, stage, key)
        marker, skipped = _run_stage(
            ctx, stage, stage_dir, key, f"stage {n}/{len(stages)}: {stage.name}"
        )
        if not skipped and ctx.book is not None:
            ctx.book.save(book_file)
        info = marker["info"]
        stage.apply(ctx, info)
        sections.append(stage.report(ctx, info))
        runs.append(
            StageRun(
                stage.name,
                key,
                skipped,
                marker.get("seconds", 0.0),
                info,
                marker.get("peak_rss_bytes"),
            )
        )
    return runs, sections


def _open_output(out: Path, ctx: BuildContext, resume: bool, force: bool) -> None:
    """Refuse an output folder the build may not write, before anything is written."""
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"output '{out}' exists and is a file")
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise ShrinkError(
            f"output folder '{out}' exists and is not empty (use --resume to "
            "continue it, --force to start over)"
        )
    check_not_source(out, ctx.source.path)
    if resume and out.exists() and any(out.iterdir()):
        check_resumable(out)  # only a folder a shrink build created


def _start_over(out: Path, force: bool, resume: bool) -> Path:
    if force and not resume and out.exists():
        if any(out.iterdir()):
            check_replaceable(out)
        shutil.rmtree(out)
    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out)
    return stages_dir


def preview(
    config: BuildConfig,
    output: str | Path | None = None,
    gpu: str | None = None,
    ram: str | None = None,
) -> tuple[list[str], bool]:
    """What ``build`` would do, without doing it: the stage plan and the memory plan (for this
    machine, or the GPU and RAM sizes given), and whether every stage fits."""
    from shrink.analysis.memory import format_plan
    from shrink.stages.memoryplan import build_plan, with_planned_heal

    validate(config)
    memory = build_plan(config, gpu, ram)
    config = with_planned_heal(config, memory)
    stages = build_stages(config)
    ctx = validate(config, stages)
    out = Path(output or default_output(config, stages)).expanduser()
    return plan(ctx, stages, out, estimate_disk(ctx, stages)).splitlines() + format_plan(
        memory
    ), memory.fits


def check_memory(config: BuildConfig, show: bool) -> tuple[BuildConfig, list[dict]]:
    """Print the memory plan; refuse with one line when a stage cannot fit this machine.
    Returns ``config`` with the heal method the plan chose when the config left it open, and
    the plan's rows (for the report)."""
    from shrink.analysis.memory import format_plan
    from shrink.stages.memoryplan import build_plan, with_planned_heal

    memory = build_plan(config)
    if show:
        stderr.print("\n".join(format_plan(memory)), highlight=False)
    if not memory.fits:
        raise ShrinkError(f"the build cannot run on this machine: {memory.refusal}")
    rows = [{**asdict(row), "fits": row.fits} for row in memory.stages]
    return with_planned_heal(config, memory), rows


def build(
    config: BuildConfig | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    command: str | None = None,
    keep_stages: bool = False,
    show_progress: bool = True,
    budget: dict | None = None,
) -> BuildResult:
    """Run the whole chain into ``output``; see the module docstring. ``budget``: what a
    build to a budget chose (:func:`shrink.stages.frontier.budget_config`), for the report."""
    s = config or BuildConfig()
    stages = build_stages(s)
    ctx = validate(s, stages, show_progress)
    planned, memory_plan = check_memory(s, show_progress)
    if planned is not s:  # the plan chose QLoRA: the stages and their keys follow it
        s, stages = planned, build_stages(planned)
        ctx = validate(s, stages, show_progress)
    ctx.resume, ctx.budget, ctx.memory_plan = resume, budget, memory_plan
    out = ctx.output = Path(output or default_output(s, stages)).expanduser()
    _open_output(out, ctx, resume, force)
    disk = estimate_disk(ctx, stages)
    check_disk(out, disk)
    with lock_output(out):  # a second build into the same folder stops here
        stages_dir = _start_over(out, force, resume)
        if show_progress:
            stderr.print(plan(ctx, stages, out, disk), highlight=False)
        runs, sections = run_stages(ctx, stages, stages_dir)
        report = finish(ctx, stages, runs, sections, command)
        if not keep_stages:
            _remove_intermediates(ctx, report, stages_dir)
        from shrink.core.quiet import CURRENT_LOG

        if CURRENT_LOG is not None and CURRENT_LOG.is_file():  # the CLI's third-party output
            shutil.copy2(CURRENT_LOG, out / "build.log")
        mark_output(out)
    return BuildResult(out, s, runs, report)


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst, force=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def finish(
    ctx: BuildContext,
    stages: list[Stage],
    runs: list[StageRun],
    sections: list[dict],
    command: str | None,
) -> dict:
    """Publish the final model and every published artifact into the output, then write the
    report, the recipe and the cards."""
    from shrink.stages.pipeline import all_stages

    for name, path in ctx.published().items():
        _copy_atomic(path, ctx.output / name)
    names = {st.name for st in stages}
    absent = [st.absent_report(ctx) for st in all_stages() if st.name not in names]
    report = buildreport.assemble(ctx, sections, absent, runs, command)
    buildreport.write_cards(ctx, report)
    return report


def _remove_intermediates(ctx: BuildContext, report: dict, stages_dir: Path) -> None:
    freed = folder_bytes(stages_dir)
    shutil.rmtree(stages_dir, ignore_errors=True)
    report["intermediates_removed_bytes"] = freed
    # the report's paths: the copies in OUT for the final artifacts, none for the removed
    moved = {str(path): ctx.output / name for name, path in ctx.published().items()}
    buildreport.point_at_copies(report, stages_dir, moved)
    buildreport.write_report(ctx.output, report)
    if ctx.show_progress:
        stderr.print(
            f"removed the intermediate stage folders ({freed / 1e6:.0f} MB; "
            "--keep-stages keeps them for --resume)",
            highlight=False,
        )


def command_line() -> str | None:
    """The command as typed, when shrink runs as the command-line program."""
    if "build" not in sys.argv[1:]:
        return None  # called through the Python API or a test runner
    return "shrink " + " ".join(shlex.quote(a) for a in sys.argv[1:])
