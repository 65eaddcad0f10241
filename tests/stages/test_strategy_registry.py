"""A strategy added through the registry alone reaches `shrink prune` and `shrink build`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shrink.cli import main
from shrink.stages.strategies import STRATEGIES, Selection, register_strategy


@pytest.fixture
def toy_strategy():
    @register_strategy("toy-middle", help="the N layers around the middle (a test strategy)")
    def middle(sel: Selection):
        start = (sel.num_layers - sel.n) // 2
        return list(range(start, start + sel.n)), "the middle of the stack"

    yield "toy-middle"
    STRATEGIES.pop("toy-middle")


def test_toy_strategy_runs_through_prune_and_build(toy_strategy, tiny_model_dir, tmp_path):
    src = str(tiny_model_dir("llama"))
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "prune",
            src,
            "--drop",
            "2",
            "--strategy",
            toy_strategy,
            "-o",
            str(tmp_path / "p"),
            "--no-verify",
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["result"]
    assert out["removed_layers"] == [2, 3] and out["strategy"] == toy_strategy
    res = runner.invoke(
        main,
        [
            "build",
            src,
            "--drop",
            "2",
            "--strategy",
            toy_strategy,
            "--no-heal",
            "--eval-samples",
            "1",
            "--eval-seq-len",
            "16",
            "-o",
            str(tmp_path / "b"),
            "--json",
            "-",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["result"]
    assert report["removed_layers"] == [2, 3] and report["strategy"] == toy_strategy
    assert "toy-middle" in runner.invoke(main, ["prune", "--help"]).output


def test_unknown_strategy_is_one_clear_line(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "prune",
            str(tiny_model_dir("llama")),
            "--drop",
            "2",
            "--strategy",
            "nope",
            "-o",
            str(tmp_path / "p"),
        ],
    )
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output


def test_a_strategy_returning_bad_layers_is_refused(tiny_model_dir, tmp_path):
    @register_strategy("toy-bad", help="returns a duplicate")
    def bad(sel: Selection):
        return [0, 0], "broken"

    try:
        res = CliRunner().invoke(
            main,
            [
                "prune",
                str(tiny_model_dir("llama")),
                "--drop",
                "2",
                "--strategy",
                "toy-bad",
                "-o",
                str(tmp_path / "p"),
            ],
        )
        assert res.exit_code == 2 and "not 2 distinct layers" in res.output
        assert not (tmp_path / "p").exists()
    finally:
        STRATEGIES.pop("toy-bad")
