"""``shrink heal``: LoRA / QLoRA / distillation fine-tune, merged into a standard checkpoint."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    eval_config,
    eval_options,
    load_options,
    model_options,
    output_options,
    write_json,
)
from shrink.cli.options import config_options
from shrink.stages.configs import HealConfig


@click.command("heal")
@click.argument("model_dir")
@config_options(HealConfig)
@eval_options
@click.option(
    "--resume", is_flag=True, help="Continue from the last checkpoint of an interrupted run."
)
@output_options
@model_options
def command(model_dir, output, force, no_verify, json_out, resume, **kwargs):
    """Heal a pruned MODEL_DIR: LoRA/QLoRA fine-tune (optionally distilled from --teacher), merge
    the adapter into a full-precision copy and write a standard HF folder to OUTPUT, with
    perplexity before/after, loss.png and shrink.json. Runs on several GPUs/nodes under
    `accelerate launch -m shrink.cli heal ...` unchanged."""
    from shrink.report.summaries import heal_lines
    from shrink.stages.heal import heal as run_heal

    config = build_config(HealConfig, kwargs)
    evaluation = eval_config(kwargs)
    load = load_options(kwargs)
    check_writable(json_out)
    result = run_heal(
        model_dir,
        output,
        config,
        evaluation=evaluation,
        load=load,
        resume=resume,
        force=force,
        verify=not no_verify,
    )
    if result.output is None:  # not the main process of a multi-process run
        return
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
    if json_out != "-":
        for line in heal_lines(result, evaluation):
            console.print(line)
