"""The linear bridge streamed layer by layer (shrink.streaming.bridge) equals the in-memory one:
the same T per run, the same folded tensors, the same written checkpoint and logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from shards import padded_inputs, save_sharded, state

from shrink.stages.configs import PruneConfig

REMOVE = [1, 2, 4]  # two runs: [1, 2] bridged into layer 0, [4] into layer 3
CALIB = dict(samples=4, seq_len=32, guard=0)


def _scaled(bias: bool):
    """The tiny Llama with its MLP outputs scaled up (random init leaves them tiny next to the
    residual stream, so the bridge would have little to do), optionally with MLP biases."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", 6)
    cfg.mlp_bias = bias
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
            if bias:
                layer.mlp.down_proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def bridge_dir(tmp_path_factory, embedded_dir, tokenizer_files):
    """bridge_dir(bias) -> a folder with the scaled tiny Llama in ~100 KB shards (its layers
    split across shards) and the SmolLM2 tokenizer."""
    made: dict = {}

    def make(bias: bool = False) -> Path:
        if bias not in made:
            folder = tmp_path_factory.mktemp(f"bridge-llama-{int(bias)}")
            made[bias] = save_sharded(_scaled(bias), folder, embedded_dir, tokenizer_files)
        return made[bias]

    return make


@pytest.mark.parametrize("bias", [False, True])
def test_stream_bridges_equal_apply_bridges(bridge_dir, bias):
    """Same T for each run (the second run is fitted on the model with the first bridged), same
    fit errors and token counts, and the folded tensors equal the in-memory model's weights;
    padding and skip_first are honoured the same way."""
    from transformers import AutoModelForCausalLM

    from shrink.core.bridge import apply_bridges
    from shrink.streaming import stream_bridges

    folder = bridge_dir(bias)
    ids, mask = padded_inputs(6)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want, _ = apply_bridges(model, REMOVE, ids, mask, skip_first=2, batch_size=4)
    got = stream_bridges(folder, REMOVE, ids, mask, skip_first=2, batch_size=4, show_progress=False)
    assert [r.layers for r in got.runs] == [[1, 2], [4]]
    assert [r.folded_into for r in got.runs] == [0, 3]
    for w, g in zip(want, got.runs):
        assert g.tokens == w.tokens
        assert torch.allclose(g.transform, w.transform, atol=1e-6, rtol=1e-5)
        for key in ("fit_error", "identity_error", "run_fit_error"):
            assert getattr(g, key) == pytest.approx(getattr(w, key), rel=1e-5)
    names = {
        f"model.layers.{k}.mlp.down_proj.{p}"
        for k in (0, 3)
        for p in (("weight", "bias") if bias else ("weight",))
    }
    assert set(got.tensors) == names
    sd = model.state_dict()
    assert all(torch.allclose(got.tensors[n], sd[n], atol=1e-6) for n in names)
    # the second run's T differs from one fitted on the dense model: the ordering matters
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    alone, _ = apply_bridges(dense, [4], ids, mask, skip_first=2, batch_size=4)
    assert not torch.allclose(alone[0].transform, got.runs[1].transform, atol=1e-4)


def test_streamed_prune_with_bridge_equals_in_memory(bridge_dir, tmp_path):
    """(a) prune --bridge linear streamed writes the in-memory checkpoint, tensor by tensor."""
    from shrink.stages.prune import prune

    folder = str(bridge_dir(False))
    mem = prune(
        folder,
        tmp_path / "mem",
        PruneConfig(layers=REMOVE, bridge="linear", streaming=False, **CALIB),
        verify=False,
        show_progress=False,
    )
    streamed = prune(
        folder,
        tmp_path / "stream",
        PruneConfig(layers=REMOVE, bridge="linear", streaming=True, **CALIB),
        verify=False,
        show_progress=False,
    )
    assert streamed.streamed and not mem.streamed
    a, b = state(tmp_path / "mem"), state(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    original = state(Path(folder))
    for new, old in ((0, 0), (1, 3)):  # the bridged layers changed; everything else is a copy
        key = f"model.layers.{new}.mlp.down_proj.weight"
        assert not torch.allclose(b[key], original[f"model.layers.{old}.mlp.down_proj.weight"])
    assert torch.equal(
        b["model.layers.2.mlp.down_proj.weight"], original["model.layers.5.mlp.down_proj.weight"]
    )
    for m, s in zip(mem.bridge, streamed.bridge):
        assert {k: v for k, v in m.items() if "error" not in k} == {
            k: v for k, v in s.items() if "error" not in k
        }
        assert s["fit_error"] == pytest.approx(m["fit_error"], rel=1e-5)
    record = json.loads((tmp_path / "stream" / "shrink.json").read_text())["stages"][-1]
    assert record["streaming"]["replaced_tensors"] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]


def test_cli_streamed_bridge_reloads_with_in_memory_logits(bridge_dir, tmp_path):
    """(b) shrink prune --streaming --bridge linear: verified in a fresh process, recorded in
    shrink.json, and plain transformers computes the in-memory bridged model's logits."""
    from transformers import AutoModelForCausalLM

    from shrink.cli import main

    folder = str(bridge_dir(False))
    common = [
        "prune",
        folder,
        "--layers",
        "1,2,4",
        "--bridge",
        "linear",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--guard",
        "0",
        "--json",
        "-",
    ]
    runner = CliRunner()
    r = runner.invoke(main, common + ["--streaming", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["result"]
    assert out["streamed"] and out["verification"]["ok"]
    assert [b["folded_into"] for b in out["bridge"]] == [0, 3]
    record = json.loads((tmp_path / "s" / "shrink.json").read_text())["stages"][-1]
    assert record["bridge"] == out["bridge"]
    assert [b["target"] for b in record["bridge"]] == [
        "layers.0.mlp.down_proj",
        "layers.3.mlp.down_proj",
    ]
    r = runner.invoke(main, common + ["--no-streaming", "--no-verify", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    ids = padded_inputs(6)[0][:2]
    logits = []
    for name in ("s", "m"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        assert model.config.num_hidden_layers == 3
        with torch.no_grad():
            logits.append(model(input_ids=ids, use_cache=False).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_streamed_run_at_layer_zero_is_not_bridged(bridge_dir, tmp_path):
    """(c) A run starting at layer 0 is removed without a bridge, recorded as such, streamed too;
    with only such a run, nothing is fitted and the output is the plain streamed prune."""
    from shrink.stages.prune import prune

    folder = str(bridge_dir(False))
    res = prune(
        folder,
        tmp_path / "a",
        PruneConfig(layers=[0, 1, 4], bridge="linear", streaming=True, **CALIB),
        verify=False,
        show_progress=False,
    )
    assert [(b["layers"], b["folded_into"]) for b in res.bridge] == [([0, 1], None), ([4], 3)]
    assert "layer 0" in res.bridge[0]["note"] and res.bridge[0]["target"] is None
    mem = prune(
        folder,
        tmp_path / "m",
        PruneConfig(layers=[0, 1, 4], bridge="linear", streaming=False, **CALIB),
        verify=False,
        show_progress=False,
    )
    assert [b["note"] for b in mem.bridge] == [b["note"] for b in res.bridge]
    a, b = state(tmp_path / "a"), state(tmp_path / "m")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    only = prune(
        folder,
        tmp_path / "b",
        PruneConfig(layers=[0, 1], bridge="linear", streaming=True, **CALIB),
        verify=False,
        show_progress=False,
    )
    assert [b["folded_into"] for b in only.bridge] == [None]
    plain = prune(
        folder,
        tmp_path / "c",
        PruneConfig(layers=[0, 1], streaming=True),
        verify=False,
        show_progress=False,
    )
    assert plain.bridge is None
    a, b = state(tmp_path / "b"), state(tmp_path / "c")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_substitution_and_architecture_refusals(bridge_dir, tiny_model_dir, tmp_path):
    """A substituted tensor must be one the pruned checkpoint keeps, with its shape; Gemma 3 is
    refused streamed with the in-memory reason, before any layer is read."""
    from shrink.core.errors import ShrinkError
    from shrink.stages.prune import prune
    from shrink.streaming.prune import plan_stream_prune, substitutions

    plan = plan_stream_prune(bridge_dir(False), REMOVE)
    w = torch.zeros(64, 128)
    assert list(substitutions(plan, {"model.layers.3.mlp.down_proj.weight": w})) == [
        "model.layers.1.mlp.down_proj.weight"
    ]
    with pytest.raises(ShrinkError, match="not among the tensors"):
        substitutions(plan, {"model.layers.2.mlp.down_proj.weight": w})
    with pytest.raises(ShrinkError, match="shape"):
        substitutions(plan, {"model.layers.3.mlp.down_proj.weight": w.T})
    with pytest.raises(ShrinkError, match="post_feedforward_layernorm"):
        prune(
            str(tiny_model_dir("gemma3")),
            tmp_path / "g",
            PruneConfig(layers=[1], bridge="linear", streaming=True, **CALIB),
            show_progress=False,
        )
    assert not (tmp_path / "g").exists()
