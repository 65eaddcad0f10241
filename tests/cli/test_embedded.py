"""End to end on the real embedded SmolLM2-135M (a 30-layer Llama): score, prune, eval."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shrink.cli import main

pytestmark = pytest.mark.slow


def test_score_prune_eval(tmp_path, embedded_dir):
    run = CliRunner().invoke
    r = run(
        main,
        [
            "score",
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--drop",
            "6",
            "--json",
            str(tmp_path / "s.json"),
            "--plot",
            str(tmp_path / "s.png"),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())["result"]
    assert len(s["bi"]) == 30 and len(s["chosen"]) == 6 and s["tokens"] == 4 * 63
    assert (tmp_path / "s.png").stat().st_size > 10_000
    out = tmp_path / "smol-24"
    r = run(
        main,
        ["prune", "--drop", "6", "--samples", "4", "--seq-len", "64", "-o", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    stage = json.loads((out / "shrink.json").read_text())["stages"][0]
    assert stage["removed_layers"] == s["chosen"]  # same data, same seed, same choice
    assert stage["verification"]["num_layers"] == 24
    r = run(
        main,
        ["eval", str(out), "--samples", "2", "--seq-len", "128", "--json", "-"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    pruned = json.loads(r.stdout)["result"]
    r = run(
        main, ["eval", "--samples", "2", "--seq-len", "128", "--json", "-"], catch_exceptions=False
    )
    dense = json.loads(r.stdout)["result"]
    assert 5 < dense["perplexity"] < pruned["perplexity"] < 10 * dense["perplexity"]
