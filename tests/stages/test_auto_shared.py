"""--strategy auto without waste: the dense states shared by the candidates (shrink.core.dense
DenseStates) give bit for bit the numbers of computing every candidate from scratch."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from shrink.core.bridge import (
    apply_bridges,
    bridge_dense_layers,
    bridged_without,
    first_changed_layer,
)
from shrink.core.dense import DenseStates
from shrink.core.errors import ShrinkError
from shrink.core.layers import without_layers
from shrink.core.perplexity import perplexity
from shrink.stages.auto import choose_auto


def _tiny(layers=8, seed=0):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", layers), dtype=torch.float32
    ).eval()
    with torch.no_grad():  # make the MLPs matter, so that the bridges have work to do
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
    return model


def _ids(samples, seq=24, seed=1):
    return torch.randint(0, 200, (samples, seq), generator=torch.Generator().manual_seed(seed))


def _from_scratch(model, layers, calib, held, bridge):
    """The computation before the dense states were shared."""
    ctx = bridged_without(model, layers, calib, batch_size=4) if bridge else nullcontext([])
    with ctx as runs, nullcontext() if bridge else without_layers(model, layers):
        ppl = perplexity(model, held, batch_size=4, show_progress=False).perplexity
    return ppl, [r.transform for r in runs]


@pytest.mark.parametrize("layers", [[3, 4], [2, 5, 6], [0, 1, 4], [1, 2], [6]])
def test_bridges_from_the_dense_states_are_bit_identical(layers):
    model, calib = _tiny(), _ids(10)
    expected, restore = apply_bridges(model, layers, calib, batch_size=4)
    restore()
    dense = DenseStates().record(model, calib, None, bridge_dense_layers(layers), batch_size=4)
    calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    got, restore = apply_bridges(model, layers, calib, batch_size=4, dense=dense)
    hook.remove()
    restore()
    if first_changed_layer(layers, True) > 0:  # nothing below the first change is recomputed
        assert not calls
    assert [r.bridged for r in got] == [r.bridged for r in expected]
    for a, b in zip(got, expected):
        if b.bridged:
            assert torch.equal(a.transform, b.transform)
            assert a.fit_error == b.fit_error and a.tokens == b.tokens


def test_replayed_prefix_gives_the_same_logits_and_unknown_batches_run_in_full():
    model, held = _tiny(), _ids(6)
    full = model(input_ids=held[:4], attention_mask=torch.ones_like(held[:4])).logits
    states = DenseStates().record(model, held, None, {2}, batch_size=4)
    assert len(states.outputs) == 2  # two batches, one layer
    calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    with states.start_at(model, 3):
        replayed = model(input_ids=held[:4], attention_mask=torch.ones_like(held[:4])).logits
        assert not calls  # layer 0 never ran
        other = _ids(4, seed=9)
        model(input_ids=other, attention_mask=torch.ones_like(other))
        assert calls  # a batch that was not recorded ran every layer
    hook.remove()
    assert torch.equal(replayed, full)
    # the model is left as it was
    assert "forward" not in vars(model.model.layers[0])


@pytest.mark.parametrize("bridge", [True, False])
def test_auto_chooses_and_measures_as_before(bridge):
    model, calib, held = _tiny(), _ids(10), _ids(6, seed=3)
    proposals = {"bi": [3, 4], "angular": [2, 3], "relmag": [5, 6], "iterative": [3, 4]}
    res = choose_auto(
        model,
        2,
        held,
        lambda name: (proposals[name], name),
        candidates=("bi", "angular", "relmag", "iterative"),
        bridge=bridge,
        calib_input_ids=calib,
        batch_size=4,
    )
    before = {
        name: _from_scratch(model, layers, calib, held, bridge)
        for name, layers in proposals.items()
        if name != "iterative"
    }
    got = {c.strategy.split("=")[0]: c.perplexity for c in res.candidates}
    assert got == {name: ppl for name, (ppl, _) in before.items()}
    best = min(before, key=lambda n: before[n][0])
    assert res.layers == proposals[best]
    assert res.perplexity == before[best][0]
    assert [c.strategy for c in res.candidates][0] == "bi=iterative"
    assert "fitted" not in res.to_dict()
    if not bridge:
        assert res.fitted is None
        return
    # the winner's bridges fold into the same weights as fitting them again for the prune
    from shrink.core.bridge import bridge_and_prune, prune_with_fitted

    a, b = _tiny(), _tiny()
    prune_with_fitted(a, res.layers, res.fitted)
    bridge_and_prune(b, res.layers, calib, batch_size=4)
    assert len(a.model.layers) == len(b.model.layers) == 8 - len(res.layers)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ShrinkError, match="other layers"):
        prune_with_fitted(_tiny(), [1, 2], res.fitted)


def test_first_changed_layer():
    assert first_changed_layer([3, 4], bridged=True) == 2
    assert first_changed_layer([3, 4], bridged=False) == 3
    assert first_changed_layer([0, 5], bridged=True) == 0
    assert bridge_dense_layers([3, 4, 7]) == {4, 7, 1}
    assert bridge_dense_layers([0, 1, 4]) == {4}
