"""Hugging Face folders (safetensors, run by transformers)."""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError, first_line, install_hint
from shrink.core.hfconfig import quant_method, read_config
from shrink.runtime.kinds.base import Card, Kind, Measure, Stream


def load_for_measuring(model, dtype=None, device: str | None = None, **kwargs):
    """:func:`shrink.core.models.load_model`, but a quantized folder whose float32 embeddings
    and head do not fit this process loads them in bfloat16 on the CPU (GPTQModel's CPU kernel
    computes in bfloat16 anyway; see :func:`shrink.streaming.memory.quantized_cpu_dtype`)."""
    from shrink.core.models import load_model
    from shrink.streaming.memory import quantized_cpu_dtype

    if dtype is None and (device or "cpu") == "cpu":
        dtype = quantized_cpu_dtype(model)  # None leaves the loader's default
    return load_model(str(model), dtype=dtype, device=device, **kwargs)


class HfKind(Kind):
    """A plain Hugging Face model folder, in float precision."""

    name = "hf"
    lm_eval = True
    torch_weights = True

    def detect(self, path: Path) -> bool:
        p = Path(path)
        return p.is_dir() and (p / "config.json").is_file() and not quant_method(p)

    def check_runtime(self) -> None:
        """Raise ShrinkError with the install line when this kind's libraries are missing."""

    def load_kwargs(self, device: str) -> dict:
        """from_pretrained's keywords for this kind on ``device``."""
        import torch

        return {"dtype": torch.float32}

    def load(self, path: str | Path, device: str | None = None):
        """The model and its checked tokenizer: (model, tokenizer), in eval mode."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from shrink.core.models import (
            check_tokenizer,
            check_tokenizer_files,
            from_pretrained_checked,
        )

        path = Path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.check_runtime()
        check_tokenizer_files(path)
        tok = AutoTokenizer.from_pretrained(path)
        check_tokenizer(tok, path)
        try:
            model = from_pretrained_checked(
                path, auto_class=AutoModelForCausalLM, **self.load_kwargs(device)
            )
        except ImportError as e:
            raise ShrinkError(f"cannot load {path} with transformers: {first_line(e)}") from None
        return model.eval(), tok

    def perplexity(
        self, model, make_blocks, *, load=None, batch_size: int = 4, show_progress: bool = True
    ) -> list:
        from shrink.core.perplexity import perplexity

        loaded = load_for_measuring(model, **(load.load_kwargs() if load is not None else {}))
        results = []
        for blocks in make_blocks(loaded.tokenizer):
            r = perplexity(
                loaded.model, blocks.input_ids, batch_size=batch_size, show_progress=show_progress
            )
            r.data = blocks.describe()
            results.append(r)
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
        import torch
        from transformers import TextStreamer

        model, tok = self.load(path)

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if stream is not None and text:
                    stream(text)

        if seed is not None:
            torch.manual_seed(seed)
        enc = tok(prompt, return_tensors="pt").to(model.device)
        sample = temperature > 0
        gen_kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            streamer=_Streamer(tok, skip_prompt=True, skip_special_tokens=True),
        )
        if sample:
            gen_kwargs.update(temperature=float(temperature), top_p=float(top_p))
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = model.generate(**enc, **gen_kwargs)
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def measure_kwargs(self, device: str) -> dict:
        """from_pretrained's extra keywords for a benchmark run."""
        return {}

    def measure(self, path: Path, m: Measure) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from shrink.core.models import (
            check_tokenizer,
            check_tokenizer_files,
            from_pretrained_checked,
        )
        from shrink.core.perplexity import perplexity
        from shrink.runtime import measure as M

        if m.threads:
            torch.set_num_threads(m.threads)
        check_tokenizer_files(path)
        tok = AutoTokenizer.from_pretrained(path)
        check_tokenizer(tok, path)
        dtype = torch.float32 if m.device == "cpu" else torch.float16
        try:
            model = from_pretrained_checked(
                path, dtype=dtype, auto_class=AutoModelForCausalLM, **self.measure_kwargs(m.device)
            )
        except ImportError as e:
            raise ShrinkError(
                f"cannot load GPTQ artifact {path}: {e}; {install_hint('gptq')}"
            ) from None
        model.to(m.device).eval()
        if m.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        ids = M.prompt_ids(tok, m.prompt_len, m.batch).to(m.device)
        for _ in range(m.warmup):
            M.time_hf(model, ids, min(m.gen_len, 4), m.device)
        if m.device == "cpu":
            M.reset_peak_rss()
        cpu0 = M.cpu_seconds()
        ttft, decode = M.time_hf(model, ids, m.gen_len, m.device)
        result = {
            "ttft_s": ttft,
            "decode_s": decode,
            "cpu_s": M.cpu_seconds() - cpu0,
            "threads": torch.get_num_threads(),
            "peak_rss_bytes": M.vm_bytes("VmHWM"),
        }
        if m.device.startswith("cuda"):
            result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        if m.ppl_samples:
            blocks = M.eval_blocks(tok, m.ppl_samples, m.ppl_seq_len)
            result["perplexity"] = perplexity(
                model, blocks.input_ids, show_progress=False
            ).perplexity
        return result

    def verify(self, path: Path, timeout: float = 1800, **kw) -> dict:
        """Reload in transformers in a fresh process: finite logits, cached generation equal to
        uncached (:func:`shrink.runtime.verify.verify_model_dir`)."""
        from shrink.runtime.verify import verify_in_subprocess

        return verify_in_subprocess(path, timeout=timeout)

    def describe(self, path: Path) -> dict:
        cfg = read_config(path) or {}
        text = cfg.get("text_config") or cfg
        return {
            **super().describe(path),
            "format": "safetensors",
            "precision": text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype"),
        }

    def card(self, report: dict) -> Card:
        return Card(
            tags=["shrink", "pruned"],
            library="transformers",
            format="Hugging Face checkpoint (safetensors)",
            row="healed" if report.get("heal") else "pruned",
            usage=[
                "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
                "```",
            ],
        )
