"""Run GGUF files in llama.cpp (through llama-cpp-python), quantize them with llama.cpp's own
quantizer, and verify a written GGUF in a fresh process.

* :class:`GgufRunner`: ``encode``, ``logits`` (every position), ``generate_ids`` (greedy by
  default), ``perplexity`` (same blocks and arithmetic as ``shrink.evaluate.perplexity``).
* :func:`quantize_in_subprocess`: llama.cpp's ``llama_model_quantize`` in a child process (a
  failed ggml assertion aborts the whole process, so it must not be the user's).
* :func:`verify_in_subprocess`: ``python -m shrink.runtime.gguf verify GGUF HF_DIR TYPE ...``
  prints one JSON object on its last stdout line; it loads the GGUF in llama.cpp, compares its
  metadata with the HF config, its tokenizer with the HF tokenizer, its greedy tokens and logits
  with PyTorch's, and measures perplexity on held-out blocks.

llama.cpp writes its loading log to file descriptor 2; :class:`GgufRunner` sends it to a log
file (``log_file``, default a temporary file) while the model loads, then restores fd 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.runtime.sampling import sample as _sample
from shrink.runtime.worker import run_worker

GGUF_EXTRA = install_hint("gguf")
# fixed prompts of the verification (greedy tokens compared with PyTorch's)
PROMPTS = (
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession",
    "def fibonacci(n):",
)


def check_runtime() -> None:
    """Raise ShrinkError with the install line when llama-cpp-python is missing."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ShrinkError(f"running or quantizing GGUF needs llama-cpp-python: run {GGUF_EXTRA}")


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def check_gguf_file(path: str | Path) -> None:
    """Refuse what llama.cpp should not be handed, with one line: not a regular file, shorter than
    a GGUF header, no GGUF magic, an unknown version, or a header whose tensors do not fit in the
    file (truncated), as its header says."""
    p = Path(path)
    if not p.is_file():
        raise ShrinkError(f"no such GGUF file '{path}'")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise ShrinkError(f"'{path}' is not a GGUF file ({size} bytes: too short)")
    if head[:4] != b"GGUF":
        raise ShrinkError(f"'{path}' is not a GGUF file (no GGUF magic)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ShrinkError(f"'{path}' is GGUF version {version}; llama.cpp reads versions 2 and 3")
    from shrink.runtime.gguf_header import read_header

    header = read_header(p)  # a cut or damaged header: one line
    end = max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if end > size:
        raise ShrinkError(
            f"'{path}' is truncated: its tensors end at byte {end}, the file has {size}"
        )


@contextlib.contextmanager
def stderr_to(log_file: str | Path | None) -> Iterator[None]:
    """Send file descriptor 2 (where llama.cpp's C code logs) to ``log_file`` for the block,
    then restore it. ``None``: to a temporary file that is deleted."""
    sys.stderr.flush()
    saved = os.dup(2)
    if log_file is None:
        target = tempfile.TemporaryFile()
        fd = target.fileno()
    else:
        target = open(log_file, "ab")
        fd = target.fileno()
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        target.close()


class GgufRunner:
    """A GGUF file loaded in llama.cpp with full-sequence logits.

    ``n_ctx``: the longest sequence (prompt + generated) this runner takes.
    ``n_threads``: llama.cpp threads (default: all cores of this machine).
    ``logits_all``: keep every position's logits (needed by :meth:`logits` and
    :meth:`perplexity`); False computes the last position's only (faster prefill, for timing).
    """

    kv_cache = True

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        log_file: str | Path | None = None,
        logits_all: bool = True,
    ):
        check_runtime()
        self.path = Path(path)
        check_gguf_file(self.path)
        threads = int(n_threads or os.cpu_count() or 1)
        with stderr_to(log_file):
            import llama_cpp

            try:
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(n_ctx, 512),
                    # 256-token micro-batches: a 512-token block 8% faster than with 512 on
                    # a 2-core AVX-512 CPU (measured), the same logits bit for bit
                    n_ubatch=min(n_ctx, 256),
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=logits_all,
                    verbose=False,
                    seed=0,
                )
            except (ValueError, RuntimeError) as e:
                raise ShrinkError(f"llama.cpp cannot load {path}: {first_line(e)}") from None
        # close before the interpreter tears modules down (llama-cpp-python's __del__ then fails)
        self._finalizer = weakref.finalize(self, self.llm.close)
        self.llama_cpp = llama_cpp
        self.logits_all = logits_all
        self.n_ctx = n_ctx
        self.n_threads = threads
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self.eos = {self.llm.token_eos()}
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self._finalizer()
            self.llm = None

    def __enter__(self) -> GgufRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_layer(self) -> int:
        arch = self.metadata.get("general.architecture", "")
        return int(self.metadata[f"{arch}.block_count"])

    def encode(self, text: str) -> list[int]:
        """Token ids as llama.cpp's tokenizer makes them (BOS added when the GGUF says so)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def _last_logits(self) -> np.ndarray:
        """Logits of the last evaluated position (a copy), in either logits_all mode."""
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32)

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise ShrinkError(
                f"{n} tokens exceed this runner's context of {self.n_ctx} (pass a larger n_ctx)"
            )

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits for every position of ``ids``: (len(ids), vocab), float32."""
        ids = [int(t) for t in ids]
        self._check_len(len(ids))
        if not self.logits_all:
            raise ShrinkError(
                "this runner was made with logits_all=False: it has no logits for every position"
            )
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def generate_ids(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        min_new_tokens: int = 0,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Continue ``ids`` with the KV cache; greedy (argmax) when ``temperature`` is 0.
        Stops after an end-of-generation token (included in the result)."""
        ids = [int(t) for t in ids]
        self._check_len(len(ids) + max_new_tokens)
        rng = np.random.default_rng(seed)
        self.llm.reset()
        self.llm.eval(ids)
        new: list[int] = []
        for step in range(max_new_tokens):
            last = self._last_logits()
            if step < min_new_tokens:
                last[list(self.eos)] = -np.inf
            tok = _sample(last, temperature, top_p, rng)
            new.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in self.eos or self.llama_cpp.llama_vocab_is_eog(self._vocab, tok):
                break
            if step + 1 < max_new_tokens:
                self.llm.eval([tok])
        return new

    def time_greedy(self, ids: Sequence[int], gen_len: int) -> tuple[float, float]:
        """(time to first token: prefill + argmax, decode seconds for ``gen_len - 1`` further
        tokens), greedy with the KV cache, never stopping at EOS: the loop shrink.bench times
        for PyTorch and ONNX. Logits of the last position only are read."""
        ids = [int(t) for t in ids]
        self._check_len(len(ids) + gen_len)
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        tok = int(np.argmax(self._last_logits()))
        t1 = time.perf_counter()
        for _ in range(gen_len - 1):
            self.llm.eval([tok])
            tok = int(np.argmax(self._last_logits()))
        return t1 - t0, time.perf_counter() - t1

    def perplexity(self, input_ids_blocks, show_progress: bool = False) -> dict:
        """Token-weighted perplexity over (samples, seq_len) blocks, teacher-forced: the mean
        negative log-likelihood of token t+1 given tokens 0..t, as shrink.evaluate computes it."""
        import torch

        rows = np.asarray(input_ids_blocks, dtype=np.int64)
        total_nll, total_tokens = 0.0, 0
        t0 = time.perf_counter()
        for row in rows:
            # float64 log-softmax in PyTorch: NumPy's single-threaded pass over seq_len x vocab
            # logits took as long as llama.cpp's forward (float32 drifts in the 5th digit)
            logits = torch.from_numpy(self.logits(row.tolist())[:-1]).double()
            targets = torch.from_numpy(row[1:])
            total_nll += float(-logits.log_softmax(-1).gather(1, targets[:, None]).sum())
            total_tokens += len(targets)
        mean = total_nll / total_tokens
        return {
            "perplexity": math.exp(mean),
            "nll": mean,
            "tokens": total_tokens,
            "seconds": time.perf_counter() - t0,
        }


# ------------------------------------------------------------------------------------------------
# quantization (llama.cpp's own quantizer)
# ------------------------------------------------------------------------------------------------


def quantize(
    src: str | Path,
    dst: str | Path,
    gguf_type: str,
    threads: int | None = None,
    imatrix: dict | None = None,
    imatrix_dataset: str = "",
    imatrix_chunks: int = 0,
) -> None:
    """llama.cpp's ``llama_model_quantize`` (what ``llama-quantize`` runs), in this process.
    ``imatrix``: {GGUF tensor name: mean squared input per column} (see
    :mod:`shrink.stages.export.imatrix`). Prefer :func:`quantize_in_subprocess`: llama.cpp
    aborts the process on some errors."""
    check_runtime()
    import gguf
    import llama_cpp

    try:
        ftype = int(gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"])
    except KeyError:
        raise ShrinkError(f"llama.cpp has no quantization type '{gguf_type}'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads or os.cpu_count() or 1)
    keep = None
    if imatrix:
        from shrink.runtime.gguf_quant import imatrix_entries, imatrix_overrides

        params.imatrix, keep = imatrix_entries(llama_cpp, imatrix)
        params.kv_overrides, kv = imatrix_overrides(
            llama_cpp, imatrix_dataset, len(imatrix), imatrix_chunks
        )
        keep = (keep, kv)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    del keep
    if rc != 0:
        raise ShrinkError(f"llama.cpp could not quantize {src} to {gguf_type} (code {rc})")


def quantize_in_subprocess(
    src: str | Path,
    dst: str | Path,
    gguf_type: str,
    threads: int | None = None,
    timeout: float = 3600,
    imatrix: str | Path | None = None,
    imatrix_dataset: str = "",
    imatrix_chunks: int = 0,
) -> dict:
    """Quantize ``src`` (an f32/f16/bf16 GGUF) to ``dst`` with llama.cpp in a child process
    (llama.cpp aborts the whole process on some errors), through shrink's one worker protocol.
    ``imatrix``: an ``.npz`` importance matrix (:func:`shrink.stages.export.imatrix.imatrix_file`)."""
    return run_worker(
        "shrink.runtime.gguf:quantize_file",
        timeout=timeout,
        src=str(src),
        dst=str(dst),
        gguf_type=gguf_type,
        threads=threads,
        imatrix=str(imatrix) if imatrix else None,
        imatrix_dataset=imatrix_dataset,
        imatrix_chunks=imatrix_chunks,
    )


def quantize_file(
    src: str,
    dst: str,
    gguf_type: str,
    threads: int | None = None,
    imatrix: str | None = None,
    imatrix_dataset: str = "",
    imatrix_chunks: int = 0,
) -> dict:
    t0 = time.perf_counter()
    data = None
    if imatrix:
        from shrink.runtime.gguf_quant import load_imatrix

        data = load_imatrix(imatrix)
    quantize(src, dst, gguf_type, threads, data, imatrix_dataset, imatrix_chunks)
    return {
        "ok": True,
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes": Path(dst).stat().st_size,
    }


# ------------------------------------------------------------------------------------------------
# verification
# ------------------------------------------------------------------------------------------------


def _gguf_fields(path: Path) -> dict:
    """Key/values of a GGUF file (arrays up to 1024 items included) but the tokenizer's, and
    ``_tensor_types``: the tensor type counts, most frequent first."""
    from shrink.runtime.gguf_header import read_header, tensor_type_counts

    header = read_header(path)
    out = {
        key: value
        for key, value in header.kv.items()
        if not key.startswith("tokenizer.ggml.")
        or key in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
    }
    out["_tensor_types"] = tensor_type_counts(header)
    return out


def _check_metadata(fields: dict, config: dict, runner: GgufRunner) -> list[str]:
    """Differences between the GGUF's metadata and the HF config (empty when consistent)."""
    arch = fields.get("general.architecture")
    problems = []

    def want(key: str, value) -> None:
        got = fields.get(f"{arch}.{key}")
        if got != value:
            problems.append(f"{arch}.{key} is {got}, config says {value}")

    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    want("block_count", n_layer)
    want("embedding_length", config["hidden_size"])
    want("feed_forward_length", config["intermediate_size"])
    want("attention.head_count", n_head)
    want("attention.head_count_kv", config.get("num_key_value_heads") or n_head)
    if runner.n_layer != n_layer:
        problems.append(f"llama.cpp reports {runner.n_layer} blocks, config says {n_layer}")
    n_vocab = runner.llm.n_vocab()
    if n_vocab != config["vocab_size"]:
        problems.append(f"llama.cpp vocab {n_vocab}, config says {config['vocab_size']}")
    if arch == "gemma3" and config.get("layer_types") and config.get("sliding_window"):
        pattern = [bool(x) for x in fields.get(f"{arch}.attention.sliding_window_pattern") or []]
        expect = [t == "sliding_attention" for t in config["layer_types"]]
        if pattern != expect:
            problems.append(
                f"sliding_window_pattern {pattern} does not follow layer_types "
                f"{config['layer_types']}"
            )
        want("attention.sliding_window", config["sliding_window"])
    return problems


def _compare_with_torch(
    result,
    model_dir,
    tok,
    prompt_ids,
    gguf_greedy,
    first_logits,
    blocks,
    block_logits,
    max_new_tokens,
) -> list[bool]:
    """The PyTorch reference on the same token ids: greedy tokens, logits of the first prompt
    and top-1 agreement on a block, into ``result``; returns which prompts' tokens agree."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    pad = (
        tok.pad_token_id
        if tok.pad_token_id is not None
        else (eos[0] if isinstance(eos, list) else eos)
    )
    torch_greedy = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
            torch_greedy.append(out[0, len(ids) :].tolist())
        ref_first = model(torch.tensor([prompt_ids[0]])).logits[0].float().numpy()
        ref_block = (
            model(blocks.input_ids[:1]).logits[0].float().numpy()
            if block_logits is not None
            else None
        )
    same = [g == t for g, t in zip(gguf_greedy, torch_greedy)]
    agree_tokens = sum(sum(a == b for a, b in zip(g, t)) for g, t in zip(gguf_greedy, torch_greedy))
    n_tokens = sum(max(len(g), len(t)) for g, t in zip(gguf_greedy, torch_greedy))
    result.update(
        {
            "greedy_torch": torch_greedy,
            "greedy_equal": all(same),
            "greedy_token_agreement": round(agree_tokens / max(n_tokens, 1), 4),
            "max_abs_logit_diff": float(np.abs(first_logits - ref_first).max()),
        }
    )
    if block_logits is not None:
        result["top1_agreement"] = round(
            float((block_logits.argmax(-1) == ref_block.argmax(-1)).mean()), 4
        )
    return same


def _measure_sets(runner: GgufRunner, tok, sets: list[dict]) -> tuple[dict, dict]:
    """Perplexity of the loaded file on each text set: (the first one's record, {data: value})."""
    from shrink.core.data import token_blocks

    first, measured = None, {}
    for x in sets:
        blocks = token_blocks(
            tok, x["data"], int(x["samples"]), int(x["seq_len"]), int(x.get("seed", 0))
        )
        r = runner.perplexity(blocks.input_ids)
        measured[x["data"]] = r["perplexity"]
        if first is None:
            first = {**r, "data": blocks.describe()}
    return first, measured


def verify_gguf(
    gguf_path: str | Path,
    model_dir: str | Path,
    gguf_type: str,
    threads: int | None = None,
    samples: int = 4,
    seq_len: int = 256,
    data: str | None = None,
    max_new_tokens: int = 16,
    prompts: Sequence[str] = PROMPTS,
    seed: int = 0,
    sets: list[dict] | None = None,
) -> dict:
    """Load the GGUF in llama.cpp and check it against the HF folder it came from (run this in a
    fresh process: :func:`verify_in_subprocess`). ``sets`` ({data, samples, seq_len, seed}):
    also measure the file's perplexity on each (into ``measured``), in the same process; the
    first one's is then the check's perplexity."""
    from transformers import AutoTokenizer

    from shrink.core.data import EVALUATION, token_blocks

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    fields = _gguf_fields(gguf_path)
    blocks = token_blocks(tok, data or EVALUATION, samples, seq_len, seed, at_most=True)
    prompt_ids = [list(tok(p)["input_ids"]) for p in prompts]
    n_ctx = max(
        [seq_len, max(len(p) for p in prompt_ids) + max_new_tokens]
        + [int(x["seq_len"]) for x in sets or []]
    )

    result: dict = {
        "type": gguf_type,
        "bytes": gguf_path.stat().st_size,
        "architecture": fields.get("general.architecture"),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
        "tensor_types": fields["_tensor_types"],
    }
    t0 = time.perf_counter()
    runner = GgufRunner(gguf_path, n_ctx=n_ctx, n_threads=threads)
    result["seconds_load"] = round(time.perf_counter() - t0, 3)
    try:
        result["block_count"] = runner.n_layer
        problems = _check_metadata(fields, config, runner)
        # the tokenizer embedded in the GGUF against the HF tokenizer
        tok_texts = list(prompts)
        if len(blocks.input_ids):  # and a piece of the held-out text
            tok_texts.append(
                tok.decode(blocks.input_ids[0][:64].tolist(), skip_special_tokens=True)
            )
        tok_mismatch = [t for t in tok_texts if runner.encode(t) != list(tok(t)["input_ids"])]
        result["tokenizer_matches"] = not tok_mismatch
        if tok_mismatch:
            problems.append(
                f"llama.cpp tokenizes {tok_mismatch[0]!r} differently from the HF tokenizer"
            )
        gguf_greedy = [runner.generate_ids(ids, max_new_tokens) for ids in prompt_ids]
        first_logits = runner.logits(prompt_ids[0])
        block_logits = (
            runner.logits(blocks.input_ids[0].tolist()) if len(blocks.input_ids) else None
        )
        if sets:
            ppl, result["measured"] = _measure_sets(runner, tok, sets)
        else:
            ppl = runner.perplexity(blocks.input_ids) if len(blocks.input_ids) else None
    finally:
        runner.close()

    from shrink.streaming.memory import too_big_to_load

    result["prompts"], result["greedy_gguf"] = list(prompts), gguf_greedy
    result["completion"] = tok.decode(gguf_greedy[0], skip_special_tokens=True)
    if too_big_to_load(model_dir):
        result["reference"] = "skipped: the float32 model does not fit this process's memory"
        same = [True]
    else:
        same = _compare_with_torch(
            result,
            model_dir,
            tok,
            prompt_ids,
            gguf_greedy,
            first_logits,
            blocks,
            block_logits,
            max_new_tokens,
        )
    if ppl is not None:
        result["perplexity"] = ppl["perplexity"]
        result["nll"] = ppl["nll"]
        result["perplexity_tokens"] = ppl["tokens"]
        result["perplexity_seconds"] = round(ppl["seconds"], 2)
        result["data"] = ppl.get("data") or blocks.describe()
        if not math.isfinite(ppl["perplexity"]):
            problems.append("perplexity is not finite")
    if gguf_type in ("f32", "f16") and not all(same):
        i = same.index(False)
        problems.append(
            f"{gguf_type} greedy tokens differ from PyTorch's on {prompts[i]!r}: "
            f"{gguf_greedy[i]} vs {result['greedy_torch'][i]}"
        )
    if not all(len(g) > 0 for g in gguf_greedy):
        problems.append("llama.cpp generated no tokens")
    result["problems"] = problems
    result["ok"] = not problems
    return result


def verify_in_subprocess(
    gguf_path: str | Path,
    model_dir: str | Path,
    gguf_type: str,
    threads: int | None = None,
    samples: int = 4,
    seq_len: int = 256,
    data: str | None = None,
    max_new_tokens: int = 16,
    timeout: float = 3600,
    sets: list[dict] | None = None,
) -> dict:
    """:func:`verify_gguf` in a fresh process; raise ShrinkError naming the first problem."""
    result = run_worker(
        "shrink.runtime.gguf:verify_gguf",
        timeout=timeout,
        gguf_path=str(gguf_path),
        model_dir=str(model_dir),
        gguf_type=gguf_type,
        threads=threads,
        samples=samples,
        seq_len=seq_len,
        data=data,
        max_new_tokens=max_new_tokens,
        sets=sets,
    )
    if not result.get("ok"):
        raise ShrinkError(f"verification of {gguf_path} failed: {result['problems'][0]}")
    return result
