"""What a finished build writes beside its artifacts: ``report.json`` assembled from the build's
own facts and every stage's part, ``recipe.yaml``, ``scores.png``, the model card and one card
per published folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.outputs import mark_output, output_id, safetensors_bytes

ARITHMETIC_CONTEXT = 2048  # the context the per-token FLOPs are quoted at


def arithmetic(label: str, config: dict | None) -> dict:
    """FLOPs per token and 16-bit weight bytes of a model config, as a report row ({label: row},
    or {"error": why} when the architecture is not one the estimate knows)."""
    from shrink.analysis.estimate import flops_per_token, weight_memory

    if config is None:
        return {}
    try:
        f = flops_per_token(config, context=ARITHMETIC_CONTEXT)
        w = weight_memory(config, bits=16)
    except ShrinkError as e:
        return {"error": str(e)}
    return {
        label: {
            "flops_per_token": f.total,
            "matmul_flops_per_token": f.matmul,
            "weight_bytes_fp16": w.total_bytes,
            "layers": config.get("num_hidden_layers"),
        }
    }


def model_config(folder: str | Path | None) -> dict | None:
    return json.loads((Path(folder) / "config.json").read_text()) if folder else None


def _merge(report: dict, part: dict) -> None:
    """A stage's entries: a dict merges into the build's dict of the same key, else replaces."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value


def assemble(
    ctx, sections: list[dict], absent: list[dict], runs: list, command: str | None
) -> dict:
    """report.json: the build's facts, then each stage's part (``sections``, in order; ``absent``
    from the stages that did not run), then the stages' timings and the published folders."""
    from shrink import __version__
    from shrink.core.models import read_shrink_json

    out = ctx.output
    source = ctx.source
    record = read_shrink_json(out / "model") or {}
    report = {
        "shrink_version": __version__,
        "source_model": ctx.config.model,
        "base_model": record.get("base_model"),
        "settings": ctx.config.settings(),
        "output_id": output_id(out),
        "sizes_bytes": {"dense": safetensors_bytes(Path(source.path)) if source.path else None},
        "perplexity": {},
        "arithmetic": {
            "context": ARITHMETIC_CONTEXT,
            **arithmetic("dense", model_config(source.path)),
        },
    }
    for part in absent + sections:
        _merge(report, part)
    report["sizes_bytes"]["final_model"] = safetensors_bytes(out / "model")
    report["stages"] = [
        {
            "name": r.name,
            "seconds": r.seconds,
            "skipped": r.skipped,
            "key": r.key,
            "peak_rss_bytes": r.peak_rss_bytes,
        }
        for r in runs
    ]
    report["memory_plan"] = getattr(ctx, "memory_plan", None)  # predicted, beside the peaks
    report["command"] = command
    report["artifacts"] = {name: name for name in ctx.published()}
    if ctx.budget is not None:
        report["budget"] = budget_outcome(ctx.budget, report)
    book = getattr(ctx, "book", None)  # every perplexity the build computed, each once
    report["perplexity_book"] = book.to_dict() if book is not None else None
    return report


def budget_outcome(budget: dict, report: dict) -> dict:
    """The budget's choice with what the build really made: the shipped GGUF's bytes and
    whether they are within the size budget."""
    gguf = (report.get("export") or {}).get("gguf") or {}
    made = gguf.get("size_bytes")
    limit = budget.get("max_bytes")
    met = None if made is None or limit is None else made <= limit
    return {**budget, "made_bytes": made, "within_size": met}


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_cards(ctx, report: dict) -> None:
    """report.json, recipe.yaml, scores.png (when the build scored layers), README.md (the
    model card) and a card in each published folder."""
    import yaml

    from shrink.report.modelcard import artifact_card, model_card

    out = ctx.output
    plot = None
    if ctx.scores:
        from shrink.core.scores import LayerScores
        from shrink.report.plots import plot_scores

        plot = plot_scores(
            LayerScores.from_dict(ctx.scores),
            out / "scores.png",
            chosen=report.get("removed_layers"),
        )
    write_report(out, report)
    recipe = "# every setting of this build: shrink build --config recipe.yaml\n" + yaml.safe_dump(
        ctx.config.settings(), sort_keys=False
    )
    (out / "recipe.yaml").write_text(recipe)
    (out / "README.md").write_text(model_card(report, ctx.scores, plot is not None, recipe))
    for artifact in report["artifacts"]:  # each published folder stands on its own
        card = out / artifact / "README.md.tmp"
        card.write_text(artifact_card(report, artifact))
        os.replace(card, out / artifact / "README.md")
        mark_output(out / artifact)  # the card is shrink's: a later --force may replace it


def point_at_copies(report: dict, stages_dir: Path, moved: dict[str, Path]) -> None:
    """After the stage folders are removed: perplexity rows point at the copies in the output
    (``moved``: stage path -> published copy), and at nothing for removed intermediates."""
    for row in (report.get("perplexity") or {}).values():
        p = row.get("path")
        if p and Path(p).is_relative_to(stages_dir):
            row["path"] = str(moved[p]) if p in moved else None
