"""The prune stage: strategies choose the layers, the command writes a recorded, verified folder,
bad inputs are one line, and an existing folder is replaced only when that is safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig

import shrink
from shrink.cli import main
from shrink.cli.options import parse_layers
from shrink.core.errors import ShrinkError
from shrink.stages.configs import PruneConfig
from shrink.stages.strategies import choose_layers, iterative_bi


def _ids():
    return torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def test_choose_layers():
    scores = shrink.LayerScores(
        model="m",
        num_layers=6,
        bi=[0.9, 0.2, 0.1, 0.3, 0.4, 0.8],
        relmag=[0.9, 0.5, 0.4, 0.1, 0.2, 0.8],
        tokens=1,
        samples=1,
        angular=[
            [0.5, 0.2, 0.1, 0.3, 0.2, 0.4],
            [0.5, 0.3, 0.2, 0.1, 0.4],
            [0.6, 0.5, 0.4, 0.6],
            [0.7, 0.6, 0.8],
            [0.9, 0.9],
            [1.0],
        ],
    )
    assert choose_layers("bi", 2, 6, scores)[0] == [1, 2]
    assert choose_layers("relmag", 2, 6, scores)[0] == [3, 4]
    assert choose_layers("angular", 2, 6, scores)[0] == [3, 4]
    assert choose_layers("angular", 3, 6, scores)[0] == [2, 3, 4]
    assert choose_layers("last", 2, 6)[0] == [3, 4]  # keeps the final layer
    r1 = choose_layers("random", 3, 6, seed=1)[0]
    assert r1 == choose_layers("random", 3, 6, seed=1)[0] and len(set(r1)) == 3
    for bad in (0, 6, -1):
        with pytest.raises(ShrinkError, match="between 1 and 5"):
            choose_layers("bi", bad, 6, scores)
    assert parse_layers("21,22, 25-27") == [21, 22, 25, 26, 27]
    with pytest.raises(ShrinkError):
        parse_layers("x")


def test_iterative_first_step_is_lowest_bi(tiny_model_dir):
    loaded = shrink.load_model(str(tiny_model_dir("llama")))
    ids = _ids()
    scores = shrink.score_layers(loaded.model, ids, show_progress=False)
    removed, steps = iterative_bi(loaded.model, ids, 3, show_progress=False)
    assert steps[0]["removed"] == scores.lowest("bi", 1)[0]
    assert len(removed) == 3 and len(set(removed)) == 3
    # step 2 scores equal scores of the model with step 1's layer removed
    with shrink.without_layers(loaded.model, [steps[0]["removed"]]):
        again = shrink.score_layers(loaded.model, ids, show_progress=False)
    assert steps[1]["bi"] == pytest.approx(again.bi)
    assert loaded.model.config.num_hidden_layers == 6


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_prune_writes_record_and_chains(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "p1"
    r = _run(
        [
            "prune",
            str(src),
            "--drop",
            "2",
            "--strategy",
            "bi",
            "-o",
            str(out),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert r.exit_code == 0, r.output
    record = json.loads((out / "shrink.json").read_text())
    stage = record["stages"][0]
    assert stage["stage"] == "prune" and len(stage["removed_layers"]) == 2
    assert stage["verification"]["ok"] and stage["scores"]["num_layers"] == 6
    assert stage["calibration"]["samples"] == 4
    assert (
        json.loads((tmp_path / "r.json").read_text())["result"]["removed_layers"]
        == stage["removed_layers"]
    )
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    # prune the pruned model: original numbering is kept across stages
    out2 = tmp_path / "missing-parent" / "p2"
    r = _run(["prune", str(out), "--layers", "0", "-o", str(out2), "--no-verify"])
    assert r.exit_code == 0, r.output
    rec2 = json.loads((out2 / "shrink.json").read_text())
    assert len(rec2["stages"]) == 2
    kept1 = stage["kept_original_layers"]
    assert rec2["stages"][1]["removed_original_layers"] == [kept1[0]]
    assert AutoConfig.from_pretrained(out2).num_hidden_layers == 3


@pytest.mark.parametrize("strategy", ["angular", "iterative", "last", "random", "relmag"])
def test_cli_prune_strategies(tiny_model_dir, tmp_path, strategy):
    out = tmp_path / strategy
    r = _run(
        [
            "prune",
            str(tiny_model_dir("qwen2")),
            "--drop",
            "2",
            "--strategy",
            strategy,
            "-o",
            str(out),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--no-verify",
        ]
    )
    assert r.exit_code == 0, r.output
    stage = json.loads((out / "shrink.json").read_text())["stages"][0]
    assert stage["strategy"] == strategy and len(stage["removed_layers"]) == 2


def _bad(args, cwd, expect, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "shrink.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and expect in proc.stderr, proc.stderr
    return proc


def test_bad_inputs(tiny_model_dir, tmp_path):
    from transformers import BertConfig

    src = str(tiny_model_dir("llama"))
    out = tmp_path / "out"
    _bad(
        ["prune", src, "--drop", "0", "-o", str(out)],
        tmp_path,
        "drop: Input should be greater than or equal to 1 (got 0)",
    )
    _bad(["prune", src, "--drop", "6", "-o", str(out)], tmp_path, "between 1 and 5")
    _bad(["prune", src, "--layers", "1,9", "-o", str(out)], tmp_path, "out of range")
    _bad(["prune", src, "--layers", "1,1", "-o", str(out)], tmp_path, "more than once")
    _bad(["prune", src, "--layers", "0-5", "-o", str(out)], tmp_path, "at least one must stay")
    _bad(
        ["prune", str(tmp_path / "missing"), "--drop", "1", "-o", str(out)],
        tmp_path,
        "no such model folder",
    )
    _bad(["prune", "not-an-alias", "--drop", "1", "-o", str(out)], tmp_path, "known alias")
    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(bert)
    _bad(["prune", str(bert), "--drop", "1", "-o", str(out)], tmp_path, "BertForMaskedLM")
    _bad(["score", str(tmp_path)], tmp_path, "not a model folder")
    _bad(["eval", src, "--data", str(tmp_path / "nope.txt")], tmp_path, "no such text source")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _bad(["prune", src, "--drop", "1", "-o", str(out)], tmp_path, "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "out"]  # no partial folders


def test_force_replaces_atomically(tiny_model_dir, tmp_path):
    out = tmp_path / "out"  # an earlier shrink output: --force may replace it, in one rename
    src = str(tiny_model_dir("mistral"))
    r = _run(["prune", src, "--layers", "1", "-o", str(out), "--no-verify"])
    assert r.exit_code == 0, r.output
    first = json.loads((out / "shrink.json").read_text())["stages"][-1]["removed_layers"]
    r = _run(["prune", src, "--layers", "2", "-o", str(out), "--force", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert first == [1]
    assert json.loads((out / "shrink.json").read_text())["stages"][-1]["removed_layers"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_force_never_replaces_other_work(tiny_model_dir, tmp_path):
    """--force replaces model folders only: not a folder of other files, a git checkout, the
    current folder or the home folder (a typo like '-o . --force' must not delete a project)."""
    src = str(tiny_model_dir("llama"))
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    (work / "config.json").write_text("{}")  # looks like a model folder, but it is the cwd
    for target in (work, tmp_path, "."):
        _bad(["prune", src, "--drop", "1", "-o", str(target), "--force"], work, "current or home")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text("{}")
    _bad(
        ["prune", src, "--drop", "1", "-o", "~", "--force"],
        tmp_path,
        "current or home",
        env={**os.environ, "HOME": str(home)},
    )
    assert (home / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    _bad(["prune", src, "--drop", "1", "-o", str(other), "--force"], tmp_path, "model folder")
    (other / "config.json").write_text("{}")
    (other / ".git").mkdir()
    _bad(["prune", src, "--drop", "1", "-o", str(other), "--force"], tmp_path, "git checkout")
    (other / ".git").rmdir()
    (other / "config.json").unlink()
    _bad(
        ["build", src, "--drop", "1", "--no-heal", "-o", str(other), "--force"],
        tmp_path,
        "model folder",
    )
    assert (work / "notes.txt").read_text() == "precious" and (work / "config.json").exists()
    assert (other / "data.csv").read_text() == "1,2"


def test_failed_verification_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import shrink.stages.prune as pruning

    def broken(path):
        raise ShrinkError("verification failed (simulated)")

    monkeypatch.setattr(pruning, "verify_in_subprocess", broken)
    with pytest.raises(ShrinkError, match="simulated"):
        pruning.prune(str(tiny_model_dir("llama")), tmp_path / "out", PruneConfig(layers=[1]))
    assert list(tmp_path.iterdir()) == []


def test_bridge_and_auto_through_the_prune_command(tiny_model_dir, tmp_path):
    """--bridge linear folds one map per removed run into the layer before it (the output is
    reloaded and checked in a fresh process); --strategy auto records every candidate."""
    src = str(tiny_model_dir("llama"))
    r = _run(
        [
            "prune",
            src,
            "--layers",
            "2,3,5",
            "--bridge",
            "linear",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "-o",
            str(tmp_path / "b"),
            "--json",
            "-",
        ]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["result"]
    assert [b["layers"] for b in out["bridge"]] == [[2, 3], [5]]
    assert [b["folded_into"] for b in out["bridge"]] == [1, 4]
    assert out["verification"]["ok"] and out["quality"]["ratio"] > 0
    r = _run(
        [
            "prune",
            src,
            "--drop",
            "2",
            "--strategy",
            "auto",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "-o",
            str(tmp_path / "a"),
            "--no-verify",
            "--json",
            "-",
        ]
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "a" / "shrink.json").read_text())["stages"][-1]
    auto = record["calibration"]["auto"]
    best = min(
        (c for c in auto["candidates"] if c["perplexity"] is not None),
        key=lambda c: c["perplexity"],
    )
    assert record["removed_layers"] == best["layers"] == auto["layers"]


def test_bridge_auto_bridges_where_the_architecture_allows(tiny_model_dir, tmp_path):
    """--bridge auto (shrink build's default): bridged on Llama, recorded as not bridged on
    Gemma 3 (its MLP output is normalised, so no linear map folds exactly) instead of failing,
    while --bridge linear on Gemma 3 is still refused."""
    common = ["--layers", "2,3", "--samples", "2", "--seq-len", "16", "--no-verify"]
    r = _run(
        [
            "prune",
            str(tiny_model_dir("llama")),
            *common,
            "--bridge",
            "auto",
            "-o",
            str(tmp_path / "llama"),
        ]
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "llama" / "shrink.json").read_text())["stages"][-1]
    assert record["settings"]["bridge"] == "auto"  # as asked
    assert [b["layers"] for b in record["bridge"]] == [[2, 3]] and "bridge_note" not in record
    gemma = str(tiny_model_dir("gemma3"))
    r = _run(["prune", gemma, *common, "--bridge", "auto", "-o", str(tmp_path / "gemma")])
    assert r.exit_code == 0, r.output
    assert "not bridged" in r.output
    record = json.loads((tmp_path / "gemma" / "shrink.json").read_text())["stages"][-1]
    assert "bridge" not in record and record["bridge_note"].startswith("not bridged")
    r = _run(["prune", gemma, *common, "--bridge", "linear", "-o", str(tmp_path / "g2")])
    assert r.exit_code == 2 and not (tmp_path / "g2").exists()
