"""The build's memory plan: where each stage runs and whether it fits, before any work."""

from __future__ import annotations

import pytest

from shrink.analysis.estimate import GB, GIB, count_params, load_config
from shrink.analysis.memory import (
    PlanSettings,
    facts_for,
    format_plan,
    heal_bytes,
    parse_memory,
    plan_build,
    plan_for_estimate,
)
from shrink.core.errors import ShrinkError

STAGES = ["score", "prune", "bridge", "heal", "merge", "quantize", "export gguf", "evaluate"]


def test_gromov_70b_fits_one_24gb_card_with_qlora():
    plan = plan_for_estimate("llama-2-70b", 40, "24GB", "64GB")
    assert plan.fits and plan.refusal is None
    assert [s.stage for s in plan.stages] == STAGES
    heal = plan.stage("heal")
    assert heal.mode == "whole (qlora)" and heal.precision == "4-bit"
    assert "QLoRA chosen" in heal.note
    assert 15 * GB < heal.device_bytes <= 24 * GIB * 0.9
    # the dense model is streamed; the merge never holds more than a few tensors
    assert plan.stage("score").mode == "streamed" and plan.stage("merge").host_bytes < 8 * GB
    # the pruned checkpoint: 40 layers of 16-bit weights on disk
    assert plan.stage("prune").disk_bytes == count_params(load_config("llama-2-70b"), 40).total * 2
    lines = format_plan(plan)
    assert lines[-1] == "every stage fits"
    assert sum(line.startswith(tuple(STAGES)) for line in lines) == len(STAGES)


def test_13b_drop_10_plan():
    plan = plan_for_estimate("llama-2-13b", 10, "24GB", "64GB")
    assert plan.fits
    assert plan.stage("heal").mode == "whole (qlora)"  # 19.7 GB of 16-bit weights + activations
    assert plan.stage("score").mode == "streamed"  # 26 GB dense does not fit the card
    quant = plan.stage("quantize")
    assert quant.precision == "4-bit" and quant.disk_bytes < plan.stage("prune").disk_bytes / 3


def test_small_model_heals_with_16bit_lora():
    plan = plan_for_estimate("smollm2-135m", 3, "24GB", "64GB")
    assert plan.fits and plan.stage("heal").mode == "whole (lora)"
    assert plan.stage("score").mode == "whole" and not plan.stage("heal").note


def test_too_small_ram_is_refused_naming_stage_and_shortfall():
    plan = plan_for_estimate("llama-2-70b", 40, "24GB", "8GB")
    assert not plan.fits
    assert plan.refusal.startswith("stage quantize cannot fit: needs ")
    assert "GB of RAM" in plan.refusal and "short by" in plan.refusal
    assert format_plan(plan)[-1] == f"refused: {plan.refusal}"


def test_qlora_on_the_cpu_and_a_card_too_small():
    def cpu(method):
        return plan_build(
            "llama-2-13b",
            gpu_bytes=0,
            ram_bytes=64 * GIB,
            drop=10,
            settings=PlanSettings(heal_method=method),
        ).stage("heal")

    # a float32 LoRA base of 30 layers and its activations do not fit 64 GB: auto picks QLoRA
    lora, auto, qlora = cpu("lora"), cpu("auto"), cpu("qlora")
    assert lora.short.startswith("needs ") and lora.precision == "32-bit"
    assert auto.fits and auto.mode == "whole (qlora)" and auto.device == "cpu"
    assert "QLoRA chosen: a float32 LoRA base" in auto.note
    assert qlora.host_bytes == auto.host_bytes < lora.host_bytes / 3
    assert "bfloat16" in qlora.note
    small = plan_for_estimate("llama-2-70b", 40, "12GB", "64GB")
    assert small.refusal.startswith("stage heal cannot fit: needs ")
    assert "even with QLoRA" in small.refusal


def test_heal_memory_grows_with_the_batch_and_qlora_is_smaller():
    facts = facts_for(load_config("llama-2-13b"), 10)
    small = heal_bytes(facts, "qlora", PlanSettings(heal_batch=1), "cuda")
    big = heal_bytes(facts, "qlora", PlanSettings(heal_batch=8), "cuda")
    assert small < big < heal_bytes(facts, "lora", PlanSettings(heal_batch=8), "cuda")


def test_settings_are_the_stages_defaults():
    from shrink.stages.configs import EvaluateConfig, QuantizeConfig, ScoreConfig
    from shrink.stages.heal.presets import DEFAULTS

    st = PlanSettings()

    def default(cfg, name):
        return cfg.model_fields[name].default

    assert (st.score_samples, st.score_seq_len, st.batch_size) == (
        default(ScoreConfig, "samples"),
        default(ScoreConfig, "seq_len"),
        default(ScoreConfig, "batch_size"),
    )
    assert (st.gptq_samples, st.gptq_seq_len) == (
        default(QuantizeConfig, "samples"),
        default(QuantizeConfig, "seq_len"),
    )
    assert (st.eval_samples, st.eval_seq_len) == (
        default(EvaluateConfig, "samples"),
        default(EvaluateConfig, "seq_len"),
    )
    from shrink.stages.configs import ExportConfig

    assert (st.imatrix_samples, st.imatrix_seq_len) == (
        default(ExportConfig, "imatrix_samples"),
        default(ExportConfig, "imatrix_seq_len"),
    )
    assert (st.heal_rank, st.heal_batch, st.heal_seq_len, st.heal_targets) == (
        DEFAULTS["rank"],
        DEFAULTS["batch_size"],
        DEFAULTS["seq_len"],
        DEFAULTS["targets"],
    )


def test_logit_chunk_is_the_perplexity_one():
    """The plan's chunk is the one both perplexities (in memory and streamed) run the head on."""
    from shrink.analysis.memory import LOGIT_BYTES
    from shrink.core import perplexity
    from shrink.streaming import perplexity as streamed

    assert LOGIT_BYTES == perplexity.LOGIT_BYTES
    assert streamed.chunk_positions is perplexity.chunk_positions


def test_heal_logit_chunk_is_the_healing_loss_one():
    from shrink.analysis.memory import HEAD_CHUNK_BYTES
    from shrink.stages.heal import headloss

    assert HEAD_CHUNK_BYTES == headloss.HEAD_CHUNK_BYTES


def test_gptq_float32_margin_is_the_quantized_loader_one():
    """The evaluate row keeps a GPTQ folder's float tensors in float32 exactly when the loader
    does: while QUANTIZED_FLOAT32_MARGIN times their float32 size fits the usable RAM."""
    from shrink.analysis.estimate import weight_memory
    from shrink.analysis.memory import HOST_RESERVE, QUANTIZED_FLOAT32_MARGIN
    from shrink.streaming import memory

    assert QUANTIZED_FLOAT32_MARGIN == memory.QUANTIZED_FLOAT32_MARGIN
    cfg = load_config("smollm2-135m")
    st = PlanSettings()
    q = weight_memory(cfg, 6, st.gptq_bits, st.group_size)
    edge = QUANTIZED_FLOAT32_MARGIN * (q.linear_bytes + 2 * q.other_bytes) / (1 - HOST_RESERVE)

    def note(ram: float) -> str:
        return plan_build(cfg, gpu_bytes=0, ram_bytes=ram, drop=6).stage("evaluate").note

    assert "(float32 embeddings)" in note(edge * 1.001)
    assert "(bfloat16 embeddings)" in note(edge * 0.999)


def test_parse_memory():
    assert parse_memory("24GB", "gpu") == 24 * GIB == parse_memory("24 GiB", "gpu")
    assert parse_memory("512MB", "ram") == 512 * 2**20
    assert parse_memory("4090", "gpu") == 24 * GIB
    assert parse_memory(1e9, "ram") == 1e9
    for bad in ("lots", "24"):  # a size needs its unit
        with pytest.raises(ShrinkError, match="ram size"):
            parse_memory(bad, "ram")
    with pytest.raises(ShrinkError, match="positive RAM"):
        plan_build("llama-2-7b", gpu_bytes=0, ram_bytes=0)


def test_estimate_prints_the_plan_and_refuses_what_cannot_fit():
    from click.testing import CliRunner

    from shrink.cli import main

    ok = CliRunner().invoke(
        main, ["estimate", "llama-2-70b", "--drop", "40", "--gpu", "24GB", "--ram", "64GB"]
    )
    assert ok.exit_code == 0, ok.output
    assert "heal" in ok.output and "qlora" in ok.output and "every stage fits" in ok.output
    bad = CliRunner().invoke(
        main, ["estimate", "llama-2-70b", "--drop", "40", "--gpu", "24GB", "--ram", "8GB"]
    )
    assert bad.exit_code == 2 and "refused: stage quantize cannot fit" in bad.output


def test_every_gguf_type_shrink_writes_can_be_planned():
    from shrink.analysis.memory import GGUF_BITS
    from shrink.stages.export.gguf_types import GGUF_TYPES

    assert set(GGUF_TYPES) <= set(GGUF_BITS)


def test_gguf_export_row_holds_its_importance_matrix_walk():
    """The export's peak is the importance matrix's float32 forward walk of the pruned model on
    the CPU (whole when it fits the RAM, else streamed) or the writer's one tensor, whichever is
    larger; without an importance matrix it is the writer's."""

    def row(ram: str, **kw):
        settings = PlanSettings(gptq_bits=None, **{"gguf": "q4_k_m", **kw})
        return plan_for_estimate("llama-2-13b", 10, "24GB", ram, settings=settings).stage(
            "export gguf"
        )

    plain = row("64GB", imatrix_samples=0)
    assert "importance" not in plain.note and plain.host_bytes < 3 * GB  # one tensor
    assert "importance" not in row("64GB", gguf="f16").note  # written directly, no quantizer
    pruned = count_params(load_config("llama-2-13b"), 10).total
    whole = row("64GB")  # 30 float32 layers fit 64 GB: the walk holds the whole model
    assert whole.note.startswith("the importance matrix (whole, 32-bit)")
    assert pruned * 4 < whole.host_bytes < pruned * 4 + 6 * GB
    streamed = row("16GB")
    assert streamed.note.startswith("the importance matrix (streamed, 32-bit)")
    assert plain.host_bytes <= streamed.host_bytes < 4 * GB and streamed.fits


def test_evaluate_row_on_a_cpu_holds_the_gptq_model_whole():
    """On a CPU the evaluate stage loads the GPTQ folder whole (packed layers cannot be
    streamed): float32 embeddings when twice that fits the RAM, else bfloat16 ones."""
    from shrink.analysis.estimate import weight_memory

    cfg = load_config("smollm2-135m")
    q = weight_memory(cfg, 6, 4, 128)
    big = plan_for_estimate("smollm2-135m", 6, "none", "64GB").stage("evaluate")
    assert "4-bit model whole (float32 embeddings)" in big.note
    assert big.host_bytes > q.linear_bytes + 2 * q.other_bytes
    small = plan_for_estimate("smollm2-135m", 6, "none", "0.3GB").stage("evaluate")
    assert "4-bit model whole (bfloat16 embeddings)" in small.note
    assert small.host_bytes < big.host_bytes
    no_gptq = PlanSettings(gptq_bits=None)
    plain = plan_for_estimate("smollm2-135m", 6, "none", "64GB", settings=no_gptq)
    assert "4-bit" not in plain.stage("evaluate").note


def test_stages_after_gptq_carry_what_gptqmodel_leaves_in_the_process():
    from shrink.analysis.memory import GPTQ_LEFTOVER

    def row(name, bits):
        settings = PlanSettings(gptq_bits=bits, gguf="q4_k_m")
        return plan_for_estimate("llama-2-13b", 10, "none", "64GB", settings=settings).stage(name)

    assert row("export gguf", 4).host_bytes == row("export gguf", None).host_bytes + GPTQ_LEFTOVER
    # evaluate's row also holds the 4-bit model when there is one: at least the leftover more
    assert row("evaluate", 4).host_bytes >= row("evaluate", None).host_bytes + GPTQ_LEFTOVER
