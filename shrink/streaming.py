"""Models larger than memory: score and prune layer by layer, straight from the safetensors files.

Scoring (``stream_score``) builds the model skeleton without weights (``accelerate``'s
``init_empty_weights``: parameters on the ``meta`` device, small buffers such as the rotary
frequencies real), loads the embeddings alone to turn the calibration tokens into layer-0 inputs,
then loads ONE decoder layer at a time from the checkpoint shards, pushes every calibration sample
through it, accumulates the same statistics as :func:`shrink.scoring.score_layers`, and frees the
layer. Activations live on the CPU (or in a memory-mapped file when they do not fit in RAM); the
device holds one layer and one batch. What each layer receives besides its hidden states
(attention mask, rotary position embeddings, per-layer attention type) is captured from the model's
own forward: every layer is replaced by a stub that records its arguments, so masks are built by
transformers itself, exactly as in the in-memory path, and the scores match it.

Pruning (``stream_prune``) copies the kept tensors byte for byte, shard by shard, renaming
``model.layers.{i}.`` to the new numbering, and rewrites the config with the same function the
in-memory path uses (:func:`shrink.pruning._swap_layers` applied to a weightless skeleton).
Peak memory is one copy buffer (64 MiB), not one layer.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ShrinkError, first_line
from .models import check_decoder_only, check_device, find_layers, parse_dtype, read_shrink_json
from .progress import progress_bar, stderr

# model_type values whose decoder layers depend only on (hidden states, mask, position embeddings):
# the stub capture below is exact for them, and tests compare them with the in-memory path.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
           "F8_E5M2": getattr(torch, "float8_e5m2", None)}
_COPY_CHUNK = 64 << 20


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# --------------------------------------------------------------------------------------------
# The checkpoint on disk: which file holds which tensor, and each tensor's place in its file.


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: list[int]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.nbytes // max(self.numel, 1) if self.numel else 1


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, data start) of a safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ShrinkError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ShrinkError(f"{path} is not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


class Checkpoint:
    """A folder of safetensors weights (one ``model.safetensors`` or shards + index json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
        elif (self.folder / SINGLE).is_file():
            files = [self.folder / SINGLE]
        else:
            raise ShrinkError(f"no safetensors weights in {self.folder} ({SINGLE} or {INDEX}): "
                              "streaming reads safetensors checkpoints only")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict] = {}
        for path in files:
            if not path.is_file():
                raise ShrinkError(f"shard {path.name} listed in {INDEX} is missing")
            header, meta, start = _read_header(path)
            self.metadata[path] = meta
            for key, info in header.items():
                a, b = info["data_offsets"]
                self.tensors[key] = TensorInfo(path, info["dtype"], list(info["shape"]),
                                               start + a, start + b)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# --------------------------------------------------------------------------------------------
# Memory: how much there is, and whether a model fits.


def available_memory(device: str) -> int:
    """Free bytes on ``device``: CUDA free memory, or the CPU's available RAM."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the stack; /proc is the fallback
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0


def weights_bytes(folder: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the checkpoint's weights take in memory when loaded in ``dtype``."""
    ck = Checkpoint(folder)
    if dtype is None:
        return ck.nbytes
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel * size if t.dtype.startswith(("F", "BF")) else t.nbytes
               for t in ck.tensors.values())


def decide_streaming(resolved, device: str | None, dtype, streaming: bool | None, *,
                     method: str, show_progress: bool = True) -> bool:
    """Whether to stream: ``streaming`` if given, else when the weights do not fit in the
    device's available memory (with 20% headroom for activations). ``method`` is the metric or
    strategy asked for: the ones that need the whole model (ppl, iterative) cannot stream."""
    if streaming is False:
        return False
    device = check_device(device)
    if resolved.path is None:
        if streaming:
            raise ShrinkError(f"streaming reads a local folder; download {resolved.hub_id} first "
                              f"(huggingface-cli download {resolved.hub_id} --local-dir DIR) and "
                              "pass DIR")
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
            stderr.print(f"the weights need {_gb(need)} in {str(torch_dtype)[6:]} but {device} has "
                         f"{_gb(free)} available: streaming layer by layer (--no-streaming loads "
                         "the whole model)", highlight=False)
    if streaming and method in ("ppl", "iterative"):
        raise ShrinkError(f"'{method}' needs the whole model in memory and cannot stream; use "
                          "bi, angular or relmag (or --no-streaming on a machine that fits it)")
    if streaming:
        _load_config(resolved.path)  # an architecture streaming does not support: say so now
    return streaming


# --------------------------------------------------------------------------------------------
# The weightless skeleton and loading one module's weights into it.


def _load_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ShrinkError(f"cannot read the config of {folder}: "
                          f"{first_line(e)}") from None
    check_decoder_only(config)
    if config.model_type not in SUPPORTED:
        raise ShrinkError(f"streaming does not support {config.model_type} yet (supported: "
                          f"{', '.join(SUPPORTED)}); use --no-streaming")
    return config


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM with every parameter on the meta device (no memory is allocated, not even
    transiently), and its few non-persistent buffers (rotary frequencies, Gemma's embedding
    scale) rebuilt for real on the CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in model.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            for key, buf in fresh.named_buffers(recurse=False):
                module._buffers[key] = buf
        elif hasattr(module, "scalar_embed_scale"):
            module._buffers["embed_scale"] = torch.tensor(module.scalar_embed_scale)
        metas = [k for k, b in module.named_buffers(recurse=False) if b.is_meta]
        if metas and metas[0] in module._non_persistent_buffers_set:
            raise ShrinkError(f"streaming cannot rebuild the buffer {name}.{metas[0]} of "
                              f"{type(module).__name__}; use --no-streaming")
    model.eval()
    return model


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ShrinkError(f"module {type(module).__name__} not found in the model")  # pragma: no cover


class _Loader:
    """Loads a module's weights from the checkpoint into the skeleton, in place of its meta
    parameters, cast to the skeleton's dtype (as from_pretrained casts).

    Decoder layers reuse one pool of device tensors: layer i+1 is read into the storage layer i
    used (same shapes), so memory stays at one layer and the allocator never fragments. Bytes go
    straight from the file into the tensor when dtype and device match, else through one reusable
    CPU staging buffer."""

    def __init__(self, ck: Checkpoint, device: str):
        self.ck, self.device = ck, torch.device(device)
        self.pool: dict[str, torch.Tensor] = {}
        self.staging = torch.empty(0, dtype=torch.uint8)

    def _slots(self, module: nn.Module):
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.is_meta:
                owner, _, attr = name.rpartition(".")
                yield name, module.get_submodule(owner) if owner else module, attr, p

    def load(self, module: nn.Module, prefix: str, reuse: bool = True) -> int:
        slots = list(self._slots(module))
        missing = [prefix + n for n, *_ in slots if prefix + n not in self.ck.tensors]
        if missing:
            raise ShrinkError(f"tensor '{missing[0]}' is not in the checkpoint {self.ck.folder}: "
                              "its names do not follow the transformers layout; use --no-streaming")
        total = 0
        handles: dict[Path, object] = {}
        try:
            place = {n: self.ck.tensors[prefix + n] for n, *_ in slots}
            for name, owner, attr, meta in sorted(
                    slots, key=lambda s: (str(place[s[0]].file), place[s[0]].start)):
                info = place[name]
                if list(meta.shape) != info.shape:
                    raise ShrinkError(f"tensor '{prefix + name}' has shape {info.shape} in the "
                                      f"checkpoint but {list(meta.shape)} in the config")
                dst = self.pool.get(name) if reuse else None
                if dst is None or dst.shape != meta.shape or dst.dtype != meta.dtype:
                    dst = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
                    if reuse:
                        self.pool[name] = dst
                f = handles.get(info.file)
                if f is None:
                    f = handles[info.file] = open(info.file, "rb", buffering=0)
                src_dtype = _DTYPES.get(info.dtype)
                if src_dtype is None:
                    raise ShrinkError(f"unsupported safetensors dtype {info.dtype} in "
                                      f"{info.file.name}")
                if src_dtype == dst.dtype and dst.device.type == "cpu":
                    _readinto(f, info, dst.view(-1).view(torch.uint8))
                else:
                    if self.staging.numel() < info.nbytes:
                        self.staging = torch.empty(info.nbytes, dtype=torch.uint8)
                    buf = self.staging[:info.nbytes]
                    _readinto(f, info, buf)
                    dst.copy_(buf.view(src_dtype).view(info.shape))
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(dst, requires_grad=False)
                else:
                    owner._buffers[attr] = dst
                total += dst.numel() * dst.element_size()
        finally:
            for h in handles.values():
                h.close()
        for n, b in module.named_buffers():  # real non-persistent buffers (e.g. embed_scale)
            if not b.is_meta and b.device != self.device:
                owner, _, attr = n.rpartition(".")
                (module.get_submodule(owner) if owner else module)._buffers[attr] = b.to(
                    self.device)
        return total

    @staticmethod
    def free(module: nn.Module) -> None:
        """Put the module's weights back on meta (their storage stays in the pool, if pooled)."""
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and not p.is_meta:
                    m._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)
        _trim()


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc). Without it, glibc's dynamic mmap threshold
    serves each batch's activations from the heap, and fragmentation grows RSS by about one
    activation tensor per layer (measured: +10 MB per layer on the benchmark model)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - not glibc: AttributeError
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _readinto(f, info: TensorInfo, out: torch.Tensor) -> None:
    """Read the tensor's byte range from an open file into the uint8 tensor ``out``."""
    view = memoryview(out.numpy())
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise ShrinkError(f"{info.file} is truncated")
        done += n


class _Stop(Exception):
    pass


def _layer_inputs(base: nn.Module, layers: nn.ModuleList, target: int, **forward_kwargs):
    """Run the base model's own forward with every layer replaced by a stub (identity); the stub
    of layer ``target`` records its arguments (hidden states, mask, position embeddings, ...)
    and stops the pass. Masks and rotary embeddings are thus built by transformers itself."""
    captured: dict = {}

    def stub(j):
        def forward(*args, **kwargs):
            if j == target:
                captured["args"], captured["kwargs"] = args, kwargs
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        return forward

    for j, layer in enumerate(layers):
        layer.forward = stub(j)
    try:
        base(**forward_kwargs, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if "args" not in captured:
        raise ShrinkError(f"the forward pass of {type(base).__name__} never reached layer "
                          f"{target}; use --no-streaming")  # pragma: no cover
    return captured["args"], captured["kwargs"]


# --------------------------------------------------------------------------------------------
# Estimates.


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
        return (f"streaming {self.layers} layers: device peak ~{_gb(self.device_peak)} "
                f"(one layer {_gb(self.layer_bytes)} + one batch {_gb(self.batch_bytes)}; "
                f"embeddings {_gb(self.embed_bytes)} first), "
                f"activations {_gb(self.activation_bytes)} "
                f"in {where}, reads {_gb(self.read_bytes)}; ~{self.flops / 1e12:.2f} TFLOP, "
                f"estimated {self.seconds:.0f} s")


def _throughput(device: str, dtype: torch.dtype) -> float:
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
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def estimate(ck: Checkpoint, config, prefix: str, embed_prefix: str, samples: int, seq_len: int,
             batch_size: int, dtype: torch.dtype, device: str, on_disk: bool,
             read_rate: float = 1e9) -> StreamEstimate:
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
    seconds = flops / _throughput(device, dtype) + read / read_rate
    return StreamEstimate(L, max(per_layer), embed, samples * seq_len * H * size, batch, read,
                          flops, seconds, on_disk)


# --------------------------------------------------------------------------------------------
# Scoring.


def _activation_store(shape: tuple[int, int, int], dtype: torch.dtype, offload_dir,
                      on_disk: bool) -> tuple[torch.Tensor, Path | None]:
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


@torch.no_grad()
def stream_score(model_dir: str | Path, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, batch_size: int = 4,
                 skip_first: int = 1, device: str | None = None, dtype=None,
                 offload_dir: str | Path | None = None, show_progress: bool = True, *,
                 model_name: str = "", settings: dict | None = None,
                 trust_remote_code: bool = False):
    """Layer scores of the model in ``model_dir`` without ever holding more than one decoder
    layer: the same :class:`shrink.scoring.LayerScores` (BI, relmag, angular distances) as
    :func:`shrink.scoring.score_layers` on the loaded model, to float rounding."""
    from .scoring import ScoreAccumulator, _hidden, check_score_inputs, token_masks

    attention_mask = check_score_inputs(input_ids, attention_mask, skip_first)
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    folder = Path(model_dir)
    config = _load_config(folder, trust_remote_code)
    ck = Checkpoint(folder)
    model = build_skeleton(config, torch_dtype)
    parent, attr, layers = find_layers(model)
    base = parent
    prefix = _module_name(model, layers)
    embed = base.get_input_embeddings()
    embed_prefix = _module_name(model, embed) + "."
    L = len(layers)
    N, S = input_ids.shape
    H = config.get_text_config().hidden_size
    on_disk = activations_on_disk((N, S, H), torch_dtype, offload_dir)
    est = estimate(ck, config, prefix, embed_prefix, N, S, batch_size, torch_dtype, device,
                   on_disk)
    if show_progress:
        stderr.print(est.describe(), highlight=False)
    t_start = time.perf_counter()
    # Keep the device copy of small buffers (rotary frequencies, embed scale) next to the compute.
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            owner, _, a = name.rpartition(".")
            model.get_submodule(owner)._buffers[a] = buf.to(device)

    acts, acts_file = _activation_store((N, S, H), torch_dtype, offload_dir, on_disk)
    batches = [slice(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]
    masks = [attention_mask[sl].to(device) for sl in batches]
    acc = ScoreAccumulator(L)
    last = torch.zeros(N, L + 1, H, dtype=torch.float32)
    valids, last_idxs = zip(*(token_masks(mask, skip_first) for mask in masks))
    try:
        # 1. Embeddings alone: layer-0 inputs of every sample.
        loader = _Loader(ck, device)
        loader.load(embed, embed_prefix, reuse=False)
        for sl, mask in zip(batches, masks):
            args, _ = _layer_inputs(base, layers, 0, input_ids=input_ids[sl].to(device),
                                    attention_mask=mask)
            acts[sl].copy_(args[0])
        loader.free(embed)
        # 2. One layer at a time.
        for i in progress_bar(range(L), "streaming layers", enabled=show_progress):
            layer = layers[i]
            loader.load(layer, f"{prefix}.{i}.")
            for b, (sl, mask) in enumerate(zip(batches, masks)):
                x = acts[sl].to(device)
                args, kwargs = _layer_inputs(base, layers, i, inputs_embeds=x,
                                             attention_mask=mask)
                y = _hidden(layer(x, *args[1:], **kwargs))
                rows = torch.arange(x.shape[0], device=x.device)
                acc.add_layer(i, x, y, valids[b])
                last[sl, i] = x[rows, last_idxs[b]].float().cpu()
                if i == L - 1:
                    last[sl, L] = y[rows, last_idxs[b]].float().cpu()
                del x
                acts[sl].copy_(y)
                del y
            loader.free(layer)
            if i == 0 and show_progress and L > 1:
                per = time.perf_counter() - t_start
                stderr.print(f"first layer took {per:.1f} s: about {per * L:.0f} s in all",
                             highlight=False)
    finally:
        del acts
        if acts_file is not None:
            acts_file.unlink(missing_ok=True)
    for b, sl in enumerate(batches):
        acc.add_samples(last[sl], valids[b])
    seconds = time.perf_counter() - t_start
    return acc.result(model_name or str(model_dir), {
        "skip_first": skip_first, "batch_size": batch_size, **(settings or {}),
        "streaming": {"device": device, "dtype": str(torch_dtype)[6:],
                      "activations_on_disk": on_disk, "estimate": est.describe(),
                      "seconds": round(seconds, 2),
                      "tokens_per_second": round(N * S / seconds, 1)}})


def score_model_streaming(model: str, resolved, data: str, samples: int, seq_len: int, seed: int,
                          batch_size: int, skip_first: int, dtype, device,
                          trust_remote_code: bool, show_progress: bool, offload_dir=None):
    """:func:`shrink.scoring.score_model` for a model that does not fit: tokenizer + stream."""
    from transformers import AutoTokenizer

    from .data import token_blocks

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    blocks = token_blocks(tokenizer, data, samples, seq_len, seed)
    return stream_score(resolved.path, blocks.input_ids, batch_size=batch_size,
                        skip_first=skip_first, device=device, dtype=dtype,
                        offload_dir=offload_dir, show_progress=show_progress, model_name=model,
                        settings={"data": blocks.describe(), "location": resolved.location},
                        trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------
# Pruning: copy kept tensors byte for byte.


def _write_safetensors(out: Path, entries: list[tuple[str, TensorInfo]], metadata: dict) -> int:
    """Write a safetensors file whose tensors are byte ranges of other files, copied in 64 MiB
    chunks (the format: 8-byte header length, JSON header padded to 8, then the data)."""
    entries = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))  # keeps every tensor aligned
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in entries:
        header[name] = {"dtype": t.dtype, "shape": t.shape,
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    handles: dict[Path, object] = {}
    try:
        with open(out, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, t in entries:
                src = handles.get(t.file)
                if src is None:
                    src = handles[t.file] = open(t.file, "rb")
                src.seek(t.start)
                left = t.nbytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise ShrinkError(f"{t.file} is truncated")
                    f.write(chunk)
                    left -= len(chunk)
    finally:
        for h in handles.values():
            h.close()
    return offset


@dataclass
class StreamPruneResult:
    output: Path
    removed: list[int]
    kept: list[int]
    num_layers_before: int
    params_before: int
    params_after: int
    shards: int
    bytes_written: int
    seconds: float
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def _fits_for_verify(params: int) -> bool:
    """Whether the fresh-process check (it loads the model in float32) fits in RAM."""
    return params * 4 * 1.3 < available_memory("cpu")


def stream_prune(model_dir: str | Path, output: str | Path, remove: list[int],
                 force: bool = False, verify: bool = True, *, stage: dict | None = None,
                 source_model: str | None = None, base_model: str | None = None,
                 show_progress: bool = True, trust_remote_code: bool = False,
                 ) -> StreamPruneResult:
    """Write ``model_dir`` without decoder layers ``remove`` to ``output``, shard by shard.

    Kept tensors are copied byte for byte (bitwise equal to the source), layer indices renamed;
    the config is rewritten by the in-memory path's own ``_swap_layers`` (num_hidden_layers,
    per-layer lists such as ``layer_types``, ``max_window_layers``); a new index json, the
    tokenizer, generation config, license files and a ``shrink.json`` stage are written; then the
    folder is reloaded in a fresh process (``verify``) when it fits in this machine's RAM, and
    otherwise checked structurally (every tensor the pruned config expects, with its shape)."""
    from .outputs import atomic_output, check_output, copy_license_files, write_record
    from .pruning import _check_remove, _swap_layers

    t0 = time.perf_counter()
    check_output(output, force)
    folder = Path(model_dir)
    config = _load_config(folder, trust_remote_code)
    ck = Checkpoint(folder)
    skeleton = build_skeleton(config, torch.float32)
    _, _, layers = find_layers(skeleton)
    prefix = _module_name(skeleton, layers)
    L = len(layers)
    remove = _check_remove(list(remove), L)
    keep = [i for i in range(L) if i not in remove]
    new_index = {old: new for new, old in enumerate(keep)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")

    def rename(key: str) -> str | None:
        m = pat.match(key)
        if not m:
            return key
        i = int(m.group(1))
        if i >= L:
            raise ShrinkError(f"tensor '{key}' names layer {i} but the config has {L} layers")
        return f"{prefix}.{new_index[i]}.{m.group(2)}" if i in new_index else None

    plan: list[tuple[Path, list[tuple[str, TensorInfo]]]] = []
    params_before = params_after = 0
    for path in ck.files:
        entries = []
        for key, t in ck.tensors.items():
            if t.file != path:
                continue
            params_before += t.numel
            new = rename(key)
            if new is not None:
                entries.append((new, t))
                params_after += t.numel
        if entries:
            plan.append((path, entries))
    _swap_layers(skeleton, keep)
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    written = {new: t.shape for _, entries in plan for new, t in entries}
    missing = sorted(set(expected) - set(written) - _tied_keys(skeleton))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or wrong:
        raise ShrinkError(f"the pruned checkpoint would not match its config "
                          f"(missing {missing[:3]}, wrong shapes {wrong[:3]}); use --no-streaming")
    reload_ok = _fits_for_verify(params_after)
    if show_progress:
        copy = sum(t.nbytes for _, e in plan for _, t in e)
        stderr.print(f"streamed prune: copy {_gb(copy)} in {len(plan)} shard(s), peak memory one "
                     f"{_COPY_CHUNK >> 20} MiB buffer, estimated {copy / 5e8:.0f} s at 0.5 GB/s",
                     highlight=False)
    with atomic_output(output, force) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        n = len(plan)
        for k, (path, entries) in enumerate(progress_bar(plan, "copying shards",
                                                         enabled=show_progress)):
            name = SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            meta = dict(ck.metadata.get(path) or {}) or {"format": "pt"}
            total += _write_safetensors(tmp / name, entries, meta)
            for new, _ in entries:
                weight_map[new] = name
        if n > 1:
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        cfg = skeleton.config
        cfg.architectures = [type(skeleton).__name__]
        cfg.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, tmp / extra)
        _copy_tokenizer(folder, tmp, trust_remote_code)
        copy_license_files(folder, tmp)
        stage = dict(stage or {})
        stage.setdefault("stage", "prune")
        stage.setdefault("source", str(folder))
        stage.update({"num_layers_before": L, "num_layers_after": len(keep),
                      "removed_layers": remove, "kept_layers": keep,
                      "params_before": params_before, "params_after": params_after,
                      "streaming": {"shards": n, "bytes_written": total}})
        verification: dict = {}
        if verify and reload_ok:
            from .verify import verify_in_subprocess

            if show_progress:
                stderr.print("verifying: reload in a fresh process, logits, cached generation")
            verification = verify_in_subprocess(tmp)
            stage["verification"] = verification
        elif verify:
            verification = {"ok": True, "reload": "skipped", "structure_ok": True,
                            "reason": f"the pruned model ({_gb(params_after * 4)} in float32) "
                                      "does not fit in this machine's RAM for the fresh-process "
                                      "reload; every tensor and shape was checked against the "
                                      "pruned config"}
            stage["verification"] = verification
            if show_progress:
                stderr.print(f"[yellow]note[/]: {verification['reason']}", highlight=False)
        record = write_record(tmp, read_shrink_json(folder), stage,
                              source_model=source_model or str(model_dir), base_model=base_model)
    return StreamPruneResult(Path(output), remove, keep, L, params_before, params_after, n, total,
                             time.perf_counter() - t0, verification, record)


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that save_pretrained leaves out because they are tied to another."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()


def _copy_tokenizer(src: Path, dst: Path, trust_remote_code: bool) -> None:
    """Save the tokenizer the way the in-memory path does (load + save_pretrained)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no tokenizer: a weights-only folder is still valid
        return
    tok.save_pretrained(dst)


def prune_streaming(model: str, output, resolved, L: int, remove: list[int] | None, drop,
                    strategy: str, calib: str, samples: int, seq_len: int, seed: int,
                    skip_first: int, batch_size: int, dtype, device, force: bool,
                    trust_remote_code: bool, verify: bool, show_progress: bool,
                    offload_dir=None):
    """:func:`shrink.pruning.prune` for a model that does not fit: stream-score when the strategy
    needs scores, choose, then :func:`stream_prune`. Returns a ``PruneResult``."""
    from .pruning import PruneResult, _base_model_id, choose_layers, original_layers

    scores = None
    calib_info = None
    if remove is not None:
        strategy, reason = "explicit", "listed by the user"
    elif strategy in ("bi", "angular", "relmag"):
        scores = score_model_streaming(model, resolved, calib, samples, seq_len, seed,
                                       batch_size, skip_first, dtype, device, trust_remote_code,
                                       show_progress, offload_dir)
        calib_info = scores.settings.get("data")
        remove, reason = choose_layers(strategy, drop, L, scores, seed)
    elif strategy in ("last", "random"):
        remove, reason = choose_layers(strategy, drop, L, None, seed)
    else:
        raise ShrinkError(f"strategy '{strategy}' needs the whole model in memory and cannot "
                          "stream; use bi, angular, relmag, last or random")
    previous = read_shrink_json(resolved.path)
    orig = original_layers(previous, L)
    kept = [i for i in range(L) if i not in remove]
    stage = {"stage": "prune", "source": resolved.location, "strategy": strategy,
             "reason": reason, "removed_original_layers": [orig[i] for i in remove],
             "kept_original_layers": [orig[i] for i in kept], "seed": seed,
             "skip_first": skip_first, "calibration": calib_info,
             "scores": scores.to_dict() if scores is not None else None}
    config = _load_config(resolved.path, trust_remote_code)
    res = stream_prune(resolved.path, output, remove, force=force, verify=verify, stage=stage,
                       source_model=model, base_model=_base_model_id(resolved, config, previous),
                       show_progress=show_progress, trust_remote_code=trust_remote_code)
    return PruneResult(res.output, res.removed, res.kept, stage["removed_original_layers"],
                       strategy, reason, L, res.params_before, res.params_after, scores,
                       res.verification, res.record)


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints (tests and benchmark): random weights written shard by shard.


def write_random_checkpoint(config, folder: str | Path, max_shard_bytes: int = 500 << 20,
                            dtype: torch.dtype = torch.float32, seed: int = 0,
                            std: float = 0.02) -> Path:
    """Save a random-weight checkpoint of ``config`` without ever holding the whole model:
    tensors are made one at a time and written one shard at a time (norm weights 1, others
    N(0, std)). Layers may split across shards. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(config, dtype)
    names = [(k, v.shape) for k, v in skeleton.state_dict().items()]
    skip = _tied_keys(skeleton)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []

    def flush(final: bool) -> None:
        nonlocal size
        if shards[-1]:
            name = f"shard-{len(files):05d}.tmp"
            save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
            files.append(name)
        shards[-1] = {}
        size = 0

    weight_map: dict[str, str] = {}
    for key, shape in names:
        if key in skip:
            continue
        owner = key.rpartition(".")[0].rpartition(".")[2]
        if "norm" in owner:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush(False)
        shards[-1][key] = t
        weight_map[key] = str(len(files))
        size += nbytes
    flush(True)
    n = len(files)
    final_names = {str(i): (SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                   for i in range(n)}
    for i, name in enumerate(files):
        os.replace(folder / name, folder / final_names[str(i)])
    if n > 1:
        total = sum((folder / f).stat().st_size for f in final_names.values())
        (folder / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total},
             "weight_map": {k: final_names[v] for k, v in sorted(weight_map.items())}},
            indent=2) + "\n")
    cfg = skeleton.config
    cfg.architectures = [type(skeleton).__name__]
    cfg.save_pretrained(folder)
    return folder
