"""Healing settings: the defaults, Gromov et al.'s preset, and which Linear modules to adapt."""

from __future__ import annotations

from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers, text_config
from shrink.stages.configs import HealConfig

# Values used when neither the user nor a preset sets one.
DEFAULTS = dict(
    method="lora",
    rank=8,
    dropout=0.05,
    targets="mlp",
    steps=100,
    lr=1e-3,
    batch_size=4,
    grad_accum=1,
    seq_len=512,
    kd_alpha=0.5,
    last_layers=2,
)

_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


def gromov_family(config, names: list[str]) -> dict:
    """Per-family rank and peak LR of Gromov et al. (App. A.1), from the base model's name
    (shrink.json / config) or, failing that, its shapes (a pruned model keeps its widths)."""
    text = " ".join(n for n in names if n).lower().replace("_", "-")
    tc = text_config(config)
    shape = (
        config.model_type,
        getattr(tc, "hidden_size", None),
        getattr(tc, "intermediate_size", None),
        getattr(tc, "vocab_size", None),
    )
    if "llama-2-70b" in text or shape == ("llama", 8192, 28672, 32000):
        return {"family": "llama-2-70b", "rank": 8, "lr": 3e-5}
    if "llama-2-7b" in text or shape == ("llama", 4096, 11008, 32000):
        return {"family": "llama-2-7b", "rank": 2, "lr": 3e-4}
    if "mistral-7b" in text or shape == ("mistral", 4096, 14336, 32000):
        return {"family": "mistral-7b", "rank": 4, "lr": 3e-6}
    if "phi-2" in text or (config.model_type == "phi" and shape[1] == 2560):
        return {"family": "phi-2", "rank": 64, "lr": 2e-4}
    return {"family": "other", "rank": 64, "lr": 3e-4}


def preset_values(preset: str, config, names: list[str], world_size: int) -> dict:
    if preset != "gromov":
        raise ShrinkError(f"unknown preset '{preset}'; the only preset is 'gromov'")
    fam = gromov_family(config, names)
    tc = text_config(config)
    # max length 2048 for models up to 7B, 4096 from 13B (hidden 5120 and up); capped by context
    seq_len = 4096 if (getattr(tc, "hidden_size", 0) or 0) >= 5120 else 2048
    ctx = getattr(tc, "max_position_embeddings", None)
    if isinstance(ctx, int):
        seq_len = min(seq_len, ctx)
    return {
        "method": "qlora",
        "targets": "mlp",
        "dropout": 0.05,
        "rank": fam["rank"],
        "lr": fam["lr"],
        "warmup": 100,
        "steps": 5000,
        "seq_len": seq_len,
        "batch_size": max(1, 16 // world_size),
        "grad_accum": 1,
        "family": fam["family"],
    }


def resolve_settings(c: HealConfig, hf_config, names: list[str], world_size: int) -> dict:
    """Every training value, from the config, else the preset, else DEFAULTS; checked against
    the model (context length)."""
    preset = preset_values(c.preset, hf_config, names, world_size) if c.preset else {}
    s: dict = {}
    for k in (
        "method",
        "rank",
        "dropout",
        "targets",
        "steps",
        "lr",
        "warmup",
        "batch_size",
        "grad_accum",
        "seq_len",
        "last_layers",
    ):
        v = getattr(c, k)
        s[k] = v if v is not None else preset.get(k, DEFAULTS.get(k))
    if s["warmup"] is None:
        s["warmup"] = min(100, s["steps"] // 10)
    s["alpha"] = c.alpha if c.alpha is not None else s["rank"]
    s["kd_alpha"] = (
        (c.kd_alpha if c.kd_alpha is not None else DEFAULTS["kd_alpha"]) if c.teacher else None
    )
    s["family"] = preset.get("family")
    ctx = getattr(text_config(hf_config), "max_position_embeddings", None)
    if isinstance(ctx, int) and s["seq_len"] > ctx:
        raise ShrinkError(
            f"--seq-len {s['seq_len']} is beyond the model's context "
            f"(max_position_embeddings = {ctx})"
        )
    num_layers = getattr(text_config(hf_config), "num_hidden_layers", None)
    if (
        s["method"] == "last-layers"
        and isinstance(num_layers, int)
        and s["last_layers"] > num_layers
    ):
        raise ShrinkError(
            f"--last-layers {s['last_layers']}: the model has only {num_layers} layers"
        )
    return s


def linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Leaf names of the nn.Linear modules inside the decoder layers -> their full names."""
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
        return any(
            any(w in part.lower() for part in n.split(".")[:-1] for w in words) for n in full_names
        )

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
            raise ShrinkError(
                f"--targets: unknown module name(s) {', '.join(unknown) or '(none)'}; "
                f"the model's Linear modules are: {', '.join(sorted(names))} "
                "(or use mlp, attn, all)"
            )
    if not chosen:
        raise ShrinkError(
            f"--targets {targets}: no Linear module of that kind in this model; "
            f"its Linear modules are: {', '.join(sorted(names))}"
        )
    return chosen
