"""The options of ``shrink build``: every stage's settings, prefixed where several stages share a
name, with the defaults a build applies; and those that decide what to build before any work:
the plan only (``--plan``), without pruning (``--no-prune``), or to a budget from a measured
frontier (``--target-size``, ``--target-speed``, ``--frontier``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from shrink.cli.common import console, err
from shrink.cli.options import config_options, values
from shrink.core.errors import ShrinkError
from shrink.stages.configs import STAGE_CONFIGS, BuildConfig, ModelOptions

BUILD_PREFIX = {
    "prune": "prune",
    "heal": "heal",
    "quantize": "quantize",
    "export": "export",
    "evaluate": "eval",
}


def build_prefixes() -> dict[str, dict[str, str]]:
    """Per stage, the option prefix of each setting: none when the name is unique among the
    stages (``--drop``, ``--gptq``, ``--onnx``), the stage's prefix when several stages use it
    (``--heal-seq-len``, ``--eval-samples``, ``--quantize-seed``)."""
    names = Counter(n for cls in STAGE_CONFIGS.values() for n in cls.model_fields)
    names.update(list(ModelOptions.model_fields))
    return {
        stage: {n: (BUILD_PREFIX[stage] if names[n] > 1 else "") for n in cls.model_fields}
        for stage, cls in STAGE_CONFIGS.items()
    }


def build_defaults(stage: str) -> dict:
    """The settings a build gives ``stage`` where they differ from the stage command's own
    (prune: strategy auto, bridge auto, text of both domains); none for a stage a build only
    runs when asked (quantize, export)."""
    config = getattr(BuildConfig(), stage, None)
    if config is None:
        return {}
    out = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if field.is_required() or value != field.get_default(call_default_factory=True):
            out[name] = value
    return out


def build_options(f):
    prefixes = build_prefixes()
    for stage, cls in reversed(list(STAGE_CONFIGS.items())):
        defaults = build_defaults(stage)
        for prefix in sorted(set(prefixes[stage].values())):
            exclude = tuple(n for n, pre in prefixes[stage].items() if pre != prefix)
            f = config_options(cls, prefix, exclude=exclude, defaults=defaults)(f)
    return f


def build_values(ctx: click.Context, kwargs: dict, base: dict, no_heal: bool) -> dict:
    """The recipe's settings with the options the user typed on top."""
    prefixes = build_prefixes()
    for stage, cls in STAGE_CONFIGS.items():
        given: dict = {}
        for prefix in set(prefixes[stage].values()):
            sub = {
                k: v
                for k, v in kwargs.items()
                if k
                in {
                    (f"{prefix}_{n}" if prefix else n)
                    for n, pre in prefixes[stage].items()
                    if pre == prefix
                }
            }
            given.update(values(cls, sub, prefix, ctx=ctx, only_given=True))
        if given:
            earlier = dict(base.get(stage) or {})
            if stage == "prune" and ({"drop", "layers"} & set(given)):
                earlier.pop("drop", None)  # --layers replaces the recipe's --drop, and back
                earlier.pop("layers", None)
            base[stage] = {**earlier, **given}
    if no_heal:
        base["heal"] = None
    for name, value in values(ModelOptions, kwargs, ctx=ctx, only_given=True).items():
        base[name] = value
    return base


EXTRA = ("no_prune", "plan", "gpu", "ram", "target_size", "target_speed", "frontier")


def plan_and_budget_options(f):
    options = [
        click.option("--no-prune", is_flag=True, help="Keep every layer (heal and export only)."),
        click.option(
            "--plan",
            is_flag=True,
            help="Print the stage plan and the memory plan (where each stage runs, its "
            "predicted peak memory and disk) and stop.",
        ),
        click.option(
            "--gpu",
            default=None,
            metavar="SIZE",
            help="With --plan: plan for this "
            "GPU (24GB, a card name, or none) instead of this machine's.",
        ),
        click.option(
            "--ram",
            default=None,
            metavar="SIZE",
            help="With --plan: plan for this much RAM (64GB) instead of this machine's.",
        ),
        click.option(
            "--target-size",
            default=None,
            metavar="SIZE",
            help="Build the artifact the measured frontier (--frontier) says is best within "
            "this size (80MB): its depth, healing and GGUF type.",
        ),
        click.option(
            "--target-speed",
            default=None,
            metavar="SPEED",
            help="Likewise for a decode speed: 1.3x the dense f16 GGUF, or 40tok/s.",
        ),
        click.option(
            "--frontier",
            default=None,
            metavar="DIR",
            help="The results of `shrink frontier MODEL -o DIR`. [default: frontier-MODEL]",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def to_budget(config, model: str, extra: dict):
    """The config rewritten to the budget's choice (printed, with every rejected candidate),
    and the choice for the report; unchanged without a budget."""
    if not (extra["target_size"] or extra["target_speed"]):
        if extra["frontier"]:
            raise ShrinkError("--frontier is read by --target-size or --target-speed")
        return config, None
    from shrink.stages.frontier import budget_config, load_frontier

    where = extra["frontier"] or f"frontier-{Path(model.rstrip('/')).name}"
    points = load_frontier(where)
    config, choice = budget_config(
        config, points, target_size=extra["target_size"], target_speed=extra["target_speed"]
    )
    for line in choice.lines():
        err.print(line, highlight=False, soft_wrap=True)
    return config, {**choice.to_dict(), "frontier": str(Path(where).expanduser().resolve())}


def show_plan(config, output, gpu, ram) -> None:
    from shrink.stages.build import preview

    lines, fits = preview(config, output, gpu, ram)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if not fits:
        raise SystemExit(2)
