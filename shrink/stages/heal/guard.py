"""QLoRA on CPU: the bitsandbytes gradient trap and the guard against it."""

from __future__ import annotations

from torch import nn


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
    return any(
        getattr(
            getattr(getattr(m, "weight", None), "quant_state", None),
            "packing_format_for_cpu",
            False,
        )
        for m in model.modules()
    )


def guard_callback():
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
