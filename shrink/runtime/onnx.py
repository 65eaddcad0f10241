"""ONNX runners: onnxruntime-genai for a folder with genai_config.json (KV cache), plain
onnxruntime for a forward-pass-only export (every new token re-runs the whole sequence).

``shrink.stages.export.onnx`` verifies an export with these runners; ``shrink generate``,
``shrink eval`` and ``shrink bench`` run ONNX folders with them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.runtime.artifacts import onnx_record
from shrink.runtime.sampling import sample as _sample

ONNX_EXTRA = install_hint("onnx")
ONNX_GPU_EXTRA = install_hint("onnx-gpu")

Stream = Callable[[str], None]


def import_onnx_runtime(module: str):
    """onnxruntime_genai or onnxruntime, or one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ShrinkError(
            f"running an ONNX model needs {module.replace('_', '-')} ({e}): run "
            f"{ONNX_EXTRA} (or {ONNX_GPU_EXTRA} on an NVIDIA GPU)"
        ) from None


def genai_min_length(path: str | Path) -> int:
    """The smallest ``max_length`` onnxruntime-genai accepts for this model folder.

    A model with sliding-window layers (Gemma 3) keeps a cache of ``window_size`` positions for
    them, and onnxruntime-genai refuses a generator whose max_length is below it ("KV cache
    capacity (6) must be at least local_window_size (512)"). Generators get at least this
    length and stop by count instead."""
    cfg = json.loads((Path(path) / "genai_config.json").read_text())["model"]
    window = (cfg.get("decoder", {}).get("sliding_window") or {}).get("window_size")
    return min(int(window or 0), int(cfg.get("context_length") or 2048))


class GenaiRunner:
    """An onnxruntime-genai folder (model builder output, with KV cache)."""

    kv_cache = True

    def __init__(self, path: str | Path):
        og = import_onnx_runtime("onnxruntime_genai")
        self.og = og
        self.path = Path(path)
        try:
            self.model = og.Model(str(self.path))
        except Exception as e:  # noqa: BLE001 - og raises RuntimeError with long text
            line = first_line(e)
            raise ShrinkError(f"onnxruntime-genai cannot load {path}: {line}") from None
        self.tokenizer = og.Tokenizer(self.model)
        cfg = json.loads((self.path / "genai_config.json").read_text())
        self.context_length = int(cfg["model"].get("context_length") or 2048)
        self.min_length = genai_min_length(self.path)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _generator(self, max_length: int, **search):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max(max_length, self.min_length), **search)
        return self.og.Generator(self.model, params)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits for every position of ``ids``: (len(ids), vocab), float32."""
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"))
        return out.reshape(-1, out.shape[-1])[-len(ids) :].astype(np.float32)

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        max_length = len(ids) + max_new_tokens
        if max_length > self.context_length:
            raise ShrinkError(
                f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} "
                f"exceed the model's context length {self.context_length}"
            )
        search = dict(do_sample=temperature > 0, min_length=len(ids) + min_new_tokens)
        if temperature > 0:
            search.update(temperature=float(temperature), top_p=float(top_p))
        if seed is not None:
            search["random_seed"] = int(seed)
        gen = self._generator(max_length, **search)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        new: list[int] = []
        while len(new) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            new.append(tok)
            if on_token is not None:
                on_token(tok)
        return new

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stream: Stream | None,
    ) -> str:
        ids = self.encode(prompt)
        tstream = self.tokenizer.create_stream()
        pieces: list[str] = []

        def on_token(tok: int) -> None:
            piece = tstream.decode(tok)
            pieces.append(piece)
            if stream is not None and piece:
                stream(piece)

        new = self.generate_ids(ids, max_new_tokens, temperature, top_p, seed, on_token=on_token)
        eos = set(int(t) for t in self.tokenizer.eos_token_ids)
        kept = [t for t in new if t not in eos]
        return self.tokenizer.decode(np.asarray(kept, dtype=np.int32)) if kept else ""


class PlainOnnxRunner:
    """A forward-pass-only ONNX export (no KV cache): every new token re-runs the whole
    sequence through plain onnxruntime."""

    kv_cache = False

    def __init__(self, path: str | Path, target: str | None = None):
        ort = import_onnx_runtime("onnxruntime")
        self.path = Path(path)
        models = sorted(self.path.glob("*.onnx"))
        if not models:
            raise ShrinkError(f"no .onnx file in {path}")
        target = target or onnx_record(self.path).get("target", "cpu")
        providers = ["CPUExecutionProvider"]
        if target == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ShrinkError(
                    f"{path} was exported for CUDA but this onnxruntime has no "
                    f"CUDAExecutionProvider: run {ONNX_GPU_EXTRA}"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(models[0]), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's Fail / InvalidGraph: one line
            raise ShrinkError(f"onnxruntime cannot load {models[0]}: {first_line(e)}") from None
        from transformers import AutoTokenizer

        self.hf_tokenizer = AutoTokenizer.from_pretrained(self.path)
        eos: set[int] = set()
        for src in (self.path / "generation_config.json", self.path / "config.json"):
            if src.is_file():
                val = json.loads(src.read_text()).get("eos_token_id")
                eos.update(val if isinstance(val, list) else [val] if val is not None else [])
        if self.hf_tokenizer.eos_token_id is not None:
            eos.add(self.hf_tokenizer.eos_token_id)
        self.eos = eos

    def encode(self, text: str) -> list[int]:
        return list(self.hf_tokenizer(text)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], dtype=np.int64)
        out = self.session.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
        return out[0].astype(np.float32)

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        rng = np.random.default_rng(seed)
        seq = list(ids)
        new: list[int] = []
        for step in range(max_new_tokens):
            last = self.logits(seq)[-1]
            if step < min_new_tokens and self.eos:
                last[list(self.eos)] = -np.inf
            tok = _sample(last, temperature, top_p, rng)
            new.append(tok)
            seq.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in self.eos:
                break
        return new

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stream: Stream | None,
    ) -> str:
        ids = self.encode(prompt)
        new: list[int] = []
        shown = ""

        def on_token(tok: int) -> None:
            nonlocal shown
            if tok in self.eos:
                return
            new.append(tok)
            text = self.hf_tokenizer.decode(new, skip_special_tokens=True)
            # Emit only text that can no longer change (a trailing U+FFFD is a partial character).
            if text.endswith("\ufffd"):
                return
            if stream is not None and len(text) > len(shown):
                stream(text[len(shown) :])
            shown = text

        self.generate_ids(ids, max_new_tokens, temperature, top_p, seed, on_token=on_token)
        final = self.hf_tokenizer.decode(new, skip_special_tokens=True)
        if stream is not None and len(final) > len(shown):
            stream(final[len(shown) :])
        return final


def _check_external_data(model, f: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        data = (f.parent / info.location).resolve()
        if f.parent.resolve() not in data.parents:
            raise ShrinkError(
                f"{f}: tensor {tensor.name} keeps its data outside the folder "
                f"({info.location}); refusing to read it"
            )
        if not data.is_file():
            raise ShrinkError(
                f"{f}: the data file {info.location} of tensor {tensor.name} is missing"
            )
        end = (info.offset or 0) + (info.length or 0)
        if data.stat().st_size < end:
            raise ShrinkError(
                f"{data} is truncated: tensor {tensor.name} ends at byte {end}, "
                f"the file has {data.stat().st_size}"
            )


def check_onnx_folder(path: str | Path) -> None:
    """Refuse a damaged ONNX folder with one line before a runtime loads it: no .onnx file, an
    empty or unparsable one, external data missing, truncated or outside the folder, a
    genai_config.json that is not JSON, no tokenizer."""
    import onnx

    p = Path(path)
    models = sorted(f for f in p.glob("*.onnx") if f.is_file())
    if not models:
        raise ShrinkError(f"no .onnx file in {path}")
    for f in models:
        if f.stat().st_size == 0:
            raise ShrinkError(f"{f} is empty; export it again")
        try:
            model = onnx.load(str(f), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others: one line
            raise ShrinkError(
                f"{f} is not a valid ONNX model ({first_line(e)}); it may be truncated or damaged"
            ) from None
        _check_external_data(model, f)
    genai = p / "genai_config.json"
    if genai.is_file():
        try:
            if not isinstance(json.loads(genai.read_text(encoding="utf-8"))["model"], dict):
                raise TypeError("'model' is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ShrinkError(f"{genai} is damaged ({first_line(e)})") from None
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ShrinkError(f"{path} has no tokenizer (tokenizer.json); export it again")


def onnx_runner(path: str | Path, target: str | None = None):
    """The right runner for an ONNX folder: onnxruntime-genai when it has genai_config.json."""
    p = Path(path)
    check_onnx_folder(p)
    if (p / "genai_config.json").is_file():
        return GenaiRunner(p)
    return PlainOnnxRunner(p, target)
