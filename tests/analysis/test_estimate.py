"""Analytic estimates: hand-computed tiny config, the papers' reference table, bad inputs, CLI."""

import json

import pytest
from click.testing import CliRunner

from shrink.analysis.estimate import (
    GPUS,
    count_params,
    estimate,
    find_gpu,
    flops_per_token,
    gptq_linear_bytes,
    kv_cache_bytes,
    load_config,
    weight_memory,
)
from shrink.cli.commands.estimate import command as estimate_cmd
from shrink.core.errors import ShrinkError
from shrink.core.models import ALIASES

# d=8, f=16, L=2, h=2, h_kv=1 (so d_h=4), V=10, separate head.
TINY = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 10,
    "tie_word_embeddings": False,
}


def sig3(x: float) -> str:
    return f"{x:.3g}"


# --------------------------------------------------------------------------- tiny, by hand


def test_tiny_params_by_hand():
    # per layer: q 8*8=64, k 8*4=32, v 8*4=32, o 8*8=64 -> attention 192
    #            gate/up/down 3*8*16=384; two norms 2*8=16 -> 592 per layer
    # 2 layers 1184 + final norm 8 + embedding 10*8=80 + head 80 = 1352
    p = count_params(TINY)
    assert (p.attention, p.mlp, p.norms, p.embedding, p.head) == (384, 768, 40, 80, 80)
    assert p.per_layer == 592
    assert p.total == 1352
    assert p.linear_weights == 2 * 576
    # one layer dropped: 592 + 8 + 160
    assert count_params(TINY, drop=1).total == 760
    # tied: the head is the embedding, counted once
    tied = count_params({**TINY, "tie_word_embeddings": True})
    assert tied.head == 0 and tied.total == 1272


def test_tiny_qwen2_has_qkv_bias_and_head_dim_from_config():
    # qwen2: bias on q (8), k (4), v (4) -> +16 per layer, o has none
    assert count_params({**TINY, "model_type": "qwen2"}).total == 1352 + 2 * 16
    # llama with attention_bias: q, k, v and o -> +24 per layer
    assert count_params({**TINY, "attention_bias": True}).total == 1352 + 2 * 24
    # explicit head_dim 2: q 8*4=32, k 8*2=16, v 16, o 4*8=32 -> attention 96 instead of 192
    assert count_params({**TINY, "head_dim": 2}).total == 1352 - 2 * 96


def test_tiny_gptq_bytes_by_hand():
    # Linear(K->N), 4 bits, g=4: K*N/2 + (K/4)*N/2 + 2*(K/4)*N + 4*K
    # q 8->8: 32 + 8 + 32 + 32 = 104; k, v 8->4: 16 + 4 + 16 + 32 = 68
    # o 8->8: 104; gate, up 8->16: 64 + 16 + 64 + 32 = 176; down 16->8: 64 + 16 + 64 + 64 = 208
    assert gptq_linear_bytes(8, 8, 4, 4) == 104
    assert gptq_linear_bytes(16, 8, 4, 4) == 208
    per_layer = 104 + 68 + 68 + 104 + 176 + 176 + 208  # 904
    # 16-bit rest: embedding 80 + head 80 + norms 40 = 200 params = 400 bytes
    w = weight_memory(TINY, bits=4, group_size=4)
    assert w.linear_bytes == 2 * per_layer
    assert w.other_bytes == 400
    assert w.total_bytes == 2 * 904 + 400
    # per-channel (g=-1): one group; q: 32 + 4 + 16 + 32
    assert gptq_linear_bytes(8, 8, 4, -1) == 84
    # fp16: 2 bytes per parameter
    assert weight_memory(TINY, bits=16).total_bytes == 2 * 1352
    # decode reads all but 9 of the 10 embedding rows: 2704 - 2*72
    assert weight_memory(TINY, bits=16).read_per_token_bytes == 2704 - 144


def test_tiny_kv_and_flops_by_hand():
    # 2 (K and V) * L 2 * h_kv 1 * d_h 4 * 2 bytes * c 10 * b 3
    assert kv_cache_bytes(TINY, context=10, batch=3) == 960
    # matmul: 2 * (L * 576 + d*V 80) = 2464; attention: 4 * L 2 * h*d_h 8 * c 10 = 640
    f = flops_per_token(TINY, context=10)
    assert (f.matmul, f.attention, f.total) == (2464, 640, 3104)
    assert flops_per_token(TINY, context=10, drop=1).matmul == 2 * (576 + 80)


# --------------------------------------------------------------------------- the papers' reference table

REFERENCE = [  # alias, drop, params B, fp16 GB, GPTQ-4 g128 GB, matmul GFLOPs/token
    ("llama-2-7b", 0, 6.738, 13.48, 3.89, 13.2),
    ("llama-2-13b", 0, 13.016, 26.03, 7.26, 25.7),
    ("llama-2-13b", 10, 9.844, 19.69, 5.61, 19.4),
    ("llama-2-70b", 0, 68.977, 137.95, 36.64, 137.4),
    ("llama-2-70b", 40, 34.750, 69.50, 18.84, 69.0),
]


@pytest.mark.parametrize("alias,drop,params,fp16,gptq4,gflops", REFERENCE)
def test_papers_reference_table(alias, drop, params, fp16, gptq4, gflops):
    cfg = load_config(alias)
    total = count_params(cfg, drop).total
    assert sig3(total / 1e9) == sig3(params)
    assert round(total / 1e9, 3) == params  # the table's own precision
    assert sig3(weight_memory(cfg, drop, 16).total_bytes / 1e9) == sig3(fp16)
    assert sig3(weight_memory(cfg, drop, 4, 128).total_bytes / 1e9) == sig3(gptq4)
    assert sig3(flops_per_token(cfg, 4096, drop).matmul / 1e9) == sig3(gflops)


def test_smollm2_135m():
    p = count_params(load_config("smollm2-135m"))
    # embedding 49152*576 = 28,311,552 (tied); layer: q,o 576*576, k,v 576*192, MLP 3*576*1536,
    # norms 2*576 = 3,540,096; 30 layers + final norm 576
    assert p.total == 28_311_552 + 30 * 3_540_096 + 576 == 134_515_008
    assert p.head == 0


def test_known_model_sizes():
    expected = {
        "llama-3.1-8b": 8.03,
        "llama-3.1-70b": 70.6,
        "mistral-7b": 7.24,
        "qwen2.5-7b": 7.62,
        "qwen2.5-72b": 72.7,
    }
    for alias, billions in expected.items():
        assert sig3(count_params(load_config(alias)).total / 1e9) == sig3(billions), alias


def test_kv_cache_known_cases():
    # Llama-2-7B (MHA): 2 * 32 layers * 32 heads * 128 * 2 bytes = 0.5 MiB per token; 4096 -> 2 GiB
    assert kv_cache_bytes(load_config("llama-2-7b"), 4096) == 2 * 2**30
    # Llama-2-70B (GQA, 8 KV heads): 2 * 80 * 8 * 128 * 2 = 327,680 bytes per token
    assert kv_cache_bytes(load_config("llama-2-70b"), 1, batch=1) == 327_680
    assert kv_cache_bytes(load_config("llama-2-70b"), 4096, batch=2, drop=40) == 327_680 // 2 * 8192


def test_every_alias_has_a_packaged_config():
    for alias, hub_id in ALIASES.items():
        cfg = load_config(alias)
        assert count_params(cfg).total > 0
        assert load_config(hub_id) == cfg  # hub id of an alias resolves offline
    assert load_config("Llama-2-7B")["hidden_size"] == 4096


# --------------------------------------------------------------------------- GPUs


def test_gpu_names():
    for name in ("4090", "rtx4090", "rtx-4090", "RTX 4090", "GeForce RTX 4090", "nvidia rtx4090"):
        assert find_gpu(name).name == "RTX 4090"
    assert find_gpu("m3 max").name == "Apple M3 Max"
    assert find_gpu("4060ti").name == "RTX 4060 Ti 16GB"


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(ShrinkError) as err:
        estimate("llama-2-7b", gpu="voodoo5")
    for gpu in GPUS:
        assert gpu.name in str(err.value)


def test_gpu_fit_and_roofline_by_hand():
    est = estimate("llama-2-7b", bits=16, context=4096, gpu="4090")
    (fit,) = est.gpus
    weights = 2 * 6_738_415_616  # 13,476,831,232 bytes
    kv = 2 * 2**30
    # decode reads everything but the embedding table (one row of it): 2 * (32000*4096 - 4096)
    read = weights - 2 * (32000 * 4096 - 4096)
    assert fit.decode_tokens_per_s == pytest.approx(1008e9 / (read + kv))
    assert fit.needed_gb == pytest.approx((weights + kv) / 1e9)
    assert fit.usable_gb == pytest.approx(24 * 2**30 * 0.9 / 1e9)
    assert fit.fits  # 15.6 GB <= 23.2 GB
    flops = 2 * (32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000) + 4 * 32 * 4096 * 4096
    assert fit.prefill_tokens_per_s == pytest.approx(165.2e12 / flops)
    # the dense 70B in fp16 fits none of the consumer GPUs
    assert not any(g.fits for g in estimate("llama-2-70b").gpus)
    # the Apple entries have no published TFLOPS
    apple = estimate("llama-2-7b", gpu="m2max").gpus[0]
    assert apple.prefill_tokens_per_s is None and apple.fp16_tflops is None


# --------------------------------------------------------------------------- bad inputs


def test_drop_out_of_range():
    for drop in (-1, 32, 40):
        with pytest.raises(ShrinkError, match="between 0 and 31"):
            estimate("llama-2-7b", drop=drop)
    estimate("llama-2-7b", drop=31)


def test_missing_field_is_named(tmp_path):
    cfg = dict(TINY)
    del cfg["intermediate_size"]
    with pytest.raises(ShrinkError, match="intermediate_size"):
        count_params(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}))
    with pytest.raises(ShrinkError, match="vocab_size"):
        estimate(str(path))


def test_bad_bits_and_moe():
    with pytest.raises(ShrinkError, match="bits"):
        estimate("llama-2-7b", bits=5)
    with pytest.raises(ShrinkError, match="mixture-of-experts"):
        count_params({**TINY, "num_local_experts": 8})
    with pytest.raises(ShrinkError, match="context"):
        estimate("llama-2-7b", context=0)


def test_unknown_model(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", staticmethod(offline))
    with pytest.raises(ShrinkError) as err:
        load_config("nobody/no-such-model")
    assert "llama-2-7b" in str(err.value) and "smollm2-135m" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ShrinkError, match="llama-2-7b"):
        load_config("llama2-7b")  # a typo: not an alias, not a path, not owner/name
    with pytest.raises(ShrinkError, match="no such file"):
        load_config("./missing/config.json")


def test_config_from_folder_file_and_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_config(str(tmp_path)) == TINY
    assert load_config(str(tmp_path / "config.json")) == TINY
    multimodal = {
        "model_type": "some_vlm",
        "tie_word_embeddings": True,
        "text_config": {k: v for k, v in TINY.items() if k != "tie_word_embeddings"},
    }
    (tmp_path / "mm.json").write_text(json.dumps(multimodal))
    text = load_config(str(tmp_path / "mm.json"))
    assert text["hidden_size"] == 8 and text["tie_word_embeddings"] is True
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ShrinkError, match="no config.json"):
        load_config(str(empty))


def test_estimate_to_dict_is_json():
    data = json.loads(json.dumps(estimate("smollm2-135m", bits=4, gpu="3060").to_dict()))
    assert data["params"]["total"] == 134_515_008
    assert data["gpus"][0]["gpu"] == "RTX 3060"
    assert data["kv_cache_bytes"] == 2 * 30 * 3 * 64 * 2 * 4096


# --------------------------------------------------------------------------- CLI


def test_cli_estimate_tables():
    result = CliRunner().invoke(estimate_cmd, ["llama-2-70b", "--drop", "40", "--bits", "4"])
    assert result.exit_code == 0, result.output
    for text in ("34.750 B", "18.84 GB", "RTX 4090", "RTX 3060", "68.98 GFLOP"):
        assert text in result.output


def test_cli_estimate_json(tmp_path):
    runner = CliRunner()
    result = runner.invoke(estimate_cmd, ["smollm2-135m", "--gpu", "rtx-4090", "--json", "-"])
    assert result.exit_code == 0
    data = json.loads(result.output)["result"]
    assert data["params"]["total"] == 134_515_008 and len(data["gpus"]) == 1
    out = tmp_path / "e.json"
    result = runner.invoke(estimate_cmd, ["llama-2-7b", "--bits", "8", "--json", str(out)])
    assert result.exit_code == 0 and "Parameters" in result.output
    assert json.loads(out.read_text())["result"]["bits"] == 8


def test_cli_estimate_errors():
    runner = CliRunner()
    result = runner.invoke(estimate_cmd, ["llama-2-7b", "--gpu", "voodoo5"])
    assert isinstance(result.exception, ShrinkError) and "RTX 4090" in str(result.exception)
    result = runner.invoke(estimate_cmd, ["llama-2-7b", "--drop", "32"])
    assert isinstance(result.exception, ShrinkError)
    result = runner.invoke(estimate_cmd, ["llama-2-7b", "--bits", "5"])
    assert result.exit_code == 2  # click usage error
