"""``shrink frontier``: prune or quantize harder? The size / speed / quality frontier."""

from __future__ import annotations

from pathlib import Path

import click

from shrink.cli.common import check_writable, console, err, json_option, write_json
from shrink.stages.configs import make
from shrink.stages.frontier import DENSE_LADDER, PLAIN_ALSO, FrontierConfig


@click.command("frontier")
@click.argument("model", default="smollm2-135m")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="DIR",
    help="Where the results and every measured artifact go. [default: frontier-MODEL]",
)
@click.option(
    "--dense-types",
    default=None,
    metavar="T,T",
    help=f"GGUF types of the dense model. [default: {','.join(DENSE_LADDER)}]",
)
@click.option(
    "--plain-types",
    default=None,
    metavar="T,T",
    help="Dense types also measured without an importance matrix ('' for none). "
    f"[default: {','.join(PLAIN_ALSO)}]",
)
@click.option(
    "--depths",
    default=None,
    metavar="D,D",
    help="Pruning depths: fractions of the layers (0.2) or layer counts (6). "
    "[default: 0.1,0.2,0.3]",
)
@click.option(
    "--pruned-types",
    default=None,
    metavar="T,T",
    help="GGUF types of each pruned model and of the fine-tuned dense control. "
    "[default: iq4_nl,q2_k]",
)
@click.option(
    "--unhealed/--no-unhealed",
    default=None,
    help="Also measure each pruned model before healing. [default: yes]",
)
@click.option(
    "--control/--no-control",
    default=None,
    help="Give the dense model the same fine-tune and measure it. [default: yes]",
)
@click.option(
    "--speed/--no-speed",
    default=None,
    help="Measure decode tokens/s and peak memory. [default: yes]",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads of the speed runs. [default: 1]"
)
@click.option("--repeats", type=int, default=None, help="Interleaved speed rounds. [default: 2]")
@json_option("Also write the results here (- for stdout).")
def command(model, output, json_out, **kwargs):
    """Measure what MODEL's dense quantization ladder and shrink's pruned models (10/20/30% of
    the layers, healed and unhealed, and a fine-tuned dense control) give at each size and
    speed, every artifact in fresh processes: bytes, perplexity on both held-out domains,
    decode tokens/s, peak memory. Writes frontier.json, frontier.md and plots with the Pareto
    front; a later `shrink build --target-size 80MB --frontier DIR` builds to a budget.
    Steps already measured in DIR are not run again."""
    from shrink.report.frontier import points_of, pruning_verdicts
    from shrink.stages.frontier import frontier

    given = {k: v for k, v in kwargs.items() if v is not None}
    config = make(FrontierConfig, given, "frontier")
    check_writable(json_out)
    out = Path(output or f"frontier-{Path(model).name}")
    result = frontier(model, out, config, log=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    if json_out:
        write_json(result, json_out, config.settings())
    if json_out != "-":
        points = points_of(result)
        front = [p for p in points if p.on_front("bytes")]
        console.print(
            f"{len(points)} artifacts measured; on the size front: "
            + ", ".join(
                f"{p.label} ({p.bytes / 1e6:.1f} MB)" for p in sorted(front, key=lambda p: p.bytes)
            )
        )
        for line in pruning_verdicts(points):
            console.print(line)
        console.print(f"wrote {out / 'frontier.md'}, {out / 'frontier.json'}, plots in {out}")
