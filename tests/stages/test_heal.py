"""shrink heal: LoRA, QLoRA, distillation, merge, resume, 2 processes, bad input (tiny models)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")

from shrink.cli import main  # noqa: E402
from shrink.core.errors import ShrinkError  # noqa: E402
from shrink.stages.configs import EvaluateConfig, HealConfig  # noqa: E402
from shrink.stages.heal import heal, work_dir_for  # noqa: E402
from shrink.stages.heal.trainer import kd_loss  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except Exception:  # noqa: BLE001
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes not installed")

# a few steps on short blocks, evaluated on 2 short blocks: the CPU is shared
FAST = dict(steps=3, seq_len=32, batch_size=2)
EVAL = EvaluateConfig(samples=2, seq_len=32)
EVAL_ARGS = ["--eval-samples", "2", "--eval-seq-len", "32"]


def _heal(model_dir, output, **kw):
    """heal() with the HealConfig settings given as keywords beside the call's own options."""
    config = HealConfig(**{k: kw.pop(k) for k in list(kw) if k in HealConfig.model_fields})
    kw.setdefault("evaluation", EVAL)
    kw.setdefault("show_progress", False)
    return heal(model_dir, output, config, **kw)


def _logits(model_dir, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _stage(out: Path) -> dict:
    return json.loads((out / "shrink.json").read_text())["stages"][-1]


def test_lora_cli_end_to_end(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "healed"
    res = CliRunner().invoke(
        main,
        [
            "heal",
            str(src),
            "-o",
            str(out),
            "--steps",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            *EVAL_ARGS,
            "--rank",
            "4",
            "--targets",
            "all",
            "--lr",
            "1e-3",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "loss.png",
        "shrink.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "adapter").exists()
    assert not work_dir_for(out).exists()  # checkpoints removed after success
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    st = _stage(out)
    assert st["stage"] == "heal" and st["steps"] == 4 and len(st["losses"]) == 4
    assert st["settings"]["method"] is None and st["settings"]["rank"] == 4  # as given
    assert st["resolved"]["method"] == "lora" and st["resolved"]["rank"] == 4
    assert st["resolved"]["alpha"] == 4  # alpha defaults to rank
    assert st["evaluation"]["set"] == EVAL.name() and st["evaluation"]["samples"] == 2
    assert set(st["resolved"]["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert st["perplexity_before"] > 0 and st["perplexity_after"] > 0
    # the second domain, on blocks of the same size, measured before and after too
    second = st["second_domain"]
    assert second["evaluation"]["set"] == EVAL.name("tech:evaluation")
    assert second["evaluation"]["samples"] == 2 and second["evaluation"]["seq_len"] == 32
    assert second["perplexity_before"] > 0 and second["perplexity_after"] > 0
    assert second["perplexity_before"] != st["perplexity_before"]
    assert "tech:evaluation, 2 x 32 tokens" in res.output
    assert st["verification"]["ok"]  # reloaded in a fresh process by heal itself
    assert st["merge_check"]["max_abs_logit_diff"] < 1e-5
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["result"]["ppl_before"] == pytest.approx(st["perplexity_before"])
    # refuse an existing output without --force, nothing changed
    res = CliRunner().invoke(main, ["heal", str(src), "-o", str(out), "--steps", "1"])
    assert res.exit_code == 2 and "--force" in res.output


def test_merge_matches_peft_and_reload(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    out = tmp_path / "healed"
    _heal(str(src), out, rank=4, targets="all", lr=2e-2, save_adapter=True, verify=False, **FAST)
    assert (out / "adapter" / "adapter_config.json").is_file()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    base = _logits(src, ids)
    peft_logits = _logits(src, ids, adapter=out / "adapter")
    merged_disk = _logits(out, ids)
    assert (peft_logits - base).abs().max() > 1e-3  # the adapter really changed the model
    assert torch.allclose(merged_disk, peft_logits, atol=1e-5, rtol=0)
    # in-memory merge == merged checkpoint reloaded from disk
    m = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), out / "adapter"
        )
        .merge_and_unload()
        .eval()
    )
    with torch.no_grad():
        mem = m(input_ids=ids).logits
    assert torch.allclose(mem, merged_disk, atol=1e-6, rtol=0)


def test_kd_loss_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 3.0
    p = torch.softmax(t / T, -1)
    manual = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(manual.item(), rel=1e-5)


def test_distillation(tiny_model_dir, tmp_path):
    student = tiny_model_dir("llama", 2)
    teacher = tiny_model_dir("llama")
    out = tmp_path / "kd"
    r = _heal(
        str(student),
        out,
        teacher=str(teacher),
        kd_alpha=0.8,
        kd_temperature=2.0,
        verify=False,
        **FAST,
    )
    assert r.settings["teacher"] == str(teacher) and r.settings["kd_alpha"] == 0.8
    assert all("kd_loss" in x and "lm_loss" in x for x in r.losses)
    for x in r.losses:  # logged loss is the mix (one micro-batch per step)
        assert x["loss"] == pytest.approx(0.8 * x["kd_loss"] + 0.2 * x["lm_loss"], rel=1e-4)
    assert _stage(out)["settings"]["kd_temperature"] == 2.0
    assert _stage(out)["resolved"]["temperature"] == 2.0


@needs_bnb
def test_qlora_gromov_preset_cpu(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    r = _heal(str(src), out, preset="gromov", rank=4, lr=1e-3, verify=False, **FAST)
    s = r.settings
    assert s["method"] == "qlora" and s["targets"] == "mlp"
    assert sorted(s["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert s["rank"] == 4 and s["alpha"] == 4 and s["dropout"] == 0.05
    assert s["warmup"] == 100 and s["schedule"] == "cosine" and s["steps"] == 3
    assert s["preset_family"] == "other"
    assert s["guard_4bit_repairs"] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into a full-precision copy
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert r.merge_check["max_abs_logit_diff"] < 1e-5


def test_target_groups(arch, tiny_config):
    from shrink.core.models import meta_model
    from shrink.stages.heal.presets import resolve_targets

    model = meta_model(tiny_config(arch))
    assert resolve_targets(model, "mlp") == ["down_proj", "gate_proj", "up_proj"]
    assert resolve_targets(model, "attn") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(resolve_targets(model, "all")) == 7
    assert resolve_targets(model, "up_proj,q_proj") == ["up_proj", "q_proj"]
    with pytest.raises(ShrinkError, match="Linear modules are: down_proj, gate_proj, k_proj"):
        resolve_targets(model, "fc1")


def test_gromov_family():
    from transformers import LlamaConfig, MistralConfig

    from shrink.stages.heal.presets import gromov_family, preset_values

    l7 = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, vocab_size=32000, num_hidden_layers=23
    )  # pruned: the widths identify it
    assert gromov_family(l7, [])["rank"] == 2
    assert (
        gromov_family(LlamaConfig(hidden_size=8192, intermediate_size=28672, vocab_size=32000), [])[
            "rank"
        ]
        == 8
    )
    assert (
        gromov_family(
            MistralConfig(hidden_size=4096, intermediate_size=14336, vocab_size=32000), []
        )["rank"]
        == 4
    )
    assert gromov_family(LlamaConfig(), ["meta-llama/Llama-2-7b-hf"])["family"] == "llama-2-7b"
    v = preset_values("gromov", LlamaConfig(hidden_size=64, max_position_embeddings=1024), [], 2)
    assert v["rank"] == 64 and v["lr"] == 3e-4 and v["steps"] == 5000
    assert v["batch_size"] == 8 and v["seq_len"] == 1024  # global batch 16, capped context


@needs_bnb
def test_qlora_gradients_match_dequantized_reference(tiny_model_dir):
    """LoRA gradients of the 4-bit model == those of a float model holding the dequantized 4-bit
    weights, even after an eval-mode no-grad forward (the AVX512-BF16 repacking trap)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from bitsandbytes.nn.modules import has_avx512bf16
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from shrink.stages.heal.guard import guard_4bit_cpu, is_4bit_packed

    src = tiny_model_dir("llama", 2)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    lcfg = LoraConfig(
        r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    )

    def quantized():
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        return AutoModelForCausalLM.from_pretrained(
            src, quantization_config=q, device_map="cpu", dtype=torch.float32
        )

    def trap(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    def lora_grads(model):
        torch.manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.1)  # B != 0, so every LoRA weight gets a gradient
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {
            n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def reference(qmodel):
        # never call state_dict() on the 4-bit model here: it unpacks the weights as a side effect
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        for name, mod in qmodel.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                assert not mod.weight.quant_state.packing_format_for_cpu
                w = bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                sub = name.replace("base_model.model.", "").replace(".base_layer", "")
                ref.get_submodule(sub).weight.data.copy_(w)
        return lora_grads(get_peft_model(ref, lcfg))

    # shrink's path: trap first (simulates any stray eval forward), then the guard
    qm = quantized()
    trap(qm)
    packed = is_4bit_packed(qm)
    assert packed == has_avx512bf16()
    assert guard_4bit_cpu(qm) == (14 if packed else 0)  # 7 Linears x 2 layers unpacked
    trap(qm)  # the guard's pre-hooks keep it from repacking
    assert not is_4bit_packed(qm)
    peft_q = get_peft_model(qm, lcfg)
    got = lora_grads(peft_q)
    want = reference(qm)
    assert got.keys() == want.keys() and len(got) == 20
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), n

    if packed:  # control: without the guard the gradients really are wrong on this CPU
        qm2 = quantized()
        trap(qm2)
        qm2.train()
        bad = lora_grads(get_peft_model(qm2, lcfg))
        guard_4bit_cpu(qm2)  # unpack so the reference can read the weights
        want2 = reference(qm2)
        assert any(not torch.allclose(bad[n], want2[n], rtol=1e-2, atol=1e-4) for n in bad)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Interrupt

    src = tiny_model_dir("llama", 2)
    kw = dict(FAST, steps=4, save_steps=2, lr=1e-2, dropout=0.0, verify=False)
    out = tmp_path / "r"
    with pytest.raises(_Interrupt):
        _heal(str(src), out, callbacks=[StopAfterSave()], **kw)
    work = work_dir_for(out)
    assert not out.exists() and (work / "checkpoint-2").is_dir()
    with pytest.raises(ShrinkError, match="--resume"):
        _heal(str(src), out, **kw)
    with pytest.raises(ShrinkError, match="settings differ"):
        _heal(str(src), out, resume=True, **{**kw, "rank": 2})
    r = _heal(str(src), out, resume=True, save_adapter=True, **kw)
    assert r.steps == 4 and r.resumed_from.endswith("checkpoint-2")
    assert [x["step"] for x in r.losses] == [1, 2, 3, 4]
    assert _stage(out)["resumed_from_step"] == 2
    assert not work.exists()
    # same result as an uninterrupted run
    full = tmp_path / "full"
    r2 = _heal(str(src), full, save_adapter=True, **kw)
    assert [x["loss"] for x in r2.losses] == pytest.approx([x["loss"] for x in r.losses], rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(full / "adapter" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_accelerate_launch(tiny_model_dir, tmp_path):
    """The same command under `accelerate launch` with 2 processes (DDP over gloo on CPU)."""
    src = tiny_model_dir("llama", 2)
    out = tmp_path / "ddp"
    # `accelerate launch --cpu` starts one process unless MPI is set up; --multi_gpu starts the
    # processes through torchrun, and with --device cpu they train with gloo.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "shrink.cli",
        "heal",
        str(src),
        "-o",
        str(out),
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        *EVAL_ARGS,
        "--device",
        "cpu",
        "--no-verify",
        "--json",
        str(tmp_path / "r.json"),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SHRINK_NO_PROGRESS": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = _stage(out)
    assert st["resolved"]["world_size"] == 2 and st["resolved"]["global_batch"] == 4
    assert st["steps"] == 2 and st["resolved"]["train_data"]["samples"] == 8
    assert json.loads((tmp_path / "r.json").read_text())["result"]["steps"] == 2


def _bad(args, tmp_path, out):
    res = CliRunner().invoke(main, ["heal", *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert not out.exists() and not work_dir_for(out).exists()
    return lines[0]


def test_bad_inputs(tiny_model_dir, tmp_path, monkeypatch):
    src = str(tiny_model_dir("llama", 2))
    out = tmp_path / "o"
    assert "steps: Input should be greater than or equal to 1 (got 0)" in _bad(
        [src, "--steps", "0"], tmp_path, out
    )
    assert "rank: Input should be greater than or equal to 1 (got 0)" in _bad(
        [src, "--rank", "0"], tmp_path, out
    )
    msg = _bad([src, "--targets", "gate_proj,fc1"], tmp_path, out)
    assert "fc1" in msg and "q_proj" in msg and "down_proj" in msg  # lists the Linear names
    msg = _bad([src, "--seq-len", "4096"], tmp_path, out)
    assert "max_position_embeddings = 1024" in msg
    small = tmp_path / "small.txt"
    small.write_text("It is a truth universally acknowledged. " * 20)
    assert "too little healing text" in _bad(
        [src, "--data", str(small), "--seq-len", "64"], tmp_path, out
    )
    assert "needs a teacher" in _bad([src, "--kd-alpha", "0.5"], tmp_path, out)
    # teacher with a different vocabulary
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=1000,
        )
    ).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((Path(src) / f).read_bytes())
    assert "different tokenizer or vocabulary" in _bad(
        [src, "--teacher", str(other)], tmp_path, out
    )
    # qlora without bitsandbytes names the extra
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert "bitsandbytes" in _bad([src, "--method", "qlora"], tmp_path, out)
    with pytest.raises(ShrinkError, match=r"pip install -e '\.\[qlora\]'"):
        heal(src, out, HealConfig(method="qlora"))
    assert not out.exists()
