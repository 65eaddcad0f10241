"""Streamed (layer-by-layer) scoring and pruning equal the in-memory path, and stay under a cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from shards import padded_inputs, save_sharded, state

from shrink.core.errors import ShrinkError
from shrink.stages.configs import PruneConfig, ScoreConfig


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_model_dir, tokenizer_files):
    """The tiny model of an architecture re-saved in ~100 KB shards (a decoder layer of the tiny
    models is ~260 KB, so layers split across shards)."""
    from transformers import AutoModelForCausalLM

    made: dict = {}

    def make(arch: str) -> Path:
        if arch not in made:
            src = tiny_model_dir(arch)
            folder = tmp_path_factory.mktemp(f"sharded-{arch}")
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            made[arch] = save_sharded(model, folder, src, tokenizer_files)
        return made[arch]

    return make


def test_layers_really_split_across_shards(sharded_dir):
    index = json.loads((sharded_dir("llama") / "model.safetensors.index.json").read_text())
    files = {f for k, f in index["weight_map"].items() if k.startswith("model.layers.2.")}
    assert len(set(index["weight_map"].values())) > 6 and len(files) >= 2


def test_stream_score_equals_in_memory(arch, sharded_dir):
    from transformers import AutoModelForCausalLM

    from shrink.core.scores import score_layers
    from shrink.streaming import stream_score

    folder = sharded_dir(arch)
    ids, mask = padded_inputs(5)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = score_layers(model, ids, mask, batch_size=2, skip_first=1, show_progress=False)
    got = stream_score(
        folder, ids, mask, batch_size=2, skip_first=1, device="cpu", show_progress=False
    )
    assert (got.num_layers, got.tokens, got.samples) == (ref.num_layers, ref.tokens, ref.samples)
    for a, b in [(got.bi, ref.bi), (got.relmag, ref.relmag)]:
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    for ra, rb in zip(got.angular, ref.angular):
        assert max(abs(x - y) for x, y in zip(ra, rb)) < 1e-5


def test_offloaded_activations_equal_and_cleaned(sharded_dir, tmp_path):
    from shrink.streaming import stream_score

    folder = sharded_dir("qwen3")
    ids, mask = padded_inputs(5)
    ram = stream_score(folder, ids, mask, batch_size=3, show_progress=False)
    disk = stream_score(
        folder, ids, mask, batch_size=3, offload_dir=tmp_path / "acts", show_progress=False
    )
    assert disk.bi == ram.bi and disk.angular == ram.angular
    assert disk.settings["streaming"]["activations_on_disk"]
    assert list((tmp_path / "acts").iterdir()) == []


def test_score_model_dispatch(sharded_dir):
    from shrink.stages.score import score

    folder = str(sharded_dir("llama"))
    kw = dict(samples=3, seq_len=32)
    a = score(folder, ScoreConfig(streaming=False, **kw), show_progress=False)
    b = score(folder, ScoreConfig(streaming=True, **kw), show_progress=False)
    assert "streaming" in b.settings and "streaming" not in a.settings
    assert b.settings["data"] == a.settings["data"]
    assert max(abs(x - y) for x, y in zip(a.bi, b.bi)) < 1e-5
    c = score(folder, ScoreConfig(**kw), show_progress=False)  # automatic: fits, so in memory
    assert "streaming" not in c.settings


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_stream_prune_equals_in_memory(arch, sharded_dir, tmp_path):
    from shrink.stages.prune import prune

    folder = str(sharded_dir(arch))
    remove = [1, 3]
    mem = prune(
        folder,
        tmp_path / "mem",
        PruneConfig(layers=remove, streaming=False),
        verify=False,
        show_progress=False,
    )
    streamed = prune(
        folder,
        tmp_path / "stream",
        PruneConfig(layers=remove, streaming=True),
        verify=arch in ("llama", "gemma3"),
        show_progress=False,
    )
    a, b = state(tmp_path / "mem"), state(tmp_path / "stream")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not any(k.startswith("model.layers.4.") for k in b)
    ca = json.loads((tmp_path / "mem" / "config.json").read_text())
    cb = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert ca == cb, sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    assert (mem.params_before, mem.params_after, mem.kept) == (
        streamed.params_before,
        streamed.params_after,
        streamed.kept,
    )
    sa = json.loads((tmp_path / "mem" / "shrink.json").read_text())["stages"][-1]
    sb = json.loads((tmp_path / "stream" / "shrink.json").read_text())["stages"][-1]
    for key in (
        "removed_layers",
        "kept_layers",
        "removed_original_layers",
        "kept_original_layers",
        "num_layers_after",
        "params_after",
        "strategy",
    ):
        assert sa[key] == sb[key], key
    if arch in ("llama", "gemma3"):
        assert streamed.verification["ok"] and streamed.verification["num_layers"] == 4
    shards = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(shards["weight_map"].values())) > 1


def test_stream_prune_by_score_and_rebase(sharded_dir, tmp_path):
    """--strategy bi streams the scoring too; a second prune keeps original layer numbers."""
    from shrink.stages.prune import prune

    folder = str(sharded_dir("qwen3"))
    kw = dict(drop=2, strategy="bi", samples=3, seq_len=32)
    mem = prune(
        folder,
        tmp_path / "mem",
        PruneConfig(streaming=False, **kw),
        verify=False,
        show_progress=False,
    )
    got = prune(
        folder,
        tmp_path / "s1",
        PruneConfig(streaming=True, **kw),
        verify=False,
        show_progress=False,
    )
    assert got.removed == mem.removed and got.scores is not None
    cfg = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["max_window_layers"] == 3 - sum(
        1 for i in got.removed if i < 3
    )
    again = prune(
        str(tmp_path / "s1"),
        tmp_path / "s2",
        PruneConfig(layers=[0], streaming=True),
        verify=False,
        show_progress=False,
    )
    assert again.removed_original == [got.kept[0]]
    stages = json.loads((tmp_path / "s2" / "shrink.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["prune", "prune"]


def test_streaming_refusals(sharded_dir, tmp_path):
    from shrink.core.models import resolve
    from shrink.stages.prune import prune
    from shrink.stages.score import score
    from shrink.streaming import decide_streaming, plan_stream_prune

    folder = str(sharded_dir("llama"))
    with pytest.raises(ShrinkError, match="cannot stream"):
        score(folder, ScoreConfig(metric="ppl", streaming=True, samples=2, seq_len=16))
    with pytest.raises(ShrinkError, match="cannot stream"):
        prune(folder, tmp_path / "o", PruneConfig(drop=1, strategy="iterative", streaming=True))
    with pytest.raises(ShrinkError, match="local folder"):
        # score() reads the hub config first (offline here: that error); the refusal itself
        decide_streaming(resolve("some-org/some-model"), "cpu", None, True, method="bi")
    with pytest.raises(ShrinkError, match="out of range"):
        plan_stream_prune(folder, [9])
    with pytest.raises(ShrinkError, match="out of range"):
        prune(folder, tmp_path / "o", PruneConfig(layers=[9], streaming=True))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ShrinkError, match="not empty"):
        prune(folder, tmp_path / "full", PruneConfig(layers=[1], streaming=True))
    assert not (tmp_path / "o").exists()
    # an architecture the stub capture is not proven on
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt)
    with pytest.raises(ShrinkError, match="streaming does not support gpt2"):
        score(str(gpt), ScoreConfig(streaming=True, samples=1, seq_len=8))


def test_cli_streaming(sharded_dir, tmp_path):
    from shrink.cli import main

    folder = str(sharded_dir("mistral"))
    runner = CliRunner()
    r = runner.invoke(
        main, ["score", folder, "--streaming", "--samples", "2", "--seq-len", "16", "--json", "-"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["result"]
    assert data["num_layers"] == 6 and "streaming" in data["settings"]
    r = runner.invoke(
        main,
        [
            "prune",
            folder,
            "--layers",
            "2,5",
            "--streaming",
            "--no-verify",
            "-o",
            str(tmp_path / "out"),
            "--json",
            "-",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["result"]["num_layers"] == [6, 4]
    r = runner.invoke(main, ["score", folder, "--streaming", "--metric", "ppl"])
    assert r.exit_code == 2 and "cannot stream" in r.output


CAPPED = textwrap.dedent("""
    import json, resource, sys, torch
    import transformers, shrink.streaming, shrink.core.scores  # imported before the cap is set
    from transformers import AutoModelForCausalLM
    mode, folder, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = vm("VmData:")
    resource.setrlimit(resource.RLIMIT_DATA, (base + budget, base + budget))
    ids = torch.randint(3, 8000, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        if mode == "stream":
            s = shrink.streaming.stream_score(folder, ids, device="cpu", show_progress=False)
            out = {"ok": True, "bi": s.bi}
        else:
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            out = {"ok": True, "bi": shrink.core.scores.score_layers(m, ids, show_progress=False).bi}
    except (MemoryError, RuntimeError, OSError) as e:
        out = {"ok": False, "error": type(e).__name__ + ": " + str(e)[:200]}
    out.update(baseline=base, cap=base + budget, peak_rss=vm("VmHWM:"))
    print(json.dumps(out))
""")


def test_memory_capped_scoring(tmp_path):
    """A model whose weights (~740 MB) exceed a private-memory cap of baseline + 300 MB scores
    when streamed; the in-memory loader fails under the same cap. RLIMIT_DATA (not RLIMIT_AS)
    because torch reserves far more address space than it uses and safetensors memory-maps whole
    shards read-only (page cache, reclaimable); RLIMIT_DATA counts private writable memory,
    i.e. what the process really allocates."""
    import transformers as tf

    from shrink.streaming import Checkpoint, write_random_checkpoint

    config = tf.LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        tie_word_embeddings=False,
    )
    folder = write_random_checkpoint(config, tmp_path / "big", max_shard_bytes=150 << 20)
    weights = Checkpoint(folder).nbytes
    budget = 300 << 20
    assert weights > 2 * budget
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHRINK_NO_PROGRESS": "1"}

    def run(mode):
        p = subprocess.run(
            [sys.executable, "-c", CAPPED, mode, str(folder), str(budget)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert p.returncode == 0 or "stream" != mode, p.stderr[-2000:]
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {"ok": False, "error": p.stderr[-300:]}

    streamed = run("stream")
    assert streamed["ok"], streamed
    assert len(streamed["bi"]) == 10 and all(0 <= b <= 2 for b in streamed["bi"])
    in_memory = run("memory")
    assert not in_memory["ok"], in_memory


def test_stream_prune_too_big_to_reload(sharded_dir, tmp_path, monkeypatch):
    """When the pruned model would not fit in RAM for the fresh-process reload, the structural
    check stands in and the record says the reload was skipped."""
    import shrink.streaming.prune as streamed_prune
    from shrink.stages.prune import prune

    monkeypatch.setattr(streamed_prune, "fits_for_verify", lambda params: False)
    res = prune(
        str(sharded_dir("llama")),
        tmp_path / "o",
        PruneConfig(layers=[0], streaming=True),
        show_progress=False,
    )
    assert res.streamed
    assert res.verification["reload"] == "skipped" and res.verification["structure_ok"]
    stage = json.loads((tmp_path / "o" / "shrink.json").read_text())["stages"][-1]
    assert stage["verification"]["reload"] == "skipped"
