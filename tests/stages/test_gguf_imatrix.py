"""Importance matrix for llama.cpp's quantizer (shrink.stages.export.imatrix), the IQ types and
the per-file tensor-type report of the GGUF export, and the dense-through-the-same-type point
(shrink.stages.export.gguf_point). Needs llama-cpp-python (the 'gguf' extra); skipped without it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from shrink import ShrinkError  # noqa: E402
from shrink.stages.configs import ExportConfig, make  # noqa: E402
from shrink.stages.export.gguf import export_gguf  # noqa: E402
from shrink.stages.export.imatrix import ImatrixSpec, compute_imatrix, imatrix_file  # noqa: E402

SPEC = ImatrixSpec(samples=2, seq_len=64)


def _tiny_llama(tied: bool, hidden: int = 64, layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=tied,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return tf.LlamaForCausalLM(config).eval()


def _mean_square(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).double().square().mean(0).numpy()


def test_imatrix_is_the_mean_squared_input_per_column():
    model = _tiny_llama(tied=False)
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(1))
    got = compute_imatrix(model, ids, batch_size=2)  # two batches: the mean spans both

    keys = {
        f"blk.{i}.{n}.weight"
        for i in range(2)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    assert set(got) == keys | {"output.weight"}  # an untied LM head is quantized too
    assert got["blk.0.ffn_down.weight"].shape == (128,)
    assert all(v.dtype == np.float32 for v in got.values())
    # the inputs computed by hand, without hooks
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
        layers = model.model.layers
        q0 = layers[0].input_layernorm(model.model.embed_tokens(ids))
        k1 = layers[1].input_layernorm(out.hidden_states[1])
        head = out.last_hidden_state
    np.testing.assert_allclose(got["blk.0.attn_q.weight"], _mean_square(q0), rtol=1e-5)
    np.testing.assert_allclose(got["blk.0.attn_v.weight"], _mean_square(q0), rtol=1e-5)
    np.testing.assert_allclose(got["blk.1.attn_k.weight"], _mean_square(k1), rtol=1e-5)
    np.testing.assert_allclose(got["output.weight"], _mean_square(head), rtol=1e-5)
    # a tied LM head is not written to the GGUF (llama.cpp reuses token_embd): no entry
    assert "output.weight" not in compute_imatrix(_tiny_llama(tied=True), ids)


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_imatrix_equals_the_in_memory_one(tmp_path, tied):
    from shrink.stages.export.imatrix import compute_imatrix_streamed

    model = _tiny_llama(tied=tied)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(1))
    whole = compute_imatrix(model, ids, batch_size=2)
    streamed = compute_imatrix_streamed(tmp_path / "m", ids, batch_size=2)
    assert set(streamed) == set(whole)
    for name, value in whole.items():
        np.testing.assert_allclose(streamed[name], value, rtol=1e-5, err_msg=name)


def _folder(tmp_path, embedded_dir, tokenizer_files, hidden: int):
    """A tiny llama saved with the embedded tokenizer; hidden 256 so that q2_k's 256-wide
    blocks really are used (narrower rows fall back to q4_0)."""
    folder = tmp_path / f"tiny-{hidden}"
    _tiny_llama(tied=True, hidden=hidden).save_pretrained(folder)
    for name in tokenizer_files:
        if (embedded_dir / name).exists():
            shutil.copy(embedded_dir / name, folder / name)
    return folder


def _tensor_bytes(path, name: str) -> bytes:
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return bytes(t.data.tobytes())


def _load_in_fresh_process(files: list) -> list[dict]:
    """Each GGUF loaded by llama.cpp in one new Python process: its block count, whether the
    logits of a short sequence are finite, and a few greedy tokens."""
    script = textwrap.dedent(f"""
        import json, numpy as np
        from shrink.runtime.gguf import GgufRunner
        out = []
        for f in {[str(f) for f in files]!r}:
            with GgufRunner(f, n_ctx=64, n_threads=2) as r:
                ids = r.encode("It is a truth universally acknowledged")
                out.append({{"n_layer": r.n_layer,
                             "finite": bool(np.isfinite(r.logits(ids)).all()),
                             "greedy": r.generate_ids(ids, 4)}})
        print(json.dumps(out))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_q2_k_with_and_without_imatrix_load_in_llama_cpp(
    tmp_path, monkeypatch, embedded_dir, tokenizer_files
):
    from gguf import GGUFReader

    from shrink.runtime.gguf_quant import tensor_type_counts

    folder = _folder(tmp_path, embedded_dir, tokenizer_files, 256)
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    kw = dict(threads=2, verify=False)  # loaded below, both in one fresh process
    plain = export_gguf(folder, tmp_path / "plain", "q2_k", imatrix=False, **kw)
    weighted = export_gguf(folder, tmp_path / "imatrix", "q2_k", imatrix=SPEC, **kw)
    for r, loaded in zip((plain, weighted), _load_in_fresh_process([plain.path, weighted.path])):
        assert loaded["n_layer"] == 2 and loaded["finite"] and len(loaded["greedy"]) >= 1
        assert r.tensor_types == tensor_type_counts(r.path)
        assert r.tensor_types["Q2_K"] >= 4  # 256-wide rows: q2_k itself, not a fallback
    assert plain.get("imatrix") is None and weighted["imatrix"]["matrices"] == 14
    # the imatrix reached llama.cpp: same weights, other rounding; and the file says so
    name = "blk.0.ffn_gate.weight"
    assert _tensor_bytes(plain.path, name) != _tensor_bytes(weighted.path, name)
    fields = GGUFReader(str(weighted.path)).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 14
    assert fields["quantize.imatrix.dataset"].contents() == SPEC.data
    assert "quantize.imatrix.entries_count" not in GGUFReader(str(plain.path)).fields
    record = json.loads((tmp_path / "imatrix" / "shrink.json").read_text())
    assert record["stages"][-1]["settings"]["imatrix"]["samples"] == 2
    # the matrix is cached by weights and settings: the second call computes nothing
    file, meta = imatrix_file(folder, SPEC)
    assert meta["cached"] and file.parent == tmp_path / "cache" / "imatrix"


def test_imatrix_types_refused_without_one_in_one_line(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("llama", 2)
    for t in ("iq2_xs", "iq2_m", "iq3_xxs"):
        with pytest.raises(ShrinkError, match=f"GGUF {t} needs an importance matrix") as e:
            export_gguf(folder, tmp_path / t, t, imatrix=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / t).exists()
        with pytest.raises(ShrinkError, match="needs an importance matrix") as e:
            make(ExportConfig, {"gguf": t, "imatrix": False})
        assert "\n" not in str(e.value)
    # with the default (on) they are accepted; llama.cpp's quantizer gets it for every type it
    # writes, q8_0 (written by shrink directly) gets none
    assert make(ExportConfig, {"gguf": "iq2_m"}).uses_imatrix()
    assert make(ExportConfig, {"gguf": "q4_k_m"}).uses_imatrix()
    assert not make(ExportConfig, {"gguf": "q8_0"}).uses_imatrix()
    assert not make(ExportConfig, {"gguf": "q4_k_m", "imatrix": False}).uses_imatrix()
    spec = ImatrixSpec.from_config(make(ExportConfig, {"gguf": "q2_k", "imatrix_samples": 4}))
    assert spec == ImatrixSpec(samples=4)
    assert ImatrixSpec.from_config(make(ExportConfig, {"gguf": "q8_0"})) is False


def test_dense_point_is_cached_and_measured_on_each_set(tmp_path, monkeypatch, tiny_model_dir):
    from shrink.runtime.gguf import GgufRunner
    from shrink.stages.configs import EvaluateConfig
    from shrink.stages.export.gguf_point import DenseComparison, compare_with_dense, gguf_point

    folder = tiny_model_dir("llama", 2)
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    ev = EvaluateConfig(samples=1, seq_len=64)
    p = gguf_point(folder, "q4_0", imatrix=False, evaluation=ev, threads=2)
    assert list(p["perplexity"]) == ["austen:evaluation", "tech:evaluation"]
    assert p["tensor_types"]["Q4_0"] >= 14 and p["imatrix"] is None
    # the same number as llama.cpp gives on the same blocks, computed here directly
    from transformers import AutoTokenizer

    import shrink

    blocks = shrink.token_blocks(AutoTokenizer.from_pretrained(folder), "tech:evaluation", 1, 64, 0)
    with GgufRunner(p["file"], n_ctx=64, n_threads=2) as r:
        logits = r.logits(blocks.input_ids[0].tolist()).astype(np.float64)[:-1]
    # the log-softmax written out in float64 NumPy, independent of the runner's own
    targets = blocks.input_ids[0, 1:].numpy()
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    ref = math.exp(float((lse - logits[np.arange(len(targets)), targets]).mean()))
    assert p["perplexity"]["tech:evaluation"] == pytest.approx(ref, rel=1e-9)
    assert p["work"] == {"written": True, "imatrix_tokens": 0, "measured_tokens": 128}
    mtime = Path(p["file"]).stat().st_mtime_ns
    again = gguf_point(folder, "q4_0", imatrix=False, evaluation=ev, threads=2)
    assert again["work"] == {"written": False, "imatrix_tokens": 0, "measured_tokens": 0}
    assert {**again, "work": None} == {**p, "work": None}
    assert Path(p["file"]).stat().st_mtime_ns == mtime
    # an export compared with "the dense model" (here itself): the same numbers on both sides
    c = compare_with_dense(p["file"], folder, "q4_0", DenseComparison(folder, ev), threads=2)
    assert c["this"]["perplexity"] == c["dense"]["perplexity"] == p["perplexity"]
    # the export's check measures the same sets in its own fresh process: the same numbers, and
    # the comparison takes them instead of measuring the file again
    from shrink.runtime.gguf import verify_gguf
    from shrink.stages.export.gguf_point import evaluation_sets

    v = verify_gguf(p["file"], folder, "q4_0", threads=2, sets=evaluation_sets(ev))
    assert v["ok"] and v["measured"] == p["perplexity"]
    assert v["perplexity"] == p["perplexity"]["austen:evaluation"]
    c2 = compare_with_dense(
        p["file"], folder, "q4_0", DenseComparison(folder, ev), threads=2, measured=v["measured"]
    )
    assert c2["this"]["perplexity"] == p["perplexity"] and c2["this"]["work"]["in_check"]
    assert c["line"].startswith("dense q4_0: ") and "; this model: " in c["line"]
