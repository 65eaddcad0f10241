"""Removing decoder layers from a transformers model in memory, leaving a valid checkpoint."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar


def model_configs(model: nn.Module) -> list:
    """The model config and, for multimodal models, its text config (each once)."""
    cfgs = [model.config]
    text = model.config.get_text_config()
    if text is not model.config:
        cfgs.append(text)
    return cfgs


def swap_layers(model: nn.Module, keep: list[int]) -> Callable[[], None]:
    """Keep only layers ``keep`` (current numbering); return a function that undoes it.

    Rebuilds the ModuleList, sets num_hidden_layers, renumbers every ``layer_idx`` inside the kept
    layers from 0 (the KV cache is indexed by it), slices every per-layer config list (e.g.
    ``layer_types``) and recounts ``max_window_layers``.
    """
    parent, attr, layers = find_layers(model)
    L = len(layers)
    undo: list[Callable[[], None]] = []
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    undo.append(lambda: setattr(parent, attr, layers))
    for cfg in model_configs(model):
        for key, value in list(vars(cfg).items()):
            if isinstance(value, (list, tuple)) and len(value) == L and key != "architectures":
                setattr(cfg, key, type(value)(value[i] for i in keep))
                undo.append(lambda cfg=cfg, key=key, value=value: setattr(cfg, key, value))
        mwl = getattr(cfg, "max_window_layers", None)
        if isinstance(mwl, int):
            cfg.max_window_layers = sum(1 for i in keep if i < mwl)
            undo.append(lambda cfg=cfg, mwl=mwl: setattr(cfg, "max_window_layers", mwl))
        if getattr(cfg, "num_hidden_layers", None) == L:
            cfg.num_hidden_layers = len(keep)
            undo.append(lambda cfg=cfg: setattr(cfg, "num_hidden_layers", L))
    for new_idx, i in enumerate(keep):
        for module in layers[i].modules():
            old = getattr(module, "layer_idx", None)
            if isinstance(old, int):
                module.layer_idx = new_idx
                undo.append(lambda module=module, old=old: setattr(module, "layer_idx", old))

    def restore() -> None:
        for fn in reversed(undo):
            fn()
    return restore


def check_remove(remove: list[int], L: int) -> list[int]:
    if len(set(remove)) != len(remove):
        dup = sorted({i for i in remove if remove.count(i) > 1})
        raise ShrinkError(f"layer(s) {dup} listed more than once")
    bad = [i for i in remove if not 0 <= i < L]
    if bad:
        raise ShrinkError(f"layer(s) {bad} out of range: the model has layers 0..{L - 1}")
    if len(remove) >= L:
        raise ShrinkError(f"cannot remove {len(remove)} of {L} layers: at least one must stay")
    if not remove:
        raise ShrinkError("no layers to remove")
    return sorted(remove)


def prune_model(model: nn.Module, remove: list[int]) -> nn.Module:
    """Remove decoder layers ``remove`` (0-based) from ``model`` in place and return it."""
    L = len(find_layers(model)[2])
    remove = check_remove(list(remove), L)
    swap_layers(model, [i for i in range(L) if i not in remove])
    return model


@contextmanager
def without_layers(model: nn.Module, remove: list[int]) -> Iterator[nn.Module]:
    """Temporarily remove layers (for scoring what-ifs); the model is restored on exit."""
    L = len(find_layers(model)[2])
    remove = check_remove(list(remove), L)
    restore = swap_layers(model, [i for i in range(L) if i not in remove])
    try:
        yield model
    finally:
        restore()


def batch_key(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bytes | None:
    """What identifies one batch of blocks: its token ids and mask, with their shapes."""
    if input_ids is None:
        return None
    parts = [str(tuple(input_ids.shape)).encode(), input_ids.cpu().numpy().tobytes()]
    if attention_mask is not None:
        parts.append(attention_mask.cpu().numpy().tobytes())
    return b"|".join(parts)


class _Stop(Exception):
    """Ends a recording pass once the deepest layer asked for has run."""


class DenseStates:
    """The dense model's residual stream at the output of some layers, per batch of blocks,
    recorded in ONE forward pass; :meth:`start_at` replays it so that a later pass over the same
    batches (e.g. of a pruned or bridged variant that is unchanged below some layer) computes only
    from that layer on. The replayed tensors are the ones the dense pass computed, so everything
    downstream is bit for bit what a full pass gives."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[bytes, int], object] = {}  # (batch, layer) -> output as returned

    @torch.no_grad()
    def record(self, model: nn.Module, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, layers: Iterable[int], *,
               batch_size: int, description: str = "dense pass",
               show_progress: bool = False) -> DenseStates:
        """Run the dense model over ``input_ids`` in batches of ``batch_size`` (as the later
        passes will) and keep the outputs of ``layers``; the pass stops after the deepest one."""
        from shrink.core.scores import decoder_base

        wanted = sorted(set(layers))
        if not wanted:
            return self
        found = find_layers(model)[2]
        runner = decoder_base(model)
        device = next(model.parameters()).device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        current: dict = {}

        def keep(i: int):
            def hook(module, args, output):
                self.outputs[(current["key"], i)] = output
                if i == wanted[-1]:
                    raise _Stop
            return hook

        handles = [found[i].register_forward_hook(keep(i)) for i in wanted]
        try:
            for start in progress_bar(range(0, input_ids.shape[0], batch_size), description,
                                      enabled=show_progress):
                ids = input_ids[start:start + batch_size].to(device)
                mask = attention_mask[start:start + batch_size].to(device)
                current["key"] = batch_key(ids, mask)
                try:
                    runner(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return self

    def output(self, key: bytes | None, layer: int):
        """The recorded output of ``layer`` on the batch ``key`` (None when not recorded)."""
        return self.outputs.get((key, layer))

    @contextmanager
    def start_at(self, model: nn.Module, start: int) -> Iterator[None]:
        """While inside, a forward pass of ``model`` on a recorded batch skips layers 0 .. start-1
        (layer start-1 returns its recorded output); a batch not recorded runs in full. Layers
        below ``start`` must be the dense ones, unchanged."""
        from shrink.core.scores import decoder_base

        if start <= 0:
            yield
            return
        found = list(find_layers(model)[2])[:start]
        runner = decoder_base(model)
        current: dict = {}

        def on_batch(module, args, kwargs):
            current["key"] = batch_key(kwargs.get("input_ids"), kwargs.get("attention_mask"))

        def stub(j: int, original):
            def forward(*args, **kwargs):
                out = self.outputs.get((current.get("key"), start - 1))
                if out is None:
                    return original(*args, **kwargs)
                if j == start - 1:
                    return out
                return args[0] if args else kwargs["hidden_states"]
            return forward

        handle = runner.register_forward_pre_hook(on_batch, with_kwargs=True)
        for j, layer in enumerate(found):
            layer.forward = stub(j, layer.forward)
        try:
            yield
        finally:
            handle.remove()
            for layer in found:
                layer.__dict__.pop("forward", None)
