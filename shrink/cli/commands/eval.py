"""``shrink eval``: perplexity on held-out text."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    json_option,
    load_options,
    model_options,
    write_json,
)
from shrink.cli.options import config_options
from shrink.stages.configs import EvaluateConfig


@click.command("eval")
@click.argument("model", default="smollm2-135m")
@config_options(EvaluateConfig)
@json_option("Write the result (- for stdout).")
@model_options
def command(model, json_out, **kwargs):
    """Perplexity of MODEL (a model folder, GPTQ or ONNX folder, hub id or alias) on held-out
    text (default: the fixed evaluation set, Persuasion 8 x 512, never used to score, heal or
    calibrate)."""
    from shrink.report.summaries import eval_lines
    from shrink.stages.evaluate import evaluate

    config = build_config(EvaluateConfig, kwargs)
    load = load_options(kwargs)
    check_writable(json_out)
    result = evaluate(model, config, load=load)
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
    if json_out != "-":
        for line in eval_lines(model, result):
            console.print(line)
