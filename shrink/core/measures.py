"""Measure once: a perplexity of the same weights on the same blocks is computed once per build.

A measurement is keyed by ``(weights_key, set name)``. The weights key is a hash of what the
model computes with (every parameter and buffer: name, dtype, shape and bytes, in the dtype the
model is loaded in), so the pruned folder loaded by the heal stage and again by the evaluate
stage has one key, while a bf16 copy of an fp32 model has another. A folder that is measured by
a runtime other than torch (ONNX, GGUF, a GPTQ checkpoint) is keyed by its weight files' bytes.
The set name must identify the blocks exactly: source, samples, tokens per block and seed (see
:func:`set_name`). :class:`PerplexityBook` keeps the values and a ledger of every computation,
so a build can show (and a test can check) that nothing was measured twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.perplexity import PerplexityResult, perplexity

# Files whose bytes are a folder's weights (config and tokenizer files are hashed beside them).
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".data", ".gguf", ".bin")
_CHUNK = 1 << 24
# Keys are sha256 digests: CPUs with SHA extensions hash it at about twice blake2b's speed, and a
# build keys every model it measures, hundreds of MB each.


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.device.type == "meta":
        raise ShrinkError(f"cannot key weights that are not loaded ({name} is on 'meta')")
    flat = t.reshape(-1).contiguous().cpu()
    h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def _folder_key(folder: Path) -> str:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json")
    )
    if not any(p.name != "config.json" for p in files):
        raise ShrinkError(f"{folder} holds no weight files to key a measurement by")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}|{p.stat().st_size}|".encode())
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return "files:" + h.hexdigest()[:32]


def weights_key(model_or_folder: nn.Module | str | Path) -> str:
    """A short hex key of a model's weights (in memory: every parameter and buffer as the model
    computes with it; a folder: its weight files' bytes and config.json)."""
    if isinstance(model_or_folder, (str, Path)):
        folder = Path(model_or_folder).expanduser()
        if not folder.is_dir():
            raise ShrinkError(f"cannot key the weights of {folder}: not a folder")
        return _folder_key(folder)
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in list(model_or_folder.named_parameters()) + list(model_or_folder.named_buffers()):
        if id(t) in seen:  # tied weights: hashed once
            continue
        seen.add(id(t))
        _hash_tensor(h, name, t)
    return "tensors:" + h.hexdigest()[:32]


def set_name(source: str, samples: int, seq_len: int, seed: int) -> str:
    """The name of a block set: everything that decides which tokens it holds."""
    return f"{source}, {samples} x {seq_len} tokens, seed {seed}"


@dataclass
class PerplexityBook:
    """Perplexities by (weights key, set name), and the ledger of how each was computed."""

    values: dict[tuple[str, str], PerplexityResult] = field(default_factory=dict)
    ledger: list[dict] = field(default_factory=list)

    def get(self, key: str, set_name: str) -> PerplexityResult | None:
        """A copy of the recorded result (callers label and extend what they get)."""
        found = self.values.get((key, set_name))
        return copy.copy(found) if found is not None else None

    def put(self, key: str, set_name: str, result: PerplexityResult, *, by: str, what: str) -> None:
        """Record a computed value (one ledger row per computation)."""
        self.values[(key, set_name)] = copy.copy(result)
        self.ledger.append(
            {
                "key": key,
                "set": set_name,
                "by": by,
                "what": what,
                "value": result.perplexity,
                "seconds": round(result.seconds, 3),
            }
        )

    def duplicates(self) -> list[tuple[str, str]]:
        """(key, set) pairs the ledger shows computed more than once (should be none)."""
        seen: set[tuple[str, str]] = set()
        dup = []
        for row in self.ledger:
            k = (row["key"], row["set"])
            if k in seen:
                dup.append(k)
            seen.add(k)
        return dup

    def to_dict(self) -> dict:
        return {"ledger": list(self.ledger), "duplicates": [list(d) for d in self.duplicates()]}

    def save(self, path: Path) -> None:
        """The values and the ledger, for a resumed build (written to a sibling, renamed)."""
        rows = [
            {"key": k, "set": n, "result": {**asdict(r), "second": None}}
            for (k, n), r in self.values.items()
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"values": rows, "ledger": self.ledger}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PerplexityBook:
        """What :meth:`save` wrote; an empty book when the file is missing or unreadable (a
        resumed build then measures again, which is only slower)."""
        try:
            data = json.loads(path.read_text())
            values = {
                (row["key"], row["set"]): PerplexityResult(**row["result"])
                for row in data["values"]
            }
            return cls(values, list(data["ledger"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()


def measure(
    book: PerplexityBook | None,
    model: nn.Module,
    input_ids: torch.Tensor,
    set_name: str,
    by: str,
    what: str,
    *,
    key: str | None = None,
    batch_size: int = 4,
    show_progress: bool = True,
    compute=None,
) -> PerplexityResult:
    """The perplexity of ``model`` on ``input_ids`` (the block set ``set_name``): the book's value
    when it has one for these weights on this set, else computed and recorded. Without a book it
    is simply computed. ``key`` skips hashing when the caller already has it. ``compute(ids)``
    computes it instead of the in-memory forward (a streamed walk over a folder: ``model`` is
    then the folder, keyed by its files)."""

    def run() -> PerplexityResult:
        if compute is not None:
            return compute(input_ids)
        return perplexity(model, input_ids, batch_size=batch_size, show_progress=show_progress)

    if book is None:
        return run()
    key = key or weights_key(model)
    found = book.get(key, set_name)
    if found is not None:
        return found
    result = run()
    book.put(key, set_name, result, by=by, what=what)
    return result


def matmul_rate(
    m: int = 1024,
    k: int = 1024,
    n: int = 1024,
    *,
    seconds: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> float:
    """The machine's measured float matmul rate (FLOP/s) for an (m x k) @ (k x n) product, with
    torch's current thread setting: the best of repeated products over about ``seconds``."""
    import time

    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up (thread pool, kernel choice)
    best, spent = math.inf, 0.0
    while spent < seconds or best is math.inf:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * m * k * n / best


def linear_params(model: nn.Module, trained_only: bool = False) -> int:
    """Weights of every nn.Linear (the matmuls of a forward pass; tied weights once), or of those
    that are trained."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and id(w) not in seen:
            seen.add(id(w))
            if w.requires_grad or not trained_only:
                total += w.numel()
    return total


def training_throughput(
    tokens: int, seconds: float, model: nn.Module, *, rate: float | None = None
) -> dict:
    """Tokens/s of a training run and the fraction of the machine's matmul rate it reaches.
    FLOPs per token: 2 P forward + 2 P backward to the inputs + 2 T for the trained weights'
    gradients (P = all linear weights, T = the trained ones: the adapters, or the trained
    layers)."""
    P, T = linear_params(model), linear_params(model, trained_only=True)
    per_token = 4 * P + 2 * T
    rate = rate if rate is not None else matmul_rate()
    achieved = per_token * tokens / seconds if seconds > 0 else 0.0
    return {
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "flops_formula": f"(4 * {P} linear weights + 2 * {T} trained) * tokens",
        "achieved_flops_per_second": round(achieved),
        "matmul_flops_per_second": round(rate),
        "fraction_of_matmul_rate": round(achieved / rate, 3) if rate else None,
    }
