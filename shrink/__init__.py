"""shrink: score, prune, heal, quantize and export decoder LLMs, and prove what was done.

The Python API under the ``shrink`` command line. Every stage has one typed config and returns a
small typed result; the CLI is generated from the same configs::

    import shrink
    scores = shrink.score("smollm2-135m", shrink.ScoreConfig(samples=16))
    pruned = shrink.prune("smollm2-135m", "out/smol-24L", shrink.PruneConfig(drop=6))
    healed = shrink.heal(pruned.output, "out/smol-24L-healed", shrink.HealConfig(steps=50))
    print(shrink.evaluate(healed.output).perplexity)

Names are imported on first use, so ``import shrink`` is cheap and changes nothing in the host
program (no logging levels, warning filters or environment variables).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # configs (cheap: pydantic only)
    "ScoreConfig": "shrink.stages.configs",
    "PruneConfig": "shrink.stages.configs",
    "HealConfig": "shrink.stages.configs",
    "QuantizeConfig": "shrink.stages.configs",
    "ExportConfig": "shrink.stages.configs",
    "EvaluateConfig": "shrink.stages.configs",
    "BenchConfig": "shrink.stages.configs",
    "BuildConfig": "shrink.stages.configs",
    "ModelOptions": "shrink.stages.configs",
    # stages: one function each, config in, typed result out
    "score": "shrink.stages.score",
    "prune": "shrink.stages.prune",
    "heal": "shrink.stages.heal",
    "quantize": "shrink.stages.quantize",
    "export": "shrink.stages.export",
    "evaluate": "shrink.stages.evaluate",
    "bench": "shrink.stages.bench",
    "build": "shrink.stages.build",
    "PruneResult": "shrink.stages.prune",
    "HealResult": "shrink.stages.heal",
    "GptqResult": "shrink.stages.quantize",
    "OnnxResult": "shrink.stages.export.onnx",
    "BuildResult": "shrink.stages.build",
    "BenchReport": "shrink.stages.bench",
    "register_strategy": "shrink.stages.strategies",
    "STRATEGIES": "shrink.stages.strategies",
    # building blocks
    "load_model": "shrink.core.models",
    "resolve": "shrink.core.models",
    "find_layers": "shrink.core.models",
    "LoadedModel": "shrink.core.models",
    "ALIASES": "shrink.core.models",
    "EMBEDDED": "shrink.core.models",
    "token_blocks": "shrink.core.data",
    "load_texts": "shrink.core.data",
    "TokenBlocks": "shrink.core.data",
    "CALIBRATION": "shrink.core.data",
    "EVALUATION": "shrink.core.data",
    "HEALING": "shrink.core.data",
    "score_layers": "shrink.core.scores",
    "removal_perplexity": "shrink.core.scores",
    "LayerScores": "shrink.core.scores",
    "prune_model": "shrink.core.layers",
    "without_layers": "shrink.core.layers",
    "perplexity": "shrink.core.perplexity",
    "PerplexityResult": "shrink.core.perplexity",
    "ShrinkError": "shrink.core.errors",
    "verify_model_dir": "shrink.runtime.verify",
    "generate": "shrink.runtime.generate",
    "estimate": "shrink.analysis.estimate",
    "check_claims": "shrink.analysis.claims",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'shrink' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
