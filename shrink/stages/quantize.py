"""GPTQ quantization through GPTQModel: a (pruned, healed) model folder -> a standard GPTQ
checkpoint (safetensors + ``quantization_config``) that ``transformers`` reloads when GPTQModel and
optimum are installed, and that GPTQ runtimes (vLLM, SGLang, TGI, GPTQModel itself) load.

Layer pruning and quantization are orthogonal (ShortGPT, Table 2): prune, heal, then quantize.

GPTQModel does the work (calibration capture, Hessians, packing, saving); shrink adds the checks
before any heavy work, a group size that fits the model, the measured size and bits per weight,
perplexity before/after, a reload in a fresh process, and the ``shrink.json`` record.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shrink.core.data import EVALUATION, token_blocks
from shrink.core.errors import ShrinkError, first_line
from shrink.core.models import (
    check_decoder_only,
    check_device,
    check_model_folder,
    check_seq_len,
    find_layers,
    from_pretrained_checked,
    load_config,
    read_shrink_json,
    resolve,
    shards_read_not_mapped,
)
from shrink.core.outputs import check_output, safetensors_bytes
from shrink.core.progress import stderr
from shrink.core.quiet import stdout_to_stderr
from shrink.runtime.gptq import cpu_workers, gptq_interrupts, logs_outside_cwd, require_gptq
from shrink.stages.configs import EvaluateConfig, QuantizeConfig
from shrink.stages.pipeline import Artifact, BuildContext, Stage
from shrink.stages.runner import StageOutput, run_stage

BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 128
# Group sizes offered when the requested one does not fit; powers of two are what GPTQ kernels
# (Marlin, ExLlama, Triton) support.
GROUP_SIZES = (1024, 512, 256, 128, 64, 32, 16)


@dataclass
class GptqResult:
    output: Path
    bits: int
    group_size: int
    group_size_requested: int | None  # None: the default (128, or the largest that fits)
    group_size_note: str | None  # set when the default 128 did not fit and a smaller one was used
    desc_act: bool
    sym: bool
    damp: float
    device: str
    calibration: dict
    seconds: float  # GPTQ itself (GPTQModel.quantize), not loading or evaluation
    size_bytes_before: int  # safetensors bytes of the source
    size_bytes_after: int  # safetensors bytes of the output
    bits_per_weight: float  # over the quantized Linear weights, with scales/zeros/g_idx
    quantized_linears: int
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    evaluation: dict | None = None
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d.pop("record")
        return d


def quantizable_linears(config, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """Every nn.Linear inside the decoder layers (what GPTQ quantizes; embeddings, norms and the
    head stay 16-bit): name -> (in_features, out_features). Built on the meta device: no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    _, _, layers = find_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    out: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                out[f"{prefix}.{i}.{name}"] = (module.in_features, module.out_features)
    return out


def choose_group_size(
    linears: dict[str, tuple[int, int]], requested: int | None
) -> tuple[int, str | None]:
    """The group size to use, and a note when the default had to be lowered.

    A group of g input columns shares one scale and zero, so g must divide every quantized layer's
    input width. An explicit size that does not fit is an error naming the layer and the sizes that
    would; the default (None -> 128) falls back to the largest power of two that fits, reported.
    """
    if requested is not None and requested != -1 and requested < 1:
        raise ShrinkError(
            f"--group-size must be a positive number of columns or -1 (one group "
            f"per output channel), got {requested}"
        )
    if requested == -1 or not linears:
        return (requested if requested is not None else DEFAULT_GROUP_SIZE), None
    widths = sorted({k for k, _ in linears.values()})
    fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in widths)]
    g = requested if requested is not None else DEFAULT_GROUP_SIZE
    bad = [(name, k) for name, (k, _) in linears.items() if k % g]
    if not bad:
        return g, None
    options = ", ".join(str(x) for x in fits) if fits else "none of 16..1024"
    if requested is None and fits:
        smaller = [x for x in fits if x < DEFAULT_GROUP_SIZE] or fits
        chosen = smaller[0]
        return chosen, (
            f"group size {DEFAULT_GROUP_SIZE} does not divide the input width "
            f"{bad[0][1]} of {bad[0][0]} ({len(bad)} layers); used {chosen}, the "
            f"largest that divides every input width ({', '.join(map(str, widths))})"
        )
    name, k = bad[0]
    more = f" and {len(bad) - 1} other layers" if len(bad) > 1 else ""
    raise ShrinkError(
        f"group size {g} does not divide the input width {k} of {name}{more}; "
        f"group sizes that fit every layer: {options} (or -1, one group per output "
        "channel)"
    )


def safetensors_tensors(folder: Path) -> dict[str, int]:
    """tensor name -> bytes, read from the safetensors headers (no weights loaded)."""
    from shrink.core.safetensors import scan

    sizes: dict[str, int] = {}
    for header, _, _ in scan(folder)[1].values():
        for name, info in header.items():
            start, end = info["data_offsets"]
            sizes[name] = end - start
    return sizes


def bits_per_weight(folder: Path, linears: dict[str, tuple[int, int]]) -> tuple[float, int]:
    """Bits per weight over the quantized Linears of a GPTQ folder, counting qweight, qzeros,
    scales and g_idx (biases excluded); and how many Linears were quantized."""
    tensors = safetensors_tensors(folder)
    total_bytes, total_weights, count = 0, 0, 0
    for name, (k, n) in linears.items():
        if f"{name}.qweight" not in tensors:
            continue
        count += 1
        total_weights += k * n
        total_bytes += sum(
            tensors.get(f"{name}.{part}", 0) for part in ("qweight", "qzeros", "scales", "g_idx")
        )
    if count == 0:
        raise ShrinkError(f"no GPTQ-packed Linear (.qweight) found in {folder}")
    return 8 * total_bytes / total_weights, count


def _check_source(config, name: str) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        )
        raise ShrinkError(
            f"'{name}' is already quantized ({method}); quantize the unquantized "
            "(pruned or healed) model folder instead"
        )
    check_decoder_only(config)


def quantize(
    model_dir: str | Path,
    output: str | Path,
    config: QuantizeConfig,
    *,
    evaluation: EvaluateConfig | None = None,
    device: str | None = None,
    force: bool = False,
    verify: bool = True,
    show_progress: bool = True,
    book=None,
) -> GptqResult:
    """Quantize ``model_dir`` with GPTQ (GPTQModel) and write a standard GPTQ folder to ``output``.

    ``config.group_size`` None means 128, or the largest power of two dividing every quantized
    layer's input width when 128 does not (reported in ``group_size_note``); an explicit size that
    does not fit is a ShrinkError. ``evaluation`` (None skips it) measures perplexity before and
    after on that set. ``verify`` reloads the output with transformers in a fresh process
    (finite logits, greedy generation, perplexity). The output keeps the source's generation
    settings (GPTQModel would otherwise turn on sampling).
    """
    resolved = resolve(str(model_dir))
    check_output(output, force, resolved.path)
    require_gptq()
    hf_config = load_config(resolved)
    _check_source(hf_config, resolved.name)
    if resolved.path is not None:  # GPTQModel loads it itself: check it as our loader would
        check_model_folder(resolved.path, hf_config)
    check_seq_len(hf_config, config.seq_len)
    linears = quantizable_linears(hf_config)
    g, note = choose_group_size(linears, config.group_size)
    device = check_device(device)
    bits = config.bits()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    blocks = token_blocks(tokenizer, config.data, config.samples, config.seq_len, config.seed)
    eval_blocks = (
        token_blocks(
            tokenizer, evaluation.data, evaluation.samples, evaluation.seq_len, evaluation.seed
        )
        if evaluation is not None
        else None
    )
    if note and show_progress:
        stderr.print(f"note: {note}")

    ppl_before = None
    if eval_blocks is not None:
        ppl_before = source_perplexity(
            str(model_dir),
            resolved.path,
            eval_blocks,
            evaluation.name(),
            device,
            book,
            show_progress,
        )

    calibration = [
        {"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in blocks.input_ids
    ]

    def compute(tmp: Path) -> StageOutput:
        with cpu_workers(), stdout_to_stderr(), gptq_interrupts(output):
            from gptqmodel import GPTQModel
            from gptqmodel import QuantizeConfig as GPTQConfig
            from gptqmodel import __version__ as gptqmodel_version

            try:
                qconfig = GPTQConfig(
                    bits=bits,
                    group_size=g,
                    desc_act=config.desc_act,
                    sym=config.sym,
                    damp_percent=config.damp,
                    device=device,
                    **offload_setting(resolved.path, device),
                )
            except (ValueError, TypeError) as e:
                raise ShrinkError(f"GPTQModel refuses these settings: {first_line(e)}") from None
            # under a data limit GPTQModel's lazy loader reads its shards with pread instead of
            # mapping each whole shard copy-on-write
            with shards_read_not_mapped(resolved.location, ("gptqmodel",)):
                try:
                    qmodel = GPTQModel.load(resolved.location, qconfig)
                except Exception as e:  # noqa: BLE001 - unsupported architectures: one line
                    raise ShrinkError(
                        f"GPTQModel cannot load '{resolved.name}' for quantization: {first_line(e)}"
                    ) from None
                t0 = time.perf_counter()
                with logs_outside_cwd(), layer_progress(qmodel, hf_config, show_progress):
                    qmodel.quantize(calibration, batch_size=config.batch_size)
                seconds = time.perf_counter() - t0
                qmodel.save(str(tmp))
        del qmodel
        gc.collect()
        keep_generation_config(resolved.path, tmp)
        bpw, count = bits_per_weight(tmp, linears)
        size_before = safetensors_bytes(resolved.path) if resolved.path is not None else 0
        size_after = safetensors_bytes(tmp)
        record = {
            "method": "gptq",
            "source": resolved.location,
            "bits": bits,
            "group_size": g,
            "group_size_requested": config.group_size,
            "group_size_note": note,
            "desc_act": config.desc_act,
            "sym": config.sym,
            "damp": config.damp,
            "format": "gptq",
            "device": device,
            "calibration": blocks.describe(),
            "quantize_seconds": round(seconds, 2),
            "size_bytes_before": size_before,
            "size_bytes_after": size_after,
            "bits_per_weight": round(bpw, 4),
            "quantized_linears": count,
            "perplexity_before": ppl_before,
            "perplexity_after": None,  # set by the check
            "evaluation": eval_blocks.describe() if eval_blocks is not None else None,
            "tools": {"gptqmodel": gptqmodel_version, "optimum": _dist_version("optimum")},
        }
        result = GptqResult(
            Path(output),
            bits,
            g,
            config.group_size,
            note,
            config.desc_act,
            config.sym,
            config.damp,
            device,
            blocks.describe(),
            seconds,
            size_before,
            size_after,
            bpw,
            count,
            ppl_before,
            None,
            record["evaluation"],
        )

        def check_it(folder: Path) -> dict:
            from shrink.runtime import kinds

            v = kinds.verify(
                folder,
                "gptq",
                eval_data=evaluation.data if evaluation is not None else None,
                samples=evaluation.samples if evaluation else 0,
                seq_len=evaluation.seq_len if evaluation else 0,
                seed=evaluation.seed if evaluation else 0,
                device=device,
            )
            result.perplexity_after = record["perplexity_after"] = v.get("perplexity")
            return v

        return StageOutput(result, record, check_it, {"source_model": str(model_dir)})

    return run_stage(
        "quantize",
        output,
        compute,
        source=resolved.path,
        settings=config.settings(),
        force=force,
        verify=verify,
        log=stderr.print if show_progress else None,
    )


def source_perplexity(
    model: str, folder: Path | None, blocks, set_name: str, device: str, book, show_progress: bool
) -> float:
    """The source's perplexity on the evaluation set: from its shrink.json when the stage that
    wrote it measured what it saved on this very set (heal does), else from the build's book,
    else measured."""
    from shrink.core.measures import measure
    from shrink.core.models import load_model

    record = read_shrink_json(folder) or {}
    last = (record.get("stages") or [{}])[-1]
    if (last.get("evaluation") or {}).get("set") == set_name and last.get(
        "perplexity_after"
    ) is not None:
        return float(last["perplexity_after"])
    loaded = load_model(model, device=device)
    value = measure(
        book,
        loaded.model,
        blocks.input_ids,
        set_name,
        "quantize",
        "before",
        show_progress=show_progress,
    ).perplexity
    del loaded
    gc.collect()
    return value


def offload_setting(folder: Path | None, device: str) -> dict:
    """GPTQModel's disk offload (on by default) only when the model would not fit in memory:
    for a model that fits it only adds writes and reads of every layer."""
    import dataclasses

    from gptqmodel import QuantizeConfig as GPTQConfig

    if "offload_to_disk" not in {f.name for f in dataclasses.fields(GPTQConfig)}:
        return {}
    need = 3 * safetensors_bytes(folder) if folder is not None else None  # fp32 copy + work
    from shrink.streaming.memory import available_memory

    fits = need is not None and need < available_memory("cpu")
    return {"offload_to_disk": not fits}


@contextmanager
def layer_progress(qmodel, hf_config, show_progress: bool):
    """'GPTQ layer i of N' with an ETA, from GPTQModel's layer-complete callback."""
    from shrink.core.models import text_config
    from shrink.core.progress import progress_bar

    n = getattr(text_config(hf_config), "num_hidden_layers", None)
    if not show_progress or not isinstance(n, int):
        yield
        return
    ticks = progress_bar(iter(range(n)), "GPTQ layer", total=n)
    next(ticks, None)

    class Callback:
        def layer_complete(self, layer_idx: int, submodule_finalized: bool):
            if not submodule_finalized:
                next(ticks, None)

    saved = getattr(qmodel, "layer_callback", None)
    qmodel.layer_callback = Callback()
    try:
        yield
    finally:
        qmodel.layer_callback = saved
        for _ in ticks:  # finish the bar
            pass


def keep_generation_config(source: Path | None, out: Path) -> None:
    """GPTQModel rewrites generation_config.json ("auto-fixing" it to ``do_sample: true``); an
    artifact must decode like its source, so the source's file is put back (or GPTQModel's
    removed when the source had none)."""
    src = (source / "generation_config.json") if source is not None else None
    dst = out / "generation_config.json"
    if src is not None and src.is_file():
        shutil.copy2(src, dst)
    elif dst.exists():
        dst.unlink()


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- verification in a fresh process: the real consumer is transformers.from_pretrained ---


def verify_gptq_dir(
    path: str | Path,
    eval_data: str | None = EVALUATION,
    samples: int = 16,
    seq_len: int = 512,
    seed: int = 0,
    device: str | None = None,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 8,
) -> dict:
    """Load a GPTQ folder with ``AutoModelForCausalLM.from_pretrained`` (GPTQModel + optimum
    behind it); check finite logits and greedy generation; measure perplexity on ``eval_data``."""
    from transformers import AutoTokenizer

    from shrink.core.perplexity import perplexity

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    model = from_pretrained_checked(path, device_map=device)
    load_seconds = time.perf_counter() - t0
    model.eval()
    qlinear = type(
        model.get_submodule(
            next(iter(n for n, m in model.named_modules() if hasattr(m, "qweight")))
        )
    ).__name__
    enc = tok(prompt, return_tensors="pt").to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        logits = model(**enc).logits
        finite = bool(torch.isfinite(logits).all())
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
    new = cached[0, enc["input_ids"].shape[1] :]
    result = {
        "loaded_with": "transformers.AutoModelForCausalLM.from_pretrained",
        "quant_linear": qlinear,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": device,
        "load_seconds": round(load_seconds, 2),
        "finite_logits": finite,
        "generated_tokens": int(new.numel()),
        # informative only: in 16-bit arithmetic an argmax may flip between the two paths
        "cache_matches_no_cache": bool(torch.equal(cached, uncached)),
        "prompt": prompt,
        "completion": tok.decode(new, skip_special_tokens=True),
    }
    if eval_data:
        blocks = token_blocks(tok, eval_data, samples, seq_len, seed)
        ppl = perplexity(model, blocks.input_ids, show_progress=False)
        result.update(
            perplexity=ppl.perplexity,
            perplexity_seconds=round(ppl.seconds, 2),
            evaluation=blocks.describe(),
        )
    result["ok"] = finite and new.numel() > 0 and math.isfinite(result.get("perplexity", 0.0))
    return result


class QuantizeStage(Stage):
    """GPTQ the (healed) model; the evaluate stage measures it, so this stage does not."""

    name = "quantize"

    def check(self, ctx: BuildContext) -> None:
        q = self.settings(ctx)
        if q.group_size not in (None, -1):
            choose_group_size(quantizable_linears(load_config(ctx.source)), q.group_size)

    def describe(self, ctx: BuildContext) -> str:
        q = self.settings(ctx)
        return f"quantize (GPTQ {q.gptq}, {q.samples} x {q.seq_len} calibration tokens of {q.data})"

    def output_part(self, config) -> str:
        return f"gptq{self.settings_of(config).bits()}"

    def disk_bytes(self, ctx: BuildContext) -> int:
        return ctx.source_bytes() // 2

    def run(self, ctx: BuildContext, work_dir: Path) -> dict:
        # no evaluation here: the evaluate stage measures the input and the output of this
        # stage on the same blocks; measuring here too would reload the float model for it
        r = quantize(
            ctx.model,
            work_dir / "model",
            self.settings(ctx),
            evaluation=None,
            device=ctx.config.device,
            force=True,
            show_progress=ctx.show_progress,
        )
        return {
            "model": str(work_dir / "model"),
            "quantized": str(work_dir / "model"),
            "bits": r.bits,
            "group_size": r.group_size,
            "group_size_note": r.group_size_note,
            "bits_per_weight": r.bits_per_weight,
            "size_bytes": r.size_bytes_after,
        }

    def apply(self, ctx: BuildContext, result: dict) -> None:
        ctx.model = result["model"]  # exports that quantize themselves keep the float model
        ctx.add(Artifact("gptq", Path(result["model"]), "quantized"))

    def report(self, ctx: BuildContext, result: dict) -> dict:
        return {"quantize": result}

    def absent_report(self, ctx: BuildContext) -> dict:
        return {"quantize": None}
