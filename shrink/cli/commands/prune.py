"""``shrink prune``: remove decoder layers."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    load_options,
    model_options,
    output_options,
    write_json,
)
from shrink.cli.options import config_options
from shrink.stages.configs import PruneConfig


@click.command("prune")
@click.argument("model", default="smollm2-135m")
@config_options(PruneConfig)
@output_options
@model_options
def command(model, output, force, no_verify, json_out, **kwargs):
    """Remove decoder layers from MODEL and write a standard Hugging Face folder to OUTPUT.

    Strategies (--strategy): bi, angular, relmag, ppl, iterative, last, random, and any
    registered with shrink.register_strategy."""
    from shrink.report.summaries import prune_lines
    from shrink.stages.prune import prune as run_prune

    config = build_config(PruneConfig, kwargs)
    load = load_options(kwargs)
    check_writable(json_out)
    result = run_prune(model, output, config, load=load, force=force, verify=not no_verify)
    if json_out:
        write_json(result.summary(), json_out, config.settings())
    if json_out != "-":
        for line in prune_lines(result):
            console.print(line)
