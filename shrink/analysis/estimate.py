"""Analytic estimates from a model's config alone: parameters, weight memory, KV cache, FLOPs, GPU fit.

Nothing here loads weights. The formulas follow the papers (ShortGPT, Gromov et al.) and the vendors' figures:

- per layer: attention ``d*h*d_h + 2*d*h_kv*d_h + h*d_h*d`` (= ``2 d^2 + 2 d h_kv d_h`` when
  ``d_h = d/h``), gated MLP ``3 d f``, two norms ``2 d``; embedding ``V d``; head ``V d`` unless tied.
- GPTQ per Linear(K -> N) with ``bits`` and group size ``g``:
  ``K N bits/8 + (K/g) N bits/8 + 2 (K/g) N + 4 K`` bytes (qweight, qzeros, fp16 scales, g_idx).
  Embedding, head, norms and biases stay 16-bit.
- KV cache: ``2 L h_kv d_h * bytes_per_element * context * batch``.
- FLOPs per token: ``2 * (L * (attention + MLP weights) + d V)`` (matmul) ``+ 4 L h d_h c``
  (attention over a context of c tokens; ``h d_h = d`` for Llama-style models).

Units: GB = 1e9 bytes everywhere in the results; bandwidth GB/s = 1e9 bytes/s.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.models import ALIASES

GB = 1e9
GIB = 2**30
BITS_CHOICES = (16, 8, 4, 3, 2)

# Per-layer RMSNorm count by model_type (default 2: before attention and before the MLP).
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3": 4, "gemma3_text": 4}
# Model types with an RMSNorm over head_dim on q and k (q_norm, k_norm) in every layer.
_QK_NORM_TYPES = {"qwen3", "gemma3", "gemma3_text"}
# Model types whose q/k/v projections always have a bias, whatever the config says.
_QKV_BIAS_TYPES = {"qwen2"}
# Architectures whose MLP is not gated (2 matrices, not 3): the formulas here do not apply.
_UNSUPPORTED_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "mpt"}
# Keys that mark a mixture-of-experts model (the dense formulas would be wrong).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# --------------------------------------------------------------------------- config loading


def load_config(model: str) -> dict:
    """Return the config dict of ``model``.

    Accepts an alias from ``shrink.core.models.ALIASES`` (packaged json, offline), the hub id of an alias
    (same json, offline), a folder holding config.json, a path to a .json file, or any other hub id
    (through ``transformers.AutoConfig``, which may need the network). For multimodal configs the
    text config is returned.
    """
    cfg = _load_raw_config(model)
    if not isinstance(cfg, dict):
        raise ShrinkError(f"the config of {model} is not a JSON object")
    from shrink.core.models import check_decoder_only

    check_decoder_only(cfg)  # encoders are refused here as by every loader
    if isinstance(cfg.get("text_config"), dict):
        text = dict(cfg["text_config"])
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        cfg = text
    return cfg


def _load_raw_config(model: str) -> dict:
    alias = _alias_for(model)
    if alias is not None:
        text = resources.files("shrink").joinpath("configs", f"{alias}.json").read_text()
        return json.loads(text)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ShrinkError(f"folder {model} has no config.json")
        return _read_json(path / "config.json")
    if path.is_file():
        return _read_json(path)
    known = ", ".join(ALIASES)
    if model.endswith(".json") or model.startswith((".", "/", "~")):
        raise ShrinkError(f"no such file or folder: {model}")
    if "/" not in model:  # not a path, not an alias, not an owner/name hub id: likely a typo
        raise ShrinkError(
            f"unknown model {model!r}; known aliases: {known} (or a folder, a .json file, a hub id)"
        )
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as exc:  # network, unknown id, gated repo, unknown model type ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkError(
            f"cannot load a config for {model!r} ({reason[:200]}); give a folder with config.json, "
            f"a .json file, or one of the aliases: {known}"
        ) from None


def _alias_for(model: str) -> str | None:
    lowered = model.lower()
    for alias, hub_id in ALIASES.items():
        if lowered == alias or lowered == hub_id.lower():
            return alias
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShrinkError(f"cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------- shape


@dataclass
class ModelShape:
    """The numbers the formulas need, read from a config."""

    hidden: int  # d
    intermediate: int  # f
    layers: int  # L
    heads: int  # h
    kv_heads: int  # h_kv
    head_dim: int  # d_h
    vocab: int  # V
    tied: bool
    model_type: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norms_per_layer: int
    qk_norm: bool
    assumptions: list[str] = field(default_factory=list)


def _field(cfg: dict, name: str) -> int:
    value = cfg.get(name)
    if value is None:
        model_type = cfg.get("model_type", "unknown")
        raise ShrinkError(f"config (model_type {model_type}) has no {name!r}: cannot estimate")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ShrinkError(f"config field {name!r} must be a positive integer, got {value!r}")
    return value


def model_shape(cfg: dict) -> ModelShape:
    """Read the dimensions from a config dict; ShrinkError names a missing field."""
    model_type = str(cfg.get("model_type", ""))
    if model_type in _UNSUPPORTED_TYPES:
        raise ShrinkError(
            f"model_type {model_type!r} has a non-gated MLP; estimate supports Llama-style models"
        )
    for key in _MOE_KEYS:
        if (cfg.get(key) or 0) > 1:
            raise ShrinkError(f"config has {key}={cfg[key]}: mixture-of-experts is not supported")
    hidden = _field(cfg, "hidden_size")
    heads = _field(cfg, "num_attention_heads")
    assumptions = []
    if cfg.get("num_key_value_heads") is None:
        kv_heads = heads
        assumptions.append("num_key_value_heads missing: assumed equal to num_attention_heads")
    else:
        kv_heads = _field(cfg, "num_key_value_heads")
    if cfg.get("head_dim") is not None:
        head_dim = _field(cfg, "head_dim")
    else:
        head_dim = hidden // heads
    if "tie_word_embeddings" in cfg:
        tied = bool(cfg["tie_word_embeddings"])
    else:
        tied = False
        assumptions.append("tie_word_embeddings missing: assumed False (separate head)")
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        hidden=hidden,
        intermediate=_field(cfg, "intermediate_size"),
        layers=_field(cfg, "num_hidden_layers"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_field(cfg, "vocab_size"),
        tied=tied,
        model_type=model_type,
        qkv_bias=attention_bias or model_type in _QKV_BIAS_TYPES,
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=_NORMS_PER_LAYER.get(model_type, 2),
        qk_norm=model_type in _QK_NORM_TYPES,
        assumptions=assumptions,
    )


def _check_drop(shape: ModelShape, drop: int) -> int:
    if not isinstance(drop, int) or drop < 0 or drop >= shape.layers:
        raise ShrinkError(
            f"--drop must be between 0 and {shape.layers - 1} (the model has {shape.layers} layers),"
            f" got {drop}"
        )
    return shape.layers - drop


def layer_linears(shape: ModelShape) -> list[tuple[str, int, int]]:
    """The Linear layers of one decoder layer as (name, in_features K, out_features N)."""
    d, f = shape.hidden, shape.intermediate
    q_out = shape.heads * shape.head_dim
    kv_out = shape.kv_heads * shape.head_dim
    return [
        ("q_proj", d, q_out),
        ("k_proj", d, kv_out),
        ("v_proj", d, kv_out),
        ("o_proj", q_out, d),
        ("gate_proj", d, f),
        ("up_proj", d, f),
        ("down_proj", f, d),
    ]


# --------------------------------------------------------------------------- parameters


@dataclass
class ParamCounts:
    """Parameter counts; attention/mlp/norms are totals over the kept layers."""

    layers: int  # layers kept
    per_layer: int  # parameters of one decoder layer
    embedding: int
    attention: int  # weights + biases
    mlp: int  # weights + biases
    norms: int  # per-layer norms + final norm
    head: int  # 0 when tied to the embedding
    total: int
    linear_weights: int  # the weights GPTQ quantizes (attention + MLP matrices, no biases)


def _layer_parts(shape: ModelShape) -> tuple[int, int, int, int]:
    """(attention, mlp, norms, linear weights) of one decoder layer."""
    linears = layer_linears(shape)
    attn_w = sum(k * n for name, k, n in linears[:4])
    mlp_w = sum(k * n for name, k, n in linears[4:])
    attn_b = 0
    if shape.qkv_bias:
        attn_b += shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim
    if shape.o_bias:
        attn_b += shape.hidden
    mlp_b = 2 * shape.intermediate + shape.hidden if shape.mlp_bias else 0
    norms = shape.norms_per_layer * shape.hidden + (2 * shape.head_dim if shape.qk_norm else 0)
    return attn_w + attn_b, mlp_w + mlp_b, norms, attn_w + mlp_w


def count_params(cfg: dict, drop: int = 0) -> ParamCounts:
    """Count parameters by part after dropping ``drop`` decoder layers (tied embedding counted once)."""
    shape = model_shape(cfg)
    kept = _check_drop(shape, drop)
    attn, mlp, norms, linear = _layer_parts(shape)
    embedding = shape.vocab * shape.hidden
    head = 0 if shape.tied else embedding
    all_norms = kept * norms + shape.hidden
    per_layer = attn + mlp + norms
    return ParamCounts(
        layers=kept,
        per_layer=per_layer,
        embedding=embedding,
        attention=kept * attn,
        mlp=kept * mlp,
        norms=all_norms,
        head=head,
        total=embedding + head + kept * per_layer + shape.hidden,
        linear_weights=kept * linear,
    )


# --------------------------------------------------------------------------- weight memory


def gptq_linear_bytes(k: int, n: int, bits: int, group_size: int = 128) -> float:
    """Bytes of one GPTQ-quantized Linear(K -> N): qweight + qzeros + fp16 scales + int32 g_idx.

    ``group_size = -1`` means one group per output channel (K/g = 1).
    """
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    return k * n * bits / 8 + groups * n * bits / 8 + 2 * groups * n + 4 * k


@dataclass
class WeightMemory:
    """Bytes of the weights at a given precision."""

    bits: int
    group_size: int
    linear_bytes: float  # attention + MLP matrices (quantized when bits < 16)
    other_bytes: float  # embedding, head, norms, biases: always 16-bit
    total_bytes: float
    read_per_token_bytes: (
        float  # what a decode step reads: all but the embedding table's unused rows
    )
    bits_per_linear_weight: float  # effective bits including GPTQ overhead

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB


def _check_bits(bits: int, group_size: int) -> None:
    if bits not in BITS_CHOICES:
        raise ShrinkError(f"--bits must be one of {', '.join(map(str, BITS_CHOICES))}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ShrinkError(f"--group-size must be a positive integer or -1, got {group_size}")


def weight_memory(cfg: dict, drop: int = 0, bits: int = 16, group_size: int = 128) -> WeightMemory:
    """Weight bytes after dropping ``drop`` layers; bits < 16 uses the GPTQ layout for Linears."""
    _check_bits(bits, group_size)
    shape = model_shape(cfg)
    counts = count_params(cfg, drop)
    if bits == 16:
        linear = 2.0 * counts.linear_weights
    else:
        per_layer = sum(
            gptq_linear_bytes(k, n, bits, group_size) for _, k, n in layer_linears(shape)
        )
        linear = counts.layers * per_layer
    other = 2.0 * (counts.total - counts.linear_weights)
    total = linear + other
    # A decode step reads every weight once, except the embedding table, of which it reads one row
    # per token. With tied embeddings the table is read anyway, as the head.
    unread = 0.0 if shape.tied else 2.0 * (counts.embedding - shape.hidden)
    return WeightMemory(
        bits=bits,
        group_size=group_size,
        linear_bytes=linear,
        other_bytes=other,
        total_bytes=total,
        read_per_token_bytes=total - unread,
        bits_per_linear_weight=8 * linear / counts.linear_weights,
    )


# --------------------------------------------------------------------------- KV cache, FLOPs


def kv_cache_bytes(
    cfg: dict, context: int, batch: int = 1, drop: int = 0, bytes_per_element: int = 2
) -> int:
    """KV cache bytes: ``2 L h_kv d_h * bytes_per_element * context * batch`` (fp16: 2 bytes)."""
    shape = model_shape(cfg)
    kept = _check_drop(shape, drop)
    _check_positive(context=context, batch=batch)
    return 2 * kept * shape.kv_heads * shape.head_dim * bytes_per_element * context * batch


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ShrinkError(f"--{name} must be a positive integer, got {value}")


@dataclass
class Flops:
    """Forward FLOPs for one token (multiply-add = 2 FLOPs)."""

    context: int
    matmul: int  # 2 * (L * (attention + MLP weights) + d V): independent of context
    attention: int  # 4 L h d_h c: scores and weighted sum over a context of c tokens
    total: int


def flops_per_token(cfg: dict, context: int, drop: int = 0) -> Flops:
    """FLOPs for the forward pass of one token that attends to ``context`` tokens."""
    shape = model_shape(cfg)
    kept = _check_drop(shape, drop)
    if not isinstance(context, int) or context < 0:
        raise ShrinkError(f"--context must be a non-negative integer, got {context}")
    linear = sum(k * n for _, k, n in layer_linears(shape))
    matmul = 2 * (kept * linear + shape.hidden * shape.vocab)
    attention = 4 * kept * shape.heads * shape.head_dim * context
    return Flops(context=context, matmul=matmul, attention=attention, total=matmul + attention)


# --------------------------------------------------------------------------- GPUs

DEFAULT_RESERVE = 0.10
APPLE_RESERVE = 0.25


@dataclass(frozen=True)
class Gpu:
    """Vendor figures. ``memory_gb`` is the marketed size, which for VRAM and unified
    memory is binary: a "24 GB" card holds 24 * 2**30 bytes. ``reserve`` is the fraction kept free for
    the runtime (CUDA context, activations, fragmentation; on macOS the GPU may by default wire only
    about 75% of unified memory)."""

    name: str
    memory_gb: float
    bandwidth_gbs: float
    fp16_tflops: float | None
    source: str
    keys: tuple[str, ...]
    reserve: float = DEFAULT_RESERVE

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * GIB * (1 - self.reserve)


_NV = "NVIDIA spec sheet; TFLOPS = dense FP16 tensor, FP32 accumulate"
GPUS: tuple[Gpu, ...] = (
    Gpu("RTX 3060", 12, 360, 25.5, _NV + " (approx.)", ("3060",)),
    Gpu("RTX 4060 Ti 16GB", 16, 288, 44, _NV + " (approx.)", ("4060ti16gb", "4060ti16", "4060ti")),
    Gpu("RTX 3090", 24, 936, 71, _NV, ("3090",)),
    Gpu("RTX 4090", 24, 1008, 165.2, _NV, ("4090",)),
    Gpu("RTX 5090", 32, 1792, 209.5, _NV, ("5090",)),
    Gpu(
        "Apple M2 Max",
        96,
        400,
        None,
        "Apple (largest config, unified memory); TFLOPS not published",
        ("m2max",),
        APPLE_RESERVE,
    ),
    Gpu(
        "Apple M3 Max",
        128,
        400,
        None,
        "Apple (largest config, unified memory); TFLOPS not published",
        ("m3max",),
        APPLE_RESERVE,
    ),
)


def _gpu_key(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    for prefix in ("nvidia", "geforce", "rtx", "apple"):
        key = key.removeprefix(prefix)
    return key


def find_gpu(name: str) -> Gpu:
    """Look a GPU up by a loose name: '4090', 'rtx4090', 'RTX-4090', 'm3 max' ..."""
    key = _gpu_key(name)
    for gpu in GPUS:
        if key in gpu.keys or key == _gpu_key(gpu.name):
            return gpu
    known = ", ".join(gpu.name for gpu in GPUS)
    raise ShrinkError(f"unknown GPU {name!r}; known: {known} (or 'all')")


def select_gpus(gpu: str | None) -> list[Gpu]:
    """None or 'all' -> every GPU in the table; otherwise the one named."""
    if gpu is None or gpu.lower() == "all":
        return list(GPUS)
    return [find_gpu(gpu)]


@dataclass
class GpuFit:
    gpu: str
    memory_gb: float  # marketed size (binary GB)
    usable_gb: float  # decimal GB left after the reserve
    reserve: float
    needed_gb: float  # weights + KV cache, decimal GB
    fits: bool
    decode_tokens_per_s: float  # bandwidth bound, all sequences of the batch together
    prefill_tokens_per_s: float | None  # compute bound at FLOPs/token of the full context
    bandwidth_gbs: float
    fp16_tflops: float | None
    source: str


def gpu_fit(
    gpu: Gpu, weights: WeightMemory, kv_bytes: float, flops: Flops, batch: int = 1
) -> GpuFit:
    """Whether weights + KV fit in the usable memory, and the roofline token rates.

    decode: each step reads the weights once and the whole KV cache and yields ``batch`` tokens, so
    tokens/s = batch * bandwidth / (weight bytes read per token + KV bytes).
    prefill: tokens/s = FP16 FLOP/s / FLOPs per token at the full context (a conservative bound).
    """
    needed = weights.total_bytes + kv_bytes
    decode = batch * gpu.bandwidth_gbs * GB / (weights.read_per_token_bytes + kv_bytes)
    prefill = None if gpu.fp16_tflops is None else gpu.fp16_tflops * 1e12 / flops.total
    return GpuFit(
        gpu=gpu.name,
        memory_gb=gpu.memory_gb,
        usable_gb=gpu.usable_bytes / GB,
        reserve=gpu.reserve,
        needed_gb=needed / GB,
        fits=needed <= gpu.usable_bytes,
        decode_tokens_per_s=decode,
        prefill_tokens_per_s=prefill,
        bandwidth_gbs=gpu.bandwidth_gbs,
        fp16_tflops=gpu.fp16_tflops,
        source=gpu.source,
    )


# --------------------------------------------------------------------------- everything together


@dataclass
class Estimate:
    model: str
    model_type: str
    layers: int  # in the config
    drop: int
    bits: int
    group_size: int
    context: int
    batch: int
    shape: ModelShape
    params: ParamCounts
    weights: WeightMemory
    kv_cache_bytes: int
    flops: Flops
    gpus: list[GpuFit]
    assumptions: list[str]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weights"]["total_gb"] = self.weights.total_gb
        data["kv_cache_gb"] = self.kv_cache_bytes / GB
        return data


def estimate(
    model: str | dict,
    drop: int = 0,
    bits: int = 16,
    group_size: int = 128,
    context: int = 4096,
    batch: int = 1,
    gpu: str | None = None,
) -> Estimate:
    """All estimates for ``model`` (alias, folder, .json, hub id, or a config dict).

    ``gpu``: None or 'all' -> every GPU in the table, else the one named.
    """
    cfg = model if isinstance(model, dict) else load_config(model)
    name = model if isinstance(model, str) else str(cfg.get("_name_or_path", "config"))
    shape = model_shape(cfg)
    _check_drop(shape, drop)
    _check_bits(bits, group_size)
    _check_positive(context=context, batch=batch)
    gpus = select_gpus(gpu)
    params = count_params(cfg, drop)
    weights = weight_memory(cfg, drop, bits, group_size)
    kv = kv_cache_bytes(cfg, context, batch, drop)
    flops = flops_per_token(cfg, context, drop)
    assumptions = list(shape.assumptions) + [
        "GB = 1e9 bytes; GPU memory sizes are binary (24 GB card = 24 * 2^30 bytes)",
        f"GPU fit keeps {DEFAULT_RESERVE:.0%} of memory free ({APPLE_RESERVE:.0%} on Apple unified"
        " memory); activations beyond the KV cache are not counted",
        "KV cache in fp16 (2 bytes per element); all layers kept are full attention",
    ]
    if bits < 16:
        assumptions.append(
            f"GPTQ {bits}-bit, group size {group_size}: embedding, head, norms, biases stay 16-bit"
        )
    return Estimate(
        model=name,
        model_type=shape.model_type,
        layers=shape.layers,
        drop=drop,
        bits=bits,
        group_size=group_size,
        context=context,
        batch=batch,
        shape=shape,
        params=params,
        weights=weights,
        kv_cache_bytes=kv,
        flops=flops,
        gpus=[gpu_fit(g, weights, kv, flops, batch) for g in gpus],
        assumptions=assumptions,
    )
