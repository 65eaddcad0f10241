"""The ``shrink`` command line: a thin layer over the Python API (parse, call, print)."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shrink.core.errors import ShrinkError

console = Console()
err = Console(stderr=True)


class ShrinkGroup(click.Group):
    """Turns ShrinkError (and other expected failures) into one line on stderr and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ShrinkError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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
            err.print(f"[bold red]error:[/] {type(e).__name__}: {escape(line)} "
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
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # torchao (pulled in by the gptq/qlora extras) logs import-time noise on every command;
    # huggingface_hub logs each failed HTTP request before the error shrink reports anyway
    for noisy in ("torchao", "torch.utils._pytree", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
@click.option("--streaming/--no-streaming", default=None,
              help="Read one layer at a time from the safetensors files (default: only when the "
                   "weights do not fit in the device's available memory).")
@model_options
def score(model, metric, drop, skip_first, data, samples, seq_len, seed, batch_size, json_out,
          plot, streaming, dtype, device, trust_remote_code):
    """Score every decoder layer of MODEL (Block Influence, angular distance, relative magnitude,
    optionally perplexity without each layer)."""
    from shrink.stages.prune import choose_layers
    from shrink.core.scores import score_model

    scores = score_model(model, metric=metric, data=data, samples=samples, seq_len=seq_len,
                         seed=seed, batch_size=batch_size, skip_first=skip_first, dtype=dtype,
                         device=device, trust_remote_code=trust_remote_code,
                         streaming=streaming)
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
        from shrink.report.plots import plot_scores

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
@click.option("--streaming/--no-streaming", default=None,
              help="Read one layer at a time from the safetensors files (default: only when the "
                   "weights do not fit in the device's available memory).")
@model_options
def prune(model, drop, strategy, layers, output, force, skip_first, no_verify, data, samples,
          seq_len, seed, batch_size, json_out, streaming, dtype, device, trust_remote_code):
    """Remove decoder layers from MODEL and write a standard Hugging Face folder to OUTPUT."""
    from shrink.stages.prune import parse_layers, prune as prune_model

    if layers is not None and drop is not None and len(parse_layers(layers)) != drop:
        raise ShrinkError("--drop and --layers disagree; give one of them")
    result = prune_model(model, output, drop=drop, strategy=strategy,
                         layers=parse_layers(layers) if layers is not None else None, calib=data,
                         samples=samples, seq_len=seq_len, seed=seed, skip_first=skip_first,
                         batch_size=batch_size, dtype=dtype, device=device, force=force,
                         trust_remote_code=trust_remote_code, verify=not no_verify,
                         streaming=streaming)
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
        if result.verification.get("reload") == "skipped":
            console.print(f"not reloaded: {result.verification['reason']}")
        elif result.verification:
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
    """Perplexity of MODEL (a model folder, GPTQ or ONNX folder, hub id or alias) on held-out
    text (default: Persuasion, never used to score, heal or calibrate)."""
    from shrink.stages.evaluate import evaluate

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
    from shrink.analysis.estimate import GB

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
    from shrink.analysis.estimate import estimate as run_estimate

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
    from shrink.analysis.claims import TOLERANCE, check_claims, format_exact, format_stated, to_markdown

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


# --- quantize: GPTQ through GPTQModel (the `gptq` extra) ---

@main.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", required=True, help="Output folder (a standard GPTQ checkpoint).")
@click.option("--gptq", "gptq_bits", required=True, metavar="2bit|3bit|4bit|8bit",
              help="GPTQ weight bits.")
@click.option("--group-size", type=int, default=None,
              help="Input columns sharing one scale/zero; -1: one group per output channel. "
                   "Default 128, or the largest power of two dividing every layer's input width "
                   "when 128 does not (reported).")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True,
              help="Quantize columns in order of decreasing activation (act-order).")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric quantization.")
@click.option("--damp", default=0.01, show_default=True, type=float,
              help="Hessian dampening, a fraction of its mean diagonal.")
@click.option("--calib", default="austen:calibration", show_default=True,
              help="Calibration text: austen:<split|novel>, a .txt/.jsonl file or folder, or "
                   "hf:NAME[:CONFIG][:SPLIT].")
@click.option("--samples", default=128, show_default=True, type=click.IntRange(1),
              help="Calibration blocks.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(2),
              help="Tokens per calibration block.")
@click.option("--seed", default=0, show_default=True, help="Seed for block selection.")
@click.option("--eval-samples", default=16, show_default=True, type=click.IntRange(0),
              help="Evaluation blocks (austen:evaluation) for perplexity before/after; 0 skips.")
@click.option("--eval-seq-len", default=512, show_default=True, type=click.IntRange(2))
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--no-verify", is_flag=True, help="Skip the fresh-process reload check.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result (- for stdout).")
def quantize(model_dir, output, gptq_bits, group_size, desc_act, sym, damp, calib, samples,
             seq_len, seed, eval_samples, eval_seq_len, device, force, no_verify, json_out):
    """Quantize MODEL_DIR (e.g. a pruned, healed model) with GPTQ and write a standard GPTQ
    checkpoint that transformers (with GPTQModel + optimum), vLLM and other runtimes load."""
    from shrink.stages.quantize import parse_bits, quantize_gptq

    result = quantize_gptq(model_dir, output, bits=parse_bits(gptq_bits), group_size=group_size,
                           desc_act=desc_act, sym=sym, damp=damp, calib=calib, samples=samples,
                           seq_len=seq_len, seed=seed, eval_samples=eval_samples,
                           eval_seq_len=eval_seq_len, device=device, force=force,
                           verify=not no_verify)
    if json_out:
        write_json(result.to_dict(), json_out)
    if json_out != "-":
        mb = 1e6
        console.print(f"GPTQ {result.bits}-bit, group size {result.group_size}"
                      f"{' (' + result.group_size_note + ')' if result.group_size_note else ''}, "
                      f"desc_act {result.desc_act}, sym {result.sym}, damp {result.damp}; "
                      f"{result.calibration['samples']} x {result.calibration['seq_len']} tokens of "
                      f"{result.calibration['source']}, {result.seconds:.1f} s on {result.device}")
        console.print(f"weights {result.size_bytes_before / mb:.1f} MB -> "
                      f"{result.size_bytes_after / mb:.1f} MB; {result.bits_per_weight:.3f} bits per "
                      f"weight over {result.quantized_linears} quantized Linears")
        if result.perplexity_before is not None:
            after = (f"{result.perplexity_after:.3f}" if result.perplexity_after is not None
                     else "not measured (--no-verify)")
            console.print(f"perplexity on {result.evaluation['source']}: "
                          f"{result.perplexity_before:.3f} -> {after}")
        if result.verification:
            v = result.verification
            console.print(f"verified in a fresh process with transformers ({v['quant_linear']}, "
                          f"{v['dtype']}): finite logits; '{v['prompt']}' -> {v['completion']!r}")
        console.print(f"wrote {result.output}")


# --- heal: LoRA / QLoRA / distillation fine-tune, merged into a standard checkpoint ---

@main.command()
@click.argument("model_dir")
@click.option("-o", "--output", required=True, help="Output model folder (merged checkpoint).")
@click.option("--method", type=click.Choice(["lora", "qlora"]), default=None,
              help="lora: 16/32-bit base; qlora: 4-bit NF4 base (bitsandbytes). [default: lora]")
@click.option("--rank", type=int, default=None, help="LoRA rank. [default: 8]")
@click.option("--alpha", type=float, default=None, help="LoRA alpha. [default: = rank]")
@click.option("--dropout", type=float, default=None, help="LoRA dropout. [default: 0.05]")
@click.option("--targets", default=None,
              help="mlp, attn, all, or Linear names like gate_proj,up_proj. [default: mlp]")
@click.option("--steps", type=int, default=None, help="Optimizer steps. [default: 100]")
@click.option("--lr", type=float, default=None, help="Peak learning rate (cosine). [default: 3e-4]")
@click.option("--warmup", type=int, default=None,
              help="Warm-up steps. [default: 10% of steps, at most 100]")
@click.option("--batch-size", type=int, default=None,
              help="Blocks per device per micro-step. [default: 4]")
@click.option("--grad-accum", type=int, default=None, help="Gradient accumulation. [default: 1]")
@click.option("--seq-len", type=int, default=None, help="Tokens per block. [default: 512]")
@click.option("--data", default="austen:healing", show_default=True,
              help="Healing text: austen:<split|novel>, .txt/.jsonl file or folder, hf:NAME.")
@click.option("--eval-data", default="austen:evaluation", show_default=True,
              help="Held-out text for perplexity before/after.")
@click.option("--eval-samples", type=int, default=None,
              help="Evaluation blocks of --seq-len tokens. [default: 16]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--teacher", default=None, metavar="MODEL",
              help="Distil from this model (same tokenizer), e.g. the unpruned model.")
@click.option("--temperature", default=2.0, show_default=True, type=float,
              help="Distillation temperature T (KL scaled by T^2).")
@click.option("--kd-alpha", type=float, default=None,
              help="Weight of the KL term; 1 - kd_alpha goes to the LM loss. [default: 0.5]")
@click.option("--preset", type=click.Choice(["gromov"]), default=None,
              help="Gromov et al.'s recipe: QLoRA, MLP only, alpha = rank, rank/LR by family, "
                   "100 warm-up steps, 5000 steps x batch 16. Explicit options win.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of an interrupted run.")
@click.option("--save-adapter", is_flag=True, help="Also keep the LoRA adapter in OUTPUT/adapter.")
@click.option("--save-steps", type=int, default=None,
              help="Checkpoint every N steps (for --resume). [default: steps/10, at most 500]")
@click.option("--no-verify", is_flag=True, help="Skip the fresh-process reload check.")
@click.option("--force", is_flag=True, help="Replace OUTPUT; discard an interrupted run's checkpoints.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result (- for stdout).")
def heal(model_dir, output, method, rank, alpha, dropout, targets, steps, lr, warmup, batch_size,
         grad_accum, seq_len, data, eval_data, eval_samples, seed, teacher, temperature, kd_alpha,
         preset, resume, save_adapter, save_steps, no_verify, force, device, trust_remote_code,
         json_out):
    """Heal a pruned MODEL_DIR: LoRA/QLoRA fine-tune (optionally distilled from --teacher), merge
    the adapter into a full-precision copy and write a standard HF folder to OUTPUT, with
    perplexity before/after, loss.png and shrink.json. Runs on several GPUs/nodes under
    `accelerate launch -m shrink.cli heal ...` unchanged."""
    from shrink.stages.heal import heal as run_heal

    result = run_heal(model_dir, output, method=method, rank=rank, alpha=alpha, dropout=dropout,
                      targets=targets, steps=steps, lr=lr, warmup=warmup, batch_size=batch_size,
                      grad_accum=grad_accum, seq_len=seq_len, data=data, eval_data=eval_data,
                      eval_samples=eval_samples, seed=seed, teacher=teacher,
                      temperature=temperature, kd_alpha=kd_alpha, resume=resume,
                      save_adapter=save_adapter, preset=preset, force=force, device=device,
                      save_steps=save_steps, verify=not no_verify,
                      trust_remote_code=trust_remote_code)
    if result.output is None:  # not the main process of a multi-process run
        return
    if json_out:
        write_json(result.to_dict(), json_out)
    if json_out != "-":
        st = result.settings
        kd = f", distilled from {st['teacher']} (kd_alpha {st['kd_alpha']}, T {st['temperature']})" \
            if st.get("teacher") else ""
        console.print(f"{st['method']} rank {st['rank']} on {', '.join(st['target_modules'])}: "
                      f"{result.steps} steps x {st['global_batch']} x {st['seq_len']} tokens{kd}"
                      + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""))
        if result.final_loss is not None:
            console.print(f"final training loss {result.final_loss:.4f}")
        console.print(f"perplexity on {st['eval_data']}: {result.ppl_before:.3f} -> "
                      f"{result.ppl_after:.3f}")
        console.print(f"merged (max |logit diff| vs adapter model "
                      f"{result.merge_check['max_abs_logit_diff']:.1e}); wrote {result.output}")


@main.command("export")
@click.argument("model_dir")
@click.option("-o", "--output", required=True, help="Output folder.")
@click.option("--onnx", "to_onnx", is_flag=True,
              help="Export to ONNX (onnxruntime-genai model builder, with KV cache).")
@click.option("--precision", default="int4", show_default=True,
              help="Weights: int4 (MatMulNBits), fp16 (CUDA only) or fp32.")
@click.option("--lm-head", default="int8", show_default=True,
              type=click.Choice(["int8", "int4"], case_sensitive=False),
              help="Bits of the LM head in an int4 export (int4: smallest file, lower quality).")
@click.option("--target", default="cpu", show_default=True,
              help="Execution provider the model is built for: cpu or cuda.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--no-verify", is_flag=True, help="Skip the fresh-process comparison with PyTorch.")
@click.option("--no-fallback", is_flag=True,
              help="Fail instead of falling back to a forward-pass-only (no KV cache) export.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write the result (- for stdout).")
def export_cmd(model_dir, output, to_onnx, precision, lm_head, target, force, no_verify,
               no_fallback, json_out):
    """Export MODEL_DIR (a Hugging Face or GPTQ folder) for another runtime. --onnx writes
    model.onnx + genai_config.json + tokenizer + shrink.json, verified against PyTorch."""
    if not to_onnx:
        raise ShrinkError("choose an export format: --onnx")
    from shrink.stages.export.onnx import export_onnx

    quiet = json_out == "-"
    result = export_onnx(model_dir, output, precision=precision.lower(), target=target.lower(),
                         lm_head=lm_head.lower(), force=force, verify=not no_verify,
                         fallback=not no_fallback,
                         log=None if quiet else (lambda line: err.print(line, highlight=False)))
    if json_out:
        write_json(result.to_dict(), json_out)
    if not quiet:
        mb = 1024 * 1024
        head = f" (LM head {result.lm_head})" if result.lm_head else ""
        console.print(f"{result.method}: {result.precision}{head} for {result.target}, model "
                      f"{result.model_bytes / mb:.1f} MiB (source folder "
                      f"{result.source_bytes / mb:.1f} MiB), KV cache: "
                      f"{'yes' if result.kv_cache else 'NO (forward pass only)'}")
        v = result.verification
        if v:
            console.print(
                f"verified in a fresh process ({v['runtime']}): greedy tokens equal to PyTorch on "
                f"{v['greedy_tokens_matching']}/{v['greedy_tokens_total']}, first-step logits "
                f"max |diff| {v['first_step_logits_max_abs_diff']:.2e}, top-1 agreement "
                f"{100 * v['top1_agreement']:.1f}%, perplexity {v['perplexity_onnx']:.3f} "
                f"(PyTorch {v['perplexity_torch']:.3f})")
        console.print(f"wrote {result.output}")


@main.command("generate")
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0 means greedy decoding.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1,
                                                                              min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
def generate_cmd(artifact, prompt, max_new_tokens, temperature, top_p, seed):
    """Stream a continuation of --prompt from ARTIFACT: any folder shrink writes (Hugging Face,
    GPTQ or ONNX)."""
    import time

    from shrink.runtime.generate import artifact_kind, generate

    kind = artifact_kind(artifact)
    t0 = time.perf_counter()

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    generate(artifact, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, seed=seed, stream=stream)
    click.echo("")
    err.print(f"[dim]{kind} artifact, {time.perf_counter() - t0:.1f} s[/]", highlight=False)


# --- bench: measured latency, throughput, memory, perplexity ---


@main.command("bench")
@click.argument("artifacts", nargs=-1)
@click.option("--baseline", default=None, help="Artifact the others are compared with "
              "(default: the first).")
@click.option("--sweep-drop", default=None, metavar="N,N,...",
              help="Prune MODEL by BI at each setting (in memory) and plot perplexity and speed "
                   "against layers removed.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(2))
@click.option("--gen-len", default=64, show_default=True, type=click.IntRange(2))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--ppl-samples", default=4, show_default=True, type=click.IntRange(0),
              help="Blocks of held-out text for perplexity (0: skip).")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write results (- for stdout).")
@click.option("--markdown", "md_out", default=None, metavar="FILE", help="Write a markdown table.")
@click.option("--plot", default=None, metavar="FILE.png", help="Throughput/memory bars, or the "
              "sweep curve.")
@click.option("--tasks", default=None, metavar="T1,T2",
              help="lm-evaluation-harness tasks on HF/GPTQ artifacts (the eval extra).")
@click.option("--tasks-path", default=None, metavar="DIR", help="Folder of custom task YAMLs.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Documents per task.")
def bench_cmd(artifacts, baseline, sweep_drop, device, prompt_len, gen_len, batch, repeats,
              ppl_samples, json_out, md_out, plot, tasks, tasks_path, limit):
    """Measure ARTIFACTS (HF, GPTQ or ONNX folders): time to first token, decode tokens/s,
    peak memory, size on disk, perplexity and FLOPs per token, as ratios to a baseline.

    With --sweep-drop, ARTIFACTS is one model (default: the embedded one)."""
    from shrink.stages import bench as B

    if sweep_drop is not None:
        if len(artifacts) > 1:
            raise ShrinkError("--sweep-drop takes one model")
        model = artifacts[0] if artifacts else "smollm2-135m"
        try:
            drops = sorted({int(x) for x in sweep_drop.split(",") if x.strip()})
        except ValueError:
            raise ShrinkError(f"--sweep-drop: '{sweep_drop}' is not a list of integers") from None
        points = B.sweep_drop(model, drops, device=device, prompt_len=prompt_len,
                              gen_len=min(gen_len, 32), repeats=repeats,
                              ppl_samples=max(ppl_samples, 1))
        table = Table(title=f"{model}: layers removed by BI")
        for col in ("drop", "perplexity", "decode tok/s", "prefill tok/s", "GFLOP/token",
                    "speedup", "ideal (FLOPs)"):
            table.add_column(col, justify="right")
        base = points[0]
        for p in points:
            ideal = (base.flops_per_token / p.flops_per_token) if p.flops_per_token else None
            table.add_row(str(p.drop), f"{p.perplexity:.2f}", f"{p.decode_tokens_per_s:.1f}",
                          f"{p.prefill_tokens_per_s:.0f}",
                          f"{p.flops_per_token / 1e9:.3f}" if p.flops_per_token else "?",
                          f"{p.decode_tokens_per_s / base.decode_tokens_per_s:.2f}",
                          f"{ideal:.2f}" if ideal else "?")
        if json_out != "-":
            console.print(table)
        if json_out:
            from dataclasses import asdict

            write_json({"model": model, "points": [asdict(p) for p in points]}, json_out)
        if plot:
            B.plot_sweep(points, plot, model)
            err.print(f"wrote {plot}")
        return
    if not artifacts:
        raise ShrinkError("give one or more artifact folders (or --sweep-drop)")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    report = B.bench(list(artifacts), baseline=baseline, device=device, prompt_len=prompt_len,
                     gen_len=gen_len, batch=batch, repeats=repeats, ppl_samples=ppl_samples,
                     tasks=task_list, tasks_path=tasks_path, limit=limit)
    if json_out:
        write_json(report.to_dict(), json_out)
    if json_out != "-":
        table = Table(title=f"benchmark ({device}, prompt {prompt_len}, generate {gen_len}, "
                            f"batch {batch}, {repeats} repeats, medians)")
        for col in ("artifact", "kind", "layers", "size MB", "TTFT ms", "decode tok/s",
                    "peak RSS MB", "ppl", "GFLOP/tok", "decode x", "size x"):
            table.add_column(col, justify="left" if col in ("artifact", "kind") else "right")
        for r in report.results:
            m, q = r.median, r.ratios
            ppl = m.get("perplexity")
            table.add_row(Path(r.name).name or r.name, r.kind, str(r.layers or "?"),
                          f"{r.size_bytes / 1e6:.0f}",
                          f"{1000 * m['ttft_s']:.1f}", f"{m['decode_tokens_per_s']:.1f}",
                          f"{m['peak_rss_bytes'] / 2**20:.0f}",
                          "n/a" if ppl is None else f"{ppl:.2f}",
                          f"{r.flops_per_token / 1e9:.3f}" if r.flops_per_token else "?",
                          f"{q.get('decode_tokens_per_s', 1):.2f}", f"{q['size_bytes']:.2f}")
        console.print(table)
        for r in report.results:
            for task, metrics in r.median.get("tasks", {}).items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                console.print(f"{Path(r.name).name or r.name}: {task}: {shown}")
    if md_out:
        Path(md_out).write_text(B.to_markdown(report))
        err.print(f"wrote {md_out}")
    if plot:
        B.plot_bench(report, plot)
        err.print(f"wrote {plot}")


# --- build: the one-command pipeline ---


@main.command("build")
@click.argument("model", required=False)
@click.option("--config", "recipe", default=None, metavar="RECIPE",
              help="YAML recipe (a file, or a shipped one: smollm2-135m, shortgpt-llama-2-13b, "
                   "gromov-llama-2-70b). Command-line options override it.")
@click.option("-o", "--output", default=None, help="Output folder (default: derived from the "
              "model and settings).")
@click.option("--resume", is_flag=True, help="Skip stages already done with the same settings.")
@click.option("--force", is_flag=True, help="Start over in an existing output folder.")
@click.option("--drop", type=int, default=None, help="Layers to remove.")
@click.option("--layers", default=None, help="Explicit layers to remove, e.g. 21,22,25-27.")
@click.option("--strategy", "--metric", "strategy", default=None,
              type=click.Choice(["bi", "angular", "iterative", "relmag", "ppl", "last", "random"]))
@click.option("--skip-first", type=int, default=None)
@click.option("--calib", default=None, help="Calibration text (scoring and GPTQ).")
@click.option("--calib-samples", type=int, default=None)
@click.option("--calib-seq-len", type=int, default=None)
@click.option("--no-heal", is_flag=True, help="Skip the healing fine-tune.")
@click.option("--method", default=None, type=click.Choice(["lora", "qlora"]))
@click.option("--preset", default=None, type=click.Choice(["gromov"]))
@click.option("--rank", type=int, default=None)
@click.option("--alpha", type=float, default=None)
@click.option("--targets", default=None)
@click.option("--heal-steps", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--warmup", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--grad-accum", type=int, default=None)
@click.option("--heal-seq-len", type=int, default=None)
@click.option("--heal-data", default=None)
@click.option("--teacher", default=None, help="Distill from this model (e.g. the dense one).")
@click.option("--temperature", type=float, default=None)
@click.option("--kd-alpha", type=float, default=None)
@click.option("--gptq", default=None, help="GPTQ bits: 2bit, 3bit, 4bit or 8bit.")
@click.option("--group-size", type=int, default=None)
@click.option("--desc-act/--no-desc-act", default=None)
@click.option("--sym/--asym", default=None)
@click.option("--damp", type=float, default=None)
@click.option("--gptq-samples", type=int, default=None)
@click.option("--gptq-seq-len", type=int, default=None)
@click.option("--onnx", default=None, type=click.Choice(["int4", "fp16", "fp32"]))
@click.option("--onnx-target", default=None, type=click.Choice(["cpu", "cuda"]))
@click.option("--onnx-lm-head", default=None, type=click.Choice(["int8", "int4"]),
              help="LM head bits in an int4 ONNX export [default: int8].")
@click.option("--eval-data", default=None)
@click.option("--eval-samples", type=int, default=None)
@click.option("--eval-seq-len", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write report.json here "
              "too (- for stdout).")
@model_options
@click.pass_context
def build_cmd(ctx, model, recipe, output, resume, force, no_heal, layers, json_out, **options):
    """Score, prune, heal, quantize (GPTQ) and/or export (ONNX), verify, and write a model card.

    With no arguments: the embedded SmolLM2 end to end on a CPU (recipe smollm2-135m)."""
    from shrink.stages.build import build, command_line, load_recipe, make_settings
    from shrink.stages.prune import parse_layers

    recipe_text = None
    values: dict = {}
    if recipe is None and model is None:
        recipe = "smollm2-135m"
    if recipe is not None:
        values = load_recipe(recipe)
        from importlib import resources

        p = Path(recipe)
        recipe_text = p.read_text() if p.is_file() else (
            resources.files("shrink") / "recipes" / f"{recipe}.yaml").read_text()
        output = output or values.pop("output", None)
        values.pop("description", None)
    if model is not None:
        values["model"] = model
    for key, value in options.items():
        if value is not None and key != "dtype" or (key == "dtype" and value != "auto"):
            values[key] = value
    if layers is not None:
        values["layers"] = parse_layers(layers)
        values.pop("drop", None)
    if no_heal:
        values["heal"] = False
    settings = make_settings(values)
    result = build(settings, output=output, resume=resume, force=force, command=command_line(),
                   recipe_text=recipe_text)
    if json_out:
        write_json(result.report, json_out)
    if json_out != "-":
        table = Table(title=f"shrink build -> {result.output}")
        for col in ("stage", "status", "seconds"):
            table.add_column(col, justify="right" if col == "seconds" else "left")
        for st in result.stages:
            table.add_row(st.name, "resumed (done earlier)" if st.skipped else "ran",
                          f"{st.seconds:.1f}")
        console.print(table)
        for label, row in result.report["perplexity"].items():
            console.print(f"perplexity {label:>9}: {row['perplexity']:.3f}")
        console.print(f"model card: {result.output / 'README.md'}; report: "
                      f"{result.output / 'report.json'}")


if __name__ == "__main__":  # pragma: no cover
    main()
