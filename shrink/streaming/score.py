"""Streamed scoring: one decoder layer at a time, the same statistics as the in-memory scorer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import check_device, find_layers, parse_dtype
from shrink.core.progress import progress_bar, stderr
from shrink.streaming.checkpoint import Checkpoint, load_folder_config
from shrink.streaming.memory import activation_store, activations_on_disk, estimate
from shrink.streaming.skeleton import Loader, build_skeleton, module_name


class _Stop(Exception):
    pass


def layer_inputs(base: nn.Module, layers: nn.ModuleList, target: int, **forward_kwargs):
    """Run the base model's own forward with every layer replaced by a stub (identity); the stub
    of layer ``target`` records its arguments (hidden states, mask, position embeddings, ...)
    and stops the pass. Masks and rotary embeddings are thus built by transformers itself."""
    captured: dict = {}

    def stub(j):
        def forward(*args, **kwargs):
            if j == target:
                captured["args"], captured["kwargs"] = args, kwargs
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]

        return forward

    for j, layer in enumerate(layers):
        layer.forward = stub(j)
    try:
        base(**forward_kwargs, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if "args" not in captured:
        raise ShrinkError(
            f"the forward pass of {type(base).__name__} never reached layer "
            f"{target}; use --no-streaming"
        )  # pragma: no cover
    return captured["args"], captured["kwargs"]


@dataclass
class Skeleton:
    """A checkpoint opened for streaming: the weightless model, where its layers and embeddings
    are, and the checkpoint to load them from."""

    config: object
    ck: Checkpoint
    model: nn.Module
    base: nn.Module  # the module that owns the layer list (its forward builds masks, rotary)
    layers: nn.ModuleList
    prefix: str  # checkpoint name of the layer list, e.g. "model.layers"
    embed: nn.Module
    embed_prefix: str


def open_skeleton(
    folder: Path, torch_dtype: torch.dtype, device: str, trust_remote_code: bool = False
) -> Skeleton:
    """The skeleton of ``folder`` with its small real buffers (rotary frequencies, embed scale)
    moved next to the compute."""
    config = load_folder_config(folder, trust_remote_code)
    ck = Checkpoint(folder)
    model = build_skeleton(config, torch_dtype)
    base, _, layers = find_layers(model)
    embed = base.get_input_embeddings()
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            owner, _, a = name.rpartition(".")
            model.get_submodule(owner)._buffers[a] = buf.to(device)
    return Skeleton(
        config,
        ck,
        model,
        base,
        layers,
        module_name(model, layers),
        embed,
        module_name(model, embed) + ".",
    )


def embed_into(
    sk: Skeleton,
    loader: Loader,
    input_ids: torch.Tensor,
    batches: list[slice],
    masks: list[torch.Tensor],
    acts: torch.Tensor,
) -> None:
    """Load the input embeddings alone and write every sample's layer-0 input into ``acts``."""
    device = loader.device
    loader.load(sk.embed, sk.embed_prefix, reuse=False)
    for sl, mask in zip(batches, masks):
        args, _ = layer_inputs(
            sk.base, sk.layers, 0, input_ids=input_ids[sl].to(device), attention_mask=mask
        )
        acts[sl].copy_(args[0])
    loader.free(sk.embed)


def layer_forward(sk: Skeleton, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Layer i (its weights loaded) on hidden states ``x``, with the mask and position
    embeddings the model's own forward gives layer i."""
    from shrink.core.scores import hidden_states_of

    args, kwargs = layer_inputs(sk.base, sk.layers, i, inputs_embeds=x, attention_mask=mask)
    return hidden_states_of(sk.layers[i](x, *args[1:], **kwargs))


@torch.no_grad()
def stream_score(
    model_dir: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    skip_first: int = 1,
    device: str | None = None,
    dtype=None,
    offload_dir: str | Path | None = None,
    show_progress: bool = True,
    *,
    model_name: str = "",
    settings: dict | None = None,
    trust_remote_code: bool = False,
):
    """Layer scores of the model in ``model_dir`` without ever holding more than one decoder
    layer: the same :class:`shrink.core.scores.LayerScores` (BI, relmag, angular distances) as
    :func:`shrink.core.scores.score_layers` on the loaded model, to float rounding."""
    from shrink.core.scores import ScoreAccumulator, check_score_inputs, token_masks

    attention_mask = check_score_inputs(input_ids, attention_mask, skip_first)
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    sk = open_skeleton(Path(model_dir), torch_dtype, device, trust_remote_code)
    layers = sk.layers
    L = len(layers)
    N, S = input_ids.shape
    H = sk.config.get_text_config().hidden_size
    on_disk = activations_on_disk((N, S, H), torch_dtype, offload_dir)
    est = estimate(
        sk.ck, sk.config, sk.prefix, sk.embed_prefix, N, S, batch_size, torch_dtype, device, on_disk
    )
    if show_progress:
        stderr.print(est.describe(), highlight=False)
    t_start = time.perf_counter()
    acts, acts_file = activation_store((N, S, H), torch_dtype, offload_dir, on_disk)
    batches = [slice(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]
    masks = [attention_mask[sl].to(device) for sl in batches]
    acc = ScoreAccumulator(L)
    last = torch.zeros(N, L + 1, H, dtype=torch.float32)
    valids, last_idxs = zip(*(token_masks(mask, skip_first) for mask in masks))
    try:
        # 1. Embeddings alone: layer-0 inputs of every sample.
        loader = Loader(sk.ck, device)
        embed_into(sk, loader, input_ids, batches, masks, acts)
        # 2. One layer at a time.
        for i in progress_bar(range(L), "streaming layers", enabled=show_progress):
            layer = layers[i]
            loader.load(layer, f"{sk.prefix}.{i}.")
            for b, (sl, mask) in enumerate(zip(batches, masks)):
                x = acts[sl].to(device)
                y = layer_forward(sk, i, x, mask)
                rows = torch.arange(x.shape[0], device=x.device)
                acc.add_layer(i, x, y, valids[b])
                last[sl, i] = x[rows, last_idxs[b]].float().cpu()
                if i == L - 1:
                    last[sl, L] = y[rows, last_idxs[b]].float().cpu()
                del x
                acts[sl].copy_(y)
                del y
            loader.free(layer)
            if i == 0 and show_progress and L > 1:
                per = time.perf_counter() - t_start
                stderr.print(
                    f"first layer took {per:.1f} s: about {per * L:.0f} s in all", highlight=False
                )
    finally:
        del acts
        if acts_file is not None:
            acts_file.unlink(missing_ok=True)
    for b, sl in enumerate(batches):
        acc.add_samples(last[sl], valids[b])
    seconds = time.perf_counter() - t_start
    return acc.result(
        model_name or str(model_dir),
        {
            "skip_first": skip_first,
            "batch_size": batch_size,
            **(settings or {}),
            "streaming": {
                "device": device,
                "dtype": str(torch_dtype)[6:],
                "activations_on_disk": on_disk,
                "estimate": est.describe(),
                "seconds": round(seconds, 2),
                "tokens_per_second": round(N * S / seconds, 1),
            },
        },
    )


def score_model_streaming(
    model: str,
    resolved,
    data: str,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    skip_first: int,
    dtype,
    device,
    trust_remote_code: bool,
    show_progress: bool,
    offload_dir=None,
):
    """:func:`shrink.core.scores.score_model` for a model that does not fit: tokenizer + stream."""
    from transformers import AutoTokenizer

    from shrink.core.data import token_blocks

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    blocks = token_blocks(tokenizer, data, samples, seq_len, seed)
    return stream_score(
        resolved.path,
        blocks.input_ids,
        batch_size=batch_size,
        skip_first=skip_first,
        device=device,
        dtype=dtype,
        offload_dir=offload_dir,
        show_progress=show_progress,
        model_name=model,
        settings={"data": blocks.describe(), "location": resolved.location},
        trust_remote_code=trust_remote_code,
    )
