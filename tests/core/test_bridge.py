"""The linear bridge (shrink.core.bridge): its fold against an independent computation, its least
squares against torch.linalg.lstsq on independently captured activations, exact recovery of a
synthetic linear run, reload in plain transformers in a fresh process, and ONNX conversion."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from shrink.core.bridge import (
    apply_bridges,
    bridge_and_prune,
    bridged_without,
    check_bridgeable,
    contiguous_runs,
)
from shrink.core.errors import ShrinkError

D = 64  # hidden size of the tiny models (tests/conftest.py)


def _tiny(arch="llama", layers=6, seed=0, **overrides):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # random init leaves the MLP output tiny next to the residual stream; scale it up so the
    # bridge has something to do and errors are not hidden by the residual
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
            if layer.mlp.down_proj.bias is not None:
                layer.mlp.down_proj.bias.normal_(0, 0.5)
    return model


def _ids(samples=8, seq=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (samples, seq), generator=g)


def _capture(model, k, ids):
    """Independent path: y (input of post_attention_layernorm) and M (mlp output) of layer k,
    and every layer's output, through hooks on the unmodified model."""
    got: dict = {}
    layer = model.model.layers[k]
    hs = [
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a: got.__setitem__("y", a[0].detach().clone())
        ),
        layer.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("M", o.detach().clone())),
    ]
    outs = []
    for lay in model.model.layers:
        hs.append(lay.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    return got["y"].double(), got["M"].double(), [o.double() for o in outs]


def _layer_out(model, k, ids):
    got = []
    h = model.model.layers[k].register_forward_hook(lambda m, a, o: got.append(o.detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got[0].double()


def _apply_T(y, M, T):
    """y + M T, affine when T has an extra row."""
    out = y + M @ T[:D]
    return out + T[D] if T.shape[0] > D else out


def test_contiguous_runs():
    assert contiguous_runs([12, 3, 5, 4, 9, 11]) == [[3, 4, 5], [9], [11, 12]]
    assert contiguous_runs([0]) == [[0]]


@pytest.mark.parametrize("bias", [False, True])
def test_fold_equals_layer_then_T(bias):
    """(a) The bridged+pruned model's output of layer k equals y + M T computed on the ORIGINAL
    weights (hooks on an untouched copy), for both runs of a non-contiguous selection."""
    model = _tiny(mlp_bias=bias)
    original = copy.deepcopy(model)
    ids = _ids()
    results = bridge_and_prune(model, [2, 3, 5], ids)
    assert [r.layers for r in results] == [[2, 3], [5]]
    assert [r.folded_into for r in results] == [1, 4]
    assert all(r.transform.shape == (D + int(bias), D) for r in results)
    assert all(r.fit_error < r.identity_error for r in results)
    test_ids = _ids(seed=7)  # not the calibration tokens: the fold is exact everywhere
    # run 1: layer 1 keeps its number after pruning
    y, M, _ = _capture(original, 1, test_ids)
    expected = _apply_T(y, M, results[0].transform)
    got = _layer_out(model, 1, test_ids)
    assert (got - expected).abs().max() < 1e-5
    assert (got - (y + M)).abs().max() > 1e-2  # the bridge changed something
    # run 2: original layer 4 is layer 2 after pruning; compute y, M in the pruned model with
    # layer 4's ORIGINAL down_proj put back, then apply T by hand
    reference = copy.deepcopy(model)
    reference.model.layers[2].mlp.down_proj.load_state_dict(
        original.model.layers[4].mlp.down_proj.state_dict()
    )
    y, M, _ = _capture(reference, 2, test_ids)
    expected = _apply_T(y, M, results[1].transform)
    assert (_layer_out(model, 2, test_ids) - expected).abs().max() < 1e-5


def test_least_squares_matches_lstsq():
    """The float64 accumulation, token masks and solver equal torch.linalg.lstsq on activations
    captured independently (ridge 0, first token skipped, padded tokens left out)."""
    model = _tiny()
    ids = _ids(samples=12)
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0  # right padding in one sample
    M = _capture(model, 1, ids)[1]  # to check that restore() puts the weights back
    # capture with the mask, the way the bridge sees it
    got: dict = {}
    layer = model.model.layers[1]
    hs = [
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a: got.__setitem__("y", a[0].double())
        ),
        layer.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("M", o.double())),
        model.model.layers[3].register_forward_hook(
            lambda m, a, o: got.__setitem__("z", o.double())
        ),
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in hs:
        h.remove()
    keep = mask.bool().clone()
    keep[:, 0] = False
    X, Y = got["M"][keep], (got["z"] - got["y"])[keep]
    T_ref = torch.linalg.lstsq(X, Y).solution
    results, restore = apply_bridges(model, [2, 3], ids, mask, ridge=0.0)
    assert results[0].tokens == int(keep.sum())
    assert torch.allclose(results[0].transform, T_ref, atol=1e-6, rtol=1e-5)
    err = (X @ T_ref - Y).norm() / Y.norm()
    assert abs(results[0].fit_error - float(err)) < 1e-6
    assert abs(results[0].identity_error - float((X - Y).norm() / Y.norm())) < 1e-6
    restore()  # weights are back
    assert torch.equal(_capture(model, 1, ids)[1], M)


class _LinearRun(nn.Module):
    """A synthetic removed layer: maps h = y + M (the previous layer's output) to y + M W,
    with M read from a hook on the previous layer's MLP. Exactly linear in M."""

    def __init__(self, prev_mlp: nn.Module, W: torch.Tensor):
        super().__init__()
        self.W = W
        self.M = None
        prev_mlp.register_forward_hook(lambda m, a, o: setattr(self, "M", o))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.M @ (self.W - torch.eye(self.W.shape[0]))


def test_recovers_a_linear_run():
    """(c) When the removed run is exactly y + M W, the fit finds W and the bridged, pruned model
    computes the same logits as the model with the run."""
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    W = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / D**0.5
    model.model.layers[2] = _LinearRun(model.model.layers[1].mlp, W)
    ids = _ids(samples=12)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    results = bridge_and_prune(model, [2], ids, ridge=0.0)
    r = results[0]
    assert r.fit_error < 1e-5 and r.identity_error > 0.1
    assert torch.allclose(r.transform, W.double(), atol=1e-4)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-3


def test_identity_run_gives_identity():
    """A run whose attention and MLP contribute nothing is the identity: T = I, error 0."""
    model = _tiny()
    with torch.no_grad():
        for i in (3, 4):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    results, _ = apply_bridges(model, [3, 4], _ids(samples=12), ridge=0.0)
    assert torch.allclose(results[0].transform, torch.eye(D, dtype=torch.float64), atol=1e-6)
    assert results[0].fit_error < 1e-6 and results[0].identity_error < 1e-6


def test_layer_zero_run_is_not_bridged_and_context_restores():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bridged_without(model, [0, 1, 4], _ids()) as results:
        assert len(model.model.layers) == 3
        assert results[0].layers == [0, 1] and results[0].folded_into is None
        assert "layer 0" in results[0].note
        assert results[1].folded_into == 3
    assert len(model.model.layers) == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gemma3_is_refused_with_the_reason():
    with pytest.raises(ShrinkError, match="post_feedforward_layernorm"):
        check_bridgeable(_tiny("gemma3"))


@pytest.fixture(scope="module")
def bridged_folder(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
    bridge_and_prune(model, [2, 3], _ids())
    out = tmp_path_factory.mktemp("bridged") / "model"
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    ids = _ids(samples=2, seed=11)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return out, ids, logits


def test_reloads_in_plain_transformers(bridged_folder, tmp_path):
    """(b) A fresh process loads the folder with AutoModelForCausalLM alone; logits match."""
    folder, ids, logits = bridged_folder
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as A; "
        "m = A.from_pretrained(sys.argv[1], dtype=torch.float32).eval(); "
        "ids = torch.load(sys.argv[2]); "
        "torch.save(m(input_ids=ids, use_cache=False).logits.detach(), sys.argv[3])"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(folder),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
        capture_output=True,
    )
    reloaded = torch.load(tmp_path / "logits.pt")
    assert reloaded.shape == logits.shape
    assert (reloaded - logits).abs().max() < 1e-5


def test_converts_to_onnx(bridged_folder, tmp_path):
    """(d) The bridged checkpoint is a standard one: the ONNX exporter builds it and its own
    fresh-process verification against PyTorch passes."""
    pytest.importorskip("onnxruntime_genai")
    from shrink.stages.configs import ExportConfig
    from shrink.stages.export.onnx import export_onnx

    folder, _, _ = bridged_folder
    result = export_onnx(folder, tmp_path / "onnx", ExportConfig(onnx="fp32"))
    assert result.verification["ok"]
    assert result.verification["greedy_equal_to_torch"]
