"""shrink frontier: the run's own logic, the budget rewrite of a build, and (slow) a whole tiny
frontier measured through the real commands in fresh processes."""

import json

import pytest

from shrink.analysis.frontier import Point
from shrink.core.errors import ShrinkError
from shrink.stages.configs import BuildConfig
from shrink.stages.frontier import FrontierConfig, _flags, budget_config, layer_drops, load_frontier


def pt(label, mb, p, t, drop=0, healed=False, fmt="iq4_nl", imatrix=True, tps=None):
    fam = (
        ("pruned-healed" if healed else "pruned")
        if drop
        else ("dense-healed" if healed else "dense")
    )
    return Point(
        label=label,
        family=fam,
        drop=drop,
        healed=healed,
        format=fmt,
        imatrix=imatrix,
        bytes=int(mb * 1e6),
        ppl={"P": p, "T": t},
        decode_tps=tps,
    )


POINTS = [
    pt("dense f16", 270, 44.9, 18.7, fmt="f16", tps=40),
    pt("dense iq4_nl", 92, 47.9, 20.4, tps=90),
    pt("dense q2_k plain", 88, 58.8, 26.2, fmt="q2_k", imatrix=False, tps=92),
    pt("drop 3 healed q2_k", 80, 52.0, 22.5, drop=3, healed=True, fmt="q2_k", tps=100),
    pt("drop 3 q2_k", 80, 60.0, 27.0, drop=3, fmt="q2_k", tps=100),
]


def test_layer_drops():
    assert layer_drops([0.1, 0.2, 0.3], 30) == [3, 6, 9]
    assert layer_drops([6, 0.2], 30) == [6]
    with pytest.raises(ShrinkError, match="cannot be removed"):
        layer_drops([30], 30)


def test_flags_are_the_cli_names():
    assert _flags(
        {
            "drop": 6,
            "seq_len": 256,
            "bridge": "auto",
            "imatrix": False,
            "layers": None,
            "threads": [1, 2],
        }
    ) == ["--drop", "6", "--seq-len", "256", "--bridge", "auto", "--no-imatrix", "--threads", "1,2"]


def test_config_refuses_bad_depths_and_splits_lists():
    c = FrontierConfig(depths="0.1,6", pruned_types="q2_k, iq4_nl")
    assert c.depths == [0.1, 6.0] and c.pruned_types == ["q2_k", "iq4_nl"]
    with pytest.raises(Exception, match="depths"):
        FrontierConfig(depths=[-1])


def test_budget_rewrites_the_build_to_the_chosen_point():
    base = BuildConfig()
    config, choice = budget_config(base, POINTS, target_size="85MB")
    assert choice.chosen.label == "drop 3 healed q2_k"
    assert config.prune.drop == 3 and config.heal is not None
    assert config.export.gguf == "q2_k" and config.export.imatrix
    assert config.quantize is None
    assert {p.label for p, _ in choice.rejected} == {p.label for p in POINTS} - {
        choice.chosen.label
    }
    # a budget a dense file meets best: no pruning, no healing
    config, choice = budget_config(base, POINTS, target_size="95MB")
    assert choice.chosen.label == "dense iq4_nl"
    assert config.prune is None and config.heal is None and config.export.gguf == "iq4_nl"
    # speed relative to the dense reference
    config, choice = budget_config(base, POINTS, target_speed="2.4x")  # >= 96 tok/s
    assert choice.chosen.label == "drop 3 healed q2_k"


def test_budget_refuses_what_nothing_meets():
    with pytest.raises(ShrinkError, match="smallest measured is drop 3"):
        budget_config(BuildConfig(), POINTS, target_size="10MB")


def test_load_frontier(tmp_path):
    (tmp_path / "frontier.json").write_text(json.dumps({"points": [p.to_dict() for p in POINTS]}))
    assert [p.label for p in load_frontier(tmp_path)] == [p.label for p in POINTS]
    with pytest.raises(ShrinkError, match="run 'shrink frontier"):
        load_frontier(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ShrinkError, match="not a frontier.json"):
        load_frontier(tmp_path / "bad.json")


@pytest.mark.slow
def test_a_tiny_frontier_end_to_end(tiny_model_dir, tmp_path):
    """Two dense types, one depth healed and unhealed, the control, speed: every point measured
    through the real commands, the report written, and the front marked."""
    from shrink.stages.frontier import frontier

    model = tiny_model_dir("llama", layers=4)
    config = FrontierConfig(
        dense_types=["f16", "q8_0"],
        plain_types=["q8_0"],
        depths=[1],
        pruned_types=["q8_0"],
        repeats=1,
    )
    result = frontier(str(model), tmp_path / "f", config)
    labels = [p["label"] for p in result["points"]]
    assert labels == [
        "dense f16",
        "dense q8_0",
        "dense q8_0 plain",
        "dense healed q8_0",
        "drop 1 q8_0",
        "drop 1 healed q8_0",
    ]
    for p in result["points"]:
        assert p["bytes"] > 0 and len(p["ppl"]) == 2 and p["decode_tps"] > 0
    pruned = next(p for p in result["points"] if p["label"] == "drop 1 q8_0")
    dense = next(p for p in result["points"] if p["label"] == "dense q8_0")
    assert pruned["bytes"] < dense["bytes"]
    for name in ("frontier.json", "frontier.md", "frontier-size.png", "frontier-speed.png"):
        assert (tmp_path / "f" / name).is_file()
    assert "Does pruning pay?" in (tmp_path / "f" / "frontier.md").read_text()
    # resumable: a second run reuses every step's result
    again = frontier(str(model), tmp_path / "f", config)
    assert [p["ppl"] for p in again["points"]] == [p["ppl"] for p in result["points"]]


def test_build_to_a_budget_plans_the_chosen_artifact(tmp_path, tiny_model_dir):
    """`shrink build --target-size` reads the frontier, prints the choice and every rejected
    candidate, and builds (here: plans) the chosen depth and type."""
    from click.testing import CliRunner

    from shrink.cli import main

    model = tiny_model_dir("llama", layers=6)
    (tmp_path / "frontier.json").write_text(json.dumps({"points": [p.to_dict() for p in POINTS]}))
    r = CliRunner().invoke(
        main, ["build", str(model), "--target-size", "85MB", "--frontier", str(tmp_path), "--plan"]
    )
    assert r.exit_code == 0, r.output
    assert "chosen: drop 3 healed q2_k" in r.output
    assert "rejected: dense iq4_nl: 92.0 MB is over 85.0 MB" in r.output
    assert "3 of 6 layers" in r.output and "GGUF" in r.output and "q2_k" in r.output
    missing = CliRunner().invoke(
        main, ["build", str(model), "--target-size", "85MB", "--frontier", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "run 'shrink frontier" in missing.output


def test_the_report_says_whether_the_build_met_its_budget():
    from shrink.report.buildreport import budget_outcome
    from shrink.report.modelcard import budget_lines

    budget = {"max_bytes": 85_000_000, "lines": ["budget: at most 85.0 MB", "chosen: x"]}
    ok = budget_outcome(budget, {"export": {"gguf": {"size_bytes": 80_000_000}}})
    assert ok["within_size"] is True and ok["made_bytes"] == 80_000_000
    over = budget_outcome(budget, {"export": {"gguf": {"size_bytes": 90_000_000}}})
    assert over["within_size"] is False
    card = "\n".join(budget_lines(over))
    assert "## Built to a budget" in card and "OVER the budget" in card and "chosen: x" in card
