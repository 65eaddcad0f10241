"""GPTQ through GPTQModel: the output is a standard GPTQ folder that transformers reloads in a fresh
process and generates with; bad input fails in one line and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec

import pytest
from click.testing import CliRunner

from shrink.cli import main
from shrink.core.errors import ShrinkError
from shrink.runtime import gptq as gptq_runtime
from shrink.stages.configs import EvaluateConfig, QuantizeConfig, make
from shrink.stages.quantize import choose_group_size, quantize

HAS_GPTQ = find_spec("gptqmodel") is not None and find_spec("optimum") is not None


@pytest.fixture
def needs_gptq():
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# --- no weights needed ---


def test_parse_bits():
    assert [QuantizeConfig(gptq=x).bits() for x in ("4bit", "4", 8, "3bit", "2-bit")] == [
        4,
        4,
        8,
        3,
        2,
    ]
    for bad in ("5bit", "16", "four", "1bit"):
        with pytest.raises(ShrinkError, match=f"gptq: '{bad}' is not a GPTQ bit width"):
            make(QuantizeConfig, {"gptq": bad})


def test_group_size_fits_smollm2_widths():
    # SmolLM2-135M: q/k/v/o/gate/up take 576 inputs, down_proj 1536; 128 does not divide 576
    linears = {
        "model.layers.0.self_attn.q_proj": (576, 576),
        "model.layers.0.mlp.down_proj": (1536, 576),
    }
    g, note = choose_group_size(linears, None)
    assert g == 64 and "128 does not divide the input width 576" in note
    assert choose_group_size(linears, 32) == (32, None)
    assert choose_group_size(linears, -1) == (-1, None)
    with pytest.raises(
        ShrinkError,
        match=r"group size 128 does not divide the input width 576 of "
        r"model\.layers\.0\.self_attn\.q_proj.*64, 32, 16",
    ):
        choose_group_size(linears, 128)
    big = {"a": (4096, 4096), "b": (11008, 4096)}
    assert choose_group_size(big, None) == (128, None)


def test_bad_bits_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = _run(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--gptq", "5bit"])
    assert r.exit_code == 2 and "gptq: '5bit' is not a GPTQ bit width" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_extra(tiny_model_dir, tmp_path, monkeypatch):
    real = gptq_runtime.find_spec
    monkeypatch.setattr(
        gptq_runtime, "find_spec", lambda name: None if name == "gptqmodel" else real(name)
    )
    out = tmp_path / "q"
    r = _run(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--gptq", "4bit"])
    assert r.exit_code == 2
    assert "pip install -e '.[gptq]'" in r.output and "gptqmodel" in r.output
    assert not out.exists()


def test_bad_group_size_and_damp(tiny_model_dir, tmp_path, needs_gptq):
    src = str(tiny_model_dir("llama"))
    out = tmp_path / "q"
    r = _run(["quantize", src, "-o", str(out), "--gptq", "4bit", "--group-size", "48"])
    assert r.exit_code == 2
    assert "group size 48 does not divide the input width 64 of model.layers.0" in r.output
    assert "64, 32, 16" in r.output
    r = _run(["quantize", src, "-o", str(out), "--gptq", "4bit", "--damp", "1.5"])
    assert r.exit_code == 2 and "damp: Input should be less than 1 (got 1.5)" in r.output
    assert not out.exists()


def test_output_exists(tiny_model_dir, tmp_path, needs_gptq):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _run(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--gptq", "4bit"])
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- real quantization of a tiny model ---


@pytest.fixture(scope="module")
def tiny_gptq(tiny_model_dir, tmp_path_factory):
    if not HAS_GPTQ:
        pytest.skip("gptqmodel / optimum not installed")
    out = tmp_path_factory.mktemp("gptq") / "tiny-q4"
    r = _run(
        [
            "quantize",
            str(tiny_model_dir("llama")),
            "-o",
            str(out),
            "--gptq",
            "4bit",
            "--group-size",
            "32",
            "--samples",
            "8",
            "--seq-len",
            "64",
            "--eval-samples",
            "2",
            "--eval-seq-len",
            "64",
            "--json",
            "-",
        ]
    )
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)["result"]


def test_tiny_quantize_record_and_layout(tiny_gptq):
    out, result = tiny_gptq
    assert result["bits"] == 4 and result["group_size"] == 32 and result["group_size_note"] is None
    # 6 layers x 7 Linears (q, k, v, o, gate, up, down)
    assert result["quantized_linears"] == 42
    # 4 bits + fp16 scale and packed 4-bit zero per 32 columns + int32 g_idx per input row
    assert 4.5 < result["bits_per_weight"] < 6
    assert result["size_bytes_after"] < result["size_bytes_before"]
    assert result["perplexity_before"] > 0 and result["perplexity_after"] > 0
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (
        "gptq",
        4,
        32,
        False,
        True,
    )
    assert (out / "tokenizer.json").is_file() and list(out.glob("*.safetensors"))
    assert not list(out.parent.glob(".tiny-q4.partial-*"))
    record = json.loads((out / "shrink.json").read_text())
    stage = record["stages"][-1]
    assert stage["stage"] == "quantize" and stage["method"] == "gptq"
    for key in (
        "bits",
        "group_size",
        "desc_act",
        "sym",
        "damp",
        "calibration",
        "size_bytes_after",
        "bits_per_weight",
        "perplexity_before",
        "perplexity_after",
        "verification",
    ):
        assert stage[key] is not None, key
    assert stage["verification"]["finite_logits"] and stage["verification"]["generated_tokens"] > 0


def test_tiny_reload_in_fresh_transformers_process(tiny_gptq):
    """The real consumer: plain transformers from_pretrained (GPTQModel + optimum behind it)."""
    out, _ = tiny_gptq
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "p = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(p)\n"
        "m = AutoModelForCausalLM.from_pretrained(p, device_map='cpu')\n"
        "q = [type(x).__name__ for x in m.modules() if hasattr(x, 'qweight')]\n"
        "enc = tok('The capital of France is', return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = m(**enc).logits\n"
        "    gen = m.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=2)\n"
        "print('RESULT', json.dumps({'finite': bool(torch.isfinite(logits).all()),\n"
        "       'new': int(gen.shape[1] - enc['input_ids'].shape[1]), 'qlinears': len(q)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result == {"finite": True, "new": 5, "qlinears": 42}


def test_already_quantized_refused(tiny_gptq, tmp_path):
    out, _ = tiny_gptq
    r = _run(["quantize", str(out), "-o", str(tmp_path / "again"), "--gptq", "4bit"])
    assert r.exit_code == 2 and "already quantized (gptq)" in r.output
    assert not (tmp_path / "again").exists()


def test_pruned_gemma3_then_quantize(tiny_model_dir, tmp_path, needs_gptq):
    """prune -> quantize on an architecture with per-layer layer_types; the record keeps both."""
    from shrink.stages.configs import PruneConfig
    from shrink.stages.prune import prune

    pruned = tmp_path / "pruned"
    prune(
        str(tiny_model_dir("gemma3")),
        pruned,
        PruneConfig(layers=[1, 4]),
        verify=False,
        show_progress=False,
    )
    r = quantize(
        str(pruned),
        tmp_path / "q",
        QuantizeConfig(gptq="8bit", group_size=32, samples=4, seq_len=64),
        evaluation=EvaluateConfig(samples=1, seq_len=64),
        show_progress=False,
    )
    assert r.quantized_linears == 4 * 7 and r.verification["ok"]
    record = json.loads((tmp_path / "q" / "shrink.json").read_text())
    assert [st["stage"] for st in record["stages"]] == ["prune", "quantize"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4


# --- the embedded SmolLM2-135M ---


@pytest.mark.slow
def test_smollm2_4bit_perplexity(embedded_dir, tmp_path, needs_gptq):
    """Default group size falls back to 64 (128 does not divide 576); 4-bit perplexity stays
    within 1.5x of fp32 after a fresh-process reload in transformers."""
    result = quantize(
        str(embedded_dir),
        tmp_path / "q4",
        QuantizeConfig(gptq="4bit", samples=16, seq_len=256),
        evaluation=EvaluateConfig(samples=4, seq_len=256),
        show_progress=False,
    )
    assert result.group_size == 64 and "128 does not divide" in result.group_size_note
    assert result.quantized_linears == 30 * 7
    assert 4.2 < result.bits_per_weight < 4.6
    assert result.size_bytes_after < result.size_bytes_before / 2.5
    assert result.perplexity_after < 1.5 * result.perplexity_before
    assert result.verification["finite_logits"]


def test_under_a_memory_limit_a_gptq_model_is_measured_in_a_fresh_process(tiny_gptq, monkeypatch):
    """Under a memory limit the evaluate stage measures a GPTQ folder in a fresh process (its
    memory then holds the 4-bit model alone); the values equal the in-process ones."""
    import shrink.core.peaks as peaks
    import shrink.runtime.worker as worker
    from shrink.core.measures import PerplexityBook
    from shrink.stages.configs import EvaluateConfig
    from shrink.stages.evaluate import evaluate

    out, _ = tiny_gptq
    ev = EvaluateConfig(samples=2, seq_len=32)
    here = evaluate(str(out), ev, show_progress=False, book=PerplexityBook())
    tasks = []
    real = worker.run_worker

    def spy(task, **kw):
        tasks.append(task)
        return real(task, **kw)

    monkeypatch.setattr(worker, "run_worker", spy)
    monkeypatch.setattr("shrink.runtime.kinds.gptq.run_worker", spy)
    monkeypatch.setattr(peaks, "process_limit", lambda: 64 << 30)
    fresh = evaluate(str(out), ev, show_progress=False, book=PerplexityBook())
    assert tasks == ["shrink.runtime.kinds.gptq:measure_blocks"]
    assert fresh.perplexity == pytest.approx(here.perplexity, rel=1e-5)
    assert fresh.second.perplexity == pytest.approx(here.second.perplexity, rel=1e-5)
    assert fresh.data == here.data


def test_a_gptq_folder_that_fails_to_load_names_the_real_error(tiny_gptq, monkeypatch):
    """A load failure of a GPTQ folder is reported as it happened, not as a mismatch between
    its packed tensors and the float model's (which every GPTQ folder has)."""
    from transformers import AutoModelForCausalLM

    from shrink.core.errors import ShrinkError
    from shrink.core.models import from_pretrained_checked

    out, _ = tiny_gptq

    def fail(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(ShrinkError, match="can't allocate memory") as e:
        from_pretrained_checked(out)
    assert "does not match" not in str(e.value)
