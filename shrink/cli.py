"""The ``shrink`` command line: a thin layer over the Python API (parse, call, print)."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import ShrinkError

console = Console()
err = Console(stderr=True)


class ShrinkGroup(click.Group):
    """Turns ShrinkError (and other expected failures) into one line on stderr and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ShrinkError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was moved into place")
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line
            if os.environ.get("SHRINK_DEBUG"):
                raise
            line = (str(e).strip().splitlines() or [""])[0]
            err.print(f"[bold red]error:[/] {type(e).__name__}: {line} "
                      "(set SHRINK_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
            sys.exit(1)


@click.group(cls=ShrinkGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                "max_content_width": 100})
@click.version_option(package_name="shrink-llm", prog_name="shrink")
def main():
    """Turn a large language model into a smaller, faster one: score its layers, remove the
    least useful, and prove what was done.

    MODEL is a local Hugging Face folder, a hub id (org/name), an alias such as llama-2-13b, or
    the embedded default smollm2-135m (no network needed).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_options(f):
    """Options shared by every command that loads a model."""
    @click.option("--dtype", default="auto", show_default=True,
                  type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                  help="Weights dtype (auto: float32 on CPU, bfloat16 on CUDA).")
    @click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
    @click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


def data_options(default_source: str, samples: int, seq_len: int):
    def deco(f):
        @click.option("--data", "data", default=default_source, show_default=True,
                      help="Text: austen:<split|novel>, a .txt/.jsonl file or folder, or "
                           "hf:NAME[:CONFIG][:SPLIT].")
        @click.option("--samples", default=samples, show_default=True, type=click.IntRange(1),
                      help="Number of token blocks.")
        @click.option("--seq-len", default=seq_len, show_default=True, type=click.IntRange(2),
                      help="Tokens per block.")
        @click.option("--seed", default=0, show_default=True, help="Seed for block selection.")
        @click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)
        return wrapper
    return deco


def write_json(obj: dict, dest: str) -> None:
    text = json.dumps(obj, indent=2)
    if dest == "-":
        click.echo(text)
    else:
        Path(dest).write_text(text + "\n")
        err.print(f"wrote {dest}")


def scores_table(scores, metric: str, chosen: list[int]) -> Table:
    table = Table(title=f"{scores.model}: layer scores ({scores.tokens} tokens, "
                        f"{scores.samples} samples)")
    table.add_column("layer", justify="right")
    for col in ("BI", "relmag") + (("ppl +",) if scores.ppl is not None else ()):
        table.add_column(col, justify="right")
    table.add_column(f"rank ({metric})", justify="right")
    table.add_column("removed")
    if metric == "angular":
        rank = {i: None for i in range(scores.num_layers)}
    else:
        vals = scores.values(metric)
        order = sorted(range(len(vals)), key=lambda i: (vals[i], i))
        rank = {layer: r + 1 for r, layer in enumerate(order)}
    for i in range(scores.num_layers):
        row = [str(i), f"{scores.bi[i]:.4f}", f"{scores.relmag[i]:.4f}"]
        if scores.ppl is not None:
            row.append(f"{scores.ppl[i]:+.3f}")
        row += [str(rank[i]) if rank[i] else "", "[bold red]x[/]" if i in chosen else ""]
        table.add_row(*row)
    return table


@main.command()
@click.argument("model", default="smollm2-135m")
@click.option("--metric", default="bi", show_default=True,
              type=click.Choice(["bi", "angular", "relmag", "ppl"]),
              help="Which score ranks the layers (all cheap ones are computed in one pass).")
@click.option("--drop", type=int, default=None,
              help="Mark the layers this many removals would take.")
@click.option("--skip-first", default=1, show_default=True, type=click.IntRange(0),
              help="Leave the first K tokens of each block out of BI/relmag (attention sink).")
@data_options("austen:calibration", 32, 256)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write all scores (- for stdout).")
@click.option("--plot", default=None, metavar="FILE.png",
              help="BI bar chart and angular-distance heatmap.")
@model_options
def score(model, metric, drop, skip_first, data, samples, seq_len, seed, batch_size, json_out,
          plot, dtype, device, trust_remote_code):
    """Score every decoder layer of MODEL (Block Influence, angular distance, relative magnitude,
    optionally perplexity without each layer)."""
    from .pruning import choose_layers
    from .scoring import score_model

    scores = score_model(model, metric=metric, data=data, samples=samples, seq_len=seq_len,
                         seed=seed, batch_size=batch_size, skip_first=skip_first, dtype=dtype,
                         device=device, trust_remote_code=trust_remote_code)
    chosen: list[int] = []
    if drop is not None:
        chosen, reason = choose_layers(metric, drop, scores.num_layers, scores)
        err.print(f"--drop {drop}: would remove {chosen}: {reason}")
    if json_out != "-":
        console.print(scores_table(scores, metric, chosen))
        if metric == "angular":
            for n in sorted({1, 2, 4, drop or 0, scores.num_layers // 4, scores.num_layers // 2}
                            - {0}):
                start, d = scores.best_block(n)
                console.print(f"best block of {n:>2}: layers {start}..{start + n - 1} "
                              f"(angular distance {d:.4f})")
    if json_out:
        write_json({**scores.to_dict(), "metric": metric, "drop": drop, "chosen": chosen},
                   json_out)
    if plot:
        from .plots import plot_scores

        plot_scores(scores, plot, chosen=chosen)
        err.print(f"wrote {plot}")


@main.command()
@click.argument("model", default="smollm2-135m")
@click.option("--drop", type=int, default=None, help="Number of layers to remove.")
@click.option("--strategy", default="bi", show_default=True,
              type=click.Choice(["bi", "angular", "iterative", "relmag", "ppl", "last", "random"]),
              help="How to pick the layers.")
@click.option("--layers", default=None, help="Explicit layers to remove, e.g. 21,22,25-27.")
@click.option("-o", "--output", required=True, help="Output model folder.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--skip-first", default=1, show_default=True, type=click.IntRange(0))
@click.option("--no-verify", is_flag=True, help="Skip the fresh-process reload check.")
@data_options("austen:calibration", 32, 256)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result (- for stdout).")
@model_options
def prune(model, drop, strategy, layers, output, force, skip_first, no_verify, data, samples,
          seq_len, seed, batch_size, json_out, dtype, device, trust_remote_code):
    """Remove decoder layers from MODEL and write a standard Hugging Face folder to OUTPUT."""
    from .pruning import parse_layers, prune as prune_model

    if layers is not None and drop is not None and len(parse_layers(layers)) != drop:
        raise ShrinkError("--drop and --layers disagree; give one of them")
    result = prune_model(model, output, drop=drop, strategy=strategy,
                         layers=parse_layers(layers) if layers is not None else None, calib=data,
                         samples=samples, seq_len=seq_len, seed=seed, skip_first=skip_first,
                         batch_size=batch_size, dtype=dtype, device=device, force=force,
                         trust_remote_code=trust_remote_code, verify=not no_verify)
    summary = {
        "output": str(result.output), "strategy": result.strategy, "reason": result.reason,
        "removed_layers": result.removed, "removed_original_layers": result.removed_original,
        "num_layers": [result.num_layers_before, len(result.kept)],
        "params": [result.params_before, result.params_after],
        "verification": result.verification,
    }
    if json_out:
        write_json(summary, json_out)
    if json_out != "-":
        console.print(f"removed layers {result.removed} ({result.reason})")
        console.print(f"layers {result.num_layers_before} -> {len(result.kept)}, parameters "
                      f"{result.params_before / 1e6:.1f} M -> {result.params_after / 1e6:.1f} M "
                      f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)")
        if result.verification:
            v = result.verification
            console.print(f"verified in a fresh process: finite logits, cached generation == "
                          f"uncached; '{v['prompt']}' -> {v['completion']!r}")
        console.print(f"wrote {result.output}")


@main.command(name="eval")
@click.argument("model", default="smollm2-135m")
@data_options("austen:evaluation", 16, 512)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result (- for stdout).")
@model_options
def eval_cmd(model, data, samples, seq_len, seed, batch_size, json_out, dtype, device,
             trust_remote_code):
    """Perplexity of MODEL on held-out text (default: Persuasion, never used to score or heal)."""
    from .evaluate import evaluate

    result = evaluate(model, data=data, samples=samples, seq_len=seq_len, seed=seed,
                      batch_size=batch_size, dtype=dtype, device=device,
                      trust_remote_code=trust_remote_code)
    if json_out:
        write_json(result.to_dict(), json_out)
    if json_out != "-":
        console.print(f"{model}: perplexity {result.perplexity:.3f} on {result.tokens} tokens of "
                      f"{data} ({result.seconds:.1f} s)")


# --- analytic: estimate and claims (no weights needed) ---

def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,.0f}"


def _gb(n_bytes: float) -> str:
    from .estimate import GB

    return f"{n_bytes / GB:.2f} GB"


def _flops(n: float) -> str:
    return f"{n / 1e9:.2f} GFLOP"


@main.command("estimate")
@click.argument("model")
@click.option("--drop", default=0, show_default=True, help="Number of decoder layers removed.")
@click.option("--bits", type=click.Choice(["16", "8", "4", "3", "2"]), default="16",
              show_default=True, help="Weight bits; below 16 uses the GPTQ layout for Linears.")
@click.option("--group-size", default=128, show_default=True,
              help="GPTQ group size (-1: one group per output channel).")
@click.option("--context", default=4096, show_default=True, help="Context length in tokens.")
@click.option("--batch", default=1, show_default=True, help="Sequences decoded together.")
@click.option("--gpu", default="all", show_default=True,
              help="GPU from the table ('4090', 'rtx-3090', 'm3max', ...) or 'all'.")
@click.option("--json", "json_out", metavar="FILE|-", default=None,
              help="Also write the estimate as JSON to FILE ('-': print only JSON on stdout).")
def estimate(model, drop, bits, group_size, context, batch, gpu, json_out):
    """Estimate parameters, memory, KV cache, FLOPs and GPU fit of MODEL from its config alone.

    MODEL is an alias (llama-2-7b, smollm2-135m, ...), a folder with config.json, a .json file or a
    hub id. No weights are loaded.
    """
    from .estimate import estimate as run_estimate

    est = run_estimate(model, drop=drop, bits=int(bits), group_size=group_size, context=context,
                       batch=batch, gpu=gpu)
    if json_out == "-":
        write_json(est.to_dict(), "-")
        return
    kept = est.params.layers
    quant = "fp16" if est.bits == 16 else f"GPTQ {est.bits}-bit, group {est.group_size}"
    console.print(f"[bold]{est.model}[/] ({est.model_type}): {kept} of {est.layers} layers, {quant}, "
                  f"context {est.context}, batch {est.batch}")

    p = est.params
    table = Table(title="Parameters")
    for col in ("part", "params", "share"):
        table.add_column(col, justify="left" if col == "part" else "right")
    parts = [("embedding", p.embedding), ("attention", p.attention), ("MLP", p.mlp),
             ("norms", p.norms), ("head" + (" (tied)" if est.shape.tied else ""), p.head)]
    for name, value in parts:
        table.add_row(name, _count(value), f"{value / p.total:.1%}")
    table.add_row("[bold]total[/]", f"[bold]{_count(p.total)}[/]", "100%")
    table.add_row("per layer", _count(p.per_layer), f"{p.per_layer / p.total:.1%}")
    console.print(table)

    w = est.weights
    table = Table(title="Memory (GB = 1e9 bytes)")
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_row(f"attention + MLP weights ({w.bits_per_linear_weight:.2f} bits/weight)",
                  _gb(w.linear_bytes))
    table.add_row("embedding, head, norms, biases (16-bit)", _gb(w.other_bytes))
    table.add_row("[bold]weights[/]", f"[bold]{_gb(w.total_bytes)}[/]")
    table.add_row(f"KV cache fp16 ({est.context} tokens x {est.batch})", _gb(est.kv_cache_bytes))
    table.add_row("[bold]weights + KV cache[/]", f"[bold]{_gb(w.total_bytes + est.kv_cache_bytes)}[/]")
    console.print(table)

    f = est.flops
    table = Table(title="Forward FLOPs per token")
    table.add_column("part")
    table.add_column("FLOPs", justify="right")
    table.add_row("matmul 2*(L*(attn+MLP) + d*V)", _flops(f.matmul))
    table.add_row(f"attention over context 4*L*h*d_h*{f.context}", _flops(f.attention))
    table.add_row("[bold]total[/]", f"[bold]{_flops(f.total)}[/]")
    console.print(table)

    table = Table(title="GPUs (roofline: upper bounds)")
    for col in ("GPU", "memory", "usable", "needed", "fits", "decode tok/s", "prefill tok/s"):
        table.add_column(col, justify="left" if col in ("GPU", "fits") else "right")
    for g in est.gpus:
        prefill = "n/a" if g.prefill_tokens_per_s is None else f"{g.prefill_tokens_per_s:,.0f}"
        table.add_row(g.gpu, f"{g.memory_gb:g} GB", f"{g.usable_gb:.1f} GB", f"{g.needed_gb:.2f} GB",
                      "[green]yes[/]" if g.fits else "[red]no[/]",
                      f"{g.decode_tokens_per_s:,.1f}", prefill)
    console.print(table)
    for line in est.assumptions:
        console.print(f"[dim]- {line}[/]")
    console.print("[dim]- decode tok/s = batch x bandwidth / (weight bytes read per token + KV bytes);"
                  " prefill tok/s = FP16 FLOP/s / FLOPs per token at the full context[/]")
    if json_out:
        write_json(est.to_dict(), json_out)


@main.command("claims")
@click.option("--markdown", is_flag=True, help="Print a markdown table instead of a rich table.")
@click.option("--json", "json_out", metavar="FILE|-", default=None,
              help="Also write the checks as JSON to FILE ('-': print only JSON on stdout).")
def claims(markdown, json_out):
    """Check the papers' memory/FLOPs claims (ShortGPT, Gromov et al.) against exact arithmetic."""
    from .claims import TOLERANCE, check_claims, format_exact, format_stated, to_markdown

    checks = check_claims()
    if json_out == "-":
        write_json([c.to_dict() for c in checks], "-")
        return
    if markdown:
        click.echo(to_markdown(checks), nl=False)
    else:
        table = Table(title="Paper claims vs exact arithmetic")
        for col in ("#", "claim", "stated", "exact", "stated/exact", "verdict"):
            table.add_column(col, justify="left" if col in ("claim", "verdict") else "right")
        colors = {"holds": "green", "approximately": "yellow", "wrong": "red"}
        for i, c in enumerate(checks, 1):
            ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
            table.add_row(str(i), c.claim, format_stated(c), format_exact(c), ratio,
                          f"[{colors[c.verdict]}]{c.verdict}[/]")
        console.print(table)
        for i, c in enumerate(checks, 1):
            console.print(f"{i}. [{colors[c.verdict]}]{c.verdict}[/]: {c.note}"
                          + (f" Measure: {c.bench}" if c.bench else ""), highlight=False)
        console.print(f"[dim]Verdict rule: stated/exact {TOLERANCE}. Sources: Gromov et al."
                      " (arXiv 2403.17887) sec. 5; ShortGPT (arXiv 2403.03853).[/]")
    if json_out:
        write_json([c.to_dict() for c in checks], json_out)


if __name__ == "__main__":  # pragma: no cover
    main()
