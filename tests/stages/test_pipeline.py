"""The build is a loop over registered stages: a stage added through the registry alone (this
module's ToyStage plus one register_stage call) runs inside a real build, and shows in the plan,
the default output name, report.json and the resume markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from shrink.core.errors import ShrinkError
from shrink.stages.build import build, default_output, plan, validate
from shrink.stages.configs import BuildConfig, Config, EvaluateConfig, PruneConfig
from shrink.stages.pipeline import (
    Artifact,
    Stage,
    build_stages,
    register_stage,
    stage_names,
    unregister_stage,
)
from shrink.stages.recipes import recipe_config

FAST_PRUNE = {
    "drop": 1,
    "strategy": "last",
    "bridge": "none",
    "samples": 2,
    "seq_len": 32,
    "guard": 0,
}
FAST_EVAL = EvaluateConfig(samples=1, seq_len=32, second=None)


class ToyConfig(Config):
    note: str = Field("hello", description="A word the toy stage writes.")


class ToyStage(Stage):
    """Writes a note beside the current model and publishes it as its own folder."""

    name = "toy"
    config_class = ToyConfig
    runs = 0

    def describe(self, ctx) -> str:
        return f"toy (writes '{self.settings(ctx).note}')"

    def output_part(self, config) -> str:
        return "toy"

    def run(self, ctx, work_dir: Path) -> dict:
        ToyStage.runs += 1
        folder = work_dir / "note"
        folder.mkdir()
        (folder / "note.txt").write_text(f"{self.settings(ctx).note} after {ctx.model}")
        return {"path": str(folder), "model_seen": ctx.model}

    def apply(self, ctx, result: dict) -> None:
        ctx.add(Artifact("note", Path(result["path"]), "toy", publish="toy", measured=False))

    def report(self, ctx, result: dict) -> dict:
        return {"toy": {"note": self.settings(ctx).note}, "sizes_bytes": {"toy": 1}}

    def absent_report(self, ctx) -> dict:
        return {"toy": None}


@pytest.fixture
def toy():
    register_stage(ToyStage(), after="prune")
    ToyStage.runs = 0
    yield
    if "toy" in stage_names():
        unregister_stage("toy")


def _config(src: Path, **more) -> BuildConfig:
    return recipe_config(
        {
            "model": str(src),
            "prune": FAST_PRUNE,
            "heal": None,
            "evaluate": FAST_EVAL.settings(),
            **more,
        }
    )


def test_toy_stage_runs_in_a_build(toy, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", layers=3)
    c = _config(src, toy={"note": "hi"})
    assert [s.name for s in build_stages(c)] == ["prune", "toy", "evaluate"]
    assert default_output(c) == f"{src.name}-drop1-toy"
    ctx = validate(c)
    text = plan(ctx, build_stages(c), tmp_path / "o", 0)
    assert "2. toy (writes 'hi')" in text and "3. evaluate" in text
    out = tmp_path / "o"
    r = build(c, output=out, keep_stages=True, show_progress=False)
    assert [s.name for s in r.stages] == ["prune", "toy", "evaluate"]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["prune", "toy", "evaluate"]
    assert report["toy"] == {"note": "hi"} and report["sizes_bytes"]["toy"] == 1
    assert report["settings"]["registered"] == {"toy": {"note": "hi"}}
    assert report["artifacts"] == {"model": "model", "toy": "toy"}
    # the toy ran after prune, on the pruned model, and its folder was published
    marker = json.loads((out / "stages" / "02-toy" / "done.json").read_text())
    assert marker["stage"] == "toy" and marker["info"]["model_seen"].endswith("01-prune/model")
    assert (out / "toy" / "note.txt").read_text().startswith("hi after")
    assert set(report["perplexity"]) == {"dense", "pruned"}  # the note is not a model
    # resume: every marker matches; a changed toy setting reruns the toy and what follows
    r = build(c, output=out, resume=True, keep_stages=True, show_progress=False)
    assert all(s.skipped for s in r.stages) and ToyStage.runs == 1
    r = build(
        _config(src, toy={"note": "bye"}),
        output=out,
        resume=True,
        keep_stages=True,
        show_progress=False,
    )
    assert {s.name: s.skipped for s in r.stages} == {"prune": True, "toy": False, "evaluate": False}
    assert (out / "toy" / "note.txt").read_text().startswith("bye after")


def test_unregister_and_unknown_sections(toy, tiny_model_dir):
    src = tiny_model_dir("llama", layers=3)
    c = _config(src)  # no toy section: the toy stage stays off
    assert [s.name for s in build_stages(c)] == ["prune", "evaluate"]
    with pytest.raises(ShrinkError, match=r"toy\.note: Input should be a valid string"):
        build_stages(_config(src, toy={"note": [1]}))
    unregister_stage("toy")
    assert "toy" not in stage_names()
    with pytest.raises(ShrinkError, match="unknown setting"):
        _config(src, toy={"note": "hi"})
    with pytest.raises(ShrinkError, match="no stage 'toy'"):
        unregister_stage("toy")
    with pytest.raises(ShrinkError, match="no stage 'nowhere'"):
        register_stage(ToyStage(), after="nowhere")
    with pytest.raises(ShrinkError, match="not a build stage"):
        register_stage("shrink.stages.configs:BuildConfig")


def test_stages_come_from_the_registry_in_order():
    assert stage_names()[:5] == ["prune", "heal", "quantize", "export", "evaluate"]
    c = BuildConfig(prune=PruneConfig(drop=2))
    assert [s.name for s in build_stages(c)] == ["prune", "heal", "evaluate"]
    assert [s.name for s in build_stages(c.model_copy(update={"prune": None}))] == [
        "heal",
        "evaluate",
    ]


def test_build_py_branches_on_no_stage_or_kind_name():
    text = (Path(__file__).resolve().parents[2] / "shrink" / "stages" / "build.py").read_text()
    assert 'name == "' not in text and 'kind == "' not in text


def test_build_without_prune(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", layers=3)
    c = recipe_config(
        {"model": str(src), "prune": None, "heal": None, "evaluate": FAST_EVAL.settings()}
    )
    assert default_output(c) == src.name
    out = tmp_path / "o"
    r = build(c, output=out, show_progress=False)
    assert [s.name for s in r.stages] == ["evaluate"]
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == [3, 3] and report["removed_layers"] == []
    assert set(report["perplexity"]) == {"dense"} and report["params"][0] > 0
    assert (out / "model" / "config.json").is_file() and "0 of 3 layers" in (
        out / "README.md"
    ).read_text()
