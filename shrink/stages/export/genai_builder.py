"""Run the onnxruntime-genai model builder with the fixes shrink needs for transformers 5.

``python -m shrink.stages.export.genai_builder ARGS`` takes the builder's own command line
(``python -m onnxruntime_genai.models.builder ARGS``) and runs it in this process after patching
one thing the builder 0.18 reads wrongly, so that it builds a model with a KV cache where it
would otherwise fail and leave shrink with the no-KV-cache fallback:

Gemma 3 (text). transformers 5 keeps one set of rope parameters per attention type
(``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``) and, when it
reads a config, turns the legacy ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``
keys into that form, so no config.json makes the builder see the legacy keys: it looks up
``rope_parameters["rope_type"]`` and stops with ``KeyError: 'rope_type'``. The patch hands the
builder the form it was written for (the full-attention parameters as ``rope_parameters``, the
sliding layers' base as ``rope_local_base_freq``), builds the sliding layers' cos/sin cache
without the full layers' scaling (Gemma 3 4B+ scale only the global rope, linearly), and uses
the exact embedding scale sqrt(hidden_size) as transformers does (the builder rounds it to 2
decimals, 25.3 for 25.298 at Gemma 3 270M's width 640; on a tiny model of width 80 that alone
moved fp32 logits by 2e-4, where the rest of the graph matches PyTorch to 1e-6).

Which layer is sliding comes from ``layer_types`` in both transformers and the builder, so a
pruned model (whose ``layer_types`` shrink slices to the kept layers) builds as it runs.

The builder's classes are patched, not copied: a builder release that reads the new form itself
still gets a flat ``rope_parameters`` and builds the same model.
"""

from __future__ import annotations

import math
import runpy
import sys

BUILDER = "onnxruntime_genai.models.builder"
GEMMA3_TYPES = ("gemma3_text", "gemma3")


def legacy_gemma3_rope(config) -> None:
    """Rewrite a transformers-5 Gemma 3 config in place into the builder's legacy form:
    ``rope_parameters`` = the full-attention parameters, ``rope_local_base_freq`` = the sliding
    layers' theta. A config already in that form is left alone."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            f"Gemma 3 with a '{local['rope_type']}' rope on its sliding layers is "
            "not supported by the onnxruntime-genai builder"
        )
    config.rope_parameters = full
    config.rope_local_base_freq = local.get("rope_theta", full.get("rope_theta", 10000.0))


def patch_gemma3() -> None:
    """Patch the builder's Gemma3Model (see the module docstring)."""
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)

    # the builder imports its classes as the top-level package ``builders``, not through
    # onnxruntime_genai.models: patch those classes
    from builders.base import Model
    from builders.gemma import Gemma3Model

    if getattr(Gemma3Model, "_shrink_patched", False):
        return
    make_config_init = Gemma3Model.make_config_init
    init = Gemma3Model.__init__

    def config_init(self, config):
        if getattr(config, "model_type", None) in GEMMA3_TYPES:
            for c in (config, getattr(config, "text_config", None)):
                if c is not None:
                    legacy_gemma3_rope(c)
        make_config_init(self, config)

    def gemma3_init(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
        init(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
        if getattr(config, "model_type", None) in GEMMA3_TYPES:
            self.embed_attrs["scale"] = math.sqrt(self.hidden_size)

    def multi_cache(self):
        # the builder's own method, except that the local cache drops the global rope's scaling
        self.cos_cache_global_name, self.sin_cache_global_name = (
            "cos_cache_global",
            "sin_cache_global",
        )
        Model.make_rotary_embedding_caches(
            self,
            cos_cache_name=self.cos_cache_global_name,
            sin_cache_name=self.sin_cache_global_name,
        )
        self.rope_attrs.update(
            create_caches=True,
            theta=self.rope_local_theta,
            rescale_factors=1,
            mscale=1,
            position_scale=1,
        )
        self.rope_attrs.pop("rescale_inv_freq", None)
        self.cos_cache_local_name, self.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
        Model.make_rotary_embedding_caches(
            self, cos_cache_name=self.cos_cache_local_name, sin_cache_name=self.sin_cache_local_name
        )

    Gemma3Model.make_config_init = config_init
    Gemma3Model.__init__ = gemma3_init
    Gemma3Model.make_rotary_embedding_multi_cache = multi_cache
    Gemma3Model._shrink_patched = True


def main(argv: list[str]) -> None:
    patch_gemma3()
    sys.argv = [BUILDER, *argv]
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
