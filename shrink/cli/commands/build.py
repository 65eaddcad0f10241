"""``shrink build``: the one-command pipeline. Its options are every stage's, prefixed where
several stages share a name, with the defaults a build applies."""

from __future__ import annotations

import click

from shrink.cli.buildopts import (
    EXTRA,
    build_options,
    build_values,
    plan_and_budget_options,
    show_plan,
    to_budget,
)
from shrink.cli.common import check_writable, console, model_options, write_json
from shrink.stages.configs import BuildConfig


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
@plan_and_budget_options
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
    extra = {k: kwargs.pop(k) for k in EXTRA}
    if extra["no_prune"]:
        base["prune"] = None
    config = recipe_config(build_values(ctx, kwargs, base, no_heal), "settings")
    check_writable(json_out)
    config, budget = to_budget(config, model or config.model, extra)
    if extra["plan"]:
        show_plan(config, output, extra["gpu"], extra["ram"])
        return
    result = build(
        config,
        output=output,
        resume=resume,
        force=force,
        command=command_line(),
        keep_stages=keep_stages,
        budget=budget,
    )
    if json_out:
        write_json(result.report, json_out, config.settings())
    if json_out != "-":
        console.print(build_table(result))
        for line in build_lines(result, config.evaluate):
            console.print(line)
