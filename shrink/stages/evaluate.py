"""Perplexity on held-out text."""

from __future__ import annotations

from pathlib import Path

from shrink.core.data import token_blocks
from shrink.core.perplexity import PerplexityResult
from shrink.runtime import kinds
from shrink.stages.configs import EvaluateConfig, ModelOptions
from shrink.stages.pipeline import BuildContext, Stage


def evaluate(
    model: str,
    config: EvaluateConfig | None = None,
    *,
    load: ModelOptions | None = None,
    show_progress: bool = True,
    book=None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``config``'s evaluation set (default: shrink's fixed set,
    Persuasion 8 x 512) and, on ``result.second``, on the second held-out domain
    (``config.second``, default the CPython reference text). ``model`` is anything load_model
    takes, or any artifact kind shrink runs (an ONNX or GGUF folder written by ``shrink
    export``, ...: :mod:`shrink.runtime.kinds`); every kind is scored on the same blocks with
    the same arithmetic. ``book`` (a :class:`shrink.core.measures.PerplexityBook`) gives what an
    earlier stage already measured of the same weights on the same set, and records the rest."""
    config = config or EvaluateConfig()
    sources = [config.data] + ([config.second] if config.second else [])
    kind = kinds.for_model(model)
    if book is not None and kind.torch_weights:
        results = _hf_measured(model, sources, config, load or ModelOptions(), book, show_progress)
    else:
        results = _kind_measured(
            kind, model, sources, config, load or ModelOptions(), book, show_progress
        )
    results = [_labelled(r, config, model) for r in results]
    result = results[0]
    result.second = results[1] if len(results) > 1 else None
    return result


def _hf_measured(
    model: str,
    sources: list[str],
    config: EvaluateConfig,
    load: ModelOptions,
    book,
    show_progress: bool,
) -> list[PerplexityResult]:
    """A transformers model, loaded as the other stages load it, measured through the book; a
    folder too large for this process is measured one layer at a time, keyed by its files."""
    from shrink.core.measures import measure, weights_key
    from shrink.streaming.memory import too_big_to_load

    compute = None
    if too_big_to_load(model):
        from transformers import AutoTokenizer

        from shrink.streaming.perplexity import stream_perplexity

        weights, tokenizer = model, AutoTokenizer.from_pretrained(model)

        def compute(ids):
            return stream_perplexity(
                model,
                ids,
                device=load.device or "cpu",
                dtype=None,
                batch_size=config.batch_size,
                show_progress=show_progress,
            )
    else:
        from shrink.core.models import load_model

        loaded = load_model(str(model), **load.load_kwargs())
        weights, tokenizer = loaded.model, loaded.tokenizer
    key = weights_key(weights)
    results = []
    for source in sources:
        blocks = _blocks(tokenizer, source, config)
        r = measure(
            book,
            weights,
            blocks.input_ids,
            config.name(source),
            "evaluate",
            str(model),
            key=key,
            batch_size=config.batch_size,
            show_progress=show_progress,
            compute=compute,
        )
        r.data = blocks.describe()
        results.append(r)
    return results


def _kind_measured(
    kind,
    model: str,
    sources: list[str],
    config: EvaluateConfig,
    load: ModelOptions,
    book,
    show_progress: bool,
) -> list[PerplexityResult]:
    """Another runtime's artifact: keyed by its files' bytes in the book, when there is one."""
    from shrink.core.measures import weights_key

    names = [config.name(source) for source in sources]
    key = weights_key(model) if book is not None and Path(model).is_dir() else None
    found = [book.get(key, n) for n in names] if key else [None] * len(names)
    if all(r is not None for r in found):
        return found
    results = kind.perplexity(
        model,
        lambda tok: [_blocks(tok, source, config) for source in sources],
        load=load,
        batch_size=config.batch_size,
        show_progress=show_progress,
    )
    for r, n, old in zip(results, names, found):
        if key and old is None:
            book.put(key, n, r, by="evaluate", what=str(model))
    return results


def _blocks(tokenizer, source: str, config: EvaluateConfig):
    return token_blocks(tokenizer, source, config.samples, config.seq_len, config.seed)


def _labelled(result: PerplexityResult, config: EvaluateConfig, model: str) -> PerplexityResult:
    result.data = {**result.data, "set": config.name(result.data["source"])}
    result.model = model
    return result


class EvaluateStage(Stage):
    """Perplexity of the source and of every artifact the build made, on the same blocks."""

    name = "evaluate"

    def describe(self, ctx: BuildContext) -> str:
        return f"evaluate (every artifact on {self.settings(ctx).name()})"

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        c = self.settings(ctx)
        targets = {
            "dense": ctx.config.model,
            **{a.label: str(a.path) for a in ctx.artifacts if a.measured},
        }
        rows = {}
        for label, path in targets.items():
            res = evaluate(
                path,
                c,
                load=ModelOptions(device=ctx.config.device),
                show_progress=ctx.show_progress,
                book=ctx.book,
            )
            rows[label] = {"perplexity": res.perplexity, "tokens": res.tokens, "path": str(path)}
            if res.second is not None:
                rows[label]["second"] = res.second.perplexity
        return {
            "perplexity": rows,
            "set": c.name(),
            "second_set": c.name(c.second) if c.second else None,
        }

    def apply(self, ctx: BuildContext, result: dict) -> None:
        ctx.evaluation = dict(result["perplexity"])

    def report(self, ctx: BuildContext, result: dict) -> dict:
        return {
            "evaluation_set": self.settings(ctx).name(),
            "second_evaluation_set": result.get("second_set"),
            "perplexity": dict(result["perplexity"]),
        }
