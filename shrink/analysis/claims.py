"""Check the papers' resource claims against exact arithmetic from shrink.analysis.estimate.

Verdict rule (stated vs exact): ``holds`` if stated/exact is within 10% of 1, ``approximately`` if
within 25%, else ``wrong``. The one qualitative claim ("runs on consumer GPUs") is checked against
the GPU table instead; its rule is given in its ``tolerance`` field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shrink.analysis.estimate import estimate

HOLDS_WITHIN = 0.10
APPROX_WITHIN = 0.25
TOLERANCE = f"holds within {HOLDS_WITHIN:.0%}, approximately within {APPROX_WITHIN:.0%}, else wrong"
CONTEXT = 4096  # Llama-2's context length, used where a claim needs one
GROMOV = "Gromov et al. 2024 (arXiv 2403.17887), sec. 5"
SHORTGPT = "Men et al. 2024, ShortGPT (arXiv 2403.03853)"


@dataclass
class ClaimCheck:
    claim: str
    source: str
    stated: float | None
    exact: float | None
    unit: str  # "GB", "FLOPs/token", "fraction"
    ratio: float | None  # stated / exact
    verdict: str  # "holds" | "approximately" | "wrong"
    tolerance: str
    note: str
    bench: str | None = None  # a `shrink bench ...` command that measures it, where one can

    def to_dict(self) -> dict:
        return asdict(self)


def verdict_for(ratio: float) -> str:
    """The verdict for stated/exact = ``ratio`` under the module's tolerances."""
    off = abs(ratio - 1)
    if off <= HOLDS_WITHIN:
        return "holds"
    if off <= APPROX_WITHIN:
        return "approximately"
    return "wrong"


def _numeric(claim, source, stated, exact, unit, note, bench=None) -> ClaimCheck:
    ratio = stated / exact
    verdict = verdict_for(ratio)
    if verdict == "wrong":
        direction = f"low by {exact / stated:.1f}x" if ratio < 1 else f"high by {ratio:.1f}x"
        note = f"{direction}. {note}"
    else:
        note = f"off by {(ratio - 1):+.1%}. {note}"
    return ClaimCheck(
        claim, source, stated, exact, unit, ratio, verdict, TOLERANCE, note.strip(), bench
    )


# Commands that measure what the arithmetic predicts (a GPU with enough memory, the weights
# local): peak memory and decode throughput with `shrink bench`, ratios to the dense model.
BENCH_70B_DENSE = "shrink bench LLAMA_2_70B_DIR --device cuda"
BENCH_70B_PRUNED = (
    "shrink build --config gromov-llama-2-70b -o l2-70b-40L && "
    "shrink bench l2-70b-40L/model --device cuda"
)
BENCH_13B = (
    "shrink prune llama-2-13b --drop 10 -o l2-13b-30L && "
    "shrink bench l2-13b-30L --baseline LLAMA_2_13B_DIR --device cuda"
)
BENCH_7B = (
    "shrink prune llama-2-7b --drop 9 -o l2-7b-23L && shrink quantize l2-7b-23L "
    "--gptq 4bit -o l2-7b-23L-gptq && shrink bench l2-7b-23L-gptq --device cuda"
)


def check_claims() -> list[ClaimCheck]:
    """Every claim, checked. Dense 70B at fp16; 'pruned' = 40 of 80 layers dropped (50%)."""
    dense = estimate("llama-2-70b", bits=16, context=CONTEXT)
    pruned4 = estimate("llama-2-70b", drop=40, bits=4, group_size=128, context=CONTEXT)
    b13 = estimate("llama-2-13b", context=CONTEXT)
    b13_cut = estimate("llama-2-13b", drop=10, context=CONTEXT)
    b7 = estimate("llama-2-7b", context=CONTEXT)
    b7_cut = estimate("llama-2-7b", drop=9, context=CONTEXT)
    checks = []

    checks.append(
        _numeric(
            "Llama-2-70B takes ~140 GB (fp16)",
            GROMOV,
            140.0,
            dense.weights.total_gb,
            "GB",
            f"exact: {dense.params.total / 1e9:.3f} B parameters x 2 bytes.",
            BENCH_70B_DENSE,
        )
    )
    checks.append(
        _numeric(
            "Llama-2-70B needs ~3e10 FLOPs per token",
            GROMOV,
            3e10,
            float(dense.flops.matmul),
            "FLOPs/token",
            f"exact matmul FLOPs 2*(weights) = {dense.flops.matmul:.3g}, before the "
            f"{dense.flops.attention:.2g} of attention over a {CONTEXT}-token context.",
        )
    )
    checks.append(
        _numeric(
            "4-bit + 50% of layers pruned: ~17.5 GB",
            GROMOV,
            17.5,
            pruned4.weights.total_gb,
            "GB",
            "exact: GPTQ 4-bit g128 (4.16 bits per weight with scales, zeros, g_idx), embeddings and head "
            "in fp16; 17.5 is 140/8, pure 4-bit.",
            BENCH_70B_PRUNED,
        )
    )
    checks.append(
        _numeric(
            "4-bit + 50% pruned: ~1.5e10 FLOPs per token",
            GROMOV,
            1.5e10,
            float(pruned4.flops.matmul),
            "FLOPs/token",
            "quantization does not change FLOPs; 40 remaining layers need "
            f"{pruned4.flops.matmul:.3g} matmul FLOPs per token.",
        )
    )
    checks.append(
        _numeric(
            "Pruning 50% of layers halves the FLOPs",
            GROMOV,
            0.5,
            pruned4.flops.matmul / dense.flops.matmul,
            "fraction",
            "the halving is right (the head's FLOPs are not halved, hence slightly above 0.5); only the "
            "absolute FLOPs numbers are low.",
        )
    )
    checks.append(_consumer_gpus(pruned4))

    removed13 = 1 - b13_cut.params.total / b13.params.total
    checks.append(
        _numeric(
            "Llama-2-13B minus 10 layers removes ~25% of parameters",
            SHORTGPT,
            0.25,
            removed13,
            "fraction",
            f"exact: 1 - {b13_cut.params.total / 1e9:.3f}/{b13.params.total / 1e9:.3f} = {removed13:.1%}.",
            BENCH_13B,
        )
    )
    flops13 = 1 - b13_cut.flops.matmul / b13.flops.matmul
    checks.append(
        _numeric(
            "Llama-2-13B minus 10 layers removes ~25% of compute",
            SHORTGPT,
            0.25,
            flops13,
            "fraction",
            f"exact matmul FLOPs: 1 - {b13_cut.flops.matmul / 1e9:.1f}G/{b13.flops.matmul / 1e9:.1f}G = "
            f"{flops13:.1%} (also {1 - b13_cut.flops.total / b13.flops.total:.1%} with attention "
            f"over {CONTEXT} tokens).",
            BENCH_13B,
        )
    )
    removed7 = 1 - b7_cut.params.total / b7.params.total
    checks.append(
        _numeric(
            "Llama-2-7B minus 9 of 32 layers is a 27.1% reduction (Table 2)",
            SHORTGPT,
            0.271,
            removed7,
            "fraction",
            f"matches the parameter fraction removed, {removed7:.2%} (the layer fraction is 9/32 = 28.1%).",
            BENCH_7B,
        )
    )
    return checks


def _consumer_gpus(pruned4) -> ClaimCheck:
    """'Runs on consumer GPUs': holds if weights + KV fit, with the reserve, on a discrete card."""
    fits = [g for g in pruned4.gpus if g.fits]
    misses = [g for g in pruned4.gpus if not g.fits]
    discrete_fits = [g for g in fits if not g.gpu.startswith("Apple")]
    needed = pruned4.gpus[0].needed_gb
    fit_text = ", ".join(f"{g.gpu} ({g.decode_tokens_per_s:.0f} tok/s decode bound)" for g in fits)
    miss_text = ", ".join(f"{g.gpu} ({g.usable_gb:.1f} GB usable)" for g in misses)
    return ClaimCheck(
        claim="4-bit + 50% pruned Llama-2-70B runs on consumer GPUs",
        source=GROMOV,
        stated=None,
        exact=needed,
        unit="GB",
        ratio=None,
        verdict="holds" if discrete_fits else "wrong",
        tolerance=(
            f"fits = weights + fp16 KV cache ({CONTEXT} tokens, batch 1) <= memory minus 10% reserve "
            "(25% on Apple unified memory); holds if it fits on a consumer discrete GPU"
        ),
        note=(
            f"needs {needed:.2f} GB. Fits: {fit_text or 'none'}. Does not fit: {miss_text or 'none'}. "
            "So 24 GB cards and up, not 12-16 GB cards."
        ),
        bench=BENCH_70B_PRUNED,
    )


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "GB":
        return f"{value:.2f} GB"
    if unit == "fraction":
        return f"{value:.1%}"
    return f"{value:.3g} {unit}"


def format_stated(check: ClaimCheck) -> str:
    return _fmt(check.stated, check.unit) if check.stated is not None else "(qualitative)"


def format_exact(check: ClaimCheck) -> str:
    return _fmt(check.exact, check.unit)


def to_markdown(checks: list[ClaimCheck]) -> str:
    """A markdown table of the checks, with the verdict rule above it."""
    lines = [
        f"Verdict rule: stated/exact {TOLERANCE} (GB = 1e9 bytes; FLOPs count a multiply-add as 2).",
        "",
        "| Claim | Source | Stated | Exact | Stated/exact | Verdict | Note | Measure with |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        bench = f"`{c.bench}`" if c.bench else "-"
        note = c.note if c.ratio is not None else f"{c.note} Rule: {c.tolerance}."
        cells = [
            c.claim,
            c.source,
            format_stated(c),
            format_exact(c),
            ratio,
            f"**{c.verdict}**",
            note,
            bench,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["ClaimCheck", "check_claims", "to_markdown", "verdict_for", "TOLERANCE"]
