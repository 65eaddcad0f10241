"""Heal a pruned model: a short LoRA / QLoRA fine-tune (optionally distilled from a teacher), then
merge the adapter into a full-precision copy of the base and save a standard checkpoint.

Training runs on the Hugging Face ``Trainer``, so the same call works on one CPU, one GPU, or several
processes / GPUs / nodes under ``accelerate launch`` with no code change. Only the main process
evaluates, merges and writes the output folder.

Gromov et al. (arXiv 2403.17887, App. A.1) heal with QLoRA on the MLP only; ``preset="gromov"``
reproduces their settings.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shrink.core.data import EVALUATION, HEALING, token_blocks
from shrink.core.quiet import third_party_quiet
from shrink.core.errors import ShrinkError, first_line
from shrink.core.models import (text_config, check_decoder_only, check_device, load_config, read_shrink_json,
                     resolve)
from shrink.core.outputs import (atomic_output, check_output, copy_license_files, lock_output,
                                 write_record)

METHODS = ("lora", "qlora")
QLORA_INSTALL = "pip install 'shrink-llm[qlora]'"
HEAL_INSTALL = "pip install 'shrink-llm[heal]'"

# Defaults when neither the user nor a preset sets a value.
DEFAULTS = dict(method="lora", rank=8, dropout=0.05, targets="mlp", steps=100, lr=3e-4,
                batch_size=4, grad_accum=1, seq_len=512, eval_samples=16, kd_alpha=0.5)

_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


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


# ---------------------------------------------------------------------------------------------
# Settings: defaults, the Gromov et al. preset, validation


def gromov_family(config, names: list[str]) -> dict:
    """Per-family rank and peak LR of Gromov et al. (App. A.1), from the base model's name
    (shrink.json / config) or, failing that, its shapes (a pruned model keeps its widths)."""
    text = " ".join(n for n in names if n).lower().replace("_", "-")
    tc = text_config(config)
    shape = (config.model_type, getattr(tc, "hidden_size", None),
             getattr(tc, "intermediate_size", None), getattr(tc, "vocab_size", None))
    if "llama-2-70b" in text or shape == ("llama", 8192, 28672, 32000):
        return {"family": "llama-2-70b", "rank": 8, "lr": 3e-5}
    if "llama-2-7b" in text or shape == ("llama", 4096, 11008, 32000):
        return {"family": "llama-2-7b", "rank": 2, "lr": 3e-4}
    if "mistral-7b" in text or shape == ("mistral", 4096, 14336, 32000):
        return {"family": "mistral-7b", "rank": 4, "lr": 3e-6}
    if "phi-2" in text or (config.model_type == "phi" and shape[1] == 2560):
        return {"family": "phi-2", "rank": 64, "lr": 2e-4}
    return {"family": "other", "rank": 64, "lr": 3e-4}


def _preset_values(preset: str, config, names: list[str], world_size: int) -> dict:
    if preset != "gromov":
        raise ShrinkError(f"unknown preset '{preset}'; the only preset is 'gromov'")
    fam = gromov_family(config, names)
    tc = text_config(config)
    # max length 2048 for models up to 7B, 4096 from 13B (hidden 5120 and up); capped by context
    seq_len = 4096 if (getattr(tc, "hidden_size", 0) or 0) >= 5120 else 2048
    ctx = getattr(tc, "max_position_embeddings", None)
    if isinstance(ctx, int):
        seq_len = min(seq_len, ctx)
    return {"method": "qlora", "targets": "mlp", "dropout": 0.05, "rank": fam["rank"],
            "lr": fam["lr"], "warmup": 100, "steps": 5000, "seq_len": seq_len,
            "batch_size": max(1, 16 // world_size), "grad_accum": 1, "family": fam["family"]}


def linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Leaf names of the nn.Linear modules inside the decoder layers -> their full names."""
    from shrink.core.models import find_layers

    _, _, layers = find_layers(model)
    out: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                out.setdefault(name.rsplit(".", 1)[-1], []).append(f"{i}.{name}")
    return out


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """``mlp`` / ``attn`` / ``all`` / comma-separated Linear names -> leaf module names for peft."""
    names = linear_names(model)
    if not names:
        raise ShrinkError("the model has no nn.Linear modules in its decoder layers to adapt")

    def in_group(full_names: list[str], words: tuple[str, ...]) -> bool:
        return any(any(w in part.lower() for part in n.split(".")[:-1] for w in words)
                   for n in full_names)

    if targets == "all":
        chosen = sorted(names)
    elif targets == "mlp":
        chosen = sorted(k for k, v in names.items() if in_group(v, _MLP_WORDS))
    elif targets == "attn":
        chosen = sorted(k for k, v in names.items() if in_group(v, _ATTN_WORDS))
    else:
        chosen = [t.strip() for t in targets.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in names]
        if unknown or not chosen:
            raise ShrinkError(f"--targets: unknown module name(s) {', '.join(unknown) or '(none)'}; "
                              f"the model's Linear modules are: {', '.join(sorted(names))} "
                              "(or use mlp, attn, all)")
    if not chosen:
        raise ShrinkError(f"--targets {targets}: no Linear module of that kind in this model; "
                          f"its Linear modules are: {', '.join(sorted(names))}")
    return chosen


def _meta_model(config, trust_remote_code: bool = False):
    """The model built on the meta device: module names without memory or weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError or a broken native library
        raise ShrinkError(f"--method qlora needs bitsandbytes: {QLORA_INSTALL}") from None


def _check_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ShrinkError(f"healing needs peft: {HEAL_INSTALL}") from None


def _check_teacher(teacher: str, student_config, student_tok, trust_remote_code: bool):
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


# ---------------------------------------------------------------------------------------------
# QLoRA on CPU: the bitsandbytes gradient trap (stack.md)


def guard_4bit_cpu(model: nn.Module) -> int:
    """Protect a 4-bit (bitsandbytes) model's gradients on CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight into an inference-only
    layout the first time the layer runs in eval mode without grad; later forwards use a kernel with
    no autograd, so gradients through the frozen base weights are silently dropped. This function
    (1) unpacks weights that were already repacked, (2) puts the model in train mode, and (3) adds a
    forward pre-hook to each Linear4bit that keeps its ``training`` flag on (the flag has no other
    effect on Linear4bit), so no later eval-mode forward can repack. Returns how many weights were
    unpacked.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    repaired = 0
    for mod in model.modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        w = mod.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            mod.quant_state = w.quant_state
            repaired += 1
        if not getattr(mod, "_shrink_guarded", False):
            mod.register_forward_pre_hook(_keep_training_flag)
            mod._shrink_guarded = True
    model.train()
    return repaired


def _keep_training_flag(module, args):
    module.training = True


def is_4bit_packed(model: nn.Module) -> bool:
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                       "packing_format_for_cpu", False) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Trainer pieces


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        row = self.input_ids[i]
        return {"input_ids": row, "labels": row}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions at temperature T, times T^2, averaged
    over token positions (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # per position
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean() * t * t


def _trainer_class():
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
            outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"],
                            attention_mask=inputs.get("attention_mask"), use_cache=False)
            lm = outputs.loss
            loss = lm
            if self.teacher is not None:
                ids = inputs["input_ids"]
                if next(self.teacher.parameters()).device != ids.device:
                    self.teacher.to(ids.device)
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=ids, attention_mask=inputs.get(
                        "attention_mask"), use_cache=False).logits
                kd = kd_loss(outputs.logits, t_logits, self.temperature,
                             inputs.get("attention_mask"))
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


def _progress_callback():
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        """A rich progress bar on stderr with the latest loss (main process only)."""

        def __init__(self):
            self.bar = None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero or os.environ.get("SHRINK_NO_PROGRESS"):
                return
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            from shrink.core.progress import stderr

            self.bar = Progress(TextColumn("[bold]heal[/] {task.fields[info]}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=stderr)
            self.bar.start()
            self.task = self.bar.add_task("heal", total=state.max_steps,
                                          completed=state.global_step, info="")

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


def _guard_callback():
    from transformers import TrainerCallback

    class Guard4bit(TrainerCallback):
        """Before every step, repair a 4-bit CPU weight that something repacked (see
        guard_4bit_cpu); it should never trigger thanks to the pre-hooks."""

        def __init__(self):
            self.repaired = 0

        def on_step_begin(self, args, state, control, model=None, **kw):
            if model is not None and is_4bit_packed(model):
                self.repaired += guard_4bit_cpu(model)

    return Guard4bit()


# ---------------------------------------------------------------------------------------------
# Plot


def plot_losses(losses: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in losses]
    ax.plot(steps, [r["loss"] for r in losses], label="training loss", color="tab:blue", lw=1)
    if any("lm_loss" in r for r in losses) and any("kd_loss" in r for r in losses):
        ax.plot(steps, [r.get("lm_loss") for r in losses], label="LM loss", color="tab:green",
                lw=0.8, alpha=0.7)
        ax.plot(steps, [r.get("kd_loss") for r in losses], label="KD loss (T^2 KL)",
                color="tab:orange", lw=0.8, alpha=0.7)
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        vals = [r["loss"] for r in losses]
        smooth = [sum(vals[max(0, i - k + 1):i + 1]) / len(vals[max(0, i - k + 1):i + 1])
                  for i in range(len(vals))]
        ax.plot(steps, smooth, color="black", lw=1.5, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The stage


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
    state_file = folder / "trainer_state.json"
    try:
        json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "no complete trainer_state.json"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors")
               if (folder / n).is_file()]
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


def _settings_match(saved: dict, now: dict) -> list[str]:
    return [k for k in now if k in saved and saved[k] != now[k]]


def heal(model_dir: str, output: str | Path, method: str | None = None, rank: int | None = None,
         alpha: float | None = None, dropout: float | None = None, targets: str | None = None,
         steps: int | None = None, lr: float | None = None, warmup: int | None = None,
         batch_size: int | None = None, grad_accum: int | None = None, seq_len: int | None = None,
         data: str = HEALING, eval_data: str = EVALUATION, eval_samples: int | None = None,
         seed: int = 0, teacher: str | None = None, temperature: float = 2.0,
         kd_alpha: float | None = None, resume: bool = False, save_adapter: bool = False,
         preset: str | None = None, force: bool = False, device: str | None = None,
         save_steps: int | None = None, verify: bool = True, trust_remote_code: bool = False,
         callbacks: list | None = None, show_progress: bool = True) -> HealResult:
    """Fine-tune ``model_dir`` with LoRA or QLoRA (optionally distilling from ``teacher``), merge
    the adapter into a full-precision copy of the base, and write a standard HF folder to
    ``output`` with shrink.json (stage "heal"), loss.png and perplexity before/after.

    ``None`` means: the preset's value if a preset is given, else the default (method lora,
    rank 8, alpha = rank, dropout 0.05, targets mlp, 100 steps, lr 3e-4, warm-up 10% of steps (at
    most 100), batch 4 per device, grad_accum 1, seq_len 512, 16 eval blocks, kd_alpha 0.5).
    Explicit values always override the preset.
    """
    t0 = time.perf_counter()
    from shrink.core.progress import stderr

    # ---- cheap checks first: nothing heavy runs and nothing is written on bad input ----
    _check_peft()
    check_output(output, force)
    device = check_device(device)
    resolved = resolve(model_dir)
    config = load_config(resolved, trust_remote_code)
    check_decoder_only(config)
    previous = read_shrink_json(resolved.path)
    from accelerate import PartialState

    # one process, or one of several under accelerate launch / torchrun (gloo on CPU)
    state = PartialState(cpu=not device.startswith("cuda"))
    world_size = state.num_processes
    explicit = dict(method=method, rank=rank, dropout=dropout, targets=targets, steps=steps, lr=lr,
                    warmup=warmup, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                    eval_samples=eval_samples)
    base_names = [(previous or {}).get("base_model"), getattr(config, "_name_or_path", None),
                  resolved.name, resolved.hub_id]
    preset_vals = (_preset_values(preset, config, [n for n in base_names if n], world_size)
                   if preset else {})
    s: dict = {}
    for k, v in explicit.items():
        s[k] = v if v is not None else preset_vals.get(k, DEFAULTS.get(k))
    if s["warmup"] is None:
        s["warmup"] = min(100, s["steps"] // 10)
    s["alpha"] = alpha if alpha is not None else s["rank"]
    if s["method"] not in METHODS:
        raise ShrinkError(f"unknown method '{s['method']}'; use lora or qlora")
    for k in ("steps", "rank", "batch_size", "grad_accum", "eval_samples"):
        if not isinstance(s[k], int) or s[k] < 1:
            flag = "--" + k.replace("_", "-")
            raise ShrinkError(f"{flag} must be an integer >= 1 (got {s[k]})")
    if s["warmup"] < 0:
        raise ShrinkError(f"--warmup must be >= 0 (got {s['warmup']})")
    if not s["lr"] > 0:
        raise ShrinkError(f"--lr must be > 0 (got {s['lr']})")
    if not 0 <= s["dropout"] < 1:
        raise ShrinkError(f"--dropout must be in [0, 1) (got {s['dropout']})")
    if not s["alpha"] > 0:
        raise ShrinkError(f"--alpha must be > 0 (got {s['alpha']})")
    if s["seq_len"] < 2:
        raise ShrinkError(f"--seq-len must be >= 2 (got {s['seq_len']})")
    ctx = getattr(text_config(config), "max_position_embeddings", None)
    if isinstance(ctx, int) and s["seq_len"] > ctx:
        raise ShrinkError(f"--seq-len {s['seq_len']} is beyond the model's context "
                          f"(max_position_embeddings = {ctx})")
    if teacher is None and kd_alpha is not None:
        raise ShrinkError("--kd-alpha mixes distillation and LM loss: it needs --teacher MODEL")
    s["kd_alpha"] = (kd_alpha if kd_alpha is not None else DEFAULTS["kd_alpha"]) if teacher else None
    if teacher is not None:
        if not 0 <= s["kd_alpha"] <= 1:
            raise ShrinkError(f"--kd-alpha must be in [0, 1] (got {s['kd_alpha']})")
        if not temperature > 0:
            raise ShrinkError(f"--temperature must be > 0 (got {temperature})")
    if s["method"] == "qlora":
        _check_bitsandbytes()
    if save_steps is not None and save_steps < 1:
        raise ShrinkError(f"--save-steps must be >= 1 (got {save_steps})")
    target_modules = resolve_targets(_meta_model(config, trust_remote_code), s["targets"])

    from transformers import AutoTokenizer

    with third_party_quiet():
        tokenizer = AutoTokenizer.from_pretrained(resolved.location,
                                                  trust_remote_code=trust_remote_code)
    teacher_resolved = (_check_teacher(teacher, config, tokenizer, trust_remote_code)
                        if teacher else None)

    global_batch = s["batch_size"] * s["grad_accum"] * world_size
    train = token_blocks(tokenizer, data, s["steps"] * global_batch, s["seq_len"], seed,
                         at_most=True)
    if train.available < global_batch:
        raise ShrinkError(f"too little healing text: '{data}' gives {train.available} blocks of "
                          f"{s['seq_len']} tokens, one optimizer step needs {global_batch} "
                          "(give more text, or lower --seq-len / --batch-size)")
    evalb = token_blocks(tokenizer, eval_data, s["eval_samples"], s["seq_len"], seed)

    settings = {
        "method": s["method"], "rank": s["rank"], "alpha": s["alpha"], "dropout": s["dropout"],
        "targets": s["targets"], "target_modules": target_modules, "steps": s["steps"],
        "lr": s["lr"], "schedule": "cosine", "warmup": s["warmup"],
        "batch_size": s["batch_size"], "grad_accum": s["grad_accum"], "world_size": world_size,
        "global_batch": global_batch, "seq_len": s["seq_len"], "seed": seed, "data": data,
        "eval_data": eval_data, "eval_samples": s["eval_samples"], "preset": preset,
        "preset_family": preset_vals.get("family"),
        "teacher": teacher, "temperature": temperature if teacher else None,
        "kd_alpha": s["kd_alpha"], "device": device,
    }

    # ---- the work folder (Trainer checkpoints) and resume ----
    # the output's lock covers the work folder too: a second heal into the same output stops here
    out_lock = lock_output(output) if state.is_main_process else None
    work = work_dir_for(output)
    settings_file = work / "heal-settings.json"
    last, incomplete = last_valid_checkpoint(work)  # skips checkpoints killed mid-write
    resume_from = None
    if resume:
        if last is not None:
            saved = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
            diff = _settings_match(saved, settings)
            if diff:
                raise ShrinkError(f"--resume: settings differ from the interrupted run in "
                                  f"{', '.join(diff)} (saved in {settings_file}); use the same "
                                  "options, or drop --resume and pass --force to start over")
            resume_from = last
        elif show_progress and state.is_main_process:
            stderr.print(f"--resume: no checkpoint in {work}; starting from step 0")
    elif last is not None and not force:
        raise ShrinkError(f"an interrupted heal left checkpoints in {work}: pass --resume to "
                          "continue it, or --force to start over")
    if state.is_main_process:
        if resume_from is None and work.exists():
            shutil.rmtree(work)
        for d in incomplete:  # killed while being written: the Trainer would trip over them
            if work.exists() and d.exists():
                if show_progress:
                    stderr.print(f"removing the incomplete checkpoint {d.name} "
                                 f"({checkpoint_problem(d)})")
                shutil.rmtree(d, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()

    # ---- load the model to train ----
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, TrainingArguments

    on_cuda = device.startswith("cuda")
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    compute_dtype = torch.bfloat16 if bf16 else (torch.float16 if on_cuda else torch.float32)
    load_kw = dict(use_safetensors=True, trust_remote_code=trust_remote_code)
    if s["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute_dtype)
        device_map = {"": state.local_process_index} if on_cuda else "cpu"
        model = AutoModelForCausalLM.from_pretrained(resolved.location, quantization_config=qconf,
                                                     dtype=compute_dtype, device_map=device_map,
                                                     **load_kw)
        model.train()  # before any forward: see guard_4bit_cpu
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=on_cuda)
        guard_4bit_cpu(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=compute_dtype,
                                                     **load_kw)
        model.train()
    model.config.use_cache = False
    lcfg = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                      target_modules=target_modules, bias="none", task_type="CAUSAL_LM")
    from transformers import set_seed

    set_seed(seed)  # the LoRA A matrices are drawn here: same seed, same run
    peft_model = get_peft_model(model, lcfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    settings["trainable_params"] = trainable

    teacher_model = None
    if teacher_resolved is not None:
        teacher_model = AutoModelForCausalLM.from_pretrained(
            teacher_resolved.location, dtype=compute_dtype, **load_kw)
        teacher_model.eval().requires_grad_(False)

    if save_steps is None:
        save_steps = max(1, min(500, math.ceil(s["steps"] / 10)))
    args = TrainingArguments(
        output_dir=str(work), max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], learning_rate=s["lr"],
        lr_scheduler_type="cosine", warmup_steps=s["warmup"], weight_decay=0.0, max_grad_norm=1.0,
        logging_strategy="steps", logging_steps=1, save_strategy="steps", save_steps=save_steps,
        save_total_limit=2, report_to="none", seed=seed, data_seed=seed, disable_tqdm=True,
        use_cpu=not on_cuda, bf16=bf16, fp16=on_cuda and not bf16,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0, dataloader_pin_memory=on_cuda, remove_unused_columns=False,
    )
    from transformers import default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    guard = _guard_callback() if s["method"] == "qlora" else None
    cbs = [cb for cb in [guard] + list(callbacks or []) if cb is not None]
    if show_progress:
        cbs.append(_progress_callback())
    trainer = _trainer_class()(
        model=peft_model, args=args, train_dataset=_Blocks(train.input_ids),
        data_collator=default_data_collator, callbacks=cbs, teacher=teacher_model,
        temperature=temperature, kd_alpha=s["kd_alpha"] if teacher else 0.0)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if resume_from and show_progress and state.is_main_process:
        stderr.print(f"resuming from {resume_from}")
    train_out = trainer.train(resume_from_checkpoint=resume_from)

    losses = [{k: round(float(v), 6) for k, v in r.items()
               if k in ("step", "loss", "lm_loss", "kd_loss", "learning_rate", "grad_norm")}
              for r in trainer.state.log_history if "loss" in r]
    for r in losses:
        r["step"] = int(r["step"])
    n_tail = max(1, min(10, len(losses) // 10))
    final_loss = (sum(r["loss"] for r in losses[-n_tail:]) / n_tail) if losses else None
    steps_done = int(trainer.state.global_step)
    settings["train_seconds"] = round(float(train_out.metrics.get("train_runtime", 0.0)), 2)
    settings["epochs"] = round(steps_done * global_batch / train.input_ids.shape[0], 3)
    settings["train_data"] = train.describe()
    settings["eval_data_blocks"] = evalb.describe()
    if guard is not None:
        settings["guard_4bit_repairs"] = guard.repaired

    adapter_dir = work / "adapter-final"
    if state.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(adapter_dir)
    state.wait_for_everyone()
    result = HealResult(None, s["method"], settings, steps_done, final_loss, losses,
                        resumed_from=str(resume_from) if resume_from else None)
    del trainer, peft_model, model, teacher_model
    gc.collect()
    if not state.is_main_process:
        return result

    # ---- merge into a full-precision copy of the base (never into 4-bit weights) ----
    from peft import PeftModel

    src_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(src_dtype, str):
        src_dtype = getattr(torch, src_dtype, None)
    if not isinstance(src_dtype, torch.dtype) or src_dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        src_dtype = torch.float32
    merge_dtype = torch.float32 if not on_cuda else src_dtype
    if show_progress:
        stderr.print(f"merging the adapter into a {str(merge_dtype).split('.')[-1]} copy of the "
                     "base model")
    base = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=merge_dtype, **load_kw)
    base.to(device).eval()
    from shrink.stages.evaluate import perplexity

    before = perplexity(base, evalb.input_ids, show_progress=show_progress)
    pmodel = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    probe_ids = evalb.input_ids[:1].to(device)
    with torch.no_grad():
        peft_logits = pmodel(input_ids=probe_ids, use_cache=False).logits.float()
    merged = pmodel.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=probe_ids, use_cache=False).logits.float()
    merge_check = {"max_abs_logit_diff": float((peft_logits - merged_logits).abs().max()),
                   "tokens": int(probe_ids.numel())}
    after = perplexity(merged, evalb.input_ids, show_progress=show_progress)
    result.ppl_before, result.ppl_after = before.perplexity, after.perplexity
    result.merge_check = merge_check

    if merged.dtype != src_dtype:
        merged.to(src_dtype)
    merged.config.use_cache = True
    with atomic_output(output, force) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_license_files(resolved.path, tmp)
        if save_adapter:
            shutil.copytree(adapter_dir, tmp / "adapter")
            cfg_file = tmp / "adapter" / "adapter_config.json"
            if cfg_file.is_file():  # point the adapter at the model it was trained on
                acfg = json.loads(cfg_file.read_text())
                acfg["base_model_name_or_path"] = resolved.location
                cfg_file.write_text(json.dumps(acfg, indent=2) + "\n")
        title = (f"heal {s['method']} r={s['rank']} on {Path(resolved.location).name}: "
                 f"ppl {before.perplexity:.2f} -> {after.perplexity:.2f}")
        if losses:
            plot_losses(losses, tmp / "loss.png", title)
        stage = {
            "stage": "heal", "source": resolved.location, "settings": settings,
            "steps": steps_done, "final_loss": final_loss,
            "resumed_from_step": (int(Path(resume_from).name.split("-")[-1])
                                  if resume_from else None),
            "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
            "eval_tokens": after.tokens, "merge_check": merge_check,
            "merged_dtype": str(src_dtype).split(".")[-1], "adapter_saved": bool(save_adapter),
            "losses": losses, "seconds": round(time.perf_counter() - t0, 1),
        }
        if verify:
            if show_progress:
                stderr.print("verifying: reload in a fresh process, logits, cached generation")
            from shrink.runtime.verify import verify_in_subprocess

            result.verification = verify_in_subprocess(tmp)
            stage["verification"] = result.verification
        from shrink.stages.prune import base_model_id

        result.record = write_record(tmp, previous, stage, source_model=str(model_dir),
                                     base_model=base_model_id(resolved, config, previous))
    shutil.rmtree(work, ignore_errors=True)
    if out_lock is not None:
        out_lock.release()
    result.output = Path(output)
    result.seconds = time.perf_counter() - t0
    return result
