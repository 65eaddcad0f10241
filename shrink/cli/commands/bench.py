"""``shrink bench``: measured latency, throughput, memory and perplexity."""

from __future__ import annotations

import os
from pathlib import Path

import click

from shrink.cli.common import build_config, check_writable, console, json_option, write_json, wrote
from shrink.cli.options import config_options
from shrink.core.errors import ShrinkError
from shrink.stages.configs import BenchConfig


@click.command("bench")
@click.argument("artifacts", nargs=-1)
@click.option(
    "--baseline", default=None, help="Artifact the others are compared with (default: the first)."
)
@click.option(
    "--sweep-drop",
    default=None,
    metavar="N,N,...",
    help="Prune MODEL by BI at each setting (in memory) and plot perplexity and speed "
    "against layers removed.",
)
@config_options(BenchConfig)
@json_option("Write results (- for stdout).")
@click.option("--markdown", "md_out", default=None, metavar="FILE", help="Write a markdown table.")
@click.option(
    "--plot", default=None, metavar="FILE.png", help="Throughput/memory bars, or the sweep curve."
)
@click.option(
    "--tasks",
    default=None,
    metavar="T1,T2",
    help="lm-evaluation-harness tasks on HF/GPTQ artifacts (the eval extra).",
)
@click.option("--tasks-path", default=None, metavar="DIR", help="Folder of custom task YAMLs.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Documents per task.")
def command(
    artifacts, baseline, sweep_drop, json_out, md_out, plot, tasks, tasks_path, limit, **kwargs
):
    """Measure ARTIFACTS (HF, GPTQ, ONNX or GGUF folders): time to first token, decode tokens/s,
    peak memory, size on disk, perplexity and FLOPs per token, as ratios to a baseline, each run
    in a fresh process, interleaved. With --threads 1,2 every artifact runs at each count and
    decode is also given as a fraction of the measured memory-bandwidth roofline.

    With --sweep-drop, ARTIFACTS is one model (default: the embedded one)."""
    config = build_config(BenchConfig, kwargs)
    check_writable(json_out, md_out, plot)
    if sweep_drop is not None:
        sweep(artifacts, sweep_drop, config, json_out, plot)
        return
    from shrink.report.tables import bench_markdown, bench_table
    from shrink.stages.bench import bench

    if not artifacts:
        raise ShrinkError("give one or more artifact folders (or --sweep-drop)")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    report = bench(
        list(artifacts),
        baseline=baseline,
        device=config.device,
        prompt_len=config.prompt_len,
        gen_len=config.gen_len,
        batch=config.batch,
        repeats=config.repeats,
        ppl_samples=config.ppl_samples,
        tasks=task_list,
        tasks_path=tasks_path,
        limit=limit,
        threads=config.threads,
    )
    if json_out:
        write_json(
            {**report.to_dict(), "load_average": list(os.getloadavg())}, json_out, config.settings()
        )
    if json_out != "-":
        console.print(bench_table(report, config.settings()))
        for r in report.results:
            for task, metrics in r.median.get("tasks", {}).items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                console.print(f"{Path(r.name).name or r.name}: {task}: {shown}")
    if md_out:
        Path(md_out).write_text(bench_markdown(report))
        wrote(md_out)
    if plot:
        from shrink.report.plots import plot_bench

        plot_bench(report, plot)
        wrote(plot)


def sweep(
    artifacts: tuple[str, ...],
    sweep_drop: str,
    config: BenchConfig,
    json_out: str | None,
    plot: str | None,
) -> None:
    """``--sweep-drop``: one model pruned in memory at each number of layers removed."""
    from dataclasses import asdict

    from shrink.report.tables import sweep_table
    from shrink.stages.bench import sweep_drop as run_sweep

    if len(artifacts) > 1:
        raise ShrinkError("--sweep-drop takes one model")
    model = artifacts[0] if artifacts else "smollm2-135m"
    try:
        drops = sorted({int(x) for x in sweep_drop.split(",") if x.strip()})
    except ValueError:
        raise ShrinkError(f"--sweep-drop: '{sweep_drop}' is not a list of integers") from None
    points = run_sweep(
        model,
        drops,
        device=config.device,
        prompt_len=config.prompt_len,
        gen_len=min(config.gen_len, 32),
        repeats=config.repeats,
        ppl_samples=max(config.ppl_samples, 1),
    )
    if json_out != "-":
        console.print(sweep_table(points, model))
    if json_out:
        write_json({"model": model, "points": [asdict(p) for p in points]}, json_out)
    if plot:
        from shrink.report.plots import plot_sweep

        plot_sweep(points, plot, model)
        wrote(plot)
