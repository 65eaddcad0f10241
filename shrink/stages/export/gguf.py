"""Export an HF folder that shrink wrote (plain, pruned, healed) to GGUF, the file format of
llama.cpp, Ollama and LM Studio.

What is written follows llama.cpp's own converter (``convert_hf_to_gguf.py``; its Llama, Qwen2,
Qwen3 and Gemma3 classes), re-implemented here on the ``gguf`` package, which owns the file
format, the key names and the HF -> GGUF tensor name map. Everything is derived from
``config.json``, so a pruned checkpoint gets its own block count and every per-layer array
(Gemma 3's sliding/full attention pattern) sliced to the kept layers.

* ``f32``, ``f16``, ``bf16`` and ``q8_0`` are written directly (``gguf.quants`` does q8_0).
* Every other type (``q4_0``, ``q4_k_m``, ``q5_k_m``, ``q6_k``, ...) is made by llama.cpp's own
  quantizer (through llama-cpp-python, in a child process) from a lossless intermediate file
  (f32, f16 or bf16: the dtype of the checkpoint's weights), given an importance matrix that
  shrink computes from calibration text (:mod:`shrink.stages.export.imatrix`; required by the 2-
  and 3-bit IQ types). The record counts the tensors of each type in the file: at a width that
  is not a multiple of 256 most k-quant tensors fall back to a 32-wide type.
* Before the file is moved into place, a fresh process loads it in llama.cpp
  (:func:`shrink.runtime.gguf.verify_in_subprocess`): block count and metadata against the HF
  config, tokenizer ids against the HF tokenizer, greedy generation against PyTorch (must be equal
  for f32/f16), top-1 agreement and perplexity on held-out blocks.

GPTQ folders (``quantization_config`` in config.json) are refused: dequantizing the GPTQ
integers and re-quantizing them to a GGUF type compounds two rounding errors (GPTQ's grid, then
llama.cpp's grid, which do not line up), so the result is worse than a GGUF quantized once from
the float model, which shrink always has (the folder before ``quantize``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shrink.core.errors import ShrinkError, install_hint
from shrink.core.outputs import check_output
from shrink.stages.export.gguf_types import ARCHS as _ARCHS
from shrink.stages.export.gguf_types import (  # noqa: F401 (the exporter's names, re-exported)
    DIRECT_TYPES,
    GGUF_TYPES,
    IMATRIX_TYPES,
    NEEDS_IMATRIX,
    QUANTIZED_TYPES,
    check_imatrix,
    llama_cpp_arch,
)
from shrink.stages.export.gguf_vocab import write_vocab

# ------------------------------------------------------------------------------------------------
# types
# ------------------------------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
# types whose greedy tokens must equal PyTorch's on the fixed prompts
EXACT_TYPES = ("f32", "f16")
GGUF_EXTRA = install_hint("gguf")


def check_type(gguf_type: str) -> str:
    t = str(gguf_type).lower()
    if t not in GGUF_TYPES:
        raise ShrinkError(f"unknown GGUF type '{gguf_type}'; choose one of {', '.join(GGUF_TYPES)}")
    return t


def imatrix_spec(gguf_type: str, imatrix=None):
    """The importance matrix an export of ``gguf_type`` uses (an ImatrixSpec), or None where the
    type gains nothing from one or ``imatrix`` is False (refused for types that need one)."""
    from shrink.stages.export.imatrix import ImatrixSpec

    check_imatrix(gguf_type, imatrix is not False)
    if imatrix is False or gguf_type not in IMATRIX_TYPES:
        return None
    return imatrix if isinstance(imatrix, ImatrixSpec) else ImatrixSpec()


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ShrinkError("writing GGUF needs the 'gguf' package: pip install gguf") from None
    return gguf


# ------------------------------------------------------------------------------------------------
# reading the HF folder
# ------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    folder: Path
    config: dict
    hf_arch: str
    arch_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool
    tensors: dict[str, tuple[Path, list[int], str]] = field(
        default_factory=dict
    )  # name -> (file, shape, dtype)


def read_config(model_dir: str | Path) -> dict:
    """config.json of an HF folder, with one-line errors that name the file."""
    folder = Path(model_dir).expanduser()
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        raise ShrinkError(f"no such model folder '{model_dir}'")
    if not cfg_file.is_file():
        raise ShrinkError(f"'{folder}' is not a Hugging Face model folder: {cfg_file} is missing")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShrinkError(f"cannot read {cfg_file}: {e}") from None


def _open_source(model_dir: str | Path) -> _Source:
    folder = Path(model_dir).expanduser()
    config = read_config(folder)
    cfg_file = folder / "config.json"
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ShrinkError(
            f"{cfg_file} describes a {method} checkpoint: GGUF is built from the float model "
            "(the folder before 'quantize'), since re-quantizing dequantized GPTQ weights "
            "compounds two rounding errors"
        )
    archs = config.get("architectures") or []
    hf_arch = next((a for a in archs if a in _ARCHS), None)
    if hf_arch is None:
        raise ShrinkError(
            f"{cfg_file}: architecture {archs or config.get('model_type')} has no "
            f"GGUF export in shrink (supported: {', '.join(_ARCHS)})"
        )
    arch_name, permute = _ARCHS[hf_arch]
    src = _Source(folder, config, hf_arch, arch_name, permute)
    from shrink.core.safetensors import scan

    where, headers = scan(folder)  # headers checked; shards agree with the index and each other
    if not headers:
        raise ShrinkError(f"no *.safetensors weights in '{folder}'")
    for name, f in where.items():
        info = headers[f][0][name]
        src.tensors[name] = (f, list(info["shape"]), info["dtype"])
    return src


def _load_tensor(src: _Source, name: str) -> np.ndarray:
    """One tensor as float32 numpy (bf16 and f16 widen exactly)."""
    import torch
    from safetensors import safe_open

    file = src.tensors[name][0]
    with safe_open(file, framework="pt") as st:
        t = st.get_tensor(name)
    return t.to(torch.float32).numpy()


def _weights_dtype(src: _Source) -> str:
    """The dtype of the 2-D weights: decides the lossless intermediate for llama.cpp's quantizer."""
    dtypes = {d for (_, shape, d) in src.tensors.values() if len(shape) == 2}
    if dtypes == {"F16"}:
        return "f16"
    if dtypes == {"BF16"}:
        return "bf16"
    return "f32"


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------


def _rope(config: dict, kind: str = "full_attention") -> dict:
    rp = config.get("rope_parameters") or {}
    if kind in rp and isinstance(rp[kind], dict):
        rp = rp[kind]
    elif "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = rp["full_attention"]
    out = dict(rp)
    # transformers 4 style keys
    if "rope_theta" not in out and "rope_theta" in config:
        out["rope_theta"] = config["rope_theta"]
    if not out.get("rope_type") and isinstance(config.get("rope_scaling"), dict):
        out.update(config["rope_scaling"])
        out.setdefault("rope_type", config["rope_scaling"].get("type"))
    return out


def layer_types(config: dict) -> list[str] | None:
    """Per-layer attention kinds, or None when the config does not have them."""
    lt = config.get("layer_types")
    n = config["num_hidden_layers"]
    if lt is None:
        return None
    if len(lt) != n:
        raise ShrinkError(
            f"config.json has {len(lt)} layer_types for {n} layers: the per-layer "
            "list was not sliced to the kept layers"
        )
    return list(lt)


def _gemma3_attention_scale(config: dict) -> float:
    """The query scale llama.cpp uses for gemma3: it does not read it from the file, it derives
    it from the layer count (62 layers = 27B: 1/sqrt(hidden/heads), else 1/sqrt(head_dim))."""
    if config["num_hidden_layers"] == 62:
        return 1.0 / math.sqrt(config["hidden_size"] / config["num_attention_heads"])
    return 1.0 / math.sqrt(config["head_dim"])


def _write_metadata(w, gguf, src: _Source, ftype: int, notes: list[str]) -> None:
    c = src.config
    n_layer = c["num_hidden_layers"]
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    n_ctx = c.get("max_position_embeddings") or 2048
    lt = layer_types(c)
    sliding = [t == "sliding_attention" for t in lt] if lt else None

    name = c.get("_name_or_path") or src.folder.name
    w.add_name(str(name).rstrip("/").split("/")[-1] or src.folder.name)
    w.add_block_count(n_layer)
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(ftype)

    rope = _rope(c)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    rtype = (rope.get("rope_type") or "default").lower()
    if rtype == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rtype not in ("default", "llama3"):
        raise ShrinkError(
            f"{src.folder / 'config.json'}: RoPE type '{rtype}' has no GGUF export in shrink"
        )

    if src.arch_name == "GEMMA3":
        if c.get("attn_logit_softcapping"):
            raise ShrinkError(
                f"{src.folder / 'config.json'}: attn_logit_softcapping is not "
                "supported by llama.cpp's gemma3"
            )
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        window = c.get("sliding_window")
        if window and (sliding is None or any(sliding)):
            w.add_sliding_window(int(window))
            # One flag per kept layer: llama.cpp reads a bool array as the per-layer pattern
            # (a scalar would be read as a period, which a pruned model no longer has).
            w.add_sliding_window_pattern(sliding if sliding is not None else [True] * n_layer)
            local = _rope(c, "sliding_attention").get("rope_theta", c.get("rope_local_base_freq"))
            if local is not None:
                w.add_rope_freq_base_swa(float(local))
        w.add_context_length(n_ctx)
    else:
        w.add_rope_dimension_count(head_dim)
        if src.arch_name == "LLAMA":
            w.add_vocab_size(c["vocab_size"])
        window = c.get("sliding_window")
        uses_window = window and (
            any(sliding)
            if sliding is not None
            else src.hf_arch == "MistralForCausalLM" or c.get("use_sliding_window")
        )
        if uses_window and window < n_ctx:
            # llama.cpp's llama/qwen2/qwen3 have no sliding-window attention: declare the window
            # as the context length, within which both compute the same thing.
            notes.append(
                f"llama.cpp's {src.arch_name.lower()} has no sliding-window attention: "
                f"context_length set to the window ({window} tokens), within which "
                "outputs equal the HF model's"
            )
            n_ctx = int(window)
        w.add_context_length(n_ctx)


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------


# The splitting regexes of llama.cpp's named pre-tokenizers (src/llama-vocab.cpp), for tokenizers
# whose vocabulary differs from the reference one but which split text the same way.
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half RoPE layout -> llama.cpp's interleaved pairs, per head (rows of q/k)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_rope_factors(c: dict) -> np.ndarray:
    rope = _rope(c)
    base = rope.get("rope_theta", 10000.0)
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class _Plan:
    hf_name: str | None  # None: generated tensor
    name: str
    shape: list[int]
    qtype: object  # gguf.GGMLQuantizationType


def _plan_tensors(gguf, src: _Source, out_type: str) -> list[_Plan]:
    c = src.config
    n_layer = c["num_hidden_layers"]
    arch = getattr(gguf.MODEL_ARCH, src.arch_name)
    tmap = gguf.get_tensor_name_map(arch, n_layer)
    Q = gguf.GGMLQuantizationType
    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    plans: list[_Plan] = []
    tied = c.get("tie_word_embeddings", src.arch_name == "GEMMA3")
    for hf_name, (_, shape, _) in src.tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when output.weight is absent
        if hf_name.startswith("model.layers."):
            bid = int(hf_name.split(".")[2])
            if bid >= n_layer:
                raise ShrinkError(
                    f"{src.tensors[hf_name][0]}: tensor {hf_name} is beyond the "
                    f"{n_layer} layers of config.json"
                )
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ShrinkError(
                f"{src.tensors[hf_name][0]}: tensor {hf_name} has no GGUF name for "
                f"{src.arch_name.lower()}"
            )
        shape = list(shape)
        if src.arch_name == "GEMMA3" and hf_name.endswith("embed_tokens.weight"):
            shape[0] = min(shape[0], c["vocab_size"])
        qtype = target
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            qtype = Q.F32
        elif qtype in (Q.Q8_0,) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            qtype = Q.F16
        plans.append(_Plan(hf_name, name, shape, qtype))
    missing = {f"blk.{i}.attn_q.weight" for i in range(n_layer)} - {p.name for p in plans}
    if missing:
        raise ShrinkError(
            f"'{src.folder}': weights of {len(missing)} of the {n_layer} layers in "
            "config.json are missing from the safetensors files"
        )
    if _rope(c).get("rope_type", "").lower() == "llama3":
        dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        plans.append(
            _Plan(
                None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", [dim // 2], Q.F32
            )
        )
    return plans


def _tensor_data(gguf, src: _Source, plan: _Plan) -> np.ndarray:
    c = src.config
    if plan.hf_name is None:
        return _llama3_rope_factors(c)
    data = _load_tensor(src, plan.hf_name)
    name = plan.hf_name
    if src.permute_qk and name.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    ):
        n_head = c["num_attention_heads"]
        if ".k_proj." in name:
            n_head = c.get("num_key_value_heads") or n_head
        data = _permute(data, n_head)
    if src.arch_name == "GEMMA3":
        if name.endswith("embed_tokens.weight"):
            data = data[: c["vocab_size"]]
        if name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm computes x * (1 + w); llama.cpp computes x * w
        if name.endswith("self_attn.q_norm.weight"):
            # HF scales queries by query_pre_attn_scalar**-0.5; llama.cpp's gemma3 by a value
            # it derives itself. Fold the ratio into the query norm (RoPE is linear).
            want = float(c.get("query_pre_attn_scalar") or c["head_dim"]) ** -0.5
            data = data * (want / _gemma3_attention_scale(c))
    data = np.ascontiguousarray(data, dtype=np.float32)
    Q = gguf.GGMLQuantizationType
    if plan.qtype == Q.F32:
        return data
    if plan.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, plan.qtype)


def write_gguf(model_dir: str | Path, path: str | Path, out_type: str = "f16") -> dict:
    """Write ``model_dir`` as a GGUF file of a directly written type (f32, f16, bf16, q8_0).

    Streams one tensor at a time (memory: the largest tensor, not the model). Returns a dict with
    the architecture, layer count, tokenizer and notes. No verification: see :func:`export_gguf`.
    """
    out_type = check_type(out_type)
    if out_type not in DIRECT_TYPES:
        raise ShrinkError(
            f"write_gguf writes {', '.join(DIRECT_TYPES)}; {out_type} is made by "
            "llama.cpp's quantizer (export_gguf does both)"
        )
    gguf = _import_gguf()
    src = _open_source(model_dir)
    arch = getattr(gguf.MODEL_ARCH, src.arch_name)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]
    notes: list[str] = []
    path = Path(path)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_metadata(w, gguf, src, int(ftype), notes)
        vocab = write_vocab(w, gguf, src)
        if out_type == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plans = _plan_tensors(gguf, src, out_type)
        for p in plans:
            if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = int(np.prod(p.shape)) * np.dtype(dt).itemsize
                w.add_tensor_info(p.name, p.shape, np.dtype(dt), nbytes)
            else:
                bshape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
                w.add_tensor_info(
                    p.name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=p.qtype
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plans:
            w.write_tensor_data(_tensor_data(gguf, src, p))
    finally:
        w.close()
    return {
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "hf_architecture": src.hf_arch,
        "block_count": src.config["num_hidden_layers"],
        "type": out_type,
        "notes": notes,
        **vocab,
    }


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


@dataclass
class GgufResult:
    """What ``export_gguf`` wrote: the typed fields, and every detail of the export record in
    ``details`` (notes, tokenizer, quantized_from, ...). ``result["key"]`` and
    ``result.get("key")`` read a field, else a detail."""

    output: Path
    path: Path  # the .gguf file
    file: str
    type: str
    bytes: int
    block_count: int | None = None
    architecture: str | None = None
    verification: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    # tensors of each type in the file: with a k-quant, what fell back to which type
    tensor_types: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **self.details,
            "output": str(self.output),
            "path": str(self.path),
            "file": self.file,
            "type": self.type,
            "bytes": self.bytes,
            "block_count": self.block_count,
            "architecture": self.architecture,
            "verification": self.verification,
            "tensor_types": self.tensor_types,
        }

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


def gguf_file_name(model_dir: Path, gguf_type: str) -> str:
    return f"{model_dir.resolve().name}-{gguf_type.upper()}.gguf"


def export_gguf(
    model_dir: str | Path,
    output: str | Path,
    gguf_type: str = "q4_k_m",
    *,
    force: bool = False,
    verify: bool = True,
    threads: int | None = None,
    samples: int = 4,
    seq_len: int = 256,
    data: str | None = None,
    max_new_tokens: int = 16,
    timeout: float = 3600,
    log=None,
    name: str | None = None,
    imatrix=None,
    measure: list[dict] | None = None,
) -> GgufResult:
    """Convert an HF folder shrink wrote to a GGUF llama.cpp loads, verified in a fresh process.

    ``output`` is a folder: it gets ``<model>-<TYPE>.gguf``, the source's license files and a
    ``shrink.json`` record carrying the source's earlier stages, through the stage runner (a
    temporary sibling renamed into place only after the check in a fresh llama.cpp process
    passes; ``verify=False`` skips that check). ``samples`` x ``seq_len`` held-out tokens are
    used for perplexity (``data``: a text source, default the held-out novel). ``threads``:
    llama.cpp threads (default: all cores). ``imatrix``: an
    :class:`~shrink.stages.export.imatrix.ImatrixSpec` (which calibration text), True/None for
    the default one, False for none; used for ``IMATRIX_TYPES``. ``measure``: text sets
    ({data, samples, seq_len, seed}) the check also measures the file on, in the same fresh
    process (its ``verification["measured"]``).
    (:func:`shrink.stages.export.gguf_point.compare_with_dense` puts the written file next to
    the dense model through the same type.)

    Returns a :class:`GgufResult`: type, sizes, tensor types (what fell back to which type), architecture, block count, tokenizer, the file's path and
    the verification result (tokenizer agreement, greedy tokens vs PyTorch, top-1 agreement,
    perplexity). Raises ShrinkError on bad input or a failed check.
    """
    from shrink.stages.runner import StageOutput, run_stage

    gguf_type = check_type(gguf_type)
    model_dir = Path(model_dir).expanduser()
    out = Path(output).expanduser()
    if out.suffix.lower() == ".gguf":
        raise ShrinkError(
            f"output '{output}' names a file: give a folder (it gets "
            f"{gguf_file_name(model_dir, gguf_type)}, its license and shrink.json)"
        )
    src = _open_source(model_dir)  # fail early on bad input, before any writing
    del src
    check_output(out, force, model_dir)
    if verify or gguf_type not in DIRECT_TYPES:
        from shrink.runtime.gguf import check_runtime

        check_runtime()  # llama.cpp verifies and quantizes: fail before any slow work
    name = f"{name}-{gguf_type.upper()}.gguf" if name else gguf_file_name(model_dir, gguf_type)
    say = log or (lambda line: None)
    spec = imatrix_spec(gguf_type, imatrix)

    def compute(tmp: Path) -> StageOutput:
        from shrink.runtime.gguf_quant import tensor_type_counts

        t0 = time.perf_counter()
        file = tmp / name
        say(
            f"writing GGUF {gguf_type} with the gguf package"
            + ("" if gguf_type in DIRECT_TYPES else ", quantized by llama.cpp")
        )
        if gguf_type in DIRECT_TYPES:
            info = write_gguf(model_dir, file, gguf_type)
        else:
            from shrink.runtime.gguf import quantize_in_subprocess

            base_type = _weights_dtype(_open_source(model_dir))
            base = tmp / f".base-{base_type}.gguf"
            info = write_gguf(model_dir, base, base_type)
            imat = {}
            if spec is not None:
                from shrink.stages.export.imatrix import imatrix_file

                imat["imatrix"], info["imatrix"] = imatrix_file(model_dir, spec, log=say)
                imat.update(imatrix_dataset=spec.data, imatrix_chunks=spec.samples)
            quantize_in_subprocess(base, file, gguf_type, threads=threads, timeout=timeout, **imat)
            base.unlink()
            info["type"] = gguf_type
            info["quantized_from"] = base_type
        for f in TOKENIZER_FILES:  # the HF tokenizer too: shrink eval/generate/bench use it
            if (model_dir / f).is_file():
                shutil.copy2(model_dir / f, tmp / f)
        info.update(
            format="gguf",
            source=str(model_dir.resolve()),
            file=name,
            seconds_write=round(time.perf_counter() - t0, 2),
            bytes=file.stat().st_size,
            tensor_types=tensor_type_counts(file),
        )

        def check_it(folder: Path) -> dict:
            from shrink.runtime import kinds

            info["verification"] = kinds.verify(
                folder / name,
                "gguf",
                source=model_dir,
                gguf_type=gguf_type,
                threads=threads,
                samples=samples,
                seq_len=seq_len,
                data=data,
                max_new_tokens=max_new_tokens,
                timeout=timeout,
                sets=measure,
            )
            return info["verification"]

        return StageOutput(info, dict(info), check_it, {"source_model": str(model_dir)})

    info = run_stage(
        "export",
        out,
        compute,
        source=model_dir,
        settings={
            "gguf": gguf_type,
            "threads": threads,
            "imatrix": spec.settings() if spec else None,
        },
        force=force,
        verify=verify,
        log=say,
    )
    return GgufResult(
        out,
        out / name,
        name,
        info["type"],
        info["bytes"],
        info.get("block_count"),
        info.get("architecture"),
        info.get("verification") or {},
        info,
        info.get("tensor_types") or {},
    )
