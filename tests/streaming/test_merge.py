"""The streamed LoRA merge equals peft's merge_and_unload, tensor by tensor, on a sharded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shards import save_sharded, state

from shrink.core.errors import ShrinkError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tiny_model_dir, tokenizer_files) -> Path:
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return save_sharded(model, tmp_path_factory.mktemp("base"), src, tokenizer_files)


def make_adapter(base: Path, folder: Path, **lora) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter with random non-zero factors (peft starts one of them at zero, which
    merges to the base) and return peft's merge_and_unload state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pmodel = get_peft_model(
        model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})
    )
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # embeddings start with A = 0
                p.normal_(0, 0.05)
    pmodel.save_pretrained(folder)
    merged = pmodel.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def state_of(shard: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return list(f.keys())


def check_equal(out: Path, ref: dict[str, torch.Tensor], base: Path) -> int:
    got, before = state(out), state(base)
    assert set(got) == set(before)
    changed = 0
    for name, t in got.items():
        assert t.dtype == before[name].dtype and t.shape == before[name].shape
        assert torch.allclose(t, ref[name], rtol=0, atol=1e-6), name
        changed += not torch.equal(t, before[name])
    return changed


def test_streamed_merge_equals_peft(sharded_llama, tmp_path):
    from shrink.streaming.merge import merge_adapter_streamed

    ref = make_adapter(sharded_llama, tmp_path / "adapter")
    lines: list[str] = []
    info = merge_adapter_streamed(
        sharded_llama,
        tmp_path / "adapter",
        tmp_path / "out",
        max_shard_bytes=300_000,
        log=lines.append,
    )
    # 6 layers x 7 targets changed, every other tensor identical
    assert len(info["merged_tensors"]) == 42
    assert check_equal(tmp_path / "out", ref, sharded_llama) == 42
    assert info["shards"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    for shard in (tmp_path / "out").glob("*.safetensors"):  # bounded, or one large tensor alone
        assert shard.stat().st_size < 300_000 + 10_000 or len(state_of(shard)) == 1
    assert (tmp_path / "out" / "tokenizer.json").is_file() and lines
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    # untouched tensors are byte-for-byte copies
    a, b = state(tmp_path / "out"), state(sharded_llama)
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_rslora_patterns_and_embedding(sharded_llama, tmp_path):
    """rsLoRA scaling, per-module rank and alpha overrides, and a LoRA on the (tied) embedding."""
    from shrink.streaming.merge import merge_adapter_streamed

    ref = make_adapter(
        sharded_llama,
        tmp_path / "adapter",
        use_rslora=True,
        target_modules=["q_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    info = merge_adapter_streamed(sharded_llama, tmp_path / "adapter", tmp_path / "out")
    assert "model.embed_tokens.weight" in info["merged_tensors"]
    assert check_equal(tmp_path / "out", ref, sharded_llama) == 13
    assert info["shards"] == 1 and (tmp_path / "out" / "model.safetensors").is_file()


def test_merged_model_loads_and_casts(sharded_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from shrink.streaming.merge import merge_adapter_streamed

    make_adapter(sharded_llama, tmp_path / "adapter")
    merge_adapter_streamed(
        sharded_llama, tmp_path / "adapter", tmp_path / "out", dtype=torch.bfloat16
    )
    assert {t.dtype for t in state(tmp_path / "out").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16


def test_bad_adapters_are_refused(sharded_llama, tmp_path):
    from shrink.streaming.merge import merge_adapter_streamed

    with pytest.raises(ShrinkError, match="adapter_config.json"):
        merge_adapter_streamed(sharded_llama, tmp_path, tmp_path / "out")
    make_adapter(sharded_llama, tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(ShrinkError, match="DoRA"):
        merge_adapter_streamed(sharded_llama, tmp_path / "adapter", tmp_path / "out")
    # an adapter trained on another model: its factors do not fit the base's shapes
    other = tmp_path / "other"
    other.mkdir()
    cfg_file.write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4),
        },
        str(other / "adapter_model.safetensors"),
    )
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShrinkError, match="do not fit"):
        merge_adapter_streamed(sharded_llama, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_heal_merge_streams_when_the_base_does_not_fit(sharded_llama, tmp_path, monkeypatch):
    """The heal stage's merge takes the streamed path when the base would not fit: the same
    perplexities before and after as the in-memory merge, and the same tensors saved."""
    import importlib

    from transformers import AutoConfig

    heal_merge = importlib.import_module("shrink.stages.heal.merge")  # the package's `merge`
    # attribute is the function of the same name
    make_adapter(sharded_llama, tmp_path / "work" / "adapter")
    ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = AutoConfig.from_pretrained(sharded_llama)
    kw = dict(
        device="cpu",
        on_cuda=False,
        eval_ids=ids,
        show_progress=False,
        load_kw={"use_safetensors": True},
    )
    ref = heal_merge.merge(str(sharded_llama), tmp_path / "work" / "adapter", "lora", cfg, **kw)
    monkeypatch.setattr(heal_merge, "needs_streamed_merge", lambda *a: True)
    from shrink.core.measures import PerplexityBook, weights_key

    book = PerplexityBook()
    got = heal_merge.merge(
        str(sharded_llama), tmp_path / "work" / "adapter", "lora", cfg, book=book, **kw
    )
    # both measurements are in the build's book, keyed by the folders' bytes
    assert book.get(weights_key(sharded_llama), "evaluation").perplexity == got.before.perplexity
    assert book.get(weights_key(tmp_path / "work" / "merged"), "evaluation").perplexity == (
        got.after.perplexity
    )
    assert isinstance(got.model, heal_merge.StreamedModel) and got.check["streamed"]
    for a, b in ((got.before, ref.before), (got.after, ref.after)):
        assert abs(a.perplexity - b.perplexity) / b.perplexity < 1e-4
    assert abs(got.after.perplexity - got.before.perplexity) > 1e-3  # the adapter changed it
    got.model.save_pretrained(tmp_path / "out")
    ref.model.save_pretrained(tmp_path / "ref")
    a, b = state(tmp_path / "out"), state(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)
    assert not any((tmp_path / "work" / "merged").iterdir())  # moved, not copied
