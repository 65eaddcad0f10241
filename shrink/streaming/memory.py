"""Memory: how much the device has, whether a model fits, the streamed-scoring estimate, and where
activations live."""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shrink.core.errors import ShrinkError
from shrink.core.hfconfig import quant_method
from shrink.core.models import check_device, parse_dtype
from shrink.core.progress import stderr
from shrink.streaming.checkpoint import Checkpoint, load_folder_config, weights_bytes


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def available_memory(device: str) -> int:
    """Free bytes on ``device``: CUDA free memory, or what this process may still take of the
    CPU's RAM: the machine's available RAM, capped by the process's data limit
    (``RLIMIT_DATA``, as ``ulimit -d`` or ``prlimit --data`` set it) and its cgroup's memory
    limit (a container's), less what is already used against each."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    from shrink.core.peaks import process_headroom

    return min([_ram_available()] + process_headroom())


def _ram_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the stack; /proc is the fallback
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0


def too_big_to_load(
    folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> bool:
    """Whether a local safetensors folder, loaded in ``dtype``, would not fit (with 30% headroom
    for the work on it) in the memory ``device`` has for this process: then it is read one
    layer or one tensor at a time. False for anything that is not such a folder (its loader
    says what is wrong), and for a quantized one (GPTQ): the layer-by-layer readers read float
    checkpoints, and its loader keeps the packed weights as they are on disk."""
    if not Path(folder).is_dir() or quant_method(folder):
        return False
    return _does_not_fit(folder, device, dtype)


def _does_not_fit(folder: str | Path, device: str, dtype: torch.dtype, margin: float = 1.3) -> bool:
    """Whether the folder's weights in ``dtype``, times ``margin`` for the work on them, exceed
    what ``device`` has for this process (False when the folder has no safetensors)."""
    try:
        need = weights_bytes(folder, dtype)
    except ShrinkError:
        return False
    return need * margin > available_memory(device)


# A quantized folder's float tensors load in float32 only when this many times its weights (in
# float32) fit: loading holds temporaries, and the CPU kernel repacks each layer's weights on
# its first forward (measured on a 5.1 GB model's 4-bit folder, 0.78 GB on disk and 1.2 GB of
# weights in float32: loading took 1.6 GB, and the first forward then failed with 1.9 GB of
# headroom; in bfloat16, 0.8 GB after loading and 1.2 GB after a forward). The memory plan's
# evaluate row applies the same rule (shrink.analysis.memory.QUANTIZED_FLOAT32_MARGIN).
QUANTIZED_FLOAT32_MARGIN = 2.0


def quantized_cpu_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype to load a quantized folder's float tensors (embeddings, LM head, norms) in on
    the CPU: None (the loader's default, float32) when ``QUANTIZED_FLOAT32_MARGIN`` times that
    fits this process's memory, else bfloat16. GPTQModel's CPU kernel computes in bfloat16
    either way; only the embeddings and the head's precision change. None for a folder that is
    not quantized."""
    if not Path(folder).is_dir() or not quant_method(folder):
        return None
    too_big = _does_not_fit(folder, "cpu", torch.float32, margin=QUANTIZED_FLOAT32_MARGIN)
    return torch.bfloat16 if too_big else None


def decide_streaming(
    resolved,
    device: str | None,
    dtype,
    streaming: bool | None,
    *,
    method: str,
    can_stream: bool = True,
    show_progress: bool = True,
) -> bool:
    """Whether to stream: ``streaming`` if given, else when the weights do not fit in the
    device's available memory (with 20% headroom for activations). ``method`` names the metric
    or strategy asked for; ``can_stream`` is False for those that need the whole model."""
    if streaming is False:
        return False
    device = check_device(device)
    if resolved.path is None:
        if streaming:
            raise ShrinkError(
                f"streaming reads a local folder; download {resolved.hub_id} first "
                f"(huggingface-cli download {resolved.hub_id} --local-dir DIR) and "
                "pass DIR"
            )
        return False
    torch_dtype = parse_dtype(dtype, device)
    try:
        need = weights_bytes(resolved.path, torch_dtype)
    except ShrinkError:
        if streaming:
            raise
        return False  # no safetensors: the in-memory loader says what is wrong
    free = available_memory(device)
    if streaming is None:
        streaming = need * 1.2 > free
        if streaming and show_progress:
            stderr.print(
                f"the weights need {gb(need)} in {str(torch_dtype)[6:]} but {device} has "
                f"{gb(free)} available: streaming layer by layer (--no-streaming loads "
                "the whole model)",
                highlight=False,
            )
    if streaming and not can_stream:
        raise ShrinkError(
            f"'{method}' needs the whole model in memory and cannot stream; use "
            "bi, angular or relmag (or --no-streaming on a machine that fits it)"
        )
    if streaming:
        load_folder_config(resolved.path)  # an architecture streaming does not support: say so now
    return streaming


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc). Without it, glibc's dynamic mmap threshold
    serves each batch's activations from the heap, and fragmentation grows RSS by about one
    activation tensor per layer (measured: +10 MB per layer on the benchmark model)."""
    global LIBC
    if LIBC is None:
        try:
            import ctypes

            LIBC = ctypes.CDLL("libc.so.6")
            LIBC.malloc_trim  # noqa: B018 - not glibc: AttributeError
        except (OSError, AttributeError):
            LIBC = False
    if LIBC:
        LIBC.malloc_trim(0)


@dataclass
class StreamEstimate:
    layers: int
    layer_bytes: int  # the largest decoder layer in the compute dtype
    embed_bytes: int  # input embeddings, loaded alone at the start
    activation_bytes: int  # every calibration sample's hidden states (CPU RAM or disk)
    batch_bytes: int  # one batch's working set on the device (hidden states, MLP, attention)
    read_bytes: int  # bytes read from the checkpoint
    flops: float
    seconds: float
    activations_on_disk: bool

    @property
    def device_peak(self) -> int:
        return max(self.layer_bytes, self.embed_bytes) + self.batch_bytes

    def describe(self) -> str:
        where = "a memory-mapped file" if self.activations_on_disk else "CPU RAM"
        return (
            f"streaming {self.layers} layers: device peak ~{gb(self.device_peak)} "
            f"(one layer {gb(self.layer_bytes)} + one batch {gb(self.batch_bytes)}; "
            f"embeddings {gb(self.embed_bytes)} first), "
            f"activations {gb(self.activation_bytes)} "
            f"in {where}, reads {gb(self.read_bytes)}; ~{self.flops / 1e12:.2f} TFLOP, "
            f"estimated {self.seconds:.0f} s"
        )


def throughput(device: str, dtype: torch.dtype) -> float:
    """A quick matmul probe: FLOP/s on ``device`` in ``dtype`` (about 0.1 s)."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.1:
        a @ b
        reps += 1
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def estimate(
    ck: Checkpoint,
    config,
    prefix: str,
    embed_prefix: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    dtype: torch.dtype,
    device: str,
    on_disk: bool,
    read_rate: float = 1e9,
) -> StreamEstimate:
    """Memory and time before any work: one layer + one batch on the device, all activations on
    the CPU; time = matmul FLOPs at a probed rate + bytes read at ``read_rate`` B/s."""
    text = config.get_text_config()
    L = text.num_hidden_layers
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = [0] * L
    layer_params = 0
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    read = 0
    embed = 0
    for key, t in ck.tensors.items():
        m = pat.match(key)
        if m and int(m.group(1)) < L:
            per_layer[int(m.group(1))] += t.numel * size
            layer_params += t.numel
            read += t.nbytes
        elif key.startswith(embed_prefix):
            embed += t.numel * size
            read += t.nbytes
    H = text.hidden_size
    inter = getattr(text, "intermediate_size", 4 * H)
    heads = getattr(text, "num_attention_heads", 1)
    B = min(batch_size, samples)
    batch = B * seq_len * (6 * H + 3 * inter) * size + B * heads * seq_len * seq_len * 4
    tokens = samples * seq_len
    flops = 2.0 * layer_params * tokens + 4.0 * L * H * seq_len * tokens
    seconds = flops / throughput(device, dtype) + read / read_rate
    return StreamEstimate(
        L, max(per_layer), embed, samples * seq_len * H * size, batch, read, flops, seconds, on_disk
    )


def activation_store(
    shape: tuple[int, int, int], dtype: torch.dtype, offload_dir, on_disk: bool
) -> tuple[torch.Tensor, Path | None]:
    """All samples' hidden states: a CPU tensor, or (``on_disk``, see
    :func:`activations_on_disk`) a file-backed tensor in ``offload_dir`` or the temp folder."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not on_disk:
        return torch.empty(shape, dtype=dtype), None
    folder = Path(offload_dir) if offload_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="shrink-activations-", suffix=".bin", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.truncate(nbytes)
    store = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    return store, Path(name)


def activations_on_disk(shape, dtype, offload_dir) -> bool:
    """Hidden states go to a file when ``offload_dir`` is given or they would take half the
    available RAM or more."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return offload_dir is not None or nbytes >= 0.5 * available_memory("cpu")


LIBC = None
