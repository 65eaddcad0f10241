"""GGUF files (llama.cpp, through llama-cpp-python): a ``.gguf`` file or a folder holding one,
as ``shrink export --gguf`` writes it (with the HF tokenizer beside the file)."""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.runtime.artifacts import gguf_file
from shrink.runtime.kinds.base import Card, Kind, Measure, Stream


def _file(path: Path) -> Path:
    f = gguf_file(path)
    if f is None:
        raise ShrinkError(f"'{path}' holds no GGUF file")
    return f


def _export_record(folder: Path) -> dict:
    from shrink.core.models import read_shrink_json

    for stage in reversed((read_shrink_json(folder) or {}).get("stages") or []):
        if stage.get("stage") == "export":
            return stage
    return {}


class GgufKind(Kind):
    name = "gguf"

    def detect(self, path: Path) -> bool:
        return gguf_file(path) is not None

    def load(self, path: str | Path, device: str | None = None, **runner):
        """A :class:`shrink.runtime.gguf.GgufRunner` on the file (close it, or use ``with``)."""
        from shrink.runtime.gguf import GgufRunner

        return GgufRunner(_file(Path(path)), **runner)

    def perplexity(
        self, model, make_blocks, *, load=None, batch_size: int = 4, show_progress: bool = True
    ) -> list:
        from transformers import AutoTokenizer

        from shrink.core.models import check_tokenizer_files
        from shrink.core.perplexity import PerplexityResult

        file = _file(Path(model).expanduser())
        check_tokenizer_files(file.parent)  # shrink's GGUF folders carry the HF tokenizer
        all_blocks = make_blocks(AutoTokenizer.from_pretrained(file.parent))
        n_ctx = max([1024] + [int(b.input_ids.shape[-1]) for b in all_blocks])
        results = []
        with self.load(file, n_ctx=n_ctx) as runner:
            for blocks in all_blocks:
                r = runner.perplexity(blocks.input_ids, show_progress=show_progress)
                results.append(
                    PerplexityResult(
                        r["perplexity"], r["nll"], r["tokens"], r["seconds"], data=blocks.describe()
                    )
                )
        return results

    def generate(
        self,
        path: Path,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stream: Stream | None,
    ) -> str:
        with self.load(path) as runner:
            ids = runner.encode(prompt)
            new = runner.generate_ids(
                ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed or 0
            )
            text = runner.decode(new)
        if stream is not None:
            stream(text)
        return text

    def measure(self, path: Path, m: Measure) -> dict:
        """llama.cpp through llama-cpp-python: the same prompt and token counts (batch 1)."""
        from transformers import AutoTokenizer

        from shrink.core.models import check_tokenizer_files
        from shrink.runtime import measure as M

        file = _file(path)
        check_tokenizer_files(file.parent)  # the prompt is built with the HF tokenizer
        tok = AutoTokenizer.from_pretrained(file.parent)
        ids = M.prompt_ids(tok, m.prompt_len, 1)[0].tolist()
        with self.load(
            file,
            n_ctx=max(1024, m.prompt_len + m.gen_len, m.ppl_seq_len),
            n_threads=m.threads,
            logits_all=False,
        ) as runner:
            for _ in range(m.warmup):
                runner.time_greedy(ids, min(m.gen_len, 4))
            M.reset_peak_rss()
            cpu0 = M.cpu_seconds()
            ttft, decode = runner.time_greedy(ids, m.gen_len)
            result = {
                "ttft_s": ttft,
                "decode_s": decode,
                "cpu_s": M.cpu_seconds() - cpu0,
                "threads": runner.n_threads,
                "peak_rss_bytes": M.vm_bytes("VmHWM"),
            }
        if m.ppl_samples:
            blocks = M.eval_blocks(tok, m.ppl_samples, m.ppl_seq_len)
            with self.load(file, n_ctx=max(1024, m.ppl_seq_len)) as runner:
                result["perplexity"] = runner.perplexity(blocks.input_ids)["perplexity"]
        return result

    def verify(
        self, path: Path, source: str | Path | None = None, gguf_type: str | None = None, **kw
    ) -> dict:
        """Load in llama.cpp in a fresh process and compare with the HF ``source``: metadata,
        tokenizer, greedy tokens, logits, perplexity
        (:func:`shrink.runtime.gguf.verify_in_subprocess`; ``kw``: its threads, samples,
        seq_len, data, max_new_tokens, timeout). ``source`` and ``gguf_type`` default to the
        folder's export record."""
        from shrink.runtime.gguf import verify_in_subprocess

        file = _file(Path(path))
        rec = _export_record(file.parent)
        source = source or rec.get("source")
        gguf_type = gguf_type or rec.get("type")
        if source is None or gguf_type is None:
            raise ShrinkError(f"{path}: give the HF source and the GGUF type to verify it against")
        return verify_in_subprocess(file, source, gguf_type, **kw)

    def describe(self, path: Path) -> dict:
        file = _file(Path(path))
        return {
            "kind": self.name,
            "format": "GGUF",
            "bytes": file.stat().st_size,
            "weight_bytes": file.stat().st_size,
            "file": file.name,
            "precision": _export_record(file.parent).get("type"),
        }

    def card(self, report: dict) -> Card:
        gtype = report["export"]["gguf"]["type"]
        file = report["export"]["gguf"]["file"]
        fmt = f"GGUF {gtype.upper()}"
        return Card(
            tags=["shrink", "pruned", "gguf", "llama.cpp", gtype],
            library="gguf",
            format=fmt,
            row="gguf",
            made=f", quantized to {fmt} by llama.cpp from the full-precision model",
            usage=[
                "```bash",
                f'llama-cli -m {file} -p "The capital of France is" -n 32',
                f"# Ollama: a Modelfile with the line  FROM ./{file}",
                "```",
                "",
                "```python",
                "from llama_cpp import Llama  # pip install llama-cpp-python",
                f'llm = Llama("{file}")',
                'print(llm("The capital of France is", max_tokens=32)["choices"][0]["text"])',
                "```",
            ],
        )

    def export_note(self, e: dict) -> str:
        from shrink.runtime.gguf_quant import types_line

        note = (
            f"GGUF: `gguf/{e['file']}` ({e['type']}, {e.get('block_count')} blocks; "
            "loads in llama.cpp, Ollama and LM Studio)."
        )
        if e.get("tensor_types"):  # with a k-quant: what fell back to which type
            note += f" Tensor types: {types_line(e['tensor_types'])}."
        if e.get("imatrix"):
            note += (
                f" Importance matrix from {e['imatrix']['tokens']} tokens of "
                f"{e['imatrix']['data']}."
            )
        if e.get("comparison"):  # the dense model through the same type, same evaluation
            c = e["comparison"]
            note += f" Perplexity on {' | '.join(c['sets'])}: {c['line']}."
        return note
