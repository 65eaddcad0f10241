"""The linear bridge (:mod:`shrink.core.bridge`) fitted layer by layer, for models that do not fit:
one decoder layer's weights in memory at a time, the same T as the in-memory fit to float rounding.

The in-memory fit handles the runs one after another, shallowest first: run r = a..b is fitted on
the model whose earlier runs are already removed and bridged (kept layer k = a-1's y and M include
their errors) against the DENSE model's output z of layer b. One walk over the layers gives the
same thing with two hidden-state streams, both [samples, seq, d] like the scorer's:

- ``dense``: every layer with its original weights; after layer b it holds z.
- ``pruned``: the pruned and bridged model: the removed layers are skipped, every kept layer runs
  with its final weights.

The two are equal until the first layer where they part (the first removed layer, or the kept
layer before it), so ``pruned`` is only allocated from there on. At layer i, ``dense`` always goes
through layer i; ``pruned`` goes through it when i is kept, EXCEPT when i is the kept layer k
before a run: its bridge is not known yet (it needs z, which ``dense`` reaches only at layer b),
so ``pruned`` waits at layer k's input. Nothing reads ``pruned`` in between, since layers a..b
are removed. Once layer b has run on ``dense`` (and been freed), layer k is loaded again and run
on ``pruned`` with forward hooks, giving its output h and MLP output M (y = h - M) over the very
inputs the in-memory fit sees; the sums of :class:`shrink.core.bridge.BridgeStats` are taken
against z = ``dense``, T is solved by :func:`shrink.core.bridge.fit_run` and folded into layer k's
``down_proj`` by :func:`shrink.core.bridge.fold`, and layer k runs a second time, now bridged, to
advance ``pruned`` past it. Runs are separated by at least one kept layer, so at most one bridge
is pending at any time and its layer k is reloaded only after layer b is freed: one layer is in
memory at a time, plus the folded down-projections kept for the writer. The walk stops after the
last run's layer b: the layers after it change no bridge.

Cost over streamed scoring: a second activation store, layer k read and run twice more per run,
and the kept layers between runs run twice (on both streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shrink.core.bridge import (
    DEFAULT_RIDGE,
    BridgeRun,
    BridgeStats,
    capture_mlp,
    check_bridge_settings,
    check_bridgeable,
    check_mlp_output,
    contiguous_runs,
    down_proj,
    fit_run,
    fold,
    not_bridged_at_zero,
)
from shrink.core.layers import check_remove
from shrink.core.models import check_device, parse_dtype
from shrink.core.progress import progress_bar, stderr
from shrink.streaming.memory import activation_store, activations_on_disk, gb
from shrink.streaming.score import Skeleton, embed_into, layer_forward, open_skeleton
from shrink.streaming.skeleton import Loader, module_name


@dataclass
class StreamedBridges:
    runs: list[BridgeRun]  # one per contiguous removed run, as apply_bridges returns them
    tensors: dict[str, torch.Tensor]  # source checkpoint name -> folded down_proj weight/bias
    settings: dict = field(default_factory=dict)


@torch.no_grad()
def stream_bridges(
    model_dir: str | Path,
    remove: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    skip_first: int = 1,
    ridge: float = DEFAULT_RIDGE,
    method: str = "mlp",
    batch_size: int = 4,
    device: str | None = None,
    dtype=None,
    offload_dir: str | Path | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> StreamedBridges:
    """:func:`shrink.core.bridge.apply_bridges` on the checkpoint in ``model_dir`` without loading
    it (see the module docstring). Nothing is written: the result holds each bridged layer's
    folded ``mlp.down_proj`` tensors under their names in the source checkpoint, in the compute
    dtype, for :func:`shrink.streaming.prune.write_stream_prune` to substitute."""
    from shrink.core.scores import check_score_inputs, token_masks

    check_bridge_settings(method, ridge)
    attention_mask = check_score_inputs(input_ids, attention_mask, skip_first)
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    sk = open_skeleton(Path(model_dir), torch_dtype, device, trust_remote_code)
    check_bridgeable(sk.model)
    arch = type(sk.model).__name__
    L = len(sk.layers)
    remove = check_remove(list(remove), L)
    runs = contiguous_runs(remove)
    by_end = {run[-1]: run for run in runs if run[0] > 0}  # layer b -> its run
    waiting = {run[0] - 1 for run in by_end.values()}  # the kept layers k, bridged at layer b
    results: dict[int, BridgeRun] = {
        run[0]: not_bridged_at_zero(run, method, ridge) for run in runs if run[0] == 0
    }
    tensors: dict[str, torch.Tensor] = {}
    settings = {"device": device, "dtype": str(torch_dtype)[6:]}
    if not by_end:  # only a run at layer 0: nothing to fit, no weights to read
        return StreamedBridges([results[r[0]] for r in runs], tensors, settings)
    N, S = input_ids.shape
    H = sk.config.get_text_config().hidden_size
    on_disk = activations_on_disk((2 * N, S, H), torch_dtype, offload_dir)
    settings["activations_on_disk"] = on_disk
    last = max(by_end)
    split = min(remove[0], min(waiting))  # the first layer where the two streams part
    if show_progress:
        nbytes = N * S * H * torch.empty((), dtype=torch_dtype).element_size()
        stderr.print(
            f"streamed bridge: {len(by_end)} run(s), layers 0..{last}; two hidden-state "
            f"streams of {gb(nbytes)} each in "
            f"{'a memory-mapped file' if on_disk else 'CPU RAM'}",
            highlight=False,
        )
    batches = [slice(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]
    masks = [attention_mask[sl].to(device) for sl in batches]
    valids = [token_masks(mask, skip_first)[0].bool() for mask in masks]
    dense, dense_file = activation_store((N, S, H), torch_dtype, offload_dir, on_disk)
    pruned = pruned_file = None
    loader = Loader(sk.ck, device)
    try:
        embed_into(sk, loader, input_ids, batches, masks, dense)
        for i in progress_bar(range(last + 1), "bridging layers", enabled=show_progress):
            if i == split:
                pruned, pruned_file = activation_store((N, S, H), torch_dtype, offload_dir, on_disk)
                pruned.copy_(dense)
            advance = pruned is not None and i not in remove and i not in waiting
            loader.load(sk.layers[i], f"{sk.prefix}.{i}.")
            for sl, mask in zip(batches, masks):
                dense[sl].copy_(layer_forward(sk, i, dense[sl].to(device), mask))
                if advance:
                    pruned[sl].copy_(layer_forward(sk, i, pruned[sl].to(device), mask))
            loader.free(sk.layers[i])
            if i in by_end:
                run = by_end[i]
                result, folded = _bridge_run(
                    sk, loader, run, dense, pruned, batches, masks, valids, method, ridge, arch
                )
                results[run[0]] = result
                tensors.update(folded)
    finally:
        del dense, pruned
        for f in (dense_file, pruned_file):
            if f is not None:
                f.unlink(missing_ok=True)
    return StreamedBridges([results[r[0]] for r in runs], tensors, settings)


def _bridge_run(
    sk: Skeleton,
    loader: Loader,
    run: list[int],
    dense: torch.Tensor,
    pruned: torch.Tensor,
    batches: list[slice],
    masks: list[torch.Tensor],
    valids: list[torch.Tensor],
    method: str,
    ridge: float,
    arch: str,
) -> tuple[BridgeRun, dict[str, torch.Tensor]]:
    """Fit run a..b's bridge into kept layer k = a-1 (``dense`` holds z, ``pruned`` layer k's
    input), fold it, and advance ``pruned`` through the bridged layer k."""
    k = run[0] - 1
    layer = sk.layers[k]
    loader.load(layer, f"{sk.prefix}.{k}.")
    try:
        device = loader.device
        down = down_proj(layer)
        stats = BridgeStats(dense.shape[-1], affine=down.bias is not None)
        state: dict = {}
        for n, (sl, mask) in enumerate(zip(batches, masks)):
            with capture_mlp(layer, state, check=n == 0):
                h = layer_forward(sk, k, pruned[sl].to(device), mask)
            if n == 0:
                check_mlp_output(state, arch)
            stats.add_batch(h, state.pop("M"), dense[sl].to(device), valids[n])
        result = fit_run(run, k, stats, method, ridge)
        fold(down, result.transform)
        name = f"{sk.prefix}.{k}.{module_name(layer, down)}."
        folded = {name + "weight": down.weight.detach().to("cpu", copy=True)}
        if down.bias is not None:
            folded[name + "bias"] = down.bias.detach().to("cpu", copy=True)
        for sl, mask in zip(batches, masks):
            pruned[sl].copy_(layer_forward(sk, k, pruned[sl].to(device), mask))
    finally:
        loader.free(layer)
    return result, folded


def bridge_model_streaming(
    resolved,
    remove: list[int],
    data: str,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    skip_first: int,
    ridge: float,
    dtype,
    device,
    trust_remote_code: bool,
    show_progress: bool,
    offload_dir=None,
) -> StreamedBridges:
    """:func:`stream_bridges` on the same calibration blocks the in-memory prune stage uses."""
    from transformers import AutoTokenizer

    from shrink.core.data import token_blocks

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    blocks = token_blocks(tokenizer, data, samples, seq_len, seed)
    fitted = stream_bridges(
        resolved.path,
        remove,
        blocks.input_ids,
        skip_first=skip_first,
        ridge=ridge,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        offload_dir=offload_dir,
        show_progress=show_progress,
        trust_remote_code=trust_remote_code,
    )
    fitted.settings["data"] = blocks.describe()
    return fitted
