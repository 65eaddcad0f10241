"""The ``heal`` stage: repair a pruned model with a short fine-tune, then write a standard checkpoint.

LoRA or QLoRA (optionally distilled from a teacher) merged into a full-precision copy of the
base, or ``last-layers``: the LM head and the last K decoder layers trained in full precision
with no adapter. Training runs on the Hugging Face ``Trainer``, so the same call works on one CPU,
one GPU, or several processes / GPUs / nodes under ``accelerate launch`` with no code change.
Only the main process evaluates, merges and writes the output folder.

The pieces: ``presets`` (defaults, Gromov et al.'s recipe, target modules), ``trainer`` (the
Trainer, the resumable work folder, the model to train), ``guard`` (the 4-bit CPU gradient trap),
``merge`` (adapter into full precision, perplexity before and after).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from shrink.core.data import token_blocks
from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.core.models import (
    check_decoder_only,
    check_device,
    from_pretrained_checked,
    load_config,
    meta_model,
    read_shrink_json,
    resolve,
    text_config,
)
from shrink.core.progress import stderr
from shrink.core.quiet import third_party_quiet
from shrink.report.plots import plot_losses
from shrink.stages.configs import EvaluateConfig, HealConfig, ModelOptions
from shrink.stages.heal.merge import merge
from shrink.stages.heal.presets import resolve_settings, resolve_targets
from shrink.stages.heal.trainer import (
    prepare_work,
    train,
    trainable_model,
    work_dir_for,
)
from shrink.stages.pipeline import Artifact, BuildContext, Stage
from shrink.stages.runner import StageOutput, claimed_output, run_stage

QLORA_INSTALL = install_hint("qlora")
HEAL_INSTALL = install_hint("heal")


@dataclass
class HealResult:
    output: Path | None  # None on processes other than the main one
    method: str
    settings: dict
    steps: int
    final_loss: float | None
    losses: list[dict] = field(default_factory=list)
    ppl_before: float | None = None
    ppl_after: float | None = None
    # the same before/after on the evaluation set's second domain (None if it has none)
    ppl_before_second: float | None = None
    ppl_after_second: float | None = None
    seconds: float = 0.0
    resumed_from: str | None = None
    merge_check: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output) if self.output is not None else None
        d.pop("record")
        return d


def _check_installed(method: str) -> None:
    if method != "last-layers":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ShrinkError(f"healing with adapters needs peft: {HEAL_INSTALL}") from None
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # noqa: BLE001 - ImportError or a broken native library
            raise ShrinkError(f"--method qlora needs bitsandbytes: {QLORA_INSTALL}") from None


def check_teacher(teacher: str, student_config, student_tok, trust_remote_code: bool):
    """Same tokenizer and vocabulary, else KL over next-token distributions is meaningless."""
    from transformers import AutoTokenizer

    resolved = resolve(teacher)
    tconfig = load_config(resolved, trust_remote_code)
    check_decoder_only(tconfig)
    if resolved.path is not None:  # safetensors only, undamaged, every tensor of its config
        from shrink.core.models import check_model_folder

        check_model_folder(resolved.path, tconfig, trust_remote_code)
    try:
        ttok = AutoTokenizer.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ShrinkError(
            f"cannot load the tokenizer of teacher '{teacher}': {first_line(e)}"
        ) from None
    sv, tv = (text_config(student_config).vocab_size, text_config(tconfig).vocab_size)
    if sv != tv or student_tok.get_vocab() != ttok.get_vocab():
        raise ShrinkError(
            f"teacher '{teacher}' has a different tokenizer or vocabulary "
            f"(vocab {tv} vs student {sv}): distillation needs the same tokenizer"
        )
    return resolved


@dataclass
class HealSettings:
    """Every resolved setting of one heal, in the order shrink.json records them (the work
    folder's resume check compares them too)."""

    method: str
    rank: int | None
    alpha: float | None
    dropout: float | None
    targets: str | None
    target_modules: list[str]
    steps: int
    lr: float
    schedule: str
    warmup: int
    batch_size: int
    grad_accum: int
    world_size: int
    global_batch: int
    seq_len: int
    seed: int
    data: str
    evaluation: str
    second_evaluation: str | None
    preset: str | None
    preset_family: str | None
    teacher: str | None
    temperature: float | None
    kd_alpha: float | None
    device: str
    last_layers: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _HealJob:
    """One heal: what it was asked, then what the checks resolved (see :func:`_prepare`)."""

    model_dir: str | Path
    output: str | Path
    config: HealConfig
    evaluation: EvaluateConfig
    load: ModelOptions
    resolved: object
    device: str
    state: object  # accelerate's PartialState
    show_progress: bool
    hf_config: object = None
    previous: dict | None = None
    s: dict = field(default_factory=dict)  # the training values (presets.resolve_settings)
    tokenizer: object = None
    teacher: object = None
    blocks: object = None
    evalb: object = None
    evalb2: object = None
    settings: dict = field(default_factory=dict)  # HealSettings, then what training adds
    resume_from: str | None = None  # the Trainer checkpoint training continued from
    on_cuda: bool = False
    load_kw: dict = field(default_factory=dict)  # how the base (and teacher) weights load


def heal(
    model_dir: str | Path,
    output: str | Path,
    config: HealConfig | None = None,
    *,
    evaluation: EvaluateConfig | None = None,
    load: ModelOptions | None = None,
    resume: bool = False,
    force: bool = False,
    verify: bool = True,
    callbacks: list | None = None,
    show_progress: bool = True,
    book=None,
) -> HealResult:
    """Fine-tune ``model_dir`` (see the module docstring), and write a standard HF folder to
    ``output`` with shrink.json (stage "heal"), loss.png and perplexity before/after on
    ``evaluation`` (default: the fixed evaluation set). Unset values in ``config`` come from its
    preset, else the defaults named in :class:`~shrink.stages.configs.HealConfig`."""
    t0 = time.perf_counter()
    load = load or ModelOptions()
    # ---- cheap checks first: nothing heavy runs and nothing is written on bad input ----
    device = check_device(load.device)
    resolved = resolve(str(model_dir))
    from accelerate import PartialState

    # one process, or one of several under accelerate launch / torchrun (gloo on CPU)
    state = PartialState(cpu=not device.startswith("cuda"))
    # the output's lock covers the work folder too: a second heal into the same output stops
    with claimed_output(output, force, resolved.path, lock=state.is_main_process):
        job = _prepare(
            _HealJob(
                model_dir,
                output,
                config or HealConfig(),
                evaluation or EvaluateConfig(),
                load,
                resolved,
                device,
                state,
                show_progress,
            )
        )
        work = work_dir_for(output)
        resume_from = prepare_work(
            work, job.settings, resume=resume, force=force, state=state, show_progress=show_progress
        )
        job.resume_from = resume_from
        trained, result = _train(job, work, callbacks)
        if not state.is_main_process:
            return result
        _merge_and_write(job, trained, result, force=force, verify=verify, book=book)
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _prepare(job: _HealJob) -> _HealJob:
    """Resolve the settings, tokenize the healing and evaluation text; no weights yet."""
    c, evaluation, load, resolved = job.config, job.evaluation, job.load, job.resolved
    job.hf_config = hf_config = load_config(resolved, load.trust_remote_code)
    check_decoder_only(hf_config)
    job.previous = read_shrink_json(resolved.path)
    names = [
        n
        for n in [
            (job.previous or {}).get("base_model"),
            getattr(hf_config, "_name_or_path", None),
            resolved.name,
            resolved.hub_id,
        ]
        if n
    ]
    job.s = s = resolve_settings(c, hf_config, names, job.state.num_processes)
    _check_installed(s["method"])
    target_modules = (
        []
        if s["method"] == "last-layers"
        else resolve_targets(meta_model(hf_config, load.trust_remote_code), s["targets"])
    )
    from transformers import AutoTokenizer

    with third_party_quiet():
        job.tokenizer = AutoTokenizer.from_pretrained(
            resolved.location, trust_remote_code=load.trust_remote_code
        )
    job.teacher = (
        check_teacher(c.teacher, hf_config, job.tokenizer, load.trust_remote_code)
        if c.teacher
        else None
    )
    global_batch = s["batch_size"] * s["grad_accum"] * job.state.num_processes
    job.blocks = token_blocks(
        job.tokenizer, c.data, s["steps"] * global_batch, s["seq_len"], c.seed, at_most=True
    )
    if job.blocks.available < global_batch:
        raise ShrinkError(
            f"too little healing text: '{c.data}' gives {job.blocks.available} "
            f"blocks of {s['seq_len']} tokens, one optimizer step needs "
            f"{global_batch} (give more text, or lower --seq-len / --batch-size)"
        )
    job.evalb = token_blocks(
        job.tokenizer, evaluation.data, evaluation.samples, evaluation.seq_len, evaluation.seed
    )
    job.evalb2 = (
        token_blocks(
            job.tokenizer,
            evaluation.second,
            evaluation.samples,
            evaluation.seq_len,
            evaluation.seed,
        )
        if evaluation.second
        else None
    )
    job.settings = _settings(job, target_modules, global_batch).to_dict()
    return job


def _settings(job: _HealJob, target_modules: list[str], global_batch: int) -> HealSettings:
    c, s, evaluation = job.config, job.s, job.evaluation
    return HealSettings(
        method=s["method"],
        rank=s["rank"],
        alpha=s["alpha"],
        dropout=s["dropout"],
        targets=s["targets"],
        target_modules=target_modules,
        steps=s["steps"],
        lr=s["lr"],
        schedule="cosine",
        warmup=s["warmup"],
        batch_size=s["batch_size"],
        grad_accum=s["grad_accum"],
        world_size=job.state.num_processes,
        global_batch=global_batch,
        seq_len=s["seq_len"],
        seed=c.seed,
        data=c.data,
        evaluation=evaluation.name(),
        second_evaluation=evaluation.name(evaluation.second) if job.evalb2 else None,
        preset=c.preset,
        preset_family=s["family"],
        teacher=c.teacher,
        temperature=c.kd_temperature if c.teacher else None,
        kd_alpha=s["kd_alpha"],
        device=job.device,
        last_layers=s["last_layers"] if s["method"] == "last-layers" else None,
    )


def _train(job: _HealJob, work: Path, callbacks) -> tuple:
    """Train (resumable: the work folder keeps the Trainer's checkpoints); returns the
    trainer's outcome and the result so far."""
    c, s, settings, state = job.config, job.s, job.settings, job.state
    resume_from = job.resume_from
    job.on_cuda = on_cuda = job.device.startswith("cuda")
    # QLoRA computes in 16 bits on either device (its point is a base that fits); LoRA on a
    # CPU trains in float32
    compute_dtype = (
        torch.bfloat16
        if (on_cuda and torch.cuda.is_bf16_supported()) or (not on_cuda and s["method"] == "qlora")
        else torch.float16
        if on_cuda
        else torch.float32
    )
    job.load_kw = load_kw = {
        "use_safetensors": True,
        "trust_remote_code": job.load.trust_remote_code,
    }
    model = trainable_model(
        job.resolved.location,
        s,
        settings["target_modules"],
        compute_dtype=compute_dtype,
        on_cuda=on_cuda,
        state=state,
        seed=c.seed,
        load_kw=load_kw,
    )
    settings["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher_model = None
    if job.teacher is not None:
        teacher_model = from_pretrained_checked(
            job.teacher.location, dtype=compute_dtype, **load_kw
        )
        teacher_model.eval().requires_grad_(False)
    trained = train(
        model,
        job.blocks.input_ids,
        s,
        work=work,
        seed=c.seed,
        on_cuda=on_cuda,
        teacher_model=teacher_model,
        temperature=c.kd_temperature,
        save_steps=c.save_steps,
        resume_from=resume_from,
        callbacks=callbacks,
        show_progress=job.show_progress,
        state=state,
    )
    settings.update(trained.info)
    _print_throughput(job, trained.info.get("throughput"))
    settings["epochs"] = round(
        trained.steps * settings["global_batch"] / job.blocks.input_ids.shape[0], 3
    )
    settings["train_data"] = job.blocks.describe()
    settings["eval_data_blocks"] = job.evalb.describe()
    if job.evalb2 is not None:
        settings["second_eval_data_blocks"] = job.evalb2.describe()
    result = HealResult(
        output=None,
        method=s["method"],
        settings=settings,
        steps=trained.steps,
        final_loss=trained.final_loss,
        losses=trained.losses,
        resumed_from=str(resume_from) if resume_from else None,
    )
    del model, teacher_model
    gc.collect()
    return trained, result


def _print_throughput(job: _HealJob, tp: dict | None) -> None:
    if tp and job.show_progress and job.state.is_main_process:
        stderr.print(
            f"heal: {tp['tokens_per_second']} tokens/s, "
            f"{tp['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s = "
            f"{tp['fraction_of_matmul_rate']:.0%} of this machine's measured matmul "
            f"rate ({tp['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s)",
            highlight=False,
        )


def _merge_and_write(
    job: _HealJob, trained, result: HealResult, *, force: bool, verify: bool, book
) -> None:
    """Merge into a full-precision copy of the base, measure before/after, write the output."""
    evaluation, evalb2 = job.evaluation, job.evalb2
    merged = merge(
        job.resolved.location,
        trained.saved,
        job.s["method"],
        job.hf_config,
        device=job.device,
        on_cuda=job.on_cuda,
        eval_ids=job.evalb.input_ids,
        load_kw=job.load_kw,
        show_progress=job.show_progress,
        second_ids=evalb2.input_ids if evalb2 is not None else None,
        book=book,
        set_names=(
            evaluation.name(),
            evaluation.name(evaluation.second) if evalb2 is not None else None,
        ),
    )
    result.ppl_before, result.ppl_after = merged.before.perplexity, merged.after.perplexity
    if evalb2 is not None:
        result.ppl_before_second = merged.before.second.perplexity
        result.ppl_after_second = merged.after.second.perplexity
    result.merge_check = merged.check
    run_stage(
        "heal",
        job.output,
        partial(_write_healed, job, trained, merged, result),
        source=job.resolved.path,
        settings=job.config.settings(),
        force=force,
        verify=verify,
        log=stderr.print if job.show_progress else None,
    )


def _write_healed(job: _HealJob, trained, merged, result: HealResult, tmp: Path) -> StageOutput:
    """The runner's computation: the merged model, its tokenizer, the adapter, the loss plot."""
    from shrink.runtime.verify import verify_in_subprocess
    from shrink.stages.prune import base_model_id

    c, s, resolved = job.config, job.s, job.resolved
    merged.model.save_pretrained(tmp, safe_serialization=True)
    job.tokenizer.save_pretrained(tmp)
    if c.save_adapter and s["method"] != "last-layers":
        shutil.copytree(trained.saved, tmp / "adapter")
        cfg_file = tmp / "adapter" / "adapter_config.json"
        if cfg_file.is_file():  # point the adapter at the model it was trained on
            acfg = json.loads(cfg_file.read_text())
            acfg["base_model_name_or_path"] = resolved.location
            cfg_file.write_text(json.dumps(acfg, indent=2) + "\n")
    if trained.losses:
        plot_losses(
            trained.losses,
            tmp / "loss.png",
            f"heal {s['method']} on {Path(resolved.location).name}: ppl "
            f"{result.ppl_before:.2f} -> {result.ppl_after:.2f} "
            f"({job.evaluation.name()})",
        )
    return StageOutput(
        result,
        _record(job, trained, merged, result),
        verify_in_subprocess,
        {
            "source_model": str(job.model_dir),
            "base_model": base_model_id(resolved, job.hf_config, job.previous),
        },
    )


def _record(job: _HealJob, trained, merged, result: HealResult) -> dict:
    """The heal's entry in shrink.json."""
    evaluation, evalb2, resume_from = job.evaluation, job.evalb2, job.resume_from
    return {
        "source": job.resolved.location,
        "resolved": job.settings,
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "resumed_from_step": (int(Path(resume_from).name.split("-")[-1]) if resume_from else None),
        "perplexity_before": result.ppl_before,
        "perplexity_after": result.ppl_after,
        "evaluation": job.evalb.describe() | {"set": evaluation.name()},
        "second_domain": None
        if evalb2 is None
        else {
            "perplexity_before": result.ppl_before_second,
            "perplexity_after": result.ppl_after_second,
            "evaluation": evalb2.describe() | {"set": evaluation.name(evaluation.second)},
        },
        "eval_tokens": merged.after.tokens,
        "merge_check": merged.check,
        "merged_dtype": str(merged.dtype).split(".")[-1],
        "adapter_saved": bool(job.config.save_adapter and job.s["method"] != "last-layers"),
        "losses": trained.losses,
    }


class HealStage(Stage):
    """Fine-tune the pruned model; resumes its own trainer checkpoints in its stage folder."""

    name = "heal"
    keeps_work = True

    def describe(self, ctx: BuildContext) -> str:
        h = self.settings(ctx)
        return (
            f"heal ({h.method or 'lora'}{', preset ' + h.preset if h.preset else ''}, "
            f"{h.steps or 'default'} steps on {h.data})"
        )

    def output_part(self, config) -> str:
        return "healed"

    def disk_bytes(self, ctx: BuildContext) -> int:
        return ctx.source_bytes() * 2  # healed model + trainer checkpoints (bounded by base)

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        c = ctx.config
        r = heal(
            ctx.model,
            work_dir / "model",
            self.settings(ctx),
            evaluation=c.evaluate,
            load=c.model_options(),
            force=True,
            resume=ctx.resume,
            show_progress=ctx.show_progress,
            book=ctx.book,
        )
        return {
            "model": str(work_dir / "model"),
            "steps": r.steps,
            "final_loss": r.final_loss,
            "ppl_before": r.ppl_before,
            "ppl_after": r.ppl_after,
            "ppl_before_second": r.ppl_before_second,
            "ppl_after_second": r.ppl_after_second,
            "evaluation": c.evaluate.name(),
            "settings": r.settings,
        }

    def apply(self, ctx: BuildContext, result: dict) -> None:
        ctx.model = ctx.float_model = result["model"]
        ctx.add(Artifact("hf", Path(result["model"]), "healed"))

    def report(self, ctx: BuildContext, result: dict) -> dict:
        return {"heal": result}

    def absent_report(self, ctx: BuildContext) -> dict:
        return {"heal": None}
