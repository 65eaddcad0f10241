"""shrink build: recipes, early validation, stage markers, resume after SIGINT/SIGKILL with the
same final weights, model card and report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from shrink.cli import main
from shrink.core.errors import ShrinkError
from shrink.stages.build import build, default_output, load_recipe, recipe_config
from shrink.stages.configs import BuildConfig, ExportConfig, PruneConfig, QuantizeConfig

FAST = [
    "--prune-samples",
    "2",
    "--prune-seq-len",
    "32",
    "--eval-samples",
    "1",
    "--eval-seq-len",
    "64",
]
HEAL_FAST = ["--steps", "4", "--heal-batch-size", "2", "--heal-seq-len", "32", "--rank", "4"]
GPTQ_FAST = [
    "--gptq",
    "4bit",
    "--group-size",
    "32",
    "--quantize-samples",
    "4",
    "--quantize-seq-len",
    "32",
]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_shipped_recipes_are_valid():
    for name in ("smollm2-135m", "shortgpt-llama-2-13b", "gromov-llama-2-70b"):
        config, text = load_recipe(name)
        assert config.prune.drop and config.model and text.strip()
    s, _ = load_recipe("shortgpt-llama-2-13b")
    assert (s.model, s.prune.drop, s.prune.strategy, s.heal) == ("llama-2-13b", 10, "bi", None)
    g, _ = load_recipe("gromov-llama-2-70b")
    assert (g.prune.drop, g.prune.strategy, g.heal.method, g.heal.preset, g.quantize.gptq) == (
        40,
        "angular",
        "qlora",
        "gromov",
        "4bit",
    )


def test_recipe_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: smollm2-135m\nprune: {drop: 2}\nheal: {stepz: 3}\n")
    with pytest.raises(ShrinkError, match=r"heal\.stepz: unknown setting"):
        load_recipe(str(bad))
    bad.write_text("drop: [1\n")
    with pytest.raises(ShrinkError, match="not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(ShrinkError, match="no recipe"):
        load_recipe("nope")
    with pytest.raises(ShrinkError, match=r"prune\.drop: Input should be a valid integer"):
        recipe_config({"prune": {"drop": "two"}})
    with pytest.raises(ShrinkError, match=r"heal: Input should be a valid dictionary"):
        recipe_config({"heal": "yes"})


def test_bad_settings_fail_before_any_stage(tiny_model_dir, tmp_path):
    src = str(tiny_model_dir("llama"))
    two = {"model": src, "prune": {"drop": 2}}
    cases = [
        ({"model": src, "prune": {"drop": 6}}, "between 1 and 5"),
        ({**two, "quantize": {"gptq": "5bit"}}, "bit"),
        ({**two, "export": {"onnx": "int4", "target": "tpu"}}, "target"),
        ({**two, "export": {"onnx": "fp16", "target": "cpu"}}, "cuda"),
        ({**two, "export": {"onnx": "int4", "lm_head": "fp8"}}, "lm_head"),
        ({**two, "prune": {"drop": 2, "strategy": "magic"}}, "strategy"),
        (
            {**two, "heal": {"steps": 0}},
            r"heal\.steps: Input should be greater than or equal to 1 \(got 0\)",
        ),
        ({"model": src, "prune": {}}, "--drop"),
    ]
    for values, message in cases:
        with pytest.raises(ShrinkError, match=message):
            build(recipe_config(values), output=tmp_path / "out", show_progress=False)
        assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("keep")
    for force in (False, True):
        with pytest.raises(ShrinkError, match="is a file"):
            build(
                BuildConfig(model=src, prune=PruneConfig(drop=2)),
                output=tmp_path / "file",
                force=force,
                show_progress=False,
            )
    assert (tmp_path / "file").read_text() == "keep"


def test_disk_space_checked_first(tiny_model_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1))
    with pytest.raises(ShrinkError, match="not enough disk space"):
        build(
            BuildConfig(model=str(tiny_model_dir("llama")), prune=PruneConfig(drop=2)),
            output=tmp_path / "o",
            show_progress=False,
        )
    assert not (tmp_path / "o").exists()


def test_default_output_name():
    s = BuildConfig(
        model="meta-llama/Llama-2-13b-hf",
        prune=PruneConfig(drop=10),
        quantize=QuantizeConfig(gptq="4bit"),
        export=ExportConfig(onnx="int4"),
    )
    assert default_output(s) == "Llama-2-13b-hf-drop10-healed-gptq4-onnx-int4"


def test_build_no_heal_card_report_and_resume(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3")
    out = tmp_path / "not-yet" / "b"  # missing parents are created
    r = CliRunner().invoke(
        main,
        ["build", str(src), "--drop", "2", "--no-heal", "-o", str(out), "--keep-stages", *FAST],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == [6, 4] and len(report["removed_layers"]) == 2
    assert set(report["perplexity"]) == {"dense", "pruned"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-generation" in card
    assert "- pruned" in card and "## Perplexity" in card and "shrink build --config" in card
    assert (out / "recipe.yaml").exists()
    assert (out / "scores.png").exists()
    # the final model reloads and generates in a fresh process
    from shrink.runtime.verify import verify_in_subprocess

    assert verify_in_subprocess(out / "model")["ok"]
    # a second run refuses without --resume/--force; with --resume it skips everything
    r = CliRunner().invoke(
        main, ["build", str(src), "--drop", "2", "--no-heal", "-o", str(out), *FAST]
    )
    assert r.exit_code == 2 and "--resume" in r.output
    before = _digest(out / "model")
    r = CliRunner().invoke(
        main,
        [
            "build",
            str(src),
            "--drop",
            "2",
            "--no-heal",
            "-o",
            str(out),
            "--resume",
            "--keep-stages",
            *FAST,
            "--json",
            "-",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert all(s["skipped"] for s in json.loads(r.stdout)["result"]["stages"])
    # a changed evaluation setting reruns only the evaluate stage
    r = CliRunner().invoke(
        main,
        [
            "build",
            str(src),
            "--drop",
            "2",
            "--no-heal",
            "-o",
            str(out),
            "--resume",
            "--keep-stages",
            *FAST[:-1],
            "32",
            "--json",
            "-",
        ],
        catch_exceptions=False,
    )
    stages = {s["name"]: s["skipped"] for s in json.loads(r.stdout)["result"]["stages"]}
    assert stages == {"prune": True, "evaluate": False}
    assert _digest(out / "model") == before


def _run_until(args: list[str], cwd: Path, marker: Path, sig: int, timeout: float = 300) -> int:
    """Start `shrink build`, wait until `marker` exists, send `sig`; return the exit code."""
    env = {**os.environ, "SHRINK_NO_PROGRESS": "1"}
    # like a shell starting a foreground job: SIGINT at its default disposition in the child.
    # In two full-suite runs (never alone) both SIGINT cases saw the build finish with 0, as if
    # it had inherited an ignored SIGINT; the cause inside the suite is not identified yet.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shrink.cli", "build", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"build ended before {marker}: {proc.stderr.read().decode()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{marker} never appeared")
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


STAGE_CASES = [
    ("prune", signal.SIGKILL, []),
    ("prune", signal.SIGINT, []),
    ("heal", signal.SIGKILL, ["peft"]),
    ("heal", signal.SIGINT, ["peft"]),
    ("quantize", signal.SIGKILL, ["gptqmodel"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage,sig,needs", STAGE_CASES, ids=[f"{s}-{g.name}" for s, g, _ in STAGE_CASES]
)
def test_kill_and_resume_gives_identical_weights(tiny_model_dir, tmp_path, stage, sig, needs):
    for module in needs:
        pytest.importorskip(module)
    src = str(tiny_model_dir("llama"))
    args = [src, "--drop", "2", *FAST]
    if stage in ("heal", "quantize"):
        args += HEAL_FAST
    else:
        args += ["--no-heal"]
    if stage == "quantize":
        args += GPTQ_FAST
    ref = tmp_path / "ref"
    r = CliRunner().invoke(main, ["build", *args, "-o", str(ref)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "killed"
    index = {"prune": 1, "heal": 2, "quantize": 3}[stage]
    stage_dir = out / "stages" / f"{index:02d}-{stage}"
    code = _run_until([*args, "-o", str(out)], tmp_path, stage_dir, sig)
    assert code != 0  # it was interrupted
    assert not (out / "model").exists() and not (stage_dir / "done.json").exists()
    r = CliRunner().invoke(
        main, ["build", *args, "-o", str(out), "--resume"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert _digest(out / "model") == _digest(ref / "model")


@pytest.mark.slow
def test_build_all_stages_tiny(tiny_model_dir, tmp_path):
    for module in ("peft", "gptqmodel", "onnxruntime_genai"):
        pytest.importorskip(module)
    out = tmp_path / "all"
    r = CliRunner().invoke(
        main,
        [
            "build",
            str(tiny_model_dir("llama")),
            "--drop",
            "2",
            "-o",
            str(out),
            *FAST,
            *HEAL_FAST,
            *GPTQ_FAST,
            "--onnx",
            "int4",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == [
        "prune",
        "heal",
        "quantize",
        "export",
        "evaluate",
    ]
    assert set(report["perplexity"]) >= {"dense", "pruned", "healed", "quantized", "onnx"}
    # each stage's resident peak, its own and its fresh processes' (every stage here verifies
    # its output in one, except evaluate)
    peaks = {s["name"]: s["peak_rss_bytes"] for s in report["stages"]}
    assert all(p["main"] > 100e6 for p in peaks.values())
    assert all(peaks[n]["workers"] > 100e6 for n in ("prune", "heal", "quantize", "export"))
    # stages/ is gone: the report points at the copies in OUT, and at nothing for the removed
    assert not (out / "stages").exists()
    paths = {k: row["path"] for k, row in report["perplexity"].items()}
    assert paths["quantized"] == str(out / "model") and paths["onnx"] == str(out / "onnx")
    assert paths["pruned"] is None and paths["healed"] is None
    assert report["quantize"]["bits"] == 4 and report["export"]["onnx"]["kv_cache"]
    card = (out / "README.md").read_text()
    for tag in ("- gptq", "- onnx", "- lora-healed"):
        assert tag in card
    assert report["export"]["onnx"]["lm_head"] == "int8" and "int4, LM head int8" in card
    record = json.loads((out / "model" / "shrink.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["prune", "heal", "quantize"]
    # the final artifacts run in their real consumers, in fresh processes
    from shrink.runtime import kinds

    assert kinds.verify(out / "model", eval_data=None)["finite_logits"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shrink.cli",
            "generate",
            str(out / "onnx"),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob(".*"))  # nothing written beside OUT


@pytest.mark.slow
def test_build_embedded_default_recipe_shortened(tmp_path, embedded_dir):
    """The no-argument recipe end to end on the real SmolLM2, with shorter budgets."""
    for module in ("peft", "llama_cpp"):
        pytest.importorskip(module)
    out = tmp_path / "smol"
    r = CliRunner().invoke(
        main,
        [
            "build",
            "--config",
            "smollm2-135m",
            "-o",
            str(out),
            "--steps",
            "2",
            "--heal-seq-len",
            "64",
            "--prune-samples",
            "4",
            "--imatrix-samples",
            "2",
            "--eval-samples",
            "1",
            "--eval-seq-len",
            "128",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == [30, 24]
    gguf = report["export"]["gguf"]
    assert gguf["type"] == "iq4_nl" and gguf["imatrix"] and (out / "gguf").is_dir()
    # the dense model through the same type, measured on the same blocks, beside this one
    assert gguf["comparison"]["dense"]["bytes"] > gguf["size_bytes"]
    # the file measured beside the dense model is not measured again by evaluate
    ledger = report["perplexity_book"]["ledger"]
    assert [r["by"] for r in ledger if "gguf" in r["what"]] == ["export", "export"]
    assert len({(r["key"], r["set"]) for r in ledger}) == len(ledger)
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "license: apache-2.0" in (out / "README.md").read_text()
    ppl = {k: v["perplexity"] for k, v in report["perplexity"].items()}
    assert ppl["dense"] < ppl["pruned"] and all(v < 1000 for v in ppl.values())
