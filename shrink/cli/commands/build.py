"""``shrink build``: the one-command pipeline. Its options are every stage's, prefixed where
several stages share a name, with the defaults a build applies."""

from __future__ import annotations

from collections import Counter

import click

from shrink.cli.common import check_writable, console, model_options, write_json
from shrink.cli.options import config_options, values
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


@click.command("build")
@click.argument("model", required=False)
@click.option(
    "--config",
    "recipe",
    default=None,
    metavar="RECIPE",
    help="YAML recipe (a file, or a shipped one: smollm2-135m, shortgpt-llama-2-13b, "
    "gromov-llama-2-70b). Command-line options override it.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    help="Output folder (default: derived from the model and settings).",
)
@click.option("--resume", is_flag=True, help="Skip stages already done with the same settings.")
@click.option("--force", is_flag=True, help="Start over in an existing output folder.")
@click.option("--no-heal", is_flag=True, help="Skip the healing fine-tune.")
@click.option(
    "--allow-degraded", is_flag=True, help=BuildConfig.model_fields["allow_degraded"].description
)
@click.option(
    "--keep-stages",
    is_flag=True,
    help="Keep OUT/stages/ (the intermediate models) "
    "after a finished build, for a later --resume with other settings.",
)
@click.option(
    "--json",
    "json_out",
    default=None,
    metavar="FILE",
    help="Write report.json here too (- for stdout).",
)
@build_options
@model_options
@click.pass_context
def command(
    ctx,
    model,
    recipe,
    output,
    resume,
    force,
    no_heal,
    allow_degraded,
    keep_stages,
    json_out,
    **kwargs,
):
    """Score, prune, heal, quantize (GPTQ) and/or export (ONNX), verify, and write a model card.

    With no arguments: the embedded SmolLM2 end to end on a CPU (recipe smollm2-135m). A
    setting several stages share is namespaced by its stage (--heal-seq-len, --eval-samples).
    The defaults shown are those of `shrink build MODEL`; a recipe's settings replace them."""
    from shrink.report.summaries import build_lines
    from shrink.report.tables import build_table
    from shrink.stages.build import build, command_line, load_recipe, recipe_config

    if recipe is None and model is None:
        recipe = "smollm2-135m"
    if recipe is not None:
        config, _ = load_recipe(recipe)
        base = config.settings()
    else:  # shrink build's own defaults, with the options given on top
        base = BuildConfig().settings()
    if model is not None:
        base["model"] = model
    if allow_degraded:
        base["allow_degraded"] = True
    config = recipe_config(build_values(ctx, kwargs, base, no_heal), "settings")
    check_writable(json_out)
    result = build(
        config,
        output=output,
        resume=resume,
        force=force,
        command=command_line(),
        keep_stages=keep_stages,
    )
    if json_out:
        write_json(result.report, json_out, config.settings())
    if json_out != "-":
        console.print(build_table(result))
        for line in build_lines(result, config.evaluate):
            console.print(line)
