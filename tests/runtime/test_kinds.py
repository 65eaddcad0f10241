"""The artifact-kind registry: every kind detected on a tiny artifact of its own, one clear line
when nothing matches, and a toy kind registered through the registry alone is scored, measured,
described, run and verified by the code that serves the real kinds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from shrink.core.errors import ShrinkError
from shrink.core.perplexity import PerplexityResult
from shrink.runtime import kinds
from shrink.runtime.kinds import Card, Kind

PACKAGE = Path(__file__).resolve().parents[2] / "shrink"


def test_builtin_kinds_are_registered():
    assert [k.name for k in kinds.all_kinds()][:4] == ["gguf", "onnx", "gptq", "hf"]
    assert kinds.get("gptq").lm_eval and not kinds.get("onnx").lm_eval
    with pytest.raises(ShrinkError, match="unknown artifact kind 'nope'"):
        kinds.get("nope")


def test_detect_each_kind(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("llama")
    assert kinds.detect(hf).name == "hf"
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}})
    )
    assert kinds.detect(gptq).name == "gptq"
    assert kinds.describe(gptq)["precision"] == "4-bit GPTQ, group size 32"
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"\0" * 10)
    assert kinds.detect(onnx).name == "onnx"
    assert kinds.describe(onnx)["weight_bytes"] == 10
    fake = tmp_path / "fake" / "m.gguf"  # detection reads the suffix; the magic is for loaders
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    assert kinds.detect(fake).name == "gguf" and kinds.detect(fake.parent).name == "gguf"
    assert kinds.artifact_kind(fake) == "gguf"


def test_detect_a_real_gguf(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    from shrink.stages.export.gguf import write_gguf

    folder = tmp_path / "g"
    folder.mkdir()
    write_gguf(tiny_model_dir("llama"), folder / "tiny-F32.gguf", "f32")
    assert kinds.detect(folder).name == "gguf"
    d = kinds.describe(folder)
    assert d["format"] == "GGUF" and d["weight_bytes"] == (folder / "tiny-F32.gguf").stat().st_size
    assert (folder / "tiny-F32.gguf").read_bytes()[:4] == b"GGUF"


def test_detect_says_one_line_when_nothing_matches(tmp_path):
    with pytest.raises(ShrinkError, match="not a model folder of any kind") as e:
        kinds.detect(tmp_path)
    assert "\n" not in str(e.value) and "gguf" in str(e.value)
    with pytest.raises(ShrinkError, match="not a folder"):
        kinds.detect(tmp_path / "missing")
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ShrinkError, match="quantized with 'awq'"):
        kinds.detect(awq)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ShrinkError, match="holds 2 GGUF files"):
        kinds.detect(two)


# --------------------------------------------------------------------------- a toy kind


class ToyKind(Kind):
    """A folder holding toy.json: a 'model' whose perplexity and timings are fixed numbers."""

    name = "toy"

    def __init__(self, tokenizer_dir: Path):
        self.tokenizer_dir = tokenizer_dir
        self.verified: list[dict] = []

    def detect(self, path: Path) -> bool:
        return (Path(path) / "toy.json").is_file()

    def perplexity(self, model, make_blocks, *, load=None, batch_size=4, show_progress=True):
        from transformers import AutoTokenizer

        ppl = json.loads((Path(model) / "toy.json").read_text())["perplexity"]
        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return [
            PerplexityResult(ppl, 0.0, b.num_tokens, 0.0, data=b.describe())
            for b in make_blocks(tok)
        ]

    def generate(self, path, prompt, max_new_tokens, temperature, top_p, seed, stream):
        text = prompt[::-1][:max_new_tokens]
        if stream is not None:
            stream(text)
        return text

    def measure(self, path, m):
        return {
            "ttft_s": 0.5,
            "decode_s": 1.0,
            "cpu_s": 1.5,
            "threads": m.threads,
            "peak_rss_bytes": 1,
            "gen_len": m.gen_len,
        }

    def verify(self, path, **kw):
        self.verified.append(kw)
        return {"ok": True, **kw}

    def describe(self, path):
        return {**super().describe(path), "format": "toy", "precision": "1-bit"}

    def card(self, report):
        return Card(
            tags=["shrink", "toy"],
            library="toylib",
            format="Toy",
            row="toy",
            made=", made into a toy",
            usage=["toy.load('.')"],
        )


@pytest.fixture
def toy(tmp_path, embedded_dir):
    kind = kinds.register_kind(ToyKind(embedded_dir))
    folder = tmp_path / "toy-artifact"
    folder.mkdir()
    (folder / "toy.json").write_text(json.dumps({"perplexity": 42.0}))
    (folder / "weights.bin").write_bytes(b"\0" * 123)
    yield kind, folder
    kinds.unregister_kind("toy")


def test_toy_kind_is_evaluated_without_edits_elsewhere(toy):
    from shrink.stages.configs import EvaluateConfig
    from shrink.stages.evaluate import evaluate

    _, folder = toy
    config = EvaluateConfig(samples=2, seq_len=16)
    r = evaluate(str(folder), config, show_progress=False)
    assert r.perplexity == 42.0 and r.second is not None and r.second.perplexity == 42.0
    assert r.data["set"] == config.name() and r.data["samples"] == 2
    assert r.second.data["set"] == config.name(config.second)


def test_toy_kind_is_benchmarked_described_and_run(toy):
    from shrink.runtime.generate import generate
    from shrink.runtime.lmeval import run_tasks
    from shrink.stages import bench as B

    kind, folder = toy
    path, name = B._resolve_artifact(str(folder))
    assert name == "toy" and path == folder.resolve()
    run = B.measure(str(folder), name, gen_len=7, threads=2)  # the worker side, in process
    assert run["decode_s"] == 1.0 and run["gen_len"] == 7 and run["threads"] == 2
    assert run["wall_s"] >= 0 and "rss_before_load_bytes" in run
    assert B.weight_file_bytes(folder, name) == 123
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert kinds.describe(folder) == {
        "kind": "toy",
        "format": "toy",
        "bytes": total,
        "weight_bytes": 123,
        "precision": "1-bit",
    }
    pieces: list[str] = []
    assert generate(folder, "abc", max_new_tokens=2, stream=pieces.append) == "cb"
    assert pieces == ["cb"]
    with pytest.raises(ShrinkError, match="run on gptq, hf artifacts, not toy"):
        run_tasks(folder, ["x"])
    assert kinds.verify(folder, source="s")["source"] == "s" and kind.verified == [{"source": "s"}]


def test_toy_kind_gets_its_card(toy):
    from shrink.report.modelcard import artifact_card, model_card

    report = {
        "base_model": None,
        "source_model": "/m/tiny",
        "shrink_version": "0",
        "num_layers": [6, 4],
        "params": [100, 80],
        "removed_layers": [1, 2],
        "strategy": "bi",
        "reason": "lowest",
        "sizes_bytes": {},
        "perplexity": {"dense": {"perplexity": 10.0}, "toy": {"perplexity": 42.0}},
        "export": {"toy": {"file": "x"}},
    }
    card = artifact_card(report, "toy")
    assert "library_name: toylib" in card and "- toy" in card and "(Toy)" in card
    assert "made into a toy." in card and "42.00 (dense: 10.00)" in card
    assert "toy.load('.')" in card
    assert "toy: `toy/`." in model_card(report, None, False, None)


def test_builtin_cards_follow_the_report():
    from shrink.report.modelcard import artifact_card

    report = {
        "base_model": None,
        "source_model": "/m/tiny",
        "shrink_version": "0",
        "num_layers": [6, 4],
        "removed_layers": [1, 2],
        "strategy": "bi",
        "quantize": {"bits": 4},
        "perplexity": {},
        "export": {"onnx": {}, "gguf": {"type": "q4_k_m", "file": "t.gguf"}},
    }
    gptq, onnx, gguf = (artifact_card(report, a) for a in ("model", "onnx", "gguf"))
    assert "- 4-bit" in gptq and "(GPTQ checkpoint)" in gptq and ", GPTQ 4-bit." in gptq
    assert "library_name: onnxruntime" in onnx and ", GPTQ 4-bit." in onnx
    assert "library_name: gguf" in gguf and "GPTQ" not in gguf and "- q4_k_m" in gguf
    assert "llama-cli -m t.gguf" in gguf
    del report["quantize"]
    assert "Hugging Face checkpoint (safetensors)" in artifact_card(report, "model")


def test_verify_dispatches_to_the_kind_in_a_fresh_process(tiny_model_dir):
    v = kinds.verify(tiny_model_dir("llama"))
    assert v["ok"] and v["num_layers"] == 6 and v["cache_matches_no_cache"]


def test_gguf_result_is_typed_and_reads_like_its_record(tmp_path):
    from shrink.stages.export.gguf import GgufResult

    r = GgufResult(
        tmp_path,
        tmp_path / "m.gguf",
        "m.gguf",
        "f16",
        10,
        4,
        "llama",
        {"ok": True},
        {"notes": ["n"], "type": "f16"},
    )
    assert r.type == "f16" and r["block_count"] == 4 and r["notes"] == ["n"]
    assert r.get("verification") == {"ok": True} and r.get("missing", 1) == 1
    assert json.loads(json.dumps(r.to_dict()))["path"] == str(tmp_path / "m.gguf")


# --------------------------------------------------------------------------- no kind strings


KIND_TEST = re.compile(
    r"""kind\s*[!=]=\s*["']|[!=]=\s*["'](hf|gptq|onnx|gguf)["']"""
    r"""|in\s*\(\s*["'](onnx|gguf)["']"""
)
# the files that asked the kind by name before the registry existed
ASKED_BY_NAME = (
    "stages/evaluate.py",
    "stages/bench.py",
    "runtime/generate.py",
    "runtime/lmeval.py",
    "report/modelcard.py",
    "stages/export/__init__.py",
)


def test_nothing_outside_runtime_compares_kind_names():
    """No artifact kind is compared by name outside shrink/runtime, and the files that used to
    branch on a kind's name do not compare kind names in any spelling."""
    by_name = re.compile(r"""kind\s*[!=]=\s*["'](hf|gptq|onnx|gguf)["']""")
    hits = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if "runtime" not in p.relative_to(PACKAGE).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if by_name.search(line)
    ]
    assert hits == []
    for rel in ASKED_BY_NAME:
        lines = (PACKAGE / rel).read_text().splitlines()
        assert [line for line in lines if KIND_TEST.search(line)] == [], rel


def test_kinds_are_tried_in_registration_order(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir("llama"), copy)
    (copy / "model.onnx").write_bytes(b"")  # ONNX is tried before HF
    assert kinds.detect(copy).name == "onnx"
