"""Importance matrix ("imatrix") for llama.cpp's quantizer, computed by shrink from calibration text.

llama.cpp's quantizers (the k-quants, the IQ types, q4_0/q5_0, iq4_nl) can weight the rounding
error of each input column of a matrix by how large the inputs to that column are: a column that
carries large activations costs more when it is rounded badly. What they take is, per quantized
matrix, one value per input column: the mean over tokens of the squared input. (llama.cpp's
imatrix tool accumulates the sum of x**2 and a token count per matrix; its quantize tool divides
one by the other before handing the arrays to ``llama_model_quantize``.) shrink computes the same
quantity with forward pre-hooks on the PyTorch model over its calibration blocks, keyed by GGUF
tensor name (``blk.3.ffn_down.weight``).

How it reaches llama.cpp: the C API takes the importance matrix as an array of
``llama_model_imatrix_data`` {name, data, size} ended by a NULL name
(``llama_model_quantize_params.imatrix``), and llama-cpp-python declares that structure in
ctypes, so :func:`shrink.runtime.gguf.quantize` passes the arrays directly: no imatrix file is
written and no ``llama-quantize`` binary is needed (llama-cpp-python ships none).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.runtime.gguf_quant import save_imatrix
from shrink.stages.configs import MIXED_CALIBRATION

# bump when what is computed changes, so cached matrices of the old computation are not reused
_VERSION = 1


@dataclass(frozen=True)
class ImatrixSpec:
    """Which calibration text the importance matrix is computed on."""

    data: str = MIXED_CALIBRATION
    samples: int = 16
    seq_len: int = 256
    seed: int = 0

    def settings(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.data}, {self.samples} x {self.seq_len} tokens, seed {self.seed}"

    @classmethod
    def from_config(cls, config) -> ImatrixSpec | bool:
        """What an ExportConfig asks ``export_gguf`` for: a spec, or False for no imatrix."""
        if not config.uses_imatrix():
            return False
        return cls(config.imatrix_data, config.imatrix_samples, config.imatrix_seq_len)


def gguf_names(model: nn.Module) -> dict[str, str]:
    """Quantized Linear modules of ``model`` -> their GGUF tensor names: every Linear of the
    decoder layers, and the LM head when it is not tied to the embeddings (a tied head is not
    written: llama.cpp reuses token_embd, which it does not weight by an imatrix)."""
    import gguf

    from shrink.core.models import find_layers
    from shrink.stages.export.gguf_types import llama_cpp_arch

    hf_arch = type(model).__name__
    arch = getattr(gguf.MODEL_ARCH, llama_cpp_arch(hf_arch))
    layers = find_layers(model)[2]
    tmap = gguf.get_tensor_name_map(arch, len(layers))
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    head = model.get_output_embeddings()
    tied = (
        getattr(model.config, "tie_word_embeddings", False)
        or head is None
        or head.weight is model.get_input_embeddings().weight
    )
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module) not in layer_ids and not (module is head and not tied):
            continue
        gname = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise ShrinkError(f"{hf_arch}: module {name} has no GGUF tensor name")
        names[name] = gname
    return names


class _Squares:
    """Forward pre-hooks summing the squared inputs of each quantized Linear, per column."""

    def __init__(self, model: nn.Module):
        self.names = gguf_names(model)
        modules = dict(model.named_modules())
        self.sums = {
            n: torch.zeros(modules[n].in_features, dtype=torch.float64) for n in self.names
        }
        self.counts = dict.fromkeys(self.names, 0)
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            self.sums[name] += x.square().sum(0, dtype=torch.float64).cpu()
            self.counts[name] += x.shape[0]

        return hook

    def result(self) -> dict[str, np.ndarray]:
        for h in self.handles:
            h.remove()
        return {
            self.names[n]: (self.sums[n] / max(self.counts[n], 1)).numpy().astype(np.float32)
            for n in self.names
        }


def compute_imatrix_streamed(
    model_dir: str | Path, input_ids_blocks, *, batch_size: int = 4, log=None
) -> dict[str, np.ndarray]:
    """:func:`compute_imatrix` of a checkpoint too large to load, one layer in memory at a time
    (the walk of :func:`shrink.streaming.perplexity.stream_perplexity`, with the same hooks)."""
    from shrink.streaming.perplexity import stream_perplexity

    squares: list[_Squares] = []
    t0 = time.perf_counter()
    ids = torch.as_tensor(input_ids_blocks)
    stream_perplexity(
        model_dir,
        ids,
        dtype=torch.float32,
        batch_size=batch_size,
        hooks=lambda model: squares.append(_Squares(model)),
        head_on_last=True,
    )
    if log:
        log(
            f"importance matrix (streamed): {len(squares[0].names)} matrices over "
            f"{ids.numel()} tokens in {time.perf_counter() - t0:.1f} s"
        )
    return squares[0].result()


def compute_imatrix(
    model: nn.Module, input_ids_blocks, *, batch_size: int = 4, log=None
) -> dict[str, np.ndarray]:
    """Mean over every token of ``input_ids_blocks`` of the squared input of each quantized
    Linear, per input column: {GGUF tensor name: float32 array of the matrix's input width}."""
    squares = _Squares(model)
    ids = torch.as_tensor(input_ids_blocks)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                model(ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        result = squares.result()
        model.train(was_training)
    if log:
        log(
            f"importance matrix: {len(result)} matrices over {ids.numel()} tokens in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return result


def weights_hash(model_dir: str | Path) -> str:
    """sha256 of the folder's config and safetensors files (what the imatrix depends on)."""
    folder = Path(model_dir)
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def imatrix_file(
    model_dir: str | Path, spec: ImatrixSpec, *, log=None, cache: str | Path | None = None
) -> tuple[Path, dict]:
    """The importance matrix of the HF folder ``model_dir`` on ``spec``'s text, as an ``.npz``
    file in shrink's cache (keyed by a hash of the weights and the settings; computed once).
    Returns (file, record: key, settings, tokens, matrices, whether it came from the cache)."""
    from shrink.core.models import cache_dir

    key = hashlib.sha256(
        json.dumps(
            {"weights": weights_hash(model_dir), "v": _VERSION, **spec.settings()}, sort_keys=True
        ).encode()
    ).hexdigest()
    folder = Path(cache) if cache is not None else cache_dir() / "imatrix"
    file = folder / f"{key[:32]}.npz"
    meta_file = file.with_suffix(".json")
    if file.is_file() and meta_file.is_file():
        return file, {**json.loads(meta_file.read_text()), "cached": True}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.core.data import token_blocks

    if log:
        log(f"computing the importance matrix on {spec.describe()}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = token_blocks(tok, spec.data, spec.samples, spec.seq_len, spec.seed)
    from shrink.streaming.memory import too_big_to_load

    if too_big_to_load(model_dir):
        data = compute_imatrix_streamed(model_dir, blocks.input_ids, log=log)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        data = compute_imatrix(model, blocks.input_ids, log=log)
        del model
    meta = {"key": key[:32], **spec.settings(), "tokens": blocks.num_tokens, "matrices": len(data)}
    save_imatrix(file, data)
    meta_file.write_text(json.dumps(meta))
    return file, {**meta, "cached": False}
