"""The stages of ``shrink build`` as registered objects.

A stage is a :class:`Stage`: its name, the section of the build config it reads, a check that
runs before any work, its line in the plan, its piece of the default output folder name, the disk
it needs, the work itself (``run``, into its own stage folder, returning a JSON-able result that
the resume marker keeps), how that result changes the build (``apply``: the current model, the
artifacts made) and its part of ``report.json`` (``report``). ``shrink build`` is a loop over
:func:`build_stages`; adding a stage is one module with a Stage subclass plus one
:func:`register_stage` call::

    register_stage("mypkg.sparsify:SparsifyStage", after="heal")

A stage registered this way reads its settings from a section of the recipe named after it
(``sparsify: {amount: 0.5}``), validated by its ``config_class``; it runs when that section is
given. The built-in stages run in the order prune, heal, quantize, export, evaluate.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shrink.core.errors import ShrinkError


@dataclass(frozen=True)
class Artifact:
    """A model the build made. ``kind`` names its runtime kind (how it is loaded and measured:
    hf, gptq, onnx, gguf); ``label`` is its row in the evaluation; ``publish``, when set, is the
    folder it is copied to in the output (the final model is published as ``model``); ``measured``:
    whether the evaluation measures it."""

    kind: str
    path: Path
    label: str
    publish: str | None = None
    measured: bool = True  # the evaluate stage measures its perplexity


@dataclass
class BuildContext:
    """What the stages of one build share: the settings, where the build writes, the model the
    next stage consumes, the artifacts made so far, the evaluation and a perplexity book."""

    config: Any  # a BuildConfig
    output: Path | None = None
    show_progress: bool = True
    resume: bool = False
    model: str = ""  # the folder (or id) the next stage consumes
    float_model: str = ""  # the latest full-precision model (exports that quantize themselves)
    layers: int | None = None  # decoder layers of the current model
    source_layers: int | None = None  # decoder layers of the source
    artifacts: list[Artifact] = field(default_factory=list)
    evaluation: dict[str, dict] = field(default_factory=dict)  # label -> perplexity row
    scores: dict | None = None  # the layer scores the build pruned by (for the card's plot)
    book: Any = None  # a shared perplexity book (shrink.core.measures), when there is one
    budget: dict | None = None  # what a --target-size/--target-speed build chose, and why
    memory_plan: list[dict] | None = None  # each planned step: where, how, predicted peaks
    _source: Any = None

    def __post_init__(self) -> None:
        self.model = self.model or self.config.model
        self.float_model = self.float_model or self.model
        if self.book is None:
            self.book = _new_book()

    @property
    def source(self):
        """The resolved source model (shrink.core.models.resolve)."""
        if self._source is None:
            from shrink.core.models import resolve

            self._source = resolve(self.config.model)
        return self._source

    def count_source_layers(self) -> int:
        if self.source_layers is None:
            from shrink.core.models import load_config, num_layers

            self.source_layers = num_layers(load_config(self.source, self.config.trust_remote_code))
        return self.source_layers

    def source_bytes(self) -> int:
        from shrink.core.outputs import safetensors_bytes

        return safetensors_bytes(self.source.path) if self.source.path is not None else 0

    def add(self, artifact: Artifact) -> None:
        """Record an artifact (one with the same label replaces the earlier one)."""
        self.artifacts = [a for a in self.artifacts if a.label != artifact.label] + [artifact]

    def published(self) -> dict[str, Path]:
        """Folder name in the output -> the artifact copied there: the final model, then every
        artifact a stage published."""
        model = self.source.path if self.model == self.config.model else self.model
        return {
            "model": Path(model),
            **{a.publish: Path(a.path) for a in self.artifacts if a.publish},
        }

    def log(self, message: str) -> None:
        if self.show_progress:
            from shrink.core.progress import stderr

            stderr.print(message, highlight=False)


def _new_book():
    """A perplexity book shared by the stages, when shrink.core.measures provides one."""
    try:
        from shrink.core.measures import PerplexityBook
    except ImportError:
        return None
    return PerplexityBook()


class Stage:
    """One step of a build; subclasses set ``name`` and implement ``describe`` and ``run``."""

    name: str = ""
    config_key: str | None = None  # the BuildConfig section it reads (default: its name)
    config_class: type | None = None  # validates a registered stage's recipe section
    keeps_work: bool = False  # its stage folder survives a rerun (it resumes its own work)

    @property
    def key(self) -> str:
        return self.config_key or self.name

    def settings_of(self, config) -> Any:
        """This stage's config in ``config`` (a BuildConfig); None when the stage is off."""
        raw = config.stage_config(self.key)
        if raw is None or self.config_class is None or not isinstance(raw, dict):
            return raw
        try:
            return self.config_class.model_validate(raw)
        except ValidationError as e:
            from shrink.stages.configs import describe

            raise ShrinkError(describe(e, self.key)) from None

    def settings(self, ctx: BuildContext) -> Any:
        return self.settings_of(ctx.config)

    def enabled(self, config) -> bool:
        return self.settings_of(config) is not None

    def check(self, ctx: BuildContext) -> None:
        """Validate the settings before any stage runs (ShrinkError on bad input)."""

    def describe(self, ctx: BuildContext) -> str | list[str]:
        """The plan's line (or lines) for this stage."""
        return self.name

    def output_part(self, config) -> str | None:
        """This stage's piece of the default output folder name."""
        return None

    def disk_bytes(self, ctx: BuildContext) -> int:
        """Bytes this stage writes at most (the source's weights are ``ctx.source_bytes()``)."""
        return 0

    def key_settings(self, ctx: BuildContext) -> dict:
        """What the resume marker hashes for this stage (with the model options and the
        previous stage's marker)."""
        cfg = self.settings(ctx)
        return cfg.settings() if hasattr(cfg, "settings") else dict(cfg or {})

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        """Do the work into ``work_dir``; the result must be JSON-able (the marker keeps it)."""
        raise NotImplementedError

    def apply(self, ctx: BuildContext, result: dict) -> None:
        """Update the build from the result (also for a stage skipped on resume)."""

    def report(self, ctx: BuildContext, result: dict) -> dict:
        """Top-level entries of report.json (dicts merge into the build's own: sizes_bytes)."""
        return {}

    def absent_report(self, ctx: BuildContext) -> dict:
        """report.json entries when the stage is off."""
        return {}


# ----------------------------------------------------------------------------- the registry

# name -> a Stage, or "module:Class" not imported yet (the built-ins import torch)
_REGISTRY: list[tuple[str, Stage | str]] = [
    ("prune", "shrink.stages.prune:PruneStage"),
    ("heal", "shrink.stages.heal:HealStage"),
    ("quantize", "shrink.stages.quantize:QuantizeStage"),
    ("export", "shrink.stages.export:ExportStage"),
    ("evaluate", "shrink.stages.evaluate:EvaluateStage"),
]


def _load(spec: Stage | str) -> Stage:
    if isinstance(spec, Stage):
        return spec
    module, _, cls = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ShrinkError(f"cannot load the stage '{spec}': {e}") from None
    stage = obj() if isinstance(obj, type) else obj
    if not isinstance(stage, Stage) or not stage.name:
        raise ShrinkError(f"'{spec}' is not a build stage (a named shrink.stages.pipeline.Stage)")
    return stage


def register_stage(stage: Stage | type | str, after: str | None = None) -> Stage:
    """Add a stage (an object, a class, or ``"module:Class"``) after the stage named ``after``
    (default: last). A stage of the same name is replaced in place."""
    st = _load(stage() if isinstance(stage, type) else stage)
    names = stage_names()
    if st.name in names:
        _REGISTRY[names.index(st.name)] = (st.name, st)
        return st
    if after is None:
        _REGISTRY.append((st.name, st))
    elif after not in names:
        raise ShrinkError(
            f"no stage '{after}' to register '{st.name}' after; stages: {', '.join(names)}"
        )
    else:
        _REGISTRY.insert(names.index(after) + 1, (st.name, st))
    return st


def unregister_stage(name: str) -> None:
    names = stage_names()
    if name not in names:
        raise ShrinkError(f"no stage '{name}'; stages: {', '.join(names)}")
    del _REGISTRY[names.index(name)]


def stage_names() -> list[str]:
    return [name for name, _ in _REGISTRY]


def get_stage(name: str) -> Stage:
    for n, spec in _REGISTRY:
        if n == name:
            return _load(spec)
    raise ShrinkError(f"no stage '{name}'; stages: {', '.join(stage_names())}")


def all_stages() -> list[Stage]:
    return [get_stage(name) for name in stage_names()]


def build_stages(config) -> list[Stage]:
    """The stages ``config`` (a BuildConfig) turns on, in order. A recipe section that names no
    registered stage is an error."""
    names = stage_names()
    unknown = [k for k in (getattr(config, "registered", None) or {}) if k not in names]
    if unknown:
        raise ShrinkError(
            f"{unknown[0]}: unknown setting (no stage of that name; stages: {', '.join(names)})"
        )
    return [st for st in all_stages() if st.enabled(config)]
