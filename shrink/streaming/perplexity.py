"""Streamed perplexity: :func:`shrink.core.perplexity.perplexity` of a checkpoint that does not fit,
computed one decoder layer at a time.

The walk is streamed scoring's (:mod:`shrink.streaming.score`): the embeddings alone turn every
block into layer-0 hidden states, then each decoder layer is loaded alone and run over all the
blocks' hidden states (with the mask and rotary embeddings the model's own forward builds), and
finally the final norm and the output head are loaded and the next-token loss summed in chunks of
positions, so the logits never exist for more than one chunk.

``remove`` skips layers, so a pruned model is measured from the dense checkpoint without writing
it; ``replace`` substitutes tensors (by checkpoint name, e.g. the linear bridge's folded
``down_proj``) after their layer is loaded. Peak memory: one layer (or the embeddings, or the
head) plus the hidden states of every block (in RAM, or a memory-mapped file when large)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from shrink.core.errors import ShrinkError
from shrink.core.models import check_device, parse_dtype
from shrink.core.perplexity import PerplexityResult, chunk_positions, chunked_nll
from shrink.core.progress import progress_bar
from shrink.streaming.memory import activation_store, activations_on_disk
from shrink.streaming.score import Skeleton, embed_into, layer_forward, open_skeleton
from shrink.streaming.skeleton import Loader, module_name


def _check_blocks(blocks, attention_mask):
    ids = getattr(blocks, "input_ids", blocks)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ShrinkError("perplexity needs token blocks of shape (samples, seq_len >= 2)")
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    if attention_mask.shape != ids.shape:
        raise ShrinkError(
            f"attention mask of shape {list(attention_mask.shape)} does not match "
            f"the blocks' {list(ids.shape)}"
        )
    return ids.long(), attention_mask.long()


def _check_remove(remove, L: int) -> set[int]:
    remove = set(int(i) for i in remove)
    bad = sorted(i for i in remove if not 0 <= i < L)
    if bad:
        raise ShrinkError(f"cannot remove layer {bad[0]}: the model has layers 0..{L - 1}")
    if len(remove) >= L:
        raise ShrinkError(f"cannot remove all {L} layers")
    return remove


def _substitute(sk: Skeleton, i: int, replace: dict[str, torch.Tensor]) -> None:
    """Write the tensors of ``replace`` that belong to layer i into its loaded parameters."""
    prefix = f"{sk.prefix}.{i}."
    for name, value in replace.items():
        if name.startswith(prefix):
            param = sk.layers[i].get_parameter(name[len(prefix) :])
            if param.shape != value.shape:
                raise ShrinkError(
                    f"cannot substitute '{name}': shape {list(value.shape)}, the "
                    f"model's is {list(param.shape)}"
                )
            param.data.copy_(value.to(param.dtype))


def load_head(sk: Skeleton, loader: Loader) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and the output head, loaded (a tied head reads the embedding matrix)."""
    norm = getattr(sk.base, "norm", None)
    head = sk.model.get_output_embeddings()
    if norm is None or head is None:
        raise ShrinkError(
            f"{type(sk.model).__name__} has no final norm or output head that the "
            "streamed perplexity knows; use --no-streaming"
        )
    loader.load(norm, module_name(sk.model, norm) + ".", reuse=False)
    head_prefix = module_name(sk.model, head) + "."
    if head_prefix + "weight" in sk.ck.tensors:
        loader.load(head, head_prefix, reuse=False)
    else:  # tied to the input embeddings
        loader.load(sk.embed, sk.embed_prefix, reuse=False)
        head._parameters["weight"] = sk.embed.weight
    return norm, head


def _head_nll(
    sk: Skeleton, norm, head, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, chunk: int
) -> tuple[float, int]:
    """Summed next-token NLL and predicted-token count of one batch, ``chunk`` positions at a
    time: logits = head(norm(h)) (soft-capped where the model caps them), as the CausalLM does."""
    cap = getattr(sk.config.get_text_config(), "final_logit_softcapping", None)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        logits = head(norm(h)).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    return chunked_nll(logits_of, x, targets, chunk), int((targets != -100).sum())


@torch.no_grad()
def stream_perplexity(
    model_dir: str | Path,
    blocks,
    *,
    attention_mask: torch.Tensor | None = None,
    remove=(),
    replace: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    dtype=torch.float32,
    batch_size: int = 4,
    chunk: int | None = None,
    offload_dir: str | Path | None = None,
    show_progress: bool = False,
    trust_remote_code: bool = False,
    hooks=None,
    head_on_last: bool = False,
) -> PerplexityResult:
    """Token-weighted perplexity of the checkpoint in ``model_dir`` (without layers ``remove``,
    with tensors ``replace``) over ``blocks`` (a (samples, seq_len) tensor or TokenBlocks), one
    layer in memory at a time; equal to the in-memory perplexity to float rounding. The head
    runs ``chunk`` positions of a batch at a time (default: as many as keep the fp32 logits
    under ``shrink.core.perplexity.LOGIT_BYTES``). ``hooks(model)``: called once with the (not
    yet loaded) model, to register forward hooks on its modules; they fire as each layer and
    the head run.
    ``head_on_last``: run the head on each block's last position too (it predicts no token of
    the block, so the loss skips it; hooks on the head then see every position, as in a whole
    forward)."""
    ids, attention_mask = _check_blocks(blocks, attention_mask)
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    sk = open_skeleton(Path(model_dir), torch_dtype, device, trust_remote_code)
    if hooks is not None:
        hooks(sk.model)
    L = len(sk.layers)
    remove = _check_remove(remove, L)
    replace = dict(replace or {})
    unknown = [n for n in replace if n not in sk.ck.tensors]
    if unknown:
        raise ShrinkError(f"cannot substitute '{unknown[0]}': no such tensor in {model_dir}")
    N, S = ids.shape
    H = sk.config.get_text_config().hidden_size
    if chunk is None:
        chunk = chunk_positions(min(batch_size, N), sk.config.get_text_config().vocab_size)
    on_disk = activations_on_disk((N, S, H), torch_dtype, offload_dir)
    t0 = time.perf_counter()
    acts, acts_file = activation_store((N, S, H), torch_dtype, offload_dir, on_disk)
    batches = [slice(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]
    masks = [attention_mask[sl].to(device) for sl in batches]
    loader = Loader(sk.ck, device)
    total_nll, tokens = 0.0, 0
    try:
        embed_into(sk, loader, ids, batches, masks, acts)
        kept = [i for i in range(L) if i not in remove]
        for i in progress_bar(kept, "perplexity, layer by layer", enabled=show_progress):
            loader.load(sk.layers[i], f"{sk.prefix}.{i}.")
            _substitute(sk, i, replace)
            for sl, mask in zip(batches, masks):
                acts[sl].copy_(layer_forward(sk, i, acts[sl].to(device), mask))
            loader.free(sk.layers[i])
        norm, head = load_head(sk, loader)
        for sl, mask in zip(batches, masks):
            x = acts[sl].to(device)
            nll, n = _head_nll(sk, norm, head, x, ids[sl].to(device), mask, chunk)
            total_nll += nll
            tokens += n
            if head_on_last:
                head(norm(x[:, -1:]))
    finally:
        del acts
        if acts_file is not None:
            acts_file.unlink(missing_ok=True)
    if tokens == 0:
        raise ShrinkError("perplexity needs at least one predicted token (every block is padding)")
    mean = total_nll / tokens
    if not math.isfinite(mean):
        raise ShrinkError(f"perplexity is not finite ({mean}): the model produces NaN/inf logits")
    ppl = math.exp(mean) if mean < 709 else math.inf
    if not math.isfinite(ppl):
        raise ShrinkError(
            f"perplexity is not finite (mean NLL {mean:.1f} nats per token): the "
            "model's predictions are far from the text"
        )
    return PerplexityResult(ppl, mean, tokens, time.perf_counter() - t0)
