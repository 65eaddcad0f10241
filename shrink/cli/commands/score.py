"""``shrink score``: per-layer scores of a model."""

from __future__ import annotations

import click

from shrink.cli.common import (
    build_config,
    check_writable,
    console,
    err,
    json_option,
    load_options,
    model_options,
    write_json,
    wrote,
)
from shrink.cli.options import config_options
from shrink.stages.configs import ScoreConfig


@click.command("score")
@click.argument("model", default="smollm2-135m")
@config_options(ScoreConfig)
@click.option(
    "--drop",
    type=int,
    default=None,
    help="Mark the layers this many removals would take (by --metric).",
)
@json_option("Write all scores (- for stdout).")
@click.option(
    "--plot", default=None, metavar="FILE.png", help="BI bar chart and angular-distance heatmap."
)
@model_options
def command(model, drop, json_out, plot, **kwargs):
    """Score every decoder layer of MODEL (Block Influence, angular distance, relative magnitude,
    optionally perplexity without each layer)."""
    from shrink.report.summaries import best_blocks
    from shrink.report.tables import scores_table
    from shrink.stages.score import score as run_score
    from shrink.stages.strategies import choose_layers

    config = build_config(ScoreConfig, kwargs)
    load = load_options(kwargs)
    check_writable(json_out, plot)
    scores = run_score(model, config, load=load)
    chosen: list[int] = []
    if drop is not None:
        chosen, reason = choose_layers(config.metric, drop, scores.num_layers, scores)
        err.print(f"--drop {drop}: would remove {chosen}: {reason}")
    if json_out != "-":
        console.print(scores_table(scores, config.metric, chosen))
        if config.metric == "angular":
            for line in best_blocks(scores, drop):
                console.print(line)
    if json_out:
        write_json(
            {**scores.to_dict(), "drop": drop, "chosen": chosen}, json_out, config.settings()
        )
    if plot:
        from shrink.report.plots import plot_scores

        plot_scores(scores, plot, chosen=chosen)
        wrote(plot)
