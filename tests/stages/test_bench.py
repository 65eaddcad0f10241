"""shrink bench: artifact kinds, report structure and ratios, the drop sweep. No timing is
asserted (these machines are noisy); only structure and deterministic numbers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import shrink
from shrink.cli import main
from shrink.core.errors import ShrinkError
from shrink.report.tables import bench_markdown
from shrink.stages import bench as B
from shrink.stages.configs import EvaluateConfig, PruneConfig


def test_artifact_kinds(tiny_model_dir, tmp_path):
    from shrink.runtime.kinds import artifact_kind

    assert artifact_kind(tiny_model_dir("llama")) == "hf"
    g = tmp_path / "g"
    g.mkdir()
    (g / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert artifact_kind(g) == "gptq"
    o = tmp_path / "o"
    o.mkdir()
    (o / "genai_config.json").write_text("{}")
    assert artifact_kind(o) == "onnx"
    with pytest.raises(ShrinkError, match="not a model folder"):
        artifact_kind(tmp_path)
    with pytest.raises(ShrinkError, match="not a folder"):
        artifact_kind(tmp_path / "missing")


def test_bench_two_artifacts(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("llama")
    pruned = tmp_path / "pruned"
    shrink.prune(str(dense), pruned, PruneConfig(layers=[1, 2]), verify=False, show_progress=False)
    report = B.bench(
        [str(dense), str(pruned)],
        prompt_len=8,
        gen_len=4,
        repeats=2,
        ppl_samples=1,
        ppl_seq_len=16,
        show_progress=False,
    )
    base, cand = report.results
    assert base.ratios["decode_tokens_per_s"] == 1.0 and len(base.runs) == 2
    assert base.layers == 6 and cand.layers == 4
    # FLOPs ratio is the analytic one: 2*(L*(attn+mlp) + d*V) + 4*L*d*c
    d, f, V, c, kv = 64, 128, 49152, 12, 2 * 16
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + 4 * d * c
    expected = (4 * per_layer + 2 * d * V) / (6 * per_layer + 2 * d * V)
    assert cand.ratios["flops_per_token"] == pytest.approx(expected, rel=1e-9)
    # perplexity is the same computation as shrink.stages.evaluate's
    ev = shrink.evaluate(str(pruned), EvaluateConfig(samples=1, seq_len=16), show_progress=False)
    assert cand.median["perplexity"] == pytest.approx(ev.perplexity, rel=1e-5)
    assert cand.median["decode_tokens_per_s"] > 0 and cand.median["peak_rss_bytes"] > 0
    md = bench_markdown(report)
    assert md.count("\n| ") >= 3 and "pruned" in md


def test_sweep_drop(tiny_model_dir):
    points = B.sweep_drop(
        str(tiny_model_dir("llama")),
        [0, 2],
        prompt_len=8,
        gen_len=4,
        repeats=1,
        ppl_samples=1,
        ppl_seq_len=16,
        calib_samples=2,
        calib_seq_len=16,
        show_progress=False,
    )
    assert [p.drop for p in points] == [0, 2] and points[0].removed == []
    assert len(points[1].removed) == 2
    full = shrink.evaluate(
        str(tiny_model_dir("llama")), EvaluateConfig(samples=1, seq_len=16), show_progress=False
    )
    assert points[0].perplexity == pytest.approx(full.perplexity, rel=1e-5)
    assert points[1].flops_per_token < points[0].flops_per_token


def test_bench_cli(tiny_model_dir, tmp_path):
    run = CliRunner().invoke
    r = run(
        main,
        [
            "bench",
            str(tiny_model_dir("qwen2")),
            "--repeats",
            "1",
            "--gen-len",
            "3",
            "--prompt-len",
            "8",
            "--ppl-samples",
            "0",
            "--json",
            "-",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["result"]["results"][0]["kind"] == "hf"
    r = run(main, ["bench", str(tmp_path)])
    assert r.exit_code == 2 and "not a model folder" in r.output
    r = run(main, ["bench", str(tiny_model_dir("llama")), "--sweep-drop", "0,9"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = run(main, ["bench"])
    assert r.exit_code == 2


def test_bench_threads_and_roofline(tiny_model_dir):
    """--threads: one result per artifact and count, the runtime told that count, the machine's
    bandwidth measured per count, and decode given as a fraction of that roofline."""
    dense = str(tiny_model_dir("llama"))
    report = B.bench(
        [dense],
        prompt_len=8,
        gen_len=4,
        repeats=1,
        ppl_samples=0,
        threads=[1, 2],
        show_progress=False,
    )
    assert [r.threads for r in report.results] == [1, 2]
    assert [run["threads"] for r in report.results for run in r.runs] == [1, 2]
    assert set(report.bandwidth) == {"1", "2"}
    for r in report.results:
        bw = report.bandwidth[str(r.threads)]["read_bytes_per_s"]
        assert bw > 1e8  # any machine streams more than 100 MB/s
        assert r.weight_file_bytes == (tiny_model_dir("llama") / "model.safetensors").stat().st_size
        assert r.median["roofline_tokens_per_s"] == pytest.approx(bw / r.weight_file_bytes)
        assert r.median["roofline_fraction"] == pytest.approx(
            r.median["decode_tokens_per_s"] / r.median["roofline_tokens_per_s"]
        )
        assert r.median["cores_busy"] > 0
    assert "| 2 |" in bench_markdown(report) and "GB/s" in bench_markdown(report)


def test_memory_bandwidth_counts_bytes():
    from shrink.runtime.worker import run_worker

    # in a worker, as bench runs it: it sets torch's thread count, which must not leak into
    # this process (the rest of the suite would run on one thread)
    bw = run_worker("shrink.stages.bench:memory_bandwidth", threads=1, mib=16, repeats=2)
    assert bw["bytes"] == 16 * 2**20 and bw["threads"] == 1 and bw["read_bytes_per_s"] > 0


def test_bench_threads_option_is_checked(tiny_model_dir):
    r = CliRunner().invoke(main, ["bench", str(tiny_model_dir("llama")), "--threads", "0"])
    assert r.exit_code == 2 and "threads" in r.output
    r = CliRunner().invoke(main, ["bench", str(tiny_model_dir("llama")), "--threads", "x"])
    assert r.exit_code == 2 and "not a list of integers" in r.output
