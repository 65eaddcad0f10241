"""Models larger than memory: score and prune layer by layer, straight from the safetensors files.

Scoring (``stream_score``) builds the model skeleton without weights (``accelerate``'s
``init_empty_weights``: parameters on the ``meta`` device, small buffers such as the rotary
frequencies real), loads the embeddings alone to turn the calibration tokens into layer-0 inputs,
then loads ONE decoder layer at a time from the checkpoint shards, pushes every calibration sample
through it, accumulates the same statistics as :func:`shrink.core.scores.score_layers`, and frees the
layer. Activations live on the CPU (or in a memory-mapped file when they do not fit in RAM); the
device holds one layer and one batch. What each layer receives besides its hidden states
(attention mask, rotary position embeddings, per-layer attention type) is captured from the model's
own forward: every layer is replaced by a stub that records its arguments, so masks are built by
transformers itself, exactly as in the in-memory path, and the scores match it.

Pruning (``plan_stream_prune`` + ``write_stream_prune``) copies the kept tensors byte for byte, shard by shard, renaming
``model.layers.{i}.`` to the new numbering, and rewrites the config with the same function the
in-memory path uses (:func:`shrink.stages.prune.swap_layers` applied to a weightless skeleton).
Peak memory is one copy buffer (64 MiB), not one layer.

The linear bridge (``stream_bridges``) is fitted the same way, one layer at a time, with two
hidden-state streams (the dense model and the pruned, bridged one; see ``bridge.py``); the
folded down-projections are then written in place of their originals by ``write_stream_prune``.
"""

from shrink.streaming.bridge import StreamedBridges, stream_bridges
from shrink.streaming.checkpoint import Checkpoint, TensorInfo, weights_bytes
from shrink.streaming.memory import available_memory, decide_streaming
from shrink.streaming.prune import StreamPlan, plan_stream_prune, write_stream_prune
from shrink.streaming.score import score_model_streaming, stream_score
from shrink.streaming.skeleton import build_skeleton, write_random_checkpoint

__all__ = [
    "Checkpoint",
    "StreamPlan",
    "StreamedBridges",
    "TensorInfo",
    "available_memory",
    "build_skeleton",
    "decide_streaming",
    "plan_stream_prune",
    "score_model_streaming",
    "stream_bridges",
    "stream_score",
    "weights_bytes",
    "write_random_checkpoint",
    "write_stream_prune",
]
