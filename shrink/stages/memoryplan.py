"""The memory plan of a build: each stage's place (device, streamed or whole, bits), predicted peak
device and host memory, and disk, for the GPU and RAM this machine has (or the ones given)."""

from __future__ import annotations

import os

from shrink.analysis.memory import Plan, PlanSettings, parse_memory, plan_build
from shrink.stages.configs import BuildConfig


def plan_settings(c: BuildConfig) -> PlanSettings:
    """What the stages of ``c`` will do, in the plan's terms."""
    s = PlanSettings()
    if c.prune is not None:
        s.score_samples, s.score_seq_len = c.prune.samples, c.prune.seq_len
    if c.heal is not None:
        s.heal_method = c.heal.method or "auto"
        s.heal_rank = c.heal.rank or s.heal_rank
        s.heal_targets = c.heal.targets if c.heal.targets in ("mlp", "attn", "all") else "all"
        s.heal_batch = c.heal.batch_size or s.heal_batch
        s.heal_seq_len = c.heal.seq_len or s.heal_seq_len
    if c.quantize is not None:
        s.gptq_bits, s.gptq_samples, s.gptq_seq_len = (
            c.quantize.bits(),
            c.quantize.samples,
            c.quantize.seq_len,
        )
        s.group_size = c.quantize.group_size or s.group_size
    else:
        s.gptq_bits = None
    s.gguf = c.export.gguf if c.export is not None and c.export.gguf else None
    if s.gguf:
        uses = c.export.uses_imatrix()
        s.imatrix_samples = c.export.imatrix_samples if uses else 0
        s.imatrix_seq_len = c.export.imatrix_seq_len
    s.eval_samples, s.eval_seq_len = c.evaluate.samples, c.evaluate.seq_len
    return s


def machine_memory() -> tuple[float, float]:
    """(GPU bytes, RAM bytes) of this machine: the first CUDA device (0 when none) and the
    physical RAM, or the process's memory limit when it is smaller."""
    gpu = 0.0
    try:
        import torch

        if torch.cuda.is_available():
            gpu = float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - a broken CUDA set-up plans for the CPU
        gpu = 0.0
    from shrink.core.peaks import process_limit

    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    limit = process_limit()  # a data limit or a container's: what this build may use
    return gpu, min(ram, float(limit)) if limit else ram


def build_plan(c: BuildConfig, gpu: str | None = None, ram: str | None = None) -> Plan:
    """The plan of build ``c`` on the given GPU and RAM sizes (default: this machine's)."""
    here_gpu, here_ram = machine_memory()
    gpu_bytes = (
        here_gpu if gpu is None else (0.0 if gpu in ("", "none") else parse_memory(gpu, "gpu"))
    )
    ram_bytes = here_ram if ram is None else parse_memory(ram, "ram")
    drop = (c.prune.count() or 0) if c.prune is not None else 0
    return plan_build(
        c.model, gpu_bytes=gpu_bytes, ram_bytes=ram_bytes, drop=drop, settings=plan_settings(c)
    )


def with_planned_heal(c: BuildConfig, plan: Plan) -> BuildConfig:
    """``c`` with the heal method the plan chose when the build left it open: QLoRA where a
    LoRA base would not fit (the plan's heal row says why), else ``c`` unchanged."""
    if c.heal is None or c.heal.method is not None:
        return c
    row = next((s for s in plan.stages if s.stage == "heal"), None)
    if row is None or row.mode != "whole (qlora)":
        return c
    return c.model_copy(update={"heal": c.heal.model_copy(update={"method": "qlora"})})
