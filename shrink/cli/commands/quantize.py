"""``shrink quantize``: GPTQ through GPTQModel (the ``gptq`` extra)."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    eval_config,
    eval_options,
    output_options,
    write_json,
)
from shrink.cli.options import config_options
from shrink.stages.configs import QuantizeConfig


@click.command("quantize")
@click.argument("model_dir")
@config_options(QuantizeConfig, required=("gptq",))
@eval_options
@click.option("--no-eval", is_flag=True, help="Skip the perplexity before/after.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@output_options
def command(model_dir, output, force, no_verify, json_out, no_eval, device, **kwargs):
    """Quantize MODEL_DIR (e.g. a pruned, healed model) with GPTQ and write a standard GPTQ
    checkpoint that transformers (with GPTQModel + optimum), vLLM and other runtimes load."""
    from shrink.report.summaries import quantize_lines
    from shrink.stages.quantize import quantize as run_quantize

    config = build_config(QuantizeConfig, kwargs)
    evaluation = eval_config(kwargs)
    check_writable(json_out)
    result = run_quantize(
        model_dir,
        output,
        config,
        evaluation=None if no_eval else evaluation,
        device=device,
        force=force,
        verify=not no_verify,
    )
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
    if json_out != "-":
        for line in quantize_lines(result, evaluation):
            console.print(line)
