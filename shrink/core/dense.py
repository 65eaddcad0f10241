"""The dense model's hidden states, recorded once and replayed: a pass over a variant that is
unchanged below some layer (a pruned or bridged candidate) starts there instead of at the
embeddings, with bit for bit the inputs a full pass would give it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shrink.core.models import find_layers
from shrink.core.progress import progress_bar
from shrink.core.scores import decoder_base


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
    def record(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layers: Iterable[int],
        *,
        batch_size: int,
        description: str = "dense pass",
        show_progress: bool = False,
    ) -> DenseStates:
        """Run the dense model over ``input_ids`` in batches of ``batch_size`` (as the later
        passes will) and keep the outputs of ``layers``; the pass stops after the deepest one."""
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
            for start in progress_bar(
                range(0, input_ids.shape[0], batch_size), description, enabled=show_progress
            ):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device)
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

    @contextmanager
    def keeping(self, model: nn.Module, position: int) -> Iterator[None]:
        """While inside, every forward pass of ``model`` stores the output of its layer at
        ``position`` (in the layer list as it is now, e.g. with layers removed) by batch, for a
        later :meth:`start_at` ``position + 1`` on the same layer list."""
        if position < 0:
            yield
            return
        layer = find_layers(model)[2][position]
        runner = decoder_base(model)
        current: dict = {}

        def on_batch(module, args, kwargs):
            current["key"] = batch_key(kwargs.get("input_ids"), kwargs.get("attention_mask"))

        def keep(module, args, output):
            self.outputs[(current.get("key"), position)] = output

        handles = [
            runner.register_forward_pre_hook(on_batch, with_kwargs=True),
            layer.register_forward_hook(keep),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
