"""``shrink generate``: stream a continuation from any artifact shrink writes."""

from __future__ import annotations

import sys
import time

import click

from shrink.cli.common import console, err


def finite(ctx, param, value):
    """Refuse NaN (click's ranges let it through: every comparison with NaN is false)."""
    if value is not None and value != value:
        raise click.BadParameter("NaN is not a number", ctx, param)
    return value


@click.command("generate")
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1e3),
    callback=finite,
    help="0 means greedy decoding.",
)
@click.option(
    "--top-p",
    default=1.0,
    show_default=True,
    callback=finite,
    type=click.FloatRange(0, 1, min_open=True),
)
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1), help="Seed for sampling.")
def command(artifact, prompt, max_new_tokens, temperature, top_p, seed):
    """Stream a continuation of --prompt from ARTIFACT: any folder shrink writes (Hugging Face,
    GPTQ or ONNX)."""
    from shrink.runtime.generate import artifact_kind, generate

    kind = artifact_kind(artifact)
    t0 = time.perf_counter()

    def stream(piece: str) -> None:
        click.echo(piece, nl=False, file=console.file)
        (console.file or sys.stdout).flush()

    generate(
        artifact,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=stream,
    )
    click.echo("", file=console.file)
    err.print(f"[dim]{kind} artifact, {time.perf_counter() - t0:.1f} s[/]", highlight=False)
