"""The memory plan of a build: for each stage, where it runs (device, streamed or whole, 4- or
16-bit), its predicted peak device and host memory, and the disk it writes; before any work.

Model sizes come from :mod:`shrink.analysis.estimate` (parameter counts, GPTQ layout). The
per-stage formulas, in bytes (d hidden, f intermediate, V vocabulary, T tokens of one batch,
s bytes per compute element: 2 on a GPU, 4 on the CPU):

- runtime: every process holds ``HOST_RUNTIME`` of libraries (``HOST_RUNTIME_CPU`` when the
  plan has no GPU); a GPU keeps ``DEFAULT_RESERVE`` of
  its memory for the CUDA context and fragmentation, and the host keeps ``HOST_RESERVE``.
- streamed walks (score, bridge, evaluate): device = max(one layer, embedding, head) + one
  batch's working set ``T s (6d + 3f)``, or the head's turn: fp32 logits of one chunk of
  positions (at most ``LOGIT_BYTES``) and their log-softmax; host = the
  hidden states of every block ``N S d s`` (two streams for the bridge), which move to a
  memory-mapped file when they would take half the RAM or more.
- prune: a byte copy through one 64 MiB buffer.
- heal: LoRA holds the pruned model in 16 bits plus training activations without checkpointing
  (``T L 2 (8d + 5f)``); QLoRA holds the decoder Linears in NF4 with double quantization
  (4.127 bits a weight) and the rest in 16 bits, with gradient checkpointing (one 16-bit
  ``d``-vector per token per layer, plus one layer's activations). Both add the adapter with its
  AdamW state (16 bytes a parameter), and the loss: the chunked linear cross-entropy holds
  the fp32 logits of one chunk of positions and their gradient (``2 HEAD_CHUNK_BYTES``) and the
  hidden states' copy and gradient ``2 T d 4``. ``auto``
  picks LoRA when it fits the GPU (on a CPU: the RAM), else QLoRA, and says so. On a CPU LoRA's
  model is float32; QLoRA computes in bfloat16 on either device.
  The host streams the checkpoint in tensor by tensor (safetensors): two of the largest tensor.
- merge: streamed, one decoder Linear in float32 with its LoRA factors and delta (three copies);
  other tensors are copied through one buffer.
- GPTQ (GPTQModel): one decoder layer in 16 bits on the device with the Hessian of its largest
  input ``K^2 4`` and the calibration hidden states (inputs and outputs); the host holds the
  quantized layers as they accumulate, the 16-bit embedding and head, and one layer.
- GGUF export: tensor by tensor (one tensor in float32 plus its quantized copy); disk holds a
  16-bit intermediate file and the result.

Sizes in GB are decimal (1e9); a GPU or RAM size given as "24GB" is binary (24 * 2**30), as
memory is sold.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from shrink.analysis.estimate import (
    DEFAULT_RESERVE,
    GB,
    GIB,
    ModelShape,
    ParamCounts,
    count_params,
    find_gpu,
    layer_linears,
    load_config,
    model_shape,
    weight_memory,
)
from shrink.core.errors import ShrinkError

HOST_RUNTIME = 1.5e9  # python, torch, transformers and the CUDA libraries in one process
HOST_RUNTIME_CPU = 0.6e9  # the same without CUDA (measured ~0.45 GB peak by bench/big_model.py)
# what GPTQModel leaves in the build's process once it has quantized (its libraries, pools and
# caches): the stages after it carry it (bench/big_model.py measured 0.24 GB)
GPTQ_LEFTOVER = 0.3e9
HOST_RESERVE = 0.10  # of the RAM, for the OS and the page cache
NF4_BITS = 4.127  # bitsandbytes NF4 with double-quantized absmax
COPY_BUFFER = 64 << 20
LOGIT_BYTES = 128 << 20  # fp32 logits of one chunk (shrink.core.perplexity.LOGIT_BYTES)
# a GPTQ folder's float tensors stay float32 on the CPU when this many times its float32
# weights fit, else bfloat16 (shrink.streaming.memory.QUANTIZED_FLOAT32_MARGIN)
QUANTIZED_FLOAT32_MARGIN = 2.0
# fp32 logits of one chunk of the healing loss (shrink.stages.heal.headloss.HEAD_CHUNK_BYTES)
HEAD_CHUNK_BYTES = 64 << 20
GGUF_BITS = {
    "f32": 32,
    "f16": 16,
    "bf16": 16,
    "q8_0": 8.5,
    "q6_k": 6.56,
    "q5_k_m": 5.69,
    "q5_0": 5.5,
    "q4_k_m": 4.85,
    "q4_0": 4.5,
    "q3_k_m": 3.91,
    "q2_k": 2.63,
    # llama.cpp's nominal bits per weight of the other types it writes
    "q5_1": 6.0,
    "q5_k_s": 5.54,
    "q4_1": 5.0,
    "q4_k_s": 4.58,
    "iq4_nl": 4.5,
    "iq4_xs": 4.25,
    "q3_k_l": 4.27,
    "q3_k_s": 3.5,
    "iq3_s": 3.44,
    "iq3_xxs": 3.06,
    "q2_k_s": 2.56,
    "iq2_m": 2.7,
    "iq2_s": 2.5,
    "iq2_xs": 2.31,
}


@dataclass
class PlanSettings:
    """The work each stage does; the defaults are the stages' own defaults."""

    score_samples: int = 32
    score_seq_len: int = 256
    batch_size: int = 4
    heal_method: str = "auto"  # auto, lora, qlora
    heal_rank: int = 8
    heal_targets: str = "mlp"  # mlp, attn, all
    heal_batch: int = 4
    heal_seq_len: int = 512
    gptq_bits: int | None = 4  # None: no GPTQ stage
    group_size: int = 128
    gptq_samples: int = 64
    gptq_seq_len: int = 512
    gguf: str | None = "q4_k_m"  # None: no GGUF export
    imatrix_samples: int = 16  # 0: the export computes no importance matrix
    imatrix_seq_len: int = 256
    eval_samples: int = 8
    eval_seq_len: int = 512


@dataclass
class ModelFacts:
    """What the plan needs to know about the model, from :mod:`shrink.analysis.estimate`."""

    name: str
    shape: ModelShape
    dense: ParamCounts
    pruned: ParamCounts
    drop: int
    source_bytes: int  # bytes per parameter in the checkpoint
    largest_tensor: int  # elements of the largest single tensor

    @property
    def layer_params(self) -> int:
        return self.dense.per_layer

    def linear_per_layer(self) -> int:
        return sum(k * n for _, k, n in layer_linears(self.shape))


def facts_for(cfg: dict, drop: int = 0, name: str = "") -> ModelFacts:
    """The model facts of a config dict with ``drop`` layers removed."""
    shape = model_shape(cfg)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    largest = max([shape.vocab * shape.hidden] + [k * n for _, k, n in layer_linears(shape)])
    return ModelFacts(
        name or str(cfg.get("_name_or_path", "model")),
        shape,
        count_params(cfg),
        count_params(cfg, drop),
        drop,
        4 if "32" in dtype else 2,
        largest,
    )


@dataclass
class StagePlan:
    stage: str
    device: str  # cuda or cpu
    mode: str  # streamed, whole, tensor by tensor, copy
    precision: str  # 4-bit, 16-bit, 32-bit, bytes
    device_bytes: float
    host_bytes: float
    disk_bytes: float
    note: str = ""
    short: str = ""  # what does not fit, one phrase; empty when it fits

    @property
    def fits(self) -> bool:
        return not self.short


@dataclass
class Plan:
    model: str
    drop: int
    gpu_bytes: float
    ram_bytes: float
    stages: list[StagePlan]
    assumptions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def refusal(self) -> str | None:
        """One line naming the first stage that cannot fit, and by how much."""
        for s in self.stages:
            if not s.fits:
                return f"stage {s.stage} cannot fit: {s.short}"
        return None

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)


class _Budget:
    """Usable memory and the shortfall phrase of a stage."""

    def __init__(self, gpu_bytes: float, ram_bytes: float):
        self.gpu = gpu_bytes * (1 - DEFAULT_RESERVE)
        self.ram = ram_bytes * (1 - HOST_RESERVE)
        self.runtime = HOST_RUNTIME if gpu_bytes > 0 else HOST_RUNTIME_CPU

    def short(self, device_bytes: float, host: float) -> str:
        if device_bytes > self.gpu:
            return (
                f"needs {device_bytes / GB:.1f} GB of GPU memory, {self.gpu / GB:.1f} GB "
                f"usable (short by {(device_bytes - self.gpu) / GB:.1f} GB)"
            )
        if host > self.ram:
            return (
                f"needs {host / GB:.1f} GB of RAM, {self.ram / GB:.1f} GB usable (short by "
                f"{(host - self.ram) / GB:.1f} GB)"
            )
        return ""


def _batch_bytes(m: ModelFacts, batch: int, seq_len: int, s: int, head: bool = True) -> float:
    """One batch's working set in a layer forward, or (``head``) the fp32 logits of one chunk
    of positions and their log-softmax, whichever is larger."""
    d, f = m.shape.hidden, m.shape.intermediate
    layer = batch * seq_len * s * (6 * d + 3 * f)
    return max(layer, 2 * min(LOGIT_BYTES, batch * seq_len * m.shape.vocab * 4) if head else 0)


def _walk(
    name: str,
    m: ModelFacts,
    b: _Budget,
    samples: int,
    seq_len: int,
    batch: int,
    streams: int = 1,
    params: ParamCounts | None = None,
    head: bool = False,
) -> StagePlan:
    """A forward walk over calibration or evaluation blocks: whole when the weights fit the
    device with 20% headroom (as ``decide_streaming``), else one layer at a time."""
    params = params or m.dense
    device = "cuda" if b.gpu > 0 else "cpu"
    s = 2 if device == "cuda" else 4
    work = _batch_bytes(m, min(batch, samples), seq_len, s, head)
    acts = streams * samples * seq_len * m.shape.hidden * s
    whole = params.total * s
    limit = b.gpu if device == "cuda" else b.ram
    if whole * 1.2 + work <= limit:
        return _stage(name, b, device, "whole", f"{8 * s}-bit", whole + work, b.runtime, 0, "")
    layer = max(m.layer_params, m.dense.embedding, m.dense.head) * s
    note = ""
    if acts >= 0.5 * b.ram:
        note = f"hidden states ({acts / GB:.1f} GB) in a memory-mapped file"
        disk, host_acts = acts, 0.0
    else:
        disk, host_acts = 0.0, acts
    return _stage(
        name, b, device, "streamed", f"{8 * s}-bit", layer + work, b.runtime + host_acts, disk, note
    )


def _stage(name, b: _Budget, device, mode, precision, dev, host, disk, note) -> StagePlan:
    """A stage's row; on the CPU its device memory is host memory."""
    if device == "cpu":
        dev, host = 0.0, host + dev
    return StagePlan(name, device, mode, precision, dev, host, disk, note, b.short(dev, host))


def _prune(m: ModelFacts, b: _Budget) -> StagePlan:
    out = m.pruned.total * m.source_bytes
    return _stage(
        "prune",
        b,
        "cpu",
        "copy",
        "bytes",
        0,
        b.runtime + COPY_BUFFER,
        out,
        f"copies {m.pruned.layers} of {m.shape.layers} layers byte for byte",
    )


def _lora_params(m: ModelFacts, targets: str, rank: int) -> int:
    picked = {
        "mlp": ("gate_proj", "up_proj", "down_proj"),
        "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    }.get(targets)
    return m.pruned.layers * sum(
        rank * (k + n) for name, k, n in layer_linears(m.shape) if picked is None or name in picked
    )


def heal_bytes(m: ModelFacts, method: str, st: PlanSettings, device: str) -> float:
    """Peak device memory of LoRA or QLoRA training (see the module docstring)."""
    d, f, L = m.shape.hidden, m.shape.intermediate, m.pruned.layers
    T = st.heal_batch * st.heal_seq_len
    s = 2 if device == "cuda" or method == "qlora" else 4
    linear = m.pruned.linear_weights
    other = m.pruned.total - linear
    adapter = _lora_params(m, st.heal_targets, st.heal_rank) * 16
    logits = 2 * min(HEAD_CHUNK_BYTES, T * m.shape.vocab * 4) + 2 * T * d * 4
    layer_acts = T * s * (8 * d + 5 * f)
    if method == "qlora":  # 16-bit compute on either device
        weights = linear * NF4_BITS / 8 + other * 2
        biggest = max(k * n for _, k, n in layer_linears(m.shape)) * 2  # one weight dequantized
        return weights + biggest + T * d * 2 * L + layer_acts + adapter + logits
    return m.pruned.total * s + L * layer_acts + adapter + logits


def _heal(m: ModelFacts, b: _Budget, st: PlanSettings) -> StagePlan:
    host = b.runtime + 2 * m.largest_tensor * m.source_bytes
    disk = _lora_params(m, st.heal_targets, st.heal_rank) * 4 * 3  # adapter + 2 checkpoints
    if b.gpu <= 0:  # the model is built in host memory: one checkpoint tensor in flight
        host = b.runtime + m.largest_tensor * m.source_bytes
        lora = heal_bytes(m, "lora", st, "cpu")
        method, note = st.heal_method, "LoRA on the CPU"
        if method == "auto" and b.short(0, lora + host):
            method = "qlora"
        if method == "qlora":
            note = "QLoRA on the CPU (bfloat16 compute, gradient checkpointing)"
            if st.heal_method == "auto":
                note = (
                    f"QLoRA chosen: a float32 LoRA base and its activations need "
                    f"{lora / GB:.1f} GB, the RAM has {b.ram / GB:.1f} GB usable"
                )
            need = heal_bytes(m, "qlora", st, "cpu")
            return _stage("heal", b, "cpu", "whole (qlora)", "4-bit", need, host, disk, note)
        return _stage("heal", b, "cpu", "whole (lora)", "32-bit", lora, host, disk, note)
    lora = heal_bytes(m, "lora", st, "cuda")
    qlora = heal_bytes(m, "qlora", st, "cuda")
    method = st.heal_method
    note = ""
    if method == "auto":
        method = "lora" if lora <= b.gpu else "qlora"
        if method == "qlora":
            note = (
                f"QLoRA chosen: the 16-bit LoRA base and its activations need "
                f"{lora / GB:.1f} GB, the GPU has {b.gpu / GB:.1f} GB usable"
            )
    need = lora if method == "lora" else qlora
    precision = "16-bit" if method == "lora" else "4-bit"
    plan = _stage("heal", b, "cuda", f"whole ({method})", precision, need, host, disk, note)
    if plan.short and method == "qlora":
        plan.short += (
            f" even with QLoRA; lower the heal batch ({st.heal_batch}) or sequence "
            f"length ({st.heal_seq_len})"
        )
    return plan


def _merge(m: ModelFacts, b: _Budget) -> StagePlan:
    # the adapted tensors are decoder Linears; the others (the embeddings too) are byte copies
    largest_linear = max(k * n for _, k, n in layer_linears(m.shape))
    host = b.runtime + 3 * largest_linear * 4 + COPY_BUFFER
    return _stage(
        "merge",
        b,
        "cpu",
        "tensor by tensor",
        "32-bit",
        0,
        host,
        m.pruned.total * m.source_bytes,
        "W + scale * B @ A, one tensor at a time",
    )


def _gptq(m: ModelFacts, b: _Budget, st: PlanSettings, cfg: dict) -> StagePlan:
    bits = st.gptq_bits
    q = weight_memory(cfg, m.drop, bits, st.group_size)
    layer16 = m.layer_params * 2
    hessian = max(k for _, k, _ in layer_linears(m.shape)) ** 2 * 4
    N, S = st.gptq_samples, st.gptq_seq_len
    acts = 2 * N * S * m.shape.hidden * 2
    work = _batch_bytes(m, min(st.batch_size, N), S, 2)
    quantized_so_far = q.linear_bytes
    host = b.runtime + quantized_so_far + q.other_bytes + layer16
    device = "cuda" if b.gpu > 0 else "cpu"
    return _stage(
        "quantize",
        b,
        device,
        "layer by layer",
        f"{bits}-bit",
        layer16 + hessian + acts + work,
        host,
        q.total_bytes,
        "GPTQModel: one 16-bit layer on the device, the rest on the host or disk",
    )


def _gguf(m: ModelFacts, b: _Budget, st: PlanSettings) -> StagePlan:
    kind = st.gguf
    if kind not in GGUF_BITS:
        raise ShrinkError(
            f"unknown GGUF type '{kind}' for the plan; use one of {', '.join(GGUF_BITS)}"
        )
    params = m.pruned.total
    host = b.runtime + m.largest_tensor * (4 + GGUF_BITS[kind] / 8)
    disk = params * 2 + params * GGUF_BITS[kind] / 8
    mode, note = "tensor by tensor", "a 16-bit GGUF first, then llama.cpp's quantizer"
    if st.imatrix_samples and kind not in ("f32", "f16", "bf16", "q8_0"):
        # the importance matrix: a float32 forward walk of the pruned model on the CPU over
        # its calibration blocks, whole or one layer at a time, before the quantizer runs
        on_cpu = copy.copy(b)
        on_cpu.gpu = 0.0
        walk = _walk(
            "imatrix",
            m,
            on_cpu,
            st.imatrix_samples,
            st.imatrix_seq_len,
            st.batch_size,
            params=m.pruned,
            head=True,
        )
        host = max(host, walk.host_bytes)
        note = f"the importance matrix ({walk.mode}, 32-bit), then " + note
    return _stage("export gguf", b, "cpu", mode, kind, 0, host, disk, note)


def _evaluate(m: ModelFacts, b: _Budget, st: PlanSettings, cfg: dict) -> StagePlan:
    plan = _walk(
        "evaluate", m, b, st.eval_samples, st.eval_seq_len, st.batch_size, params=m.dense, head=True
    )
    plan.note = "; ".join(x for x in (plan.note, "dense source and pruned outputs") if x)
    if st.gptq_bits and b.gpu > 0:
        q = weight_memory(cfg, m.drop, st.gptq_bits, st.group_size).total_bytes
        work = _batch_bytes(m, min(st.batch_size, st.eval_samples), st.eval_seq_len, 2)
        plan.device_bytes = max(plan.device_bytes, q + work)
        plan.note += f"; the {st.gptq_bits}-bit model whole on the GPU"
        plan.short = b.short(plan.device_bytes, plan.host_bytes)
    elif st.gptq_bits:
        # the GPTQ folder is loaded whole (its packed layers cannot be streamed), its float
        # tensors in float32 unless QUANTIZED_FLOAT32_MARGIN times that does not fit, then in
        # bfloat16 (as shrink.streaming.memory.quantized_cpu_dtype decides); the CPU kernel
        # repacks each Linear's weights on its first forward through int32 copies
        q = weight_memory(cfg, m.drop, st.gptq_bits, st.group_size)
        float32 = q.linear_bytes + 2 * q.other_bytes  # the 16-bit float tensors doubled
        weights = float32 if QUANTIZED_FLOAT32_MARGIN * float32 <= b.ram else q.total_bytes
        repack = 4 * 4 * max(k * n for _, k, n in layer_linears(m.shape))
        work = _batch_bytes(m, min(st.batch_size, st.eval_samples), st.eval_seq_len, 4)
        plan.host_bytes = max(plan.host_bytes, b.runtime + weights + repack + work)
        precision = "float32" if weights == float32 else "bfloat16"
        plan.note += f"; the {st.gptq_bits}-bit model whole ({precision} embeddings)"
        plan.short = b.short(plan.device_bytes, plan.host_bytes)
    return plan


def plan_build(
    config_like,
    *,
    gpu_bytes: float,
    ram_bytes: float,
    model_facts: ModelFacts | None = None,
    drop: int = 0,
    settings: PlanSettings | None = None,
) -> Plan:
    """The plan of a whole build of ``config_like`` (alias, folder, .json or config dict) with
    ``drop`` layers removed, on a GPU of ``gpu_bytes`` (0: none) and ``ram_bytes`` of RAM."""
    cfg = config_like if isinstance(config_like, dict) else load_config(config_like)
    name = config_like if isinstance(config_like, str) else str(cfg.get("_name_or_path", "model"))
    m = model_facts or facts_for(cfg, drop, name)
    st = settings or PlanSettings()
    if st.heal_method not in ("auto", "lora", "qlora"):
        raise ShrinkError(f"heal method '{st.heal_method}' is not planned; use auto, lora or qlora")
    if gpu_bytes < 0 or ram_bytes <= 0:
        raise ShrinkError("the plan needs a positive RAM size and a GPU size of 0 or more")
    b = _Budget(gpu_bytes, ram_bytes)
    stages = [
        _walk("score", m, b, st.score_samples, st.score_seq_len, st.batch_size),
        _prune(m, b),
        _walk("bridge", m, b, st.score_samples, st.score_seq_len, st.batch_size, streams=2),
        _heal(m, b, st),
        _merge(m, b),
    ]
    later = []
    if st.gguf:
        later.append(_gguf(m, b, st))
    later.append(_evaluate(m, b, st, cfg))
    if st.gptq_bits:
        stages.append(_gptq(m, b, st, cfg))
        for plan in later:
            plan.host_bytes += GPTQ_LEFTOVER
            plan.short = b.short(plan.device_bytes, plan.host_bytes)
    stages += later
    assumptions = [
        f"usable: {1 - DEFAULT_RESERVE:.0%} of the GPU, {1 - HOST_RESERVE:.0%} of the "
        f"RAM; {b.runtime / GB:.1f} GB of libraries per process",
        f"heal: batch {st.heal_batch} x {st.heal_seq_len} tokens, rank {st.heal_rank} "
        f"on {st.heal_targets}",
    ]
    return Plan(m.name, drop, gpu_bytes, ram_bytes, stages, assumptions)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)\s*$", re.I)
_UNITS = {"m": 2**20, "g": GIB, "t": 2**40}


def parse_memory(text: str | float | int, what: str) -> float:
    """Bytes of a memory size: '24GB', '24 GiB', '64g', '512MB', a number of bytes, or (for a
    GPU) a card name from the estimate table ('4090', 'rtx 3090'). GB-sized units are binary."""
    if isinstance(text, (int, float)):
        return float(text)
    if what == "gpu":
        try:
            return find_gpu(str(text)).memory_gb * GIB
        except ShrinkError:
            pass
    m = _SIZE.match(str(text))
    if not m:
        raise ShrinkError(f"cannot read the {what} size '{text}'; write it like 24GB or 512MB")
    return float(m.group(1)) * _UNITS[m.group(2)[0].lower()]


def plan_for_estimate(
    model: str, drop: int, gpu, ram, settings: PlanSettings | None = None
) -> Plan:
    """The plan ``shrink estimate MODEL --drop N --gpu 24GB --ram 64GB`` prints."""
    gpu_bytes = 0.0 if gpu in (None, "", "none", 0) else parse_memory(gpu, "gpu")
    return plan_build(
        model, gpu_bytes=gpu_bytes, ram_bytes=parse_memory(ram, "ram"), drop=drop, settings=settings
    )


def _gb(n: float) -> str:
    return "-" if n <= 0 else f"{n / GB:.1f} GB"


def format_plan(plan: Plan) -> list[str]:
    """The plan as lines of text: a header, one row per stage, notes, and the verdict."""
    gpu = f"{plan.gpu_bytes / GIB:.0f} GiB GPU" if plan.gpu_bytes else "no GPU"
    lines = [
        f"memory plan: {plan.model}, {plan.drop} layers dropped, {gpu}, "
        f"{plan.ram_bytes / GIB:.0f} GiB RAM",
        f"{'stage':<12} {'where':<5} {'how':<18} {'bits':<7} {'device':>9} {'host':>9} "
        f"{'disk':>9}  fits",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.stage:<12} {s.device:<5} {s.mode:<18} {s.precision:<7} "
            f"{_gb(s.device_bytes):>9} {_gb(s.host_bytes):>9} {_gb(s.disk_bytes):>9}  "
            f"{'yes' if s.fits else 'NO'}"
        )
    for s in plan.stages:
        if s.note:
            lines.append(f"  {s.stage}: {s.note}")
    total_disk = sum(s.disk_bytes for s in plan.stages)
    lines.append(f"disk in all: {_gb(total_disk)}")
    lines.extend(f"  assumes {a}" for a in plan.assumptions)
    lines.append("every stage fits" if plan.fits else f"refused: {plan.refusal}")
    return lines


__all__ = [
    "ModelFacts",
    "Plan",
    "PlanSettings",
    "StagePlan",
    "facts_for",
    "format_plan",
    "heal_bytes",
    "parse_memory",
    "plan_build",
    "plan_for_estimate",
]
