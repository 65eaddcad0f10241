"""GPTQ checkpoints: Hugging Face folders whose config has a GPTQ ``quantization_config``, run
by transformers with GPTQModel and optimum behind it."""

from __future__ import annotations

import json
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.hfconfig import quant_method, read_config
from shrink.runtime.kinds.base import Card
from shrink.runtime.kinds.hf import HfKind
from shrink.runtime.worker import run_worker


class GptqKind(HfKind):
    name = "gptq"
    torch_weights = False  # its weights are GPTQModel's packed integers

    def detect(self, path: Path) -> bool:
        p = Path(path)
        return p.is_dir() and (p / "config.json").is_file() and quant_method(p) == "gptq"

    def check_runtime(self) -> None:
        from shrink.runtime.gptq import require_gptq

        require_gptq("this is a GPTQ checkpoint; loading it")

    def load_kwargs(self, device: str) -> dict:
        return {"device_map": device}

    def perplexity(
        self, model, make_blocks, *, load=None, batch_size: int = 4, show_progress: bool = True
    ) -> list:
        """As a Hugging Face folder's; under a memory limit in a fresh process, whose memory
        holds the 4-bit model alone (a build's process also holds what its earlier stages,
        GPTQModel's among them, left behind)."""
        from shrink.core.peaks import process_limit

        if process_limit() is None or not Path(model).is_dir():
            return super().perplexity(
                model, make_blocks, load=load, batch_size=batch_size, show_progress=show_progress
            )
        from transformers import AutoTokenizer

        from shrink.core.perplexity import PerplexityResult

        all_blocks = make_blocks(AutoTokenizer.from_pretrained(model))
        device = load.load_kwargs().get("device") if load is not None else None
        r = run_worker(
            "shrink.runtime.kinds.gptq:measure_blocks",
            path=str(model),
            blocks=[b.input_ids.tolist() for b in all_blocks],
            batch_size=batch_size,
            device=device,
        )
        return [
            PerplexityResult(x["perplexity"], x["nll"], x["tokens"], x["seconds"], b.describe())
            for x, b in zip(r["results"], all_blocks)
        ]

    def measure_kwargs(self, device: str) -> dict:
        return {"device_map": device}

    def verify(
        self,
        path: Path,
        eval_data: str | None = "",
        samples: int = 16,
        seq_len: int = 512,
        seed: int = 0,
        device: str | None = None,
        timeout: float = 3600,
        **kw,
    ) -> dict:
        """Load with ``AutoModelForCausalLM.from_pretrained`` in a fresh process: finite logits,
        greedy generation, perplexity on ``eval_data`` (default: shrink's evaluation text; None:
        no perplexity) (``shrink.stages.quantize.verify_gptq_dir``)."""
        if eval_data == "":
            from shrink.core.data import EVALUATION

            eval_data = EVALUATION
        result = run_worker(
            "shrink.stages.quantize:verify_gptq_dir",
            timeout=timeout,
            path=str(path),
            eval_data=eval_data,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            device=device,
        )
        if not result["ok"]:
            raise ShrinkError(
                f"verification of the GPTQ checkpoint {path} failed: {json.dumps(result)}"
            )
        return result

    def describe(self, path: Path) -> dict:
        q = (read_config(path) or {}).get("quantization_config") or {}
        return {
            **super().describe(path),
            "format": "GPTQ",
            "precision": f"{q.get('bits', '?')}-bit GPTQ, group size {q.get('group_size', '?')}",
        }

    def card(self, report: dict) -> Card:
        bits = report["quantize"]["bits"]
        hf = super().card(report)
        return Card(
            tags=["shrink", "pruned", "gptq", f"{bits}-bit"],
            library="transformers",
            format="GPTQ checkpoint",
            row="quantized",
            made=f", GPTQ {bits}-bit",
            usage=[
                "A GPTQ checkpoint: transformers loads it when GPTQModel and optimum "
                "are installed (`pip install gptqmodel optimum`); vLLM serves it as "
                "is.",
                "",
            ]
            + hf.usage,
        )


def measure_blocks(path: str, blocks: list, batch_size: int = 4, device: str | None = None) -> dict:
    """Perplexity of the GPTQ folder on each set of token blocks (run in a fresh process by
    :meth:`GptqKind.perplexity`): {results: [{perplexity, nll, tokens, seconds}]}."""
    import torch

    from shrink.core.perplexity import perplexity
    from shrink.runtime.kinds.hf import load_for_measuring

    loaded = load_for_measuring(path, device=device)
    out = []
    for ids in blocks:
        r = perplexity(loaded.model, torch.tensor(ids), batch_size=batch_size, show_progress=False)
        out.append(
            {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "seconds": r.seconds}
        )
    return {"results": out}
