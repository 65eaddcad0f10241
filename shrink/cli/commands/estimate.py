"""``shrink estimate``: parameters, memory, FLOPs and GPU fit from a model's config alone."""

from __future__ import annotations

import click

from shrink.cli.common import console, json_option, write_json


@click.command("estimate")
@click.argument("model")
@click.option("--drop", default=0, show_default=True, help="Number of decoder layers removed.")
@click.option(
    "--bits",
    type=click.Choice(["16", "8", "4", "3", "2"]),
    default="16",
    show_default=True,
    help="Weight bits; below 16 uses the GPTQ layout for Linears.",
)
@click.option(
    "--group-size",
    default=128,
    show_default=True,
    help="GPTQ group size (-1: one group per output channel).",
)
@click.option("--context", default=4096, show_default=True, help="Context length in tokens.")
@click.option("--batch", default=1, show_default=True, help="Sequences decoded together.")
@click.option(
    "--gpu",
    default="all",
    show_default=True,
    help="GPU from the table ('4090', 'rtx-3090', 'm3max', ...) or 'all'; with --ram "
    "also a memory size (24GB) or 'none'.",
)
@click.option(
    "--ram",
    default=None,
    metavar="SIZE",
    help="Host RAM (64GB): print the build's stage-by-stage memory plan for this GPU "
    "and RAM (where each stage runs, its predicted peak memory and disk).",
)
@json_option(
    "Also write the estimate as JSON to FILE ('-': print only JSON on stdout).", metavar="FILE|-"
)
def command(model, drop, bits, group_size, context, batch, gpu, ram, json_out):
    """Estimate parameters, memory, KV cache, FLOPs and GPU fit of MODEL from its config alone.

    MODEL is an alias (llama-2-7b, smollm2-135m, ...), a folder with config.json, a .json file or a
    hub id. No weights are loaded.
    """
    from shrink.analysis.estimate import estimate as run_estimate
    from shrink.report.summaries import estimate_header, estimate_notes
    from shrink.report.tables import estimate_tables

    if ram is not None:
        _plan(model, drop, gpu, ram, json_out)
        return
    est = run_estimate(
        model,
        drop=drop,
        bits=int(bits),
        group_size=group_size,
        context=context,
        batch=batch,
        gpu=gpu,
    )
    if json_out == "-":
        write_json(est.to_dict(), "-")
        return
    console.print(estimate_header(est))
    for table in estimate_tables(est):
        console.print(table)
    for line in estimate_notes(est):
        console.print(line)
    if json_out:
        write_json(est.to_dict(), json_out)


def _plan(model: str, drop: int, gpu: str, ram: str, json_out: str | None) -> None:
    """The memory plan of a build (a build refuses the same way before its first stage)."""
    from dataclasses import asdict

    from shrink.analysis.memory import format_plan, plan_for_estimate

    plan = plan_for_estimate(model, drop, None if gpu == "all" else gpu, ram)
    if json_out:
        write_json({**asdict(plan), "fits": plan.fits, "refusal": plan.refusal}, json_out)
    if json_out != "-":
        for line in format_plan(plan):
            console.print(line, highlight=False, soft_wrap=True)
    if not plan.fits:
        raise SystemExit(2)
