"""GGUF types and architectures shrink writes, and which types use or need an importance matrix
(a leaf module: the configs and the imatrix validate against it without importing the
exporter)."""

from __future__ import annotations

from shrink.core.errors import ShrinkError

# HF architecture -> (llama.cpp architecture, permute q/k for llama.cpp's interleaved RoPE)
ARCHS = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
}

# written by shrink itself (gguf package)
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# written by llama.cpp's quantizer from a lossless intermediate
QUANTIZED_TYPES = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q2_k_s",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
    "iq3_s",
    "iq3_xxs",
    "iq2_m",
    "iq2_s",
    "iq2_xs",
)
GGUF_TYPES = DIRECT_TYPES + QUANTIZED_TYPES
# every type llama.cpp's quantizer writes weights the rounding error of each column by the
# importance matrix when it has one. At widths that are not a multiple of 256 the 5- and 6-bit
# k-quants fall back to q5_0/q5_1/q8_0 for most tensors, and those gain as much as the 4-bit
# types (SmolLM2, q5_k_m: 49.4 -> 45.2 Persuasion perplexity; bench/results/frontier.md)
IMATRIX_TYPES = QUANTIZED_TYPES
# made for an importance matrix: llama.cpp refuses most of them without one and recommends one
# for the rest (iq3_s)
NEEDS_IMATRIX = ("q2_k_s", "iq3_s", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs")


def check_imatrix(gguf_type: str, imatrix: bool, error: type[Exception] = ShrinkError) -> None:
    """Refuse a type that needs an importance matrix when there is none."""
    if gguf_type in NEEDS_IMATRIX and not imatrix:
        raise error(
            f"GGUF {gguf_type} needs an importance matrix (llama.cpp's 2- and 3-bit IQ "
            "types and q2_k_s are made for one): leave --imatrix on"
        )


def llama_cpp_arch(hf_arch: str) -> str:
    """The gguf.MODEL_ARCH member name of an HF architecture class name."""
    if hf_arch not in ARCHS:
        raise ShrinkError(
            f"architecture {hf_arch} has no GGUF export in shrink (supported: {', '.join(ARCHS)})"
        )
    return ARCHS[hf_arch][0]
