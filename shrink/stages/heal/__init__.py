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
from pathlib import Path

import torch

from shrink.core.data import token_blocks
from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.core.models import (check_decoder_only, check_device, from_pretrained_checked,
                                load_config, meta_model, read_shrink_json, resolve,
                                text_config)
from shrink.core.outputs import check_output, lock_output
from shrink.core.progress import stderr
from shrink.core.quiet import third_party_quiet
from shrink.report.plots import plot_losses
from shrink.stages.configs import EvaluateConfig, HealConfig, ModelOptions
from shrink.stages.heal.merge import merge
from shrink.stages.heal.presets import resolve_settings, resolve_targets
from shrink.stages.heal.trainer import prepare_work, train, trainable_model, work_dir_for
from shrink.stages.pipeline import Artifact, BuildContext, Stage
from shrink.stages.runner import StageOutput, run_stage

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
        raise ShrinkError(f"cannot load the tokenizer of teacher '{teacher}': "
                          f"{first_line(e)}") from None
    sv, tv = (text_config(student_config).vocab_size, text_config(tconfig).vocab_size)
    if sv != tv or student_tok.get_vocab() != ttok.get_vocab():
        raise ShrinkError(f"teacher '{teacher}' has a different tokenizer or vocabulary "
                          f"(vocab {tv} vs student {sv}): distillation needs the same tokenizer")
    return resolved


def heal(model_dir: str | Path, output: str | Path, config: HealConfig | None = None, *,
         evaluation: EvaluateConfig | None = None, load: ModelOptions | None = None,
         resume: bool = False, force: bool = False, verify: bool = True,
         callbacks: list | None = None, show_progress: bool = True) -> HealResult:
    """Fine-tune ``model_dir`` (see the module docstring), and write a standard HF folder to
    ``output`` with shrink.json (stage "heal"), loss.png and perplexity before/after on
    ``evaluation`` (default: the fixed evaluation set). Unset values in ``config`` come from its
    preset, else the defaults named in :class:`~shrink.stages.configs.HealConfig`."""
    t0 = time.perf_counter()
    c = config or HealConfig()
    load = load or ModelOptions()
    evaluation = evaluation or EvaluateConfig()
    # ---- cheap checks first: nothing heavy runs and nothing is written on bad input ----
    device = check_device(load.device)
    resolved = resolve(str(model_dir))
    check_output(output, force, resolved.path)
    hf_config = load_config(resolved, load.trust_remote_code)
    check_decoder_only(hf_config)
    previous = read_shrink_json(resolved.path)
    from accelerate import PartialState

    # one process, or one of several under accelerate launch / torchrun (gloo on CPU)
    state = PartialState(cpu=not device.startswith("cuda"))
    names = [n for n in [(previous or {}).get("base_model"),
                         getattr(hf_config, "_name_or_path", None), resolved.name,
                         resolved.hub_id] if n]
    s = resolve_settings(c, hf_config, names, state.num_processes)
    _check_installed(s["method"])
    target_modules = ([] if s["method"] == "last-layers" else
                      resolve_targets(meta_model(hf_config, load.trust_remote_code),
                                      s["targets"]))

    from transformers import AutoTokenizer

    with third_party_quiet():
        tokenizer = AutoTokenizer.from_pretrained(resolved.location,
                                                  trust_remote_code=load.trust_remote_code)
    teacher = (check_teacher(c.teacher, hf_config, tokenizer, load.trust_remote_code)
               if c.teacher else None)
    global_batch = s["batch_size"] * s["grad_accum"] * state.num_processes
    blocks = token_blocks(tokenizer, c.data, s["steps"] * global_batch, s["seq_len"], c.seed,
                          at_most=True)
    if blocks.available < global_batch:
        raise ShrinkError(f"too little healing text: '{c.data}' gives {blocks.available} blocks "
                          f"of {s['seq_len']} tokens, one optimizer step needs {global_batch} "
                          "(give more text, or lower --seq-len / --batch-size)")
    evalb = token_blocks(tokenizer, evaluation.data, evaluation.samples, evaluation.seq_len,
                         evaluation.seed)
    evalb2 = (token_blocks(tokenizer, evaluation.second, evaluation.samples, evaluation.seq_len,
                           evaluation.seed) if evaluation.second else None)
    settings = {
        "method": s["method"], "rank": s["rank"], "alpha": s["alpha"], "dropout": s["dropout"],
        "targets": s["targets"], "target_modules": target_modules, "steps": s["steps"],
        "lr": s["lr"], "schedule": "cosine", "warmup": s["warmup"],
        "batch_size": s["batch_size"], "grad_accum": s["grad_accum"],
        "world_size": state.num_processes, "global_batch": global_batch,
        "seq_len": s["seq_len"], "seed": c.seed, "data": c.data,
        "evaluation": evaluation.name(),
        "second_evaluation": evaluation.name(evaluation.second) if evalb2 else None,
        "preset": c.preset, "preset_family": s["family"],
        "teacher": c.teacher, "temperature": c.kd_temperature if c.teacher else None,
        "kd_alpha": s["kd_alpha"], "device": device,
        "last_layers": s["last_layers"] if s["method"] == "last-layers" else None,
    }

    # ---- train (resumable: the work folder keeps the Trainer's checkpoints) ----
    # the output's lock covers the work folder too: a second heal into the same output stops here
    out_lock = lock_output(output) if state.is_main_process else None
    work = work_dir_for(output)
    resume_from = prepare_work(work, settings, resume=resume, force=force, state=state,
                               show_progress=show_progress)
    on_cuda = device.startswith("cuda")
    compute_dtype = (torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else
                     torch.float16 if on_cuda else torch.float32)
    load_kw = dict(use_safetensors=True, trust_remote_code=load.trust_remote_code)
    model = trainable_model(resolved.location, s, target_modules, compute_dtype=compute_dtype,
                            on_cuda=on_cuda, state=state, seed=c.seed, load_kw=load_kw)
    settings["trainable_params"] = sum(p.numel() for p in model.parameters()
                                       if p.requires_grad)
    teacher_model = None
    if teacher is not None:
        teacher_model = from_pretrained_checked(teacher.location, dtype=compute_dtype,
                                                **load_kw)
        teacher_model.eval().requires_grad_(False)
    trained = train(model, blocks.input_ids, s, work=work, seed=c.seed, on_cuda=on_cuda,
                    teacher_model=teacher_model, temperature=c.kd_temperature,
                    save_steps=c.save_steps, resume_from=resume_from, callbacks=callbacks,
                    show_progress=show_progress, state=state)
    settings.update(trained.info)
    tp = trained.info.get("throughput")
    if tp and show_progress and state.is_main_process:
        stderr.print(f"heal: {tp['tokens_per_second']} tokens/s, "
                     f"{tp['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s = "
                     f"{tp['fraction_of_matmul_rate']:.0%} of this machine's measured matmul "
                     f"rate ({tp['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s)", highlight=False)
    settings["epochs"] = round(trained.steps * global_batch / blocks.input_ids.shape[0], 3)
    settings["train_data"] = blocks.describe()
    settings["eval_data_blocks"] = evalb.describe()
    if evalb2 is not None:
        settings["second_eval_data_blocks"] = evalb2.describe()
    result = HealResult(None, s["method"], settings, trained.steps, trained.final_loss,
                        trained.losses, resumed_from=str(resume_from) if resume_from else None)
    del model, teacher_model
    gc.collect()
    if not state.is_main_process:
        return result

    # ---- merge into a full-precision copy of the base, measure, write ----
    merged = merge(resolved.location, trained.saved, s["method"], hf_config, device=device,
                   on_cuda=on_cuda, eval_ids=evalb.input_ids, load_kw=load_kw,
                   show_progress=show_progress,
                   second_ids=evalb2.input_ids if evalb2 is not None else None)
    result.ppl_before, result.ppl_after = merged.before.perplexity, merged.after.perplexity
    if evalb2 is not None:
        result.ppl_before_second = merged.before.second.perplexity
        result.ppl_after_second = merged.after.second.perplexity
    result.merge_check = merged.check
    from shrink.runtime.verify import verify_in_subprocess
    from shrink.stages.prune import base_model_id

    def compute(tmp: Path) -> StageOutput:
        merged.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if c.save_adapter and s["method"] != "last-layers":
            shutil.copytree(trained.saved, tmp / "adapter")
            cfg_file = tmp / "adapter" / "adapter_config.json"
            if cfg_file.is_file():  # point the adapter at the model it was trained on
                acfg = json.loads(cfg_file.read_text())
                acfg["base_model_name_or_path"] = resolved.location
                cfg_file.write_text(json.dumps(acfg, indent=2) + "\n")
        if trained.losses:
            plot_losses(trained.losses, tmp / "loss.png",
                        f"heal {s['method']} on {Path(resolved.location).name}: ppl "
                        f"{result.ppl_before:.2f} -> {result.ppl_after:.2f} "
                        f"({evaluation.name()})")
        record = {
            "source": resolved.location, "resolved": settings, "steps": trained.steps,
            "final_loss": trained.final_loss,
            "resumed_from_step": (int(Path(resume_from).name.split("-")[-1])
                                  if resume_from else None),
            "perplexity_before": result.ppl_before, "perplexity_after": result.ppl_after,
            "evaluation": evalb.describe() | {"set": evaluation.name()},
            "second_domain": None if evalb2 is None else {
                "perplexity_before": result.ppl_before_second,
                "perplexity_after": result.ppl_after_second,
                "evaluation": evalb2.describe() | {"set": evaluation.name(evaluation.second)}},
            "eval_tokens": merged.after.tokens, "merge_check": merged.check,
            "merged_dtype": str(merged.dtype).split(".")[-1],
            "adapter_saved": bool(c.save_adapter and s["method"] != "last-layers"),
            "losses": trained.losses,
        }
        return StageOutput(result, record, verify_in_subprocess,
                           {"source_model": str(model_dir),
                            "base_model": base_model_id(resolved, hf_config, previous)})

    run_stage("heal", output, compute, source=resolved.path, settings=c.settings(),
              force=force, verify=verify, log=stderr.print if show_progress else None)
    shutil.rmtree(work, ignore_errors=True)
    if out_lock is not None:
        out_lock.release()
    result.seconds = time.perf_counter() - t0
    return result


class HealStage(Stage):
    """Fine-tune the pruned model; resumes its own trainer checkpoints in its stage folder."""

    name = "heal"
    keeps_work = True

    def describe(self, ctx: BuildContext) -> str:
        h = self.settings(ctx)
        return (f"heal ({h.method or 'lora'}{', preset ' + h.preset if h.preset else ''}, "
                f"{h.steps or 'default'} steps on {h.data})")

    def output_part(self, config) -> str:
        return "healed"

    def disk_bytes(self, ctx: BuildContext) -> int:
        return ctx.source_bytes() * 2  # healed model + trainer checkpoints (bounded by base)

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        c = ctx.config
        r = heal(ctx.model, work_dir / "model", self.settings(ctx), evaluation=c.evaluate,
                 load=c.model_options(), force=True, resume=ctx.resume,
                 show_progress=ctx.show_progress)
        return {"model": str(work_dir / "model"), "steps": r.steps, "final_loss": r.final_loss,
                "ppl_before": r.ppl_before, "ppl_after": r.ppl_after,
                "ppl_before_second": r.ppl_before_second, "ppl_after_second": r.ppl_after_second,
                "evaluation": c.evaluate.name(), "settings": r.settings}

    def apply(self, ctx: BuildContext, result: dict) -> None:
        ctx.model = ctx.float_model = result["model"]
        ctx.add(Artifact("hf", Path(result["model"]), "healed"))

    def report(self, ctx: BuildContext, result: dict) -> dict:
        return {"heal": result}

    def absent_report(self, ctx: BuildContext) -> dict:
        return {"heal": None}
