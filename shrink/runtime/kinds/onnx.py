"""ONNX folders written by ``shrink export --onnx``: onnxruntime-genai (KV cache) or plain
onnxruntime for a forward-pass-only export (:mod:`shrink.runtime.onnx`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.runtime.artifacts import is_onnx_folder, onnx_record
from shrink.runtime.kinds.base import Card, Kind, Measure, Stream
from shrink.runtime.worker import run_worker


def onnx_perplexity(onnx_dir: str | Path, input_ids, show_progress: bool = True):
    """Perplexity of an ONNX artifact, teacher-forced on the same blocks and with the same
    arithmetic as :func:`shrink.core.perplexity.perplexity`."""
    import torch
    import torch.nn.functional as F

    from shrink.core.perplexity import PerplexityResult
    from shrink.core.progress import progress_bar
    from shrink.runtime.onnx import onnx_runner

    runner = onnx_runner(onnx_dir)
    total_nll, total_tokens = 0.0, 0
    t0 = time.perf_counter()
    for row in progress_bar(input_ids, "perplexity (ONNX)", enabled=show_progress):
        logits = torch.from_numpy(runner.logits(row.tolist())).float()
        total_nll += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
        total_tokens += row.numel() - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, time.perf_counter() - t0)


class OnnxKind(Kind):
    name = "onnx"

    def detect(self, path: Path) -> bool:
        return is_onnx_folder(path)

    def load(self, path: str | Path, device: str | None = None):
        """The runner of the folder (:func:`shrink.runtime.onnx.onnx_runner`)."""
        from shrink.runtime.onnx import onnx_runner

        return onnx_runner(path)

    def perplexity(
        self, model, make_blocks, *, load=None, batch_size: int = 4, show_progress: bool = True
    ) -> list:
        from transformers import AutoTokenizer

        from shrink.runtime.onnx import check_onnx_folder

        folder = Path(model).expanduser()
        check_onnx_folder(folder)  # one line for a damaged folder, before any tokenizing
        tok = AutoTokenizer.from_pretrained(folder)
        results = []
        for blocks in make_blocks(tok):
            r = onnx_perplexity(folder, blocks.input_ids, show_progress=show_progress)
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
        return self.load(path).generate(prompt, max_new_tokens, temperature, top_p, seed, stream)

    def measure(self, path: Path, m: Measure) -> dict:
        from transformers import AutoTokenizer

        from shrink.runtime import measure as M
        from shrink.runtime.onnx import check_onnx_folder, genai_min_length, import_onnx_runtime

        check_onnx_folder(path)
        og = import_onnx_runtime("onnxruntime_genai")
        min_length = genai_min_length(path)
        tok = AutoTokenizer.from_pretrained(path)
        config = og.Config(str(path))
        if m.threads:
            config.overlay(
                json.dumps(
                    {
                        "model": {
                            "decoder": {
                                "session_options": {
                                    "intra_op_num_threads": m.threads,
                                    "inter_op_num_threads": 1,
                                }
                            }
                        }
                    }
                )
            )
        model = og.Model(config)
        ids = M.prompt_ids(tok, m.prompt_len, m.batch).numpy()

        def run(n: int) -> tuple[float, float]:
            params = og.GeneratorParams(model)
            params.set_search_options(
                max_length=max(m.prompt_len + n, min_length), do_sample=False, batch_size=m.batch
            )
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(ids)
            gen.generate_next_token()
            t1 = time.perf_counter()
            for _ in range(n - 1):
                gen.generate_next_token()
            return t1 - t0, time.perf_counter() - t1

        for _ in range(m.warmup):
            run(min(m.gen_len, 4))
        M.reset_peak_rss()
        cpu0 = M.cpu_seconds()
        ttft, decode = run(m.gen_len)
        result = {
            "ttft_s": ttft,
            "decode_s": decode,
            "cpu_s": M.cpu_seconds() - cpu0,
            "threads": m.threads,
            "peak_rss_bytes": M.vm_bytes("VmHWM"),
        }
        if m.ppl_samples:
            blocks = M.eval_blocks(tok, m.ppl_samples, m.ppl_seq_len)
            result["perplexity"] = onnx_perplexity(
                path, blocks.input_ids, show_progress=False
            ).perplexity
        return result

    def verify(
        self,
        path: Path,
        source: str | Path | None = None,
        precision: str | None = None,
        target: str | None = None,
        timeout: float = 3600,
        **kw,
    ) -> dict:
        """Compare with the PyTorch ``source`` in a fresh process (greedy tokens, first-step
        logits, top-1 agreement, perplexity: ``shrink.stages.export.onnx.verify_onnx``); an fp32
        export must match. ``source``, ``precision`` and ``target`` default to the folder's
        export record."""
        rec = onnx_record(Path(path))
        source = source or rec.get("source")
        if source is None:
            raise ShrinkError(f"{path}: no source model to verify the ONNX export against")
        v = run_worker(
            "shrink.stages.export.onnx:verify_onnx",
            timeout=timeout,
            onnx_dir=str(path),
            source_dir=str(source),
            precision=precision or rec.get("precision", "int4"),
            target=target or rec.get("target", "cpu"),
        )
        if not v["ok"]:
            raise ShrinkError(
                "the ONNX export does not match PyTorch: "
                + json.dumps(
                    {
                        k: v.get(k)
                        for k in (
                            "greedy_equal_to_torch",
                            "first_step_logits_max_abs_diff",
                            "top1_agreement",
                            "finite_logits",
                        )
                    }
                )
            )
        return v

    def describe(self, path: Path) -> dict:
        rec = onnx_record(Path(path))
        return {
            **super().describe(path),
            "format": "ONNX",
            "precision": rec.get("precision"),
            "kv_cache": rec.get("kv_cache"),
        }

    def card(self, report: dict) -> Card:
        quantized = bool(report.get("quantize"))
        return Card(
            tags=["shrink", "pruned", "onnx", "onnxruntime-genai"],
            library="onnxruntime",
            format="ONNX (onnxruntime-genai)",
            row="onnx",
            made=f", GPTQ {report['quantize']['bits']}-bit" if quantized else "",
            usage=[
                "```python",
                "import onnxruntime_genai as og  # pip install onnxruntime-genai",
                'model = og.Model("path/to/this/folder")',
                "tokenizer = og.Tokenizer(model)",
                "params = og.GeneratorParams(model)",
                "generator = og.Generator(model, params)",
                'generator.append_tokens(tokenizer.encode("The capital of France is"))',
                "while not generator.is_done():",
                "    generator.generate_next_token()",
                "print(tokenizer.decode(generator.get_sequence(0)))",
                "```",
            ],
        )

    def export_note(self, e: dict) -> str:
        head = f", LM head {e['lm_head']}" if e.get("lm_head") else ""
        return (
            f"ONNX: `onnx/` ({e.get('precision')}{head}; {e.get('method')}, KV cache: "
            f"{'yes' if e.get('kv_cache') else 'no'})."
        )
