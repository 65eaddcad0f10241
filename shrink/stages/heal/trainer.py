"""Training for healing: the Trainer with an optional teacher, the work folder that makes a heal
resumable, and the model to train (LoRA / QLoRA adapters, or the last layers in full precision)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers, from_pretrained_checked
from shrink.core.progress import stderr
from shrink.stages.heal.guard import guard_4bit_cpu, guard_callback


class Blocks(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        row = self.input_ids[i]
        return {"input_ids": row, "labels": row}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions at temperature T, times T^2, averaged
    over token positions (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # per position
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean() * t * t


def trainer_class():
    from transformers import Trainer

    class HealTrainer(Trainer):
        """Trainer with an optional teacher: loss = kd_alpha * T^2 KL(teacher||student) +
        (1 - kd_alpha) * LM loss. Losses are per-micro-batch means (blocks have no padding), so the
        Trainer scales them for gradient accumulation."""

        loss_is_scaled_for_ga = False

        def __init__(self, *a, teacher=None, temperature=2.0, kd_alpha=0.5, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher
            self.temperature = temperature
            self.kd_alpha = kd_alpha
            self._parts: dict[str, list[float]] = {"lm_loss": [], "kd_loss": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None and not return_outputs:
                from shrink.stages.heal.headloss import loss_without_logits

                lm = loss_without_logits(model, inputs, self.args.world_size == 1)
                if lm is not None:
                    self._parts["lm_loss"].append(lm.detach().item())
                    return lm
            outputs = model(
                input_ids=inputs["input_ids"],
                labels=inputs["labels"],
                attention_mask=inputs.get("attention_mask"),
                use_cache=False,
            )
            lm = outputs.loss
            loss = lm
            if self.teacher is not None:
                ids = inputs["input_ids"]
                if next(self.teacher.parameters()).device != ids.device:
                    self.teacher.to(ids.device)
                with torch.no_grad():
                    t_logits = self.teacher(
                        input_ids=ids, attention_mask=inputs.get("attention_mask"), use_cache=False
                    ).logits
                kd = kd_loss(
                    outputs.logits, t_logits, self.temperature, inputs.get("attention_mask")
                )
                loss = self.kd_alpha * kd + (1 - self.kd_alpha) * lm
                self._parts["kd_loss"].append(kd.detach().item())
            self._parts["lm_loss"].append(lm.detach().item())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                for k, v in self._parts.items():
                    if v:
                        logs[k] = round(sum(v) / len(v), 6)
                    v.clear()
            super().log(logs, start_time)

    return HealTrainer


def progress_callback():
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """A rich progress bar on stderr with the latest loss (main process only)."""

        def __init__(self):
            self.bar = None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero or os.environ.get("SHRINK_NO_PROGRESS"):
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from shrink.core.progress import stderr

            self.bar = Progress(
                TextColumn("[bold]heal[/] {task.fields[info]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr,
            )
            self.bar.start()
            self.task = self.bar.add_task(
                "heal", total=state.max_steps, completed=state.global_step, info=""
            )

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                info = f"loss {logs['loss']:.4f}"
                if "kd_loss" in logs:
                    info += f" (lm {logs['lm_loss']:.4f}, kd {logs['kd_loss']:.4f})"
                self.bar.update(self.task, info=info)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return RichProgress()


def work_dir_for(output: str | Path) -> Path:
    """Where the Trainer keeps its checkpoints: a hidden sibling of the output folder."""
    out = Path(output).expanduser().resolve()
    return out.parent / f".{out.name}.heal-work"


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a Trainer ``checkpoint-N`` folder cannot be resumed from, or None if it can. The
    Trainer writes trainer_state.json last, so a checkpoint killed while being written lacks it
    (or has it cut short); its weights must also be whole safetensors."""
    from shrink.core.models import read_safetensors_header

    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "no complete trainer_state.json"
    weights = [
        folder / n
        for n in ("adapter_model.safetensors", "model.safetensors")
        if (folder / n).is_file()
    ]
    if not weights:
        return "no adapter_model.safetensors"
    try:
        for w in weights:
            read_safetensors_header(w)
    except ShrinkError as e:
        return str(e)
    return None


def last_valid_checkpoint(work: str | Path) -> tuple[str | None, list[Path]]:
    """The newest resumable ``checkpoint-N`` in the heal work folder and the incomplete ones
    (newer than it: a heal killed while saving leaves one)."""
    work = Path(work)
    if not work.is_dir():
        return None, []
    found = []
    for d in work.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    incomplete: list[Path] = []
    for _, d in sorted(found, reverse=True):
        if checkpoint_problem(d) is None:
            return str(d), incomplete
        incomplete.append(d)
    return None, incomplete


def settings_diff(saved: dict, now: dict) -> list[str]:
    return [k for k in now if k in saved and saved[k] != now[k]]


def prepare_work(
    work: Path, settings: dict, *, resume: bool, force: bool, state, show_progress: bool
) -> str | None:
    """Make the work folder ready and return the checkpoint to resume from (None: step 0).
    Checkpoints of an interrupted run are kept unless ``force``; ``resume`` requires the same
    settings as the run that wrote them."""
    settings_file = work / "heal-settings.json"
    last, incomplete = last_valid_checkpoint(work)  # skips checkpoints killed mid-write
    resume_from = None
    if resume:
        if last is not None:
            saved = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
            diff = settings_diff(saved, settings)
            if diff:
                raise ShrinkError(
                    f"--resume: settings differ from the interrupted run in "
                    f"{', '.join(diff)} (saved in {settings_file}); use the same "
                    "options, or drop --resume and pass --force to start over"
                )
            resume_from = last
    elif last is not None and not force:
        raise ShrinkError(
            f"an interrupted heal left checkpoints in {work}: pass --resume to "
            "continue it, or --force to start over"
        )
    if state.is_main_process:
        if resume_from is None and work.exists():
            shutil.rmtree(work)
        for d in incomplete:  # killed while being written: the Trainer would trip over them
            if work.exists() and d.exists():
                if show_progress:
                    stderr.print(
                        f"removing the incomplete checkpoint {d.name} ({checkpoint_problem(d)})"
                    )
                shutil.rmtree(d, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()
    if resume_from and show_progress and state.is_main_process:
        stderr.print(f"resuming from {resume_from}")
    return resume_from


def prepare_4bit(model: nn.Module) -> nn.Module:
    """A 4-bit base ready for adapters: frozen, with gradient checkpointing on either device
    (QLoRA is chosen when memory is short). peft's ``prepare_model_for_kbit_training`` also
    casts every 16-bit tensor to float32, which doubles the largest ones QLoRA keeps, the
    embeddings and the LM head (0.5 GB more for a 32k x 4096 vocabulary); here they stay in the
    compute dtype, as the memory plan counts them (the norms compute in float32 anyway)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_model(
    location: str,
    s: dict,
    target_modules: list[str],
    *,
    compute_dtype,
    on_cuda: bool,
    state,
    seed: int,
    load_kw: dict,
) -> nn.Module:
    """The model the Trainer updates: a peft model (LoRA on a 16/32-bit base, QLoRA on a 4-bit
    NF4 base), or for ``last-layers`` the model itself with only the LM head and the last K
    decoder layers trainable (full precision, no adapter)."""
    from transformers import set_seed

    if s["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        qconf = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        device_map = {"": state.local_process_index} if on_cuda else "cpu"
        model = from_pretrained_checked(
            location,
            quantization_config=qconf,
            dtype=compute_dtype,
            device_map=device_map,
            **load_kw,
        )
        model.train()  # before any forward: see guard_4bit_cpu
        model = prepare_4bit(model)
        guard_4bit_cpu(model)
    else:
        model = from_pretrained_checked(location, dtype=compute_dtype, **load_kw)
        model.train()
    model.config.use_cache = False
    set_seed(seed)  # the LoRA A matrices are drawn here: same seed, same run
    if s["method"] == "last-layers":
        model.requires_grad_(False)
        _, _, layers = find_layers(model)
        for layer in list(layers)[-s["last_layers"] :]:
            layer.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=s["rank"],
        lora_alpha=s["alpha"],
        lora_dropout=s["dropout"],
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    from shrink.core.quiet import third_party_quiet

    with third_party_quiet():  # peft's dispatch imports GPTQModel, which sets variables
        return get_peft_model(model, lcfg)


@dataclass
class Trained:
    """What training leaves behind: the adapter (or, for last-layers, the whole model) in
    ``saved``, and the loss history."""

    saved: Path
    steps: int
    final_loss: float | None
    losses: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def train(
    model: nn.Module,
    train_ids: torch.Tensor,
    s: dict,
    *,
    work: Path,
    seed: int,
    on_cuda: bool,
    teacher_model: nn.Module | None,
    temperature: float,
    save_steps: int | None,
    resume_from: str | None,
    callbacks: list | None,
    show_progress: bool,
    state,
) -> Trained:
    """Run the Hugging Face Trainer (AdamW, cosine schedule with warm-up, clipping 1.0) and save
    the adapter (or the trained model) under ``work``."""
    from transformers import TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    if save_steps is None:
        save_steps = max(1, min(500, math.ceil(s["steps"] / 10)))
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=s["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=not on_cuda,
        bf16=bf16,
        fp16=on_cuda and not bf16,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
        remove_unused_columns=False,
    )
    guard = guard_callback() if s["method"] == "qlora" else None
    cbs = [cb for cb in [guard] + list(callbacks or []) if cb is not None]
    if show_progress:
        cbs.append(progress_callback())
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=Blocks(train_ids),
        data_collator=default_data_collator,
        callbacks=cbs,
        teacher=teacher_model,
        temperature=temperature,
        kd_alpha=s["kd_alpha"] if teacher_model is not None else 0.0,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    out = trainer.train(resume_from_checkpoint=resume_from)

    losses = [
        {
            k: round(float(v), 6)
            for k, v in r.items()
            if k in ("step", "loss", "lm_loss", "kd_loss", "learning_rate", "grad_norm")
        }
        for r in trainer.state.log_history
        if "loss" in r
    ]
    for r in losses:
        r["step"] = int(r["step"])
    n_tail = max(1, min(10, len(losses) // 10))
    final_loss = (sum(r["loss"] for r in losses[-n_tail:]) / n_tail) if losses else None
    steps = int(trainer.state.global_step)
    info = {"train_seconds": round(float(out.metrics.get("train_runtime", 0.0)), 2)}
    info["throughput"] = _throughput(trainer, s, on_cuda, info["train_seconds"], resume_from)
    if guard is not None:
        info["guard_4bit_repairs"] = guard.repaired
    saved = work / ("model-final" if s["method"] == "last-layers" else "adapter-final")
    if state.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(saved)
    state.wait_for_everyone()
    return Trained(saved, steps, final_loss, losses, info)


def _throughput(
    trainer, s: dict, on_cuda: bool, seconds: float, resume_from: str | None
) -> dict | None:
    """Tokens/s of this run's steps and the fraction of the machine's matmul rate (CPU only:
    the rate measured is the CPU's)."""
    from shrink.core.measures import training_throughput

    if on_cuda or seconds <= 0:
        return None
    done = int(trainer.state.global_step)
    if resume_from:
        done -= int(Path(resume_from).name.split("-")[-1])
    tokens = done * s["batch_size"] * s["grad_accum"] * s["seq_len"] * trainer.args.world_size
    model = trainer.accelerator.unwrap_model(trainer.model)
    return training_throughput(tokens, seconds, model)
