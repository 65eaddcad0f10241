"""One typed config per stage: the single place for a setting's name, type, default, validation
and help text.

The CLI options (``shrink prune --drop``, ``shrink build --heal-seq-len``), the YAML recipe
(``heal: {steps: 100}``), the resume hash of a build stage and the ``settings`` of every
``--json`` output are all derived from these classes; nothing restates a setting elsewhere.
Configs are frozen pydantic models: unknown keys, wrong types and impossible values are one clear
error naming the key path (``heal.steps``).

Settings that are not about *what* a stage computes (where it writes, ``--force``, ``--resume``,
``--json``, whether to verify) belong to the command or the runner, not to a config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shrink.core.errors import ShrinkError

CALIBRATION = "austen:calibration"
HEALING = "austen:healing"
EVALUATION = "austen:evaluation"
# shrink build's measured defaults (bench/results/quality*.md, healing.md): calibration and
# healing text of both shipped domains, so neither the bridge nor the fine-tune learns Austen only
MIXED_CALIBRATION = "austen:calibration+tech:calibration"
MIXED_HEALING = "austen:healing+tech:calibration"
# shrink build's heal: the cheapest recipe measured to keep the healed quality on SmolLM2-135M
# (48 steps at lr 1.5e-3 without LoRA dropout: 50.27 Persuasion / 22.12 technical prose, against
# 50.43 / 22.32 for 60 steps at 1e-3 with dropout 0.05, in a quarter less training time). The
# default BuildConfig and the shipped recipe recipes/smollm2-135m.yaml both use these values.
BUILD_HEAL = {
    "method": None,  # LoRA, or QLoRA where the memory plan finds no room for a LoRA base
    "rank": 8,
    "targets": "mlp",
    "steps": 48,
    "batch_size": 4,
    "seq_len": 256,
    "lr": 1.5e-3,
    "warmup": 6,
    "dropout": 0.0,
    "data": MIXED_HEALING,
    "seed": 0,
}
TEXT_HELP = (
    "Text: austen:<split|novel>, tech:<calibration|evaluation>, a .txt/.jsonl file or "
    "folder, or hf:NAME[:CONFIG][:SPLIT] (needs network); A+B mixes sources evenly."
)
GPTQ_BITS = ("2bit", "3bit", "4bit", "8bit")
# upper bounds that no real run comes near: a larger value is a typo, refused before any work
MAX_TOKENS = 1 << 20  # tokens per block (the longest contexts are about a million)
MAX_BLOCKS = 1 << 20
MAX_BATCH = 1 << 12
MAX_LAYERS = 1 << 12
MAX_STEPS = 10**8
MAX_THREADS = 1 << 12
MAX_SEED = 2**32 - 1  # numpy's seeds


class Config(BaseModel):
    """Base of every stage config: frozen, no unknown keys."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )  # NaN and infinities are never a setting

    def settings(self) -> dict:
        """Every setting as plain JSON values (what records, hashes and --json outputs hold)."""
        return self.model_dump(mode="json")


def cli(**hints) -> dict:
    """Extra CLI hints for a field: ``metavar``, ``short`` (e.g. "-o"), ``parse`` (a parser name
    in shrink.cli.options), ``hidden``."""
    return {"cli": hints}


# ----------------------------------------------------------------------------- shared pieces


class ModelOptions(Config):
    """How the source model is loaded (shared by every command that loads one)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype (auto: float32 on CPU, bfloat16 on CUDA)."
    )
    device: str | None = Field(
        None,
        description="cpu or cuda (default: cuda when available).",
        json_schema_extra=cli(metavar="DEVICE"),
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and v.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"'{v}' is not a device; use cpu or cuda")
        return v

    def load_kwargs(self) -> dict:
        return {
            "dtype": None if self.dtype == "auto" else self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
        }


class TextBlocks(Config):
    """Token blocks of a text source: the same four settings wherever text is read."""

    data: str = Field(CALIBRATION, description=TEXT_HELP, json_schema_extra=cli(metavar="SOURCE"))
    samples: int = Field(32, ge=1, le=MAX_BLOCKS, description="Number of token blocks.")
    seq_len: int = Field(256, ge=2, le=MAX_TOKENS, description="Tokens per block.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for choosing the blocks.")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="Blocks per forward pass.")


# ----------------------------------------------------------------------------- stages


class LayerScoring(TextBlocks):
    """Settings of layer scoring, shared by ``score`` and ``prune``."""

    skip_first: int = Field(
        1,
        ge=0,
        le=MAX_TOKENS,
        description="Leave the first K tokens of each block out of BI/relmag (the attention sink).",
    )
    streaming: bool | None = Field(
        None,
        description="Read one layer at a time from the safetensors files (default: only "
        "when the weights do not fit in the device's available memory).",
    )


class ScoreConfig(LayerScoring):
    """``shrink score``: rank the decoder layers."""

    metric: Literal["bi", "angular", "relmag", "ppl"] = Field(
        "bi",
        description="Which score ranks the layers (bi, angular and relmag come from one "
        "pass; ppl takes L+1 passes).",
    )


class PruneConfig(LayerScoring):
    """``shrink prune``: remove decoder layers (scores them first when the strategy needs it)."""

    drop: int | None = Field(None, ge=1, le=MAX_LAYERS, description="Number of layers to remove.")
    layers: list[int] | None = Field(
        None,
        description="Remove exactly these layers, e.g. 21,22,25-27 (instead of --drop).",
        json_schema_extra=cli(parse="layers", metavar="LIST"),
    )
    strategy: str = Field(
        "bi",
        description="How to pick the layers (see `shrink prune --help`).",
        json_schema_extra=cli(parse="strategy"),
    )
    bridge: Literal["none", "linear", "auto"] = Field(
        "none",
        description="linear: fold a linear map, fitted on the calibration blocks in "
        "closed form (no training), into the MLP of the layer before each "
        "removed run (ReplaceMe); the checkpoint stays standard. auto: "
        "linear where the architecture can absorb it exactly, else none "
        "(recorded).",
    )
    ridge: float = Field(
        0.1,
        ge=0,
        le=1e6,
        description="Ridge of the bridge fit, toward the identity "
        "(plain pruning), relative to the MLP output's "
        "energy.",
    )
    guard: float = Field(
        3.0,
        ge=0,
        le=1e6,
        description="Quality guard: warn (and stop a build before "
        "healing) when held-out perplexity after pruning "
        "exceeds this many times the source's; 0: off.",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from shrink.stages.strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy '{v}'; use one of {', '.join(STRATEGIES)}")
        return v

    @model_validator(mode="after")
    def _drop_or_layers(self) -> PruneConfig:
        if self.layers is not None:
            if self.drop is not None and self.drop != len(self.layers):
                raise ValueError("drop and layers disagree; give one of them")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("layers lists a layer more than once")
        return self

    def count(self) -> int | None:
        return len(self.layers) if self.layers is not None else self.drop


class HealConfig(Config):
    """``shrink heal``: LoRA / QLoRA fine-tune (optionally distilled), merged into the weights.
    Unset values come from ``preset`` if one is given, else the defaults named in the help."""

    method: Literal["lora", "qlora", "last-layers"] | None = Field(
        None,
        description="lora: adapters on a 16/32-bit base; qlora: on a 4-bit NF4 base "
        "(bitsandbytes); last-layers: the LM head and the last K layers "
        "trained in full precision, no adapter. [default: lora]",
    )
    last_layers: int | None = Field(
        None, ge=1, le=MAX_LAYERS, description="K for --method last-layers. [default: 2]"
    )
    preset: Literal["gromov"] | None = Field(
        None,
        description="Gromov et al.'s recipe: QLoRA, MLP only, alpha = rank, rank/LR by "
        "family, 100 warm-up steps, 5000 steps x batch 16. Explicit values win.",
    )
    rank: int | None = Field(None, ge=1, le=1 << 16, description="LoRA rank. [default: 8]")
    alpha: float | None = Field(None, gt=0, le=1e6, description="LoRA alpha. [default: = rank]")
    dropout: float | None = Field(None, ge=0, lt=1, description="LoRA dropout. [default: 0.05]")
    targets: str | None = Field(
        None, description="mlp, attn, all, or Linear names like gate_proj,up_proj. [default: mlp]"
    )
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps. [default: 100]"
    )
    lr: float | None = Field(
        None, gt=0, le=10, description="Peak learning rate (cosine). [default: 1e-3]"
    )
    warmup: int | None = Field(
        None, ge=0, le=MAX_STEPS, description="Warm-up steps. [default: 10% of steps, at most 100]"
    )
    batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="Blocks per device per micro-step. [default: 4]"
    )
    grad_accum: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Gradient accumulation. [default: 1]"
    )
    seq_len: int | None = Field(
        None, ge=2, le=MAX_TOKENS, description="Tokens per block. [default: 512]"
    )
    data: str = Field(
        HEALING, description="Healing text. " + TEXT_HELP, json_schema_extra=cli(metavar="SOURCE")
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for blocks, adapter initialisation and data order."
    )
    teacher: str | None = Field(
        None,
        description="Distil from this model (same tokenizer), e.g. the unpruned one.",
        json_schema_extra=cli(metavar="MODEL"),
    )
    kd_temperature: float = Field(
        2.0, gt=0, le=1e3, description="Distillation temperature T (KL scaled by T^2)."
    )
    kd_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Weight of the KL term; 1 - kd_alpha goes to the LM loss. [default: 0.5]",
    )
    save_adapter: bool = Field(False, description="Also keep the LoRA adapter in OUT/adapter.")
    save_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Checkpoint every N steps (for --resume). [default: steps/10, at most 500]",
    )

    @model_validator(mode="after")
    def _kd(self) -> HealConfig:
        if self.teacher is None and self.kd_alpha is not None:
            raise ValueError("kd_alpha mixes distillation and LM loss: it needs a teacher")
        return self


class QuantizeConfig(TextBlocks):
    """``shrink quantize``: GPTQ through GPTQModel, a standard GPTQ checkpoint."""

    # calibration on both shipped domains: on Austen alone, GPTQ 4-bit of the default build's
    # healed model lost 56% on technical prose (34.63 against 22.14), against 12% with both
    data: str = Field(
        MIXED_CALIBRATION, description=TEXT_HELP, json_schema_extra=cli(metavar="SOURCE")
    )
    gptq: str = Field(
        ...,
        description="GPTQ weight bits: 2bit, 3bit, 4bit or 8bit.",
        json_schema_extra=cli(metavar="BITS"),
    )
    group_size: int | None = Field(
        None,
        description="Input columns sharing one scale/zero; -1: one group per output "
        "channel. Default 128, or the largest power of two dividing every "
        "layer's input width when 128 does not (reported).",
    )
    desc_act: bool = Field(
        False, description="Quantize columns in order of decreasing activation (act-order)."
    )
    sym: bool = Field(True, description="Symmetric quantization.")
    damp: float = Field(
        0.01, gt=0, lt=1, description="Hessian dampening, a fraction of its mean diagonal."
    )
    samples: int = Field(64, ge=1, le=MAX_BLOCKS, description="Calibration blocks.")
    seq_len: int = Field(512, ge=2, le=MAX_TOKENS, description="Tokens per calibration block.")

    @field_validator("gptq", mode="before")
    @classmethod
    def _bits(cls, v) -> str:
        text = str(v).strip().lower().removesuffix("bits").removesuffix("bit").removesuffix("-")
        text = f"{text}bit"  # 4, "4", "4bit", "4-bit", "4bits" (as parse_bits accepted)
        if text not in GPTQ_BITS:
            raise ValueError(f"'{v}' is not a GPTQ bit width; use {', '.join(GPTQ_BITS)}")
        return text

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and not 1 <= v <= MAX_TOKENS:
            raise ValueError(f"group_size must be -1 or from 1 to {MAX_TOKENS}")
        return v

    def bits(self) -> int:
        return int(self.gptq[:-3])


class ExportConfig(Config):
    """``shrink export``: ONNX for onnxruntime(-genai), GGUF for llama.cpp."""

    onnx: Literal["int4", "fp16", "fp32"] | None = Field(
        None,
        description="ONNX weights: int4 (MatMulNBits), fp16 (CUDA only) or fp32.",
        json_schema_extra=cli(metavar="PRECISION"),
    )
    lm_head: Literal["int8", "int4"] = Field(
        "int8",
        description="Bits of the LM head in an int4 ONNX export (int4: smallest file, "
        "lower quality).",
    )
    block_size: int = Field(
        32,
        description="Weights per int4 scale in an int4 ONNX export from a float model "
        "(a GPTQ source keeps its groups). 128 decodes faster on CPUs, 32 is "
        "more accurate (bench/results/runtimes.md).",
    )
    target: Literal["cpu", "cuda"] = Field(
        "cpu", description="Execution provider the ONNX model is built for."
    )
    fallback: bool = Field(
        True,
        description="Fall back to a forward-pass-only (no KV cache) "
        "ONNX export when the builder cannot build it.",
    )
    gguf: str | None = Field(
        None,
        description="GGUF type for llama.cpp / Ollama / LM Studio: f32, f16, bf16, q8_0, "
        "q4_0, q4_k_m, q5_k_m, q6_k, ... (the gguf extra).",
        json_schema_extra=cli(metavar="TYPE"),
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=MAX_THREADS,
        description="llama.cpp threads for the GGUF quantizer and its check (default: all cores).",
    )
    imatrix: bool = Field(
        True,
        description="Give llama.cpp's quantizer an importance matrix "
        "(mean squared input per column of every matrix, "
        "computed on calibration text) for the GGUF types "
        "it writes; the 2- and 3-bit IQ types require it.",
    )
    imatrix_data: str = Field(
        MIXED_CALIBRATION,
        description="Text of the importance matrix. " + TEXT_HELP,
        json_schema_extra=cli(metavar="SOURCE"),
    )
    imatrix_samples: int = Field(16, ge=1, description="Blocks of the importance matrix.")
    imatrix_seq_len: int = Field(256, ge=2, description="Tokens per importance-matrix block.")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        if v not in (16, 32, 64, 128, 256):
            raise ValueError(f"{v} is not an int4 block size; use 16, 32, 64, 128 or 256")
        return v

    @field_validator("gguf")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from shrink.stages.export.gguf_types import GGUF_TYPES

        v = v.strip().lower()
        if v not in GGUF_TYPES:
            raise ValueError(f"'{v}' is not a GGUF type; use one of {', '.join(GGUF_TYPES)}")
        return v

    @model_validator(mode="after")
    def _format(self) -> ExportConfig:
        if self.onnx == "fp16" and self.target == "cpu":
            raise ValueError("onnx fp16 needs target cuda (fp16 ONNX runs on GPUs)")
        if self.gguf is not None and not self.imatrix:
            from shrink.stages.export.gguf_types import check_imatrix

            check_imatrix(self.gguf, False, ValueError)
        return self

    def formats(self) -> list[str]:
        return [f for f in ("onnx", "gguf") if getattr(self, f) is not None]

    def uses_imatrix(self) -> bool:
        """Whether the GGUF export computes an importance matrix (on, and a type it helps)."""
        from shrink.stages.export.gguf_types import IMATRIX_TYPES

        return self.imatrix and self.gguf in IMATRIX_TYPES


class EvaluateConfig(TextBlocks):
    """``shrink eval``: perplexity on held-out text. The defaults are shrink's one fixed
    evaluation set (Persuasion, 8 x 512 tokens, seed 0): every command that reports a
    perplexity uses it unless told otherwise, and names it beside the number."""

    data: str = Field(
        EVALUATION,
        description="Held-out text. " + TEXT_HELP,
        json_schema_extra=cli(metavar="SOURCE"),
    )
    samples: int = Field(8, ge=1, le=MAX_BLOCKS, description="Evaluation blocks.")
    seq_len: int = Field(512, ge=2, le=MAX_TOKENS, description="Tokens per evaluation block.")

    second: str | None = Field(
        "tech:evaluation",
        description="A second held-out text of another domain (modern "
        "technical prose by default), measured on blocks of the same size; '' for none.",
        json_schema_extra=cli(metavar="SOURCE"),
    )

    @field_validator("second")
    @classmethod
    def _second(cls, v: str | None) -> str | None:
        return v or None

    def name(self, data: str | None = None) -> str:
        """How every surface labels a perplexity measured on this set."""
        return f"{data or self.data}, {self.samples} x {self.seq_len} tokens, seed {self.seed}"


class BenchConfig(Config):
    """``shrink bench``: measured latency, throughput, memory and perplexity."""

    device: str = Field("cpu", description="cpu or cuda.")
    prompt_len: int = Field(128, ge=2, le=MAX_TOKENS, description="Prompt tokens.")
    gen_len: int = Field(64, ge=2, le=MAX_TOKENS, description="Generated tokens.")
    batch: int = Field(1, ge=1, le=MAX_BATCH, description="Sequences decoded together.")
    repeats: int = Field(3, ge=1, le=1000, description="Interleaved rounds (medians are reported).")
    ppl_samples: int = Field(
        4, ge=0, le=MAX_BLOCKS, description="Blocks of held-out text for perplexity (0: skip)."
    )
    threads: list[int] | None = Field(
        None,
        description="CPU threads, e.g. 1,2: every artifact is measured at each count, "
        "with the machine's memory bandwidth at that count (decode as a "
        "fraction of its roofline). [default: each runtime's own default]",
        json_schema_extra=cli(parse="ints", metavar="N,N"),
    )

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1 or max(v) > MAX_THREADS):
            raise ValueError(f"thread counts must be from 1 to {MAX_THREADS}")
        return sorted(set(v)) if v else v


# ----------------------------------------------------------------------------- the build recipe

STAGE_CONFIGS: dict[str, type[Config]] = {
    "prune": PruneConfig,
    "heal": HealConfig,
    "quantize": QuantizeConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
}


class BuildConfig(ModelOptions):
    """``shrink build``: a recipe, nested by stage. A stage set to null (``heal: null``) or left
    out (``quantize``, ``export``) does not run."""

    model: str = Field("smollm2-135m", description="Model folder, hub id or alias.")
    allow_degraded: bool = Field(
        False, description="Go on healing a model that the quality guard found badly degraded."
    )
    # the measured defaults (README, "shrink build"): auto strategy, linear bridge where the
    # architecture allows it, calibration and healing text of both domains
    prune: PruneConfig | None = Field(
        default_factory=lambda: PruneConfig(
            drop=6, strategy="auto", bridge="auto", data=MIXED_CALIBRATION
        )
    )
    heal: HealConfig | None = Field(default_factory=lambda: HealConfig(**BUILD_HEAL))
    quantize: QuantizeConfig | None = None
    export: ExportConfig | None = None
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # sections of stages added through shrink.stages.pipeline.register_stage, by stage name
    # (each validated by its stage's config class when the build starts)
    registered: dict[str, dict] = Field(default_factory=dict)

    @field_validator("heal", mode="before")
    @classmethod
    def _no_heal(cls, v):
        return None if v is False else {} if v is True else v

    def stage_config(self, name: str):
        """The section of stage ``name``: a built-in stage's config, a registered stage's raw
        settings, or None when the stage does not run."""
        if name in type(self).model_fields and name != "registered":
            return getattr(self, name)
        return self.registered.get(name)

    def settings(self) -> dict:
        values = super().settings()
        if not values.get("registered"):
            values.pop("registered", None)  # recipes without extra stages stay as they were
        return values

    def stages(self) -> list[str]:
        return [name for name in STAGE_CONFIGS if getattr(self, name) is not None]

    def model_options(self) -> ModelOptions:
        return ModelOptions(
            dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code
        )


def make(cls: type[Config], values: dict, where: str = "") -> Config:
    """Build a config from user values; a validation error becomes one ShrinkError line that
    names the key path, e.g. ``heal.steps: Input should be greater than or equal to 1 (got 0)``."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ShrinkError(describe(e, where)) from None


def describe(e: ValidationError, where: str = "") -> str:
    parts = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        path = ".".join(x for x in (where, path) if x)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        got = (
            f" (got {err['input']!r})"
            if err["type"] not in ("extra_forbidden", "missing")
            and not isinstance(err.get("input"), dict)
            else ""
        )
        parts.append(f"{path}: {msg}{got}" if path else f"{msg}{got}")
    return "; ".join(parts)
