"""Results as a few lines of text (rich markup): what each command prints when it is done."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shrink.analysis.estimate import Estimate
    from shrink.core.scores import LayerScores
    from shrink.stages.build import BuildResult
    from shrink.stages.configs import EvaluateConfig

MB = 1e6
MIB = 1024 * 1024


def best_blocks(scores: LayerScores, drop: int | None) -> list[str]:
    """Angular distance: the best contiguous block to remove at a few sizes."""
    lines = []
    for n in sorted({1, 2, 4, drop or 0, scores.num_layers // 4, scores.num_layers // 2} - {0}):
        start, d = scores.best_block(n)
        lines.append(
            f"best block of {n:>2}: layers {start}..{start + n - 1} (angular distance {d:.4f})"
        )
    return lines


def prune_lines(result) -> list[str]:
    lines = [
        f"removed layers {result.removed} ({result.reason})",
        f"layers {result.num_layers_before} -> {len(result.kept)}, parameters "
        f"{result.params_before / 1e6:.1f} M -> {result.params_after / 1e6:.1f} M "
        f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)",
    ]
    v = result.verification
    if v.get("reload") == "skipped":
        lines.append(f"not reloaded: {v['reason']}")
    elif v:
        lines.append(
            f"verified in a fresh process: finite logits, cached generation == "
            f"uncached; '{v['prompt']}' -> {v['completion']!r}"
        )
    return lines + [f"wrote {result.output}"]


def eval_lines(model: str, result) -> list[str]:
    return [
        f"{model}: perplexity {r.perplexity:.3f} on {r.data['set']} "
        f"({r.tokens} predicted tokens, {r.seconds:.1f} s)"
        for r in (result, result.second)
        if r is not None
    ]


def quantize_lines(result, evaluation: EvaluateConfig) -> list[str]:
    note = f" ({result.group_size_note})" if result.group_size_note else ""
    cal = result.calibration
    lines = [
        f"GPTQ {result.bits}-bit, group size {result.group_size}{note}, "
        f"desc_act {result.desc_act}, sym {result.sym}, damp {result.damp}; "
        f"{cal['samples']} x {cal['seq_len']} tokens of {cal['source']}, "
        f"{result.seconds:.1f} s on {result.device}",
        f"weights {result.size_bytes_before / MB:.1f} MB -> "
        f"{result.size_bytes_after / MB:.1f} MB; {result.bits_per_weight:.3f} bits per "
        f"weight over {result.quantized_linears} quantized Linears",
    ]
    if result.perplexity_before is not None:
        after = (
            f"{result.perplexity_after:.3f}"
            if result.perplexity_after is not None
            else "not measured (--no-verify)"
        )
        lines.append(
            f"perplexity on {evaluation.name()}: {result.perplexity_before:.3f} -> {after}"
        )
    if result.verification:
        v = result.verification
        lines.append(
            f"verified in a fresh process with transformers ({v['quant_linear']}, "
            f"{v['dtype']}): finite logits; '{v['prompt']}' -> {v['completion']!r}"
        )
    return lines + [f"wrote {result.output}"]


def heal_lines(result, evaluation: EvaluateConfig) -> list[str]:
    st = result.settings
    kd = (
        f", distilled from {st['teacher']} (kd_alpha {st['kd_alpha']}, T {st['temperature']})"
        if st.get("teacher")
        else ""
    )
    what = (
        f"last-layers (the LM head and the last {st['last_layers']} layers, "
        f"{st['trainable_params'] / 1e6:.1f} M trainable parameters)"
        if st["method"] == "last-layers"
        else f"{st['method']} rank {st['rank']} on {', '.join(st['target_modules'])}"
    )
    lines = [
        f"{what}: {result.steps} steps x {st['global_batch']} x {st['seq_len']} tokens{kd}"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    ]
    if result.final_loss is not None:
        lines.append(f"final training loss {result.final_loss:.4f}")
    lines.append(
        f"perplexity on {evaluation.name()}: {result.ppl_before:.3f} -> {result.ppl_after:.3f}"
    )
    if result.ppl_before_second is not None:
        lines.append(
            f"perplexity on {evaluation.name(evaluation.second)}: "
            f"{result.ppl_before_second:.3f} -> {result.ppl_after_second:.3f}"
        )
    return lines + [
        f"merged (max |logit diff| vs adapter model "
        f"{result.merge_check['max_abs_logit_diff']:.1e}); wrote {result.output}"
    ]


def gguf_lines(result: dict) -> list[str]:
    v = result.get("verification") or {}
    lines = [
        f"GGUF {result['type']}: {result['bytes'] / 1e6:.1f} MB, "
        f"{result.get('block_count', '?')} blocks"
    ]
    if result.get("tensor_types"):
        from shrink.runtime.gguf_quant import types_line

        imatrix = result.get("imatrix")
        lines.append(
            f"tensor types: {types_line(result['tensor_types'])}; importance matrix: "
            + (f"{imatrix['tokens']} tokens of {imatrix['data']}" if imatrix else "none")
        )
    if result.get("comparison"):
        lines.append(
            f"perplexity on {' | '.join(result['comparison']['sets'])}: "
            f"{result['comparison']['line']}"
        )
    if v:
        lines.append(
            f"verified in a fresh llama.cpp process: greedy tokens equal to "
            f"PyTorch's: {v.get('greedy_token_agreement', 0):.0%}, top-1 "
            f"agreement {v.get('top1_agreement', 0):.1%}, perplexity "
            f"{v.get('perplexity', float('nan')):.3f}; "
            f"'{v['prompts'][0]}' -> {v.get('completion')!r}"
        )
    return lines + [f"wrote {result['path']}"]


def onnx_lines(result) -> list[str]:
    head = f" (LM head {result.lm_head})" if result.lm_head else ""
    lines = [
        f"{result.method}: {result.precision}{head} for {result.target}, model "
        f"{result.model_bytes / MIB:.1f} MiB (source folder "
        f"{result.source_bytes / MIB:.1f} MiB), KV cache: "
        f"{'yes' if result.kv_cache else 'NO (forward pass only)'}"
    ]
    v = result.verification
    if v:
        lines.append(
            f"verified in a fresh process ({v['runtime']}): greedy tokens equal to PyTorch on "
            f"{v['greedy_tokens_matching']}/{v['greedy_tokens_total']}, first-step logits "
            f"max |diff| {v['first_step_logits_max_abs_diff']:.2e}, top-1 agreement "
            f"{100 * v['top1_agreement']:.1f}%, perplexity {v['perplexity_onnx']:.3f} "
            f"(PyTorch {v['perplexity_torch']:.3f})"
        )
    return lines + [f"wrote {result.output}"]


def export_lines(results: dict) -> list[str]:
    """Every format an export wrote (GGUF reports a dict, ONNX a typed result)."""
    lines: list[str] = []
    for fmt, result in results.items():
        lines += gguf_lines(result) if fmt == "gguf" else onnx_lines(result)
    return lines


def build_lines(result: BuildResult, evaluation: EvaluateConfig) -> list[str]:
    """After the build table: the perplexity at each step, and where the card and report are."""
    second = result.report.get("second_evaluation_set")
    lines = [f"perplexity on {evaluation.name()}" + (f" | on {second}" if second else "") + ":"]
    for label, row in result.report["perplexity"].items():
        lines.append(
            f"  {label:>9}: {row['perplexity']:.3f}"
            + (f" | {row['second']:.3f}" if row.get("second") is not None else "")
        )
    out = Path(result.output)
    return lines + [f"model card: {out / 'README.md'}; report: {out / 'report.json'}"]


def estimate_header(est: Estimate) -> str:
    quant = "fp16" if est.bits == 16 else f"GPTQ {est.bits}-bit, group {est.group_size}"
    return (
        f"[bold]{est.model}[/] ({est.model_type}): {est.params.layers} of {est.layers} "
        f"layers, {quant}, context {est.context}, batch {est.batch}"
    )


def estimate_notes(est: Estimate) -> list[str]:
    return [f"[dim]- {line}[/]" for line in est.assumptions] + [
        "[dim]- decode tok/s = batch x bandwidth / (weight bytes read per token + KV bytes);"
        " prefill tok/s = FP16 FLOP/s / FLOPs per token at the full context[/]"
    ]
