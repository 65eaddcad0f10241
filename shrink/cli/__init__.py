"""The ``shrink`` command line: a thin layer over the Python API (parse, call, print)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shrink.cli.options import config_options, values
from shrink.core.errors import ShrinkError
from shrink.core.progress import stderr
from shrink.core.quiet import capture_to, has_terminal_fds
from shrink.stages.configs import (STAGE_CONFIGS, BenchConfig, BuildConfig, EvaluateConfig,
                                   ExportConfig, HealConfig, ModelOptions, PruneConfig,
                                   QuantizeConfig, ScoreConfig, make)

console = Console()
err = stderr  # shrink's own notes and progress: one stderr console for the whole package


class ShrinkGroup(click.Group):
    """Turns ShrinkError (and other expected failures) into one line on stderr and exit 2."""

    def invoke(self, ctx):
        verbose, quiet = ctx.params.get("verbose"), ctx.params.get("quiet")
        err.quiet = bool(quiet)
        log = None
        try:
            # no capture for --help: click prints it to stdout inside the command's parsing
            asks_help = any(a in ctx.help_option_names for a in ctx.args)
            if verbose or not has_terminal_fds() or not ctx.protected_args or asks_help:
                return super().invoke(ctx)
            log = log_path(ctx.protected_args[0])
            with capture_to(log, keep=(console, err)):
                return super().invoke(ctx)
        except ShrinkError as e:
            err.quiet = False
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            if log is not None and log.stat().st_size:
                err.print(f"[dim](third-party output of this run: {log})[/]", highlight=False)
            sys.exit(2)
        except KeyboardInterrupt:
            err.quiet = False
            err.print("[bold red]interrupted[/]: nothing was moved into place")
            from shrink.runtime import gptq

            if gptq.INTERRUPTED:
                # GPTQModel's worker threads can hang (or abort with 134) at interpreter shutdown
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(130)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line
            if os.environ.get("SHRINK_DEBUG"):
                raise
            line = (str(e).strip().splitlines() or [""])[0]
            err.quiet = False
            err.print(f"[bold red]error:[/] {type(e).__name__}: {escape(line)} "
                      "(set SHRINK_DEBUG=1 for the traceback"
                      + (f"; third-party output: {log}" if log is not None else "") + ")",
                      highlight=False, soft_wrap=True)
            sys.exit(1)


def log_path(command: str) -> Path:
    """Where a CLI run's third-party output goes (``shrink build`` copies it into OUT)."""
    from shrink.core.models import cache_dir

    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"shrink-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@click.group(cls=ShrinkGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                "max_content_width": 100})
@click.version_option(package_name="shrink-llm", prog_name="shrink")
@click.option("-v", "--verbose", is_flag=True, help="Show third-party libraries' logs (by default "
              "they go to a log file, named when something fails).")
@click.option("-q", "--quiet", is_flag=True, help="Errors only on stderr (results still go to "
              "stdout).")
def main(verbose, quiet):
    """Turn a large language model into a smaller, faster one: score its layers, remove the
    least useful, and prove what was done.

    MODEL is a local Hugging Face folder, a hub id (org/name), an alias such as llama-2-13b, or
    the embedded default smollm2-135m (no network needed).
    """
    from shrink.core.quiet import quiet_process

    quiet_process()


def model_options(f):
    """Options shared by every command that loads a model (ModelOptions)."""
    return config_options(ModelOptions)(f)


def output_options(f):
    """-o/--output, --force, --no-verify and --json: what every writing command takes."""
    f = click.option("--json", "json_out", default=None, metavar="FILE",
                     help="Write the result as JSON (- for stdout).")(f)
    f = click.option("--no-verify", is_flag=True,
                     help="Skip the fresh-process check of the output.")(f)
    f = click.option("--force", is_flag=True, help="Replace the output if it exists (only a "
                     "folder shrink or another model tool wrote).")(f)
    return click.option("-o", "--output", required=True, help="Output folder.")(f)


def build_config(cls, kwargs: dict, where: str = ""):
    """The typed config of a stage command from its options (errors name the setting)."""
    return make(cls, values(cls, kwargs), where)


def load_options(kwargs: dict) -> ModelOptions:
    return build_config(ModelOptions, kwargs)


def write_json(result, dest: str, settings: dict | None = None) -> None:
    """One envelope for every --json output: {"command", "settings", "result", "versions"}."""
    from shrink.core.outputs import versions

    ctx = click.get_current_context(silent=True)
    envelope = {"command": ctx.command_path if ctx else "shrink", "settings": settings or {},
                "result": result, "versions": versions()}
    text = json.dumps(envelope, indent=2, default=str)
    if dest == "-":
        click.echo(text, file=console.file)
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
@config_options(ScoreConfig)
@click.option("--drop", type=int, default=None,
              help="Mark the layers this many removals would take (by --metric).")
@click.option("--json", "json_out", default=None, metavar="FILE",
              help="Write all scores (- for stdout).")
@click.option("--plot", default=None, metavar="FILE.png",
              help="BI bar chart and angular-distance heatmap.")
@model_options
def score(model, drop, json_out, plot, **kwargs):
    """Score every decoder layer of MODEL (Block Influence, angular distance, relative magnitude,
    optionally perplexity without each layer)."""
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
            for n in sorted({1, 2, 4, drop or 0, scores.num_layers // 4, scores.num_layers // 2}
                            - {0}):
                start, d = scores.best_block(n)
                console.print(f"best block of {n:>2}: layers {start}..{start + n - 1} "
                              f"(angular distance {d:.4f})")
    if json_out:
        write_json({**scores.to_dict(), "drop": drop, "chosen": chosen}, json_out,
                   config.settings())
    if plot:
        from shrink.report.plots import plot_scores

        plot_scores(scores, plot, chosen=chosen)
        err.print(f"wrote {plot}")


def check_writable(*paths: str | None) -> None:
    """Fail before any work when a --json/--plot file cannot be written."""
    for p in paths:
        if p and p != "-":
            parent = Path(p).expanduser().resolve().parent
            if not parent.is_dir():
                raise ShrinkError(f"cannot write '{p}': folder '{parent}' does not exist")


@main.command()
@click.argument("model", default="smollm2-135m")
@config_options(PruneConfig)
@output_options
@model_options
def prune(model, output, force, no_verify, json_out, **kwargs):
    """Remove decoder layers from MODEL and write a standard Hugging Face folder to OUTPUT.

    Strategies (--strategy): bi, angular, relmag, ppl, iterative, last, random, and any
    registered with shrink.register_strategy."""
    from shrink.stages.prune import prune as run_prune

    config = build_config(PruneConfig, kwargs)
    load = load_options(kwargs)
    check_writable(json_out)
    result = run_prune(model, output, config, load=load, force=force, verify=not no_verify)
    if json_out:
        write_json(result.summary(), json_out, config.settings())
    if json_out != "-":
        console.print(f"removed layers {result.removed} ({result.reason})")
        console.print(f"layers {result.num_layers_before} -> {len(result.kept)}, parameters "
                      f"{result.params_before / 1e6:.1f} M -> {result.params_after / 1e6:.1f} M "
                      f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)")
        v = result.verification
        if v.get("reload") == "skipped":
            console.print(f"not reloaded: {v['reason']}")
        elif v:
            console.print(f"verified in a fresh process: finite logits, cached generation == "
                          f"uncached; '{v['prompt']}' -> {v['completion']!r}")
        console.print(f"wrote {result.output}")


@main.command(name="eval")
@click.argument("model", default="smollm2-135m")
@config_options(EvaluateConfig)
@click.option("--json", "json_out", default=None, metavar="FILE",
              help="Write the result (- for stdout).")
@model_options
def eval_cmd(model, json_out, **kwargs):
    """Perplexity of MODEL (a model folder, GPTQ or ONNX folder, hub id or alias) on held-out
    text (default: the fixed evaluation set, Persuasion 8 x 512, never used to score, heal or
    calibrate)."""
    from shrink.stages.evaluate import evaluate

    config = build_config(EvaluateConfig, kwargs)
    load = load_options(kwargs)
    check_writable(json_out)
    result = evaluate(model, config, load=load)
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
    if json_out != "-":
        for r in (result, result.second):
            if r is not None:
                console.print(f"{model}: perplexity {r.perplexity:.3f} on {r.data['set']} "
                              f"({r.tokens} predicted tokens, {r.seconds:.1f} s)")


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
        click.echo(to_markdown(checks), nl=False, file=console.file)
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
@config_options(QuantizeConfig, required=("gptq",))
@config_options(EvaluateConfig, prefix="eval", exclude=("batch_size",))
@click.option("--no-eval", is_flag=True, help="Skip the perplexity before/after.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@output_options
def quantize(model_dir, output, force, no_verify, json_out, no_eval, device, **kwargs):
    """Quantize MODEL_DIR (e.g. a pruned, healed model) with GPTQ and write a standard GPTQ
    checkpoint that transformers (with GPTQModel + optimum), vLLM and other runtimes load."""
    from shrink.stages.quantize import quantize as run_quantize

    config = build_config(QuantizeConfig, kwargs)
    evaluation = make(EvaluateConfig, values(EvaluateConfig, kwargs, "eval"), "eval")
    check_writable(json_out)
    result = run_quantize(model_dir, output, config, evaluation=None if no_eval else evaluation,
                          device=device, force=force, verify=not no_verify)
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
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
            console.print(f"perplexity on {evaluation.name()}: "
                          f"{result.perplexity_before:.3f} -> {after}")
        if result.verification:
            v = result.verification
            console.print(f"verified in a fresh process with transformers ({v['quant_linear']}, "
                          f"{v['dtype']}): finite logits; '{v['prompt']}' -> {v['completion']!r}")
        console.print(f"wrote {result.output}")


# --- heal: LoRA / QLoRA / distillation fine-tune, merged into a standard checkpoint ---

@main.command()
@click.argument("model_dir")
@config_options(HealConfig)
@config_options(EvaluateConfig, prefix="eval", exclude=("batch_size",))
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of an "
              "interrupted run.")
@output_options
@model_options
def heal(model_dir, output, force, no_verify, json_out, resume, **kwargs):
    """Heal a pruned MODEL_DIR: LoRA/QLoRA fine-tune (optionally distilled from --teacher), merge
    the adapter into a full-precision copy and write a standard HF folder to OUTPUT, with
    perplexity before/after, loss.png and shrink.json. Runs on several GPUs/nodes under
    `accelerate launch -m shrink.cli heal ...` unchanged."""
    from shrink.stages.heal import heal as run_heal

    config = build_config(HealConfig, kwargs)
    evaluation = make(EvaluateConfig, values(EvaluateConfig, kwargs, "eval"), "eval")
    load = load_options(kwargs)
    check_writable(json_out)
    result = run_heal(model_dir, output, config, evaluation=evaluation, load=load, resume=resume,
                      force=force, verify=not no_verify)
    if result.output is None:  # not the main process of a multi-process run
        return
    if json_out:
        write_json(result.to_dict(), json_out, config.settings())
    if json_out != "-":
        st = result.settings
        kd = f", distilled from {st['teacher']} (kd_alpha {st['kd_alpha']}, T {st['temperature']})" \
            if st.get("teacher") else ""
        what = (f"last-layers (the LM head and the last {st['last_layers']} layers, "
                f"{st['trainable_params'] / 1e6:.1f} M trainable parameters)"
                if st["method"] == "last-layers" else
                f"{st['method']} rank {st['rank']} on {', '.join(st['target_modules'])}")
        console.print(f"{what}: {result.steps} steps x {st['global_batch']} x {st['seq_len']} tokens{kd}"
                      + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""))
        if result.final_loss is not None:
            console.print(f"final training loss {result.final_loss:.4f}")
        console.print(f"perplexity on {evaluation.name()}: {result.ppl_before:.3f} -> "
                      f"{result.ppl_after:.3f}")
        if result.ppl_before_second is not None:
            console.print(f"perplexity on {evaluation.name(evaluation.second)}: "
                          f"{result.ppl_before_second:.3f} -> {result.ppl_after_second:.3f}")
        console.print(f"merged (max |logit diff| vs adapter model "
                      f"{result.merge_check['max_abs_logit_diff']:.1e}); wrote {result.output}")


@main.command("export")
@click.argument("model_dir")
@config_options(ExportConfig)
@output_options
def export_cmd(model_dir, output, force, no_verify, json_out, **kwargs):
    """Export MODEL_DIR (a Hugging Face or GPTQ folder) for another runtime, verified against
    PyTorch in a fresh process. --onnx writes model.onnx + genai_config.json + tokenizer;
    --gguf writes a GGUF file for llama.cpp, Ollama and LM Studio (the gguf extra)."""
    from shrink.stages.export import export

    config = build_config(ExportConfig, kwargs)
    check_writable(json_out)
    quiet = json_out == "-"
    results = export(model_dir, output, config, force=force, verify=not no_verify,
                     log=None if quiet else (lambda line: err.print(line, highlight=False)))
    if json_out:
        write_json({k: r if isinstance(r, dict) else r.to_dict() for k, r in results.items()},
                   json_out, config.settings())
    if quiet:
        return
    for fmt, result in results.items():
        if fmt == "gguf":
            v = result.get("verification") or {}
            console.print(f"GGUF {result['type']}: {result['bytes'] / 1e6:.1f} MB, "
                          f"{result.get('block_count', '?')} blocks")
            if v:
                console.print(f"verified in a fresh llama.cpp process: greedy tokens equal to "
                              f"PyTorch's: {v.get('greedy_token_agreement', 0):.0%}, top-1 "
                              f"agreement {v.get('top1_agreement', 0):.1%}, perplexity "
                              f"{v.get('perplexity', float('nan')):.3f}; "
                              f"'{v['prompts'][0]}' -> {v.get('completion')!r}")
            console.print(f"wrote {result['path']}")
            continue
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
        click.echo(piece, nl=False, file=console.file)
        (console.file or sys.stdout).flush()

    generate(artifact, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, seed=seed, stream=stream)
    click.echo("", file=console.file)
    err.print(f"[dim]{kind} artifact, {time.perf_counter() - t0:.1f} s[/]", highlight=False)


# --- bench: measured latency, throughput, memory, perplexity ---


@main.command("bench")
@click.argument("artifacts", nargs=-1)
@click.option("--baseline", default=None, help="Artifact the others are compared with "
              "(default: the first).")
@click.option("--sweep-drop", default=None, metavar="N,N,...",
              help="Prune MODEL by BI at each setting (in memory) and plot perplexity and speed "
                   "against layers removed.")
@config_options(BenchConfig)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write results (- for stdout).")
@click.option("--markdown", "md_out", default=None, metavar="FILE", help="Write a markdown table.")
@click.option("--plot", default=None, metavar="FILE.png", help="Throughput/memory bars, or the "
              "sweep curve.")
@click.option("--tasks", default=None, metavar="T1,T2",
              help="lm-evaluation-harness tasks on HF/GPTQ artifacts (the eval extra).")
@click.option("--tasks-path", default=None, metavar="DIR", help="Folder of custom task YAMLs.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Documents per task.")
def bench_cmd(artifacts, baseline, sweep_drop, json_out, md_out, plot, tasks, tasks_path, limit,
              **kwargs):
    """Measure ARTIFACTS (HF, GPTQ, ONNX or GGUF folders): time to first token, decode tokens/s,
    peak memory, size on disk, perplexity and FLOPs per token, as ratios to a baseline, each run
    in a fresh process, interleaved. With --threads 1,2 every artifact runs at each count and
    decode is also given as a fraction of the measured memory-bandwidth roofline.

    With --sweep-drop, ARTIFACTS is one model (default: the embedded one)."""
    from shrink.stages import bench as B

    config = build_config(BenchConfig, kwargs)
    device, prompt_len, gen_len = config.device, config.prompt_len, config.gen_len
    batch, repeats, ppl_samples = config.batch, config.repeats, config.ppl_samples
    check_writable(json_out, md_out, plot)
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
            from shrink.report.plots import plot_sweep

            plot_sweep(points, plot, model)
            err.print(f"wrote {plot}")
        return
    if not artifacts:
        raise ShrinkError("give one or more artifact folders (or --sweep-drop)")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    report = B.bench(list(artifacts), baseline=baseline, device=device, prompt_len=prompt_len,
                     gen_len=gen_len, batch=batch, repeats=repeats, ppl_samples=ppl_samples,
                     tasks=task_list, tasks_path=tasks_path, limit=limit,
                     threads=config.threads)
    if json_out:
        write_json({**report.to_dict(), "load_average": list(os.getloadavg())}, json_out,
                   config.settings())
    if json_out != "-":
        table = Table(title=f"benchmark ({device}, prompt {prompt_len}, generate {gen_len}, "
                            f"batch {batch}, {repeats} repeats, medians; ppl on austen:evaluation, "
                            f"{ppl_samples} x 256 tokens, seed 0; load average "
                            f"{os.getloadavg()[0]:.1f})")
        for col in ("artifact", "kind", "layers", "threads", "size MB", "TTFT ms",
                    "decode tok/s", "roofline", "peak RSS MB", "ppl", "GFLOP/tok", "decode x",
                    "size x"):
            table.add_column(col, justify="left" if col in ("artifact", "kind") else "right")
        for r in report.results:
            m, q = r.median, r.ratios
            ppl = m.get("perplexity")
            roof = m.get("roofline_fraction")
            table.add_row(Path(r.name).name or r.name, r.kind, str(r.layers or "?"),
                          str(r.threads or "default"), f"{r.size_bytes / 1e6:.0f}",
                          f"{1000 * m['ttft_s']:.1f}", f"{m['decode_tokens_per_s']:.1f}",
                          "-" if roof is None else f"{roof:.0%}",
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
        from shrink.report.plots import plot_bench

        plot_bench(report, plot)
        err.print(f"wrote {plot}")


# --- build: the one-command pipeline ---


# --- build: the one-command pipeline; its options are every stage's, prefixed where needed ---

BUILD_PREFIX = {"prune": "prune", "heal": "heal", "quantize": "quantize", "export": "export",
                "evaluate": "eval"}


def _build_prefixes() -> dict[str, dict[str, str]]:
    """Per stage, the option prefix of each setting: none when the name is unique among the
    stages (``--drop``, ``--gptq``, ``--onnx``), the stage's prefix when several stages use it
    (``--heal-seq-len``, ``--eval-samples``, ``--quantize-seed``)."""
    from collections import Counter

    names = Counter(n for cls in STAGE_CONFIGS.values() for n in cls.model_fields)
    names.update(list(ModelOptions.model_fields))
    return {stage: {n: (BUILD_PREFIX[stage] if names[n] > 1 else "")
                    for n in cls.model_fields} for stage, cls in STAGE_CONFIGS.items()}


def build_options(f):
    for stage, cls in reversed(list(STAGE_CONFIGS.items())):
        prefixes = _build_prefixes()[stage]
        for prefix in sorted(set(prefixes.values())):
            exclude = tuple(n for n, pre in prefixes.items() if pre != prefix)
            f = config_options(cls, prefix, exclude=exclude)(f)
    return f


def build_values(ctx: click.Context, kwargs: dict, base: dict, no_heal: bool) -> dict:
    """The recipe's settings with the options the user typed on top."""
    prefixes = _build_prefixes()
    for stage, cls in STAGE_CONFIGS.items():
        given: dict = {}
        for prefix in set(prefixes[stage].values()):
            sub = {k: v for k, v in kwargs.items()
                   if k in {(f"{prefix}_{n}" if prefix else n) for n, pre in
                            prefixes[stage].items() if pre == prefix}}
            given.update(values(cls, sub, prefix, ctx=ctx, only_given=True))
        if given:
            earlier = dict(base.get(stage) or {})
            if stage == "prune" and ({"drop", "layers"} & set(given)):
                earlier.pop("drop", None)  # --layers replaces the recipe's --drop, and back
                earlier.pop("layers", None)
            base[stage] = {**earlier, **given}
    if no_heal:
        base["heal"] = None
    for name, value in values(ModelOptions, kwargs, ctx=ctx, only_given=True).items():
        base[name] = value
    return base


@main.command("build")
@click.argument("model", required=False)
@click.option("--config", "recipe", default=None, metavar="RECIPE",
              help="YAML recipe (a file, or a shipped one: smollm2-135m, shortgpt-llama-2-13b, "
                   "gromov-llama-2-70b). Command-line options override it.")
@click.option("-o", "--output", default=None, help="Output folder (default: derived from the "
              "model and settings).")
@click.option("--resume", is_flag=True, help="Skip stages already done with the same settings.")
@click.option("--force", is_flag=True, help="Start over in an existing output folder.")
@click.option("--no-heal", is_flag=True, help="Skip the healing fine-tune.")
@click.option("--allow-degraded", is_flag=True,
              help=BuildConfig.model_fields["allow_degraded"].description)
@click.option("--keep-stages", is_flag=True, help="Keep OUT/stages/ (the intermediate models) "
              "after a finished build, for a later --resume with other settings.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Write report.json here "
              "too (- for stdout).")
@build_options
@model_options
@click.pass_context
def build_cmd(ctx, model, recipe, output, resume, force, no_heal, allow_degraded, keep_stages,
              json_out, **kwargs):
    """Score, prune, heal, quantize (GPTQ) and/or export (ONNX), verify, and write a model card.

    With no arguments: the embedded SmolLM2 end to end on a CPU (recipe smollm2-135m). A
    setting several stages share is namespaced by its stage (--heal-seq-len, --eval-samples)."""
    from shrink.stages.build import build, command_line, load_recipe, recipe_config

    if recipe is None and model is None:
        recipe = "smollm2-135m"
    if recipe is not None:
        config, _ = load_recipe(recipe)
        base = config.settings()
    else:  # shrink build's own defaults, with the options given on top
        base = BuildConfig().settings()
    if model is not None:
        base["model"] = model
    if allow_degraded:
        base["allow_degraded"] = True
    config = recipe_config(build_values(ctx, kwargs, base, no_heal), "settings")
    check_writable(json_out)
    result = build(config, output=output, resume=resume, force=force, command=command_line(),
                   keep_stages=keep_stages)
    if json_out:
        write_json(result.report, json_out, config.settings())
    if json_out != "-":
        table = Table(title=f"shrink build -> {result.output}")
        for col in ("stage", "status", "seconds"):
            table.add_column(col, justify="right" if col == "seconds" else "left")
        for st in result.stages:
            table.add_row(st.name, "resumed (done earlier)" if st.skipped else "ran",
                          f"{st.seconds:.1f}")
        console.print(table)
        second = result.report.get("second_evaluation_set")
        console.print(f"perplexity on {config.evaluate.name()}"
                      + (f" | on {second}" if second else "") + ":")
        for label, row in result.report["perplexity"].items():
            console.print(f"  {label:>9}: {row['perplexity']:.3f}"
                          + (f" | {row['second']:.3f}" if row.get("second") is not None else ""))
        console.print(f"model card: {result.output / 'README.md'}; report: "
                      f"{result.output / 'report.json'}")


if __name__ == "__main__":  # pragma: no cover
    main()
