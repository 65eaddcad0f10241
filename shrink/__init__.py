"""shrink: score, prune, heal, quantize and export decoder LLMs, and prove what was done.

The Python API under the ``shrink`` command line::

    import shrink
    loaded = shrink.load_model("smollm2-135m")
    blocks = shrink.token_blocks(loaded.tokenizer, "austen:calibration", samples=16, seq_len=256)
    scores = shrink.score_layers(loaded.model, blocks.input_ids)
    result = shrink.prune("smollm2-135m", "smollm2-24L", drop=6, strategy="bi")
"""
__version__ = "0.1.0"

from .data import CALIBRATION, EVALUATION, HEALING, TokenBlocks, load_texts, token_blocks
from .errors import ShrinkError
from .evaluate import PerplexityResult, evaluate, perplexity
from .models import ALIASES, EMBEDDED, LoadedModel, find_layers, load_model, resolve
from .pruning import (PruneResult, choose_layers, iterative_bi, prune, prune_model,
                      without_layers)
from .scoring import LayerScores, removal_perplexity, score_layers
from .verify import verify_in_subprocess, verify_model_dir

__all__ = [
    "ALIASES", "CALIBRATION", "EMBEDDED", "EVALUATION", "HEALING", "LayerScores", "LoadedModel",
    "PerplexityResult", "PruneResult", "ShrinkError", "TokenBlocks", "choose_layers", "evaluate",
    "find_layers", "iterative_bi", "load_model", "load_texts", "perplexity", "prune",
    "prune_model", "removal_perplexity", "resolve", "score_layers", "token_blocks",
    "verify_in_subprocess", "verify_model_dir", "without_layers",
]
