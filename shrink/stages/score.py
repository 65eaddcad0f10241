"""Layer scoring that loads the model: the ``score`` stage (``shrink score``)."""
from __future__ import annotations

from shrink.core.errors import ShrinkError
from shrink.core.data import CALIBRATION, token_blocks
from shrink.core.models import load_model
from shrink.core.scores import LayerScores, METRICS, removal_perplexity, score_layers


def score_model(model: str, metric: str = "bi", data: str = CALIBRATION, samples: int = 32,
                seq_len: int = 256, seed: int = 0, batch_size: int = 4, skip_first: int = 1,
                dtype: str | None = None, device: str | None = None,
                trust_remote_code: bool = False, show_progress: bool = True,
                streaming: bool | None = None) -> LayerScores:
    """Load a model and score its layers on a text source (perplexity scores if metric='ppl').

    ``streaming``: score layer by layer from the safetensors files (shrink.streaming) instead of
    loading the model; None = automatic, when the weights do not fit in the device's memory."""
    if metric not in METRICS:
        raise ShrinkError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    if streaming is not False:
        from shrink.core.models import resolve
        from shrink.streaming import decide_streaming, score_model_streaming

        resolved = resolve(model)
        if decide_streaming(resolved, device, dtype, streaming, method=metric,
                            show_progress=show_progress):
            return score_model_streaming(model, resolved, data, samples, seq_len, seed,
                                         batch_size, skip_first, dtype, device,
                                         trust_remote_code, show_progress)
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    blocks = token_blocks(loaded.tokenizer, data, samples, seq_len, seed)
    scores = score_layers(loaded.model, blocks.input_ids, batch_size=batch_size,
                          skip_first=skip_first, model_name=model,
                          settings={"data": blocks.describe(), "location":
                                    loaded.resolved.location}, show_progress=show_progress)
    if metric == "ppl":
        scores.dense_ppl, scores.ppl = removal_perplexity(loaded.model, blocks.input_ids,
                                                          batch_size=batch_size,
                                                          show_progress=show_progress)
    return scores
