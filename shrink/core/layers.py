"""Removing decoder layers from a transformers model in memory, leaving a valid checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers


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
