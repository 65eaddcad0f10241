"""The ``score`` stage: load a model (or stream it) and rank its decoder layers."""

from __future__ import annotations

from shrink.core.data import token_blocks
from shrink.core.models import check_seq_len, load_config, load_model, resolve
from shrink.core.scores import LayerScores, removal_perplexity, score_layers
from shrink.stages.configs import ModelOptions, ScoreConfig


def score(
    model: str,
    config: ScoreConfig | None = None,
    *,
    load: ModelOptions | None = None,
    show_progress: bool = True,
) -> LayerScores:
    """Score every decoder layer of ``model`` on ``config``'s text (BI, relmag and angular in
    one pass; perplexity without each layer too when ``config.metric == 'ppl'``). Streams layer
    by layer from the safetensors files when the weights do not fit (``config.streaming``)."""
    config = config or ScoreConfig()
    load = load or ModelOptions()
    kw = load.load_kwargs()
    resolved = resolve(model)
    if resolved.path is not None:
        check_seq_len(load_config(resolved, load.trust_remote_code), config.seq_len)
    if config.streaming is not False:
        from shrink.streaming import decide_streaming, score_model_streaming

        if decide_streaming(
            resolved,
            kw["device"],
            kw["dtype"],
            config.streaming,
            method=config.metric,
            can_stream=config.metric != "ppl",
            show_progress=show_progress,
        ):
            return score_model_streaming(
                model,
                resolved,
                config.data,
                config.samples,
                config.seq_len,
                config.seed,
                config.batch_size,
                config.skip_first,
                kw["dtype"],
                kw["device"],
                load.trust_remote_code,
                show_progress,
            )
    loaded = load_model(model, **kw)
    blocks = token_blocks(
        loaded.tokenizer, config.data, config.samples, config.seq_len, config.seed
    )
    scores = score_layers(
        loaded.model,
        blocks.input_ids,
        batch_size=config.batch_size,
        skip_first=config.skip_first,
        model_name=model,
        settings={"data": blocks.describe(), "location": loaded.resolved.location},
        show_progress=show_progress,
    )
    if config.metric == "ppl":
        scores.dense_ppl, scores.ppl = removal_perplexity(
            loaded.model,
            blocks.input_ids,
            batch_size=config.batch_size,
            show_progress=show_progress,
        )
    return scores
