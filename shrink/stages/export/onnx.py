"""Export a decoder LLM folder to ONNX for edge runtimes.

The main path is the onnxruntime-genai model builder (run offline on the local folder, in a child
process): it writes ``model.onnx`` with a KV cache, ``genai_config.json`` and the tokenizer files;
``int4`` uses MatMulNBits for the decoder layers; the LM head, the largest and most
output-sensitive matrix, is 8-bit by default (``lm_head="int8"``; measured on the embedded model:
perplexity 111 -> 95 for a round-to-nearest export, 96 -> 84 from a GPTQ checkpoint, for about
40% more bytes) and the input embedding 4-bit. ``lm_head="int4"`` gives the smallest file. The
builder also takes a GPTQ checkpoint as input and keeps its calibrated 4-bit weights. It runs
through :mod:`shrink.stages.export.genai_builder`, which first fixes what the builder reads wrongly
under transformers 5 (Gemma 3's per-attention-type rope parameters).

For an architecture the builder cannot build, the fallback is ``torch.onnx.export`` of the forward
pass (no KV cache: every new token re-runs the whole sequence) plus onnxruntime's int4 weight
quantizer. shrink says so in its output and in ``shrink.json`` (``kv_cache: false``).

Every export is verified in a fresh process against PyTorch before it is moved into place.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.outputs import check_output, folder_bytes
from shrink.core.quiet import third_party_quiet
from shrink.runtime.artifacts import is_onnx_folder
from shrink.runtime.onnx import ONNX_EXTRA, ONNX_GPU_EXTRA
from shrink.stages.configs import ExportConfig
from shrink.stages.runner import StageOutput, run_stage

PRECISIONS = ("int4", "fp16", "fp32")
LM_HEADS = ("int8", "int4")  # the LM head's bits in an int4 export
TARGETS = ("cpu", "cuda")
PROMPTS = ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):")
NEW_TOKENS = 32
FP32_LOGIT_TOL = 1e-3  # max abs difference of first-step logits, fp32 export vs PyTorch
NO_KV_NOTE = (
    "no KV cache: this ONNX model is the forward pass only (torch.onnx.export), so every "
    "new token re-runs the whole sequence; onnxruntime-genai cannot load it, shrink "
    "generate runs it with plain onnxruntime"
)


@dataclass
class OnnxResult:
    output: Path
    precision: str
    target: str
    method: str  # "onnxruntime-genai builder" or "torch.onnx.export"
    kv_cache: bool
    model_bytes: int  # .onnx + external data
    folder_bytes: int
    source_bytes: int
    lm_head: str | None = None  # "int8" / "int4" in an int4 export, else None (same as the body)
    builder_error: str | None = None
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "precision": self.precision,
            "target": self.target,
            "method": self.method,
            "kv_cache": self.kv_cache,
            "model_bytes": self.model_bytes,
            "folder_bytes": self.folder_bytes,
            "source_bytes": self.source_bytes,
            "lm_head": self.lm_head,
            "builder_error": self.builder_error,
            "verification": self.verification,
        }


# ----------------------------------------------------------------------------------------------
# Environment checks
# ----------------------------------------------------------------------------------------------


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_runtime(target: str = "cpu") -> dict:
    """Fail with one line when the ONNX stack is missing, mixed (CPU and GPU builds of
    onnxruntime share one package folder) or cannot serve ``target``. Returns versions."""
    for cpu, gpu in (
        ("onnxruntime", "onnxruntime-gpu"),
        ("onnxruntime-genai", "onnxruntime-genai-cuda"),
    ):
        if _installed(cpu) and _installed(gpu):
            raise ShrinkError(
                f"both {cpu} and {gpu} are installed; they share one package folder and break "
                f"each other: run 'pip uninstall -y {cpu} {gpu}', then {ONNX_EXTRA} or "
                f"{ONNX_GPU_EXTRA} (one of them)"
            )
    versions = {}
    for module in ("onnx", "onnxruntime", "onnxruntime_genai"):
        try:
            mod = __import__(module)
        except ImportError as e:
            raise ShrinkError(
                f"ONNX export needs {module.replace('_', '-')} ({e}): run "
                f"{ONNX_EXTRA} (or {ONNX_GPU_EXTRA} for --target cuda)"
            ) from None
        versions[module] = getattr(mod, "__version__", "?")
    import onnxruntime as ort

    if target == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ShrinkError(
            "--target cuda needs onnxruntime with CUDA (CUDAExecutionProvider is "
            f"not available here): run {ONNX_GPU_EXTRA} on a machine with an "
            "NVIDIA GPU, or use --target cpu"
        )
    return versions


def _source_folder(model_dir: str | Path) -> Path:
    from shrink.core.models import EMBEDDED, ensure_embedded

    if str(model_dir).lower() == EMBEDDED:
        return ensure_embedded()
    p = Path(model_dir).expanduser()
    if not p.exists():
        raise ShrinkError(
            f"no such model folder '{model_dir}' (ONNX export needs a local Hugging Face folder)"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ShrinkError(f"'{model_dir}' is not a model folder (no config.json in it)")
    if is_onnx_folder(p):
        raise ShrinkError(f"'{model_dir}' is already an ONNX folder; give the Hugging Face folder")
    return p.resolve()


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln
    return lines[-1] if lines else "no output"


# ----------------------------------------------------------------------------------------------
# Export paths
# ----------------------------------------------------------------------------------------------


def builder_options(
    precision: str, lm_head: str | None, tied: bool, block_size: int | None = None
) -> list[str]:
    """The model builder's ``--extra_options`` for an export (``block_size``: int4 weight
    blocks; None for a GPTQ source, whose groups the builder keeps)."""
    options = ["hf_token=false"]
    if precision == "int4" and block_size is not None:
        options.append(f"block_size={block_size}")
    if precision == "int4" and lm_head == "int8":
        options.append("matmul_mixed_precision=last_matmul:int8")
        if tied:
            # the builder 0.18 writes a broken graph for a shared embedding whose LM head is
            # 8-bit (an initializer goes missing): untie them, and keep the embedding 4-bit
            options += ["shared_embeddings=false", "op_types_to_quantize=MatMul/Gather"]
    return options


def _run_builder(
    src: Path,
    out: Path,
    precision: str,
    target: str,
    options: list[str],
    layers: int | None = None,
    show_progress: bool = False,
) -> tuple[bool, str]:
    """Run the onnxruntime-genai model builder in a child process. Returns (ok, error line)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with tempfile.TemporaryDirectory(prefix="shrink-onnx-cache-") as cache:
        # the builder's command line, run through shrink's wrapper (genai_builder), which
        # first patches what the builder reads wrongly under transformers 5 (Gemma 3's rope)
        cmd = [
            sys.executable,
            "-m",
            "shrink.stages.export.genai_builder",
            "-i",
            str(src),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            target,
            "-c",
            cache,
            "--extra_options",
            *options,
        ]
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc:
            lines = _builder_lines(proc.stdout, layers, show_progress)
    if proc.returncode != 0:
        return False, _last_error_line("\n".join(lines))
    if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        return False, "the builder finished without writing model.onnx and genai_config.json"
    return True, ""


def _builder_lines(stream, layers: int | None, show_progress: bool) -> list[str]:
    """The builder's output lines; with ``show_progress``, a bar over its phase lines."""
    from shrink.core.progress import progress_bar

    steps = (layers or 0) + 4  # embedding, each layer, final norm, LM head, saving
    ticks = progress_bar(iter(range(steps)), "ONNX builder", show_progress and bool(layers), steps)
    next(ticks, None)
    lines = []
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith(("Reading layer", "Reading final", "Reading LM", "Saving ONNX")):
            next(ticks, None)
    list(ticks)  # the bar ends full
    return lines


def _untie_transposed_weights(model) -> None:
    """torch.onnx.export writes a tied LM head as MatMul(x, Transpose(embedding)); give that
    MatMul its own constant so the int4 quantizer can reach it, and drop the Transpose."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    dropped = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        p = producer.get(node.input[1])
        if p is None or p.op_type != "Transpose" or p.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in p.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            continue
        name = p.input[0] + ".transposed"
        if name not in inits:
            arr = numpy_helper.to_array(inits[p.input[0]]).T.copy()
            graph.initializer.append(numpy_helper.from_array(arr, name))
            inits[name] = graph.initializer[-1]
        node.input[1] = name
        dropped.append(p)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for p in dropped:
        if p.output[0] not in used - set(p.output) and p in graph.node:
            graph.node.remove(p)


def _head_matmul(model) -> str | None:
    """Name of the MatMul that produces the logits (walking back through element-wise ops such
    as a final soft-cap), or None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get("logits")
    for _ in range(16):
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node.name
        node = next((producer[i] for i in node.input if i in producer), None)
    return None


def _torch_export(
    src: Path,
    out: Path,
    precision: str,
    target: str,
    lm_head: str | None = None,
    block_size: int = 32,
) -> str | None:
    """Forward pass only (input_ids, attention_mask -> logits), then int4 weights if asked.
    Returns the LM head's precision in an int4 export (int4 when no head MatMul is found)."""
    import torch
    from transformers import AutoConfig

    from shrink.core.models import load_model

    config = AutoConfig.from_pretrained(src)
    if getattr(config, "quantization_config", None):
        raise ShrinkError(
            "the ONNX fallback (torch.onnx.export) cannot export a quantized "
            "checkpoint; export the unquantized folder with --precision int4"
        )
    loaded = load_model(str(src), dtype="float32", device="cpu")
    model = loaded.model
    if precision == "fp16":
        model = model.half()

    class Forward(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) % config.get_text_config().vocab_size
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=2, max=1 << 16)
    raw = out / "raw" if precision == "int4" else out
    raw.mkdir(exist_ok=True)
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), third_party_quiet():
        # the exporter prints progress and deprecation notes
        torch.onnx.export(
            Forward(model).eval(),
            (ids, torch.ones_like(ids)),
            str(raw / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=21,
            dynamo=True,
            external_data=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
    if precision == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        proto = onnx.load(str(raw / "model.onnx"))
        _untie_transposed_weights(proto)
        head = _head_matmul(proto) if lm_head == "int8" else None
        passes = [(4, [head] if head else None, None)] + ([(8, None, [head])] if head else [])
        for bits, exclude, include in passes:  # 4-bit body, then the 8-bit LM head
            q = MatMulNBitsQuantizer(
                proto,
                bits=bits,
                block_size=block_size,
                is_symmetric=True,
                accuracy_level=4 if target == "cpu" else None,
                nodes_to_exclude=exclude,
                nodes_to_include=include,
                op_types_to_quantize=("MatMul", "Gather"),
                quant_axes=(("MatMul", 0), ("Gather", 1)),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-zero rows (padding embeddings) divide by 0
                q.process()
            proto = q.model.model
        q.model.save_model_to_file(str(out / "model.onnx"), True)
        shutil.rmtree(raw)
        data = out / "model.onnx.data"
        if data.exists():
            data.chmod(0o644)
    loaded.tokenizer.save_pretrained(out)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if precision != "int4":
        return None
    return "int8" if head else "int4"


# ----------------------------------------------------------------------------------------------
# Verification (runs in a fresh process: python -m shrink.stages.export.onnx ONNX_DIR SOURCE PREC)
# ----------------------------------------------------------------------------------------------


def verify_onnx(
    onnx_dir: str | Path,
    source_dir: str | Path,
    precision: str,
    target: str = "cpu",
    eval_samples: int = 4,
    eval_seq_len: int = 128,
    prompts: tuple[str, ...] = PROMPTS,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """Compare the ONNX model with the PyTorch source: greedy tokens on ``prompts``, first-step
    logits, teacher-forced top-1 agreement and perplexity on held-out text."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.core.data import EVALUATION, token_blocks
    from shrink.runtime.onnx import onnx_runner

    runner = onnx_runner(onnx_dir, target)
    tok = AutoTokenizer.from_pretrained(source_dir)
    ref = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0

    greedy = []
    first_diff = 0.0
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([ids]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=eos,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            first = ref(torch.tensor([ids])).logits[0, -1].float().numpy()
        torch_new = out[0, len(ids) :].tolist()
        onnx_new = runner.generate_ids(ids, new_tokens, min_new_tokens=new_tokens)
        onnx_first = runner.logits(ids)[-1]
        first_diff = max(first_diff, float(np.abs(onnx_first - first).max()))
        same = 0
        for a, b in zip(torch_new, onnx_new):
            if a != b:
                break
            same += 1
        greedy.append(
            {
                "prompt": prompt,
                "equal": torch_new == onnx_new,
                "matching_prefix": same,
                "tokens": len(torch_new),
                "onnx_text": tok.decode(onnx_new, skip_special_tokens=True),
            }
        )

    blocks = token_blocks(tok, EVALUATION, eval_samples, eval_seq_len, seed=0)
    nll_t = nll_o = 0.0
    agree = count = 0
    finite = True
    for row in blocks.input_ids:
        ids = row.tolist()
        with torch.no_grad():
            lt = ref(row[None]).logits[0].float()
        lo = torch.from_numpy(runner.logits(ids)).float()
        finite = finite and bool(torch.isfinite(lo).all())
        target_ids = row[1:]
        nll_t += F.cross_entropy(lt[:-1], target_ids, reduction="sum").item()
        nll_o += F.cross_entropy(lo[:-1], target_ids, reduction="sum").item()
        agree += int((lt[:-1].argmax(-1) == lo[:-1].argmax(-1)).sum())
        count += target_ids.numel()
    ppl_t, ppl_o = math.exp(nll_t / count), math.exp(nll_o / count)
    all_equal = all(g["equal"] for g in greedy)
    result = {
        "runtime": "onnxruntime-genai" if runner.kv_cache else "onnxruntime (no KV cache)",
        "precision": precision,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "greedy_equal_to_torch": all_equal,
        "greedy_tokens_matching": sum(g["matching_prefix"] for g in greedy),
        "greedy_tokens_total": sum(g["tokens"] for g in greedy),
        "greedy": greedy,
        "first_step_logits_max_abs_diff": first_diff,
        "eval_data": blocks.describe(),
        "top1_agreement": agree / count,
        "perplexity_torch": ppl_t,
        "perplexity_onnx": ppl_o,
        "finite_logits": finite,
    }
    if precision == "fp32":
        result["logits_tolerance"] = FP32_LOGIT_TOL
        result["ok"] = finite and all_equal and first_diff <= FP32_LOGIT_TOL
    else:  # quantized or half precision: reported, not required to match
        result["ok"] = finite and math.isfinite(ppl_o)
    return result


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def export_onnx(
    model_dir: str | Path,
    output: str | Path,
    config: ExportConfig,
    *,
    force: bool = False,
    verify: bool = True,
    log=None,
) -> OnnxResult:
    """Export a local decoder-LLM folder (HF or GPTQ) to an ONNX folder at ``output``.

    ``config.lm_head`` ("int8" or "int4") sets the LM head's bits in an int4 export. ``log`` (a
    callable taking one line) receives progress notes, e.g. the no-KV-cache warning.
    """
    from shrink.core.models import check_decoder_only, load_config, resolve

    say = log or (lambda line: None)
    precision, target = config.onnx, config.target
    head = config.lm_head if precision == "int4" else None
    check_output(output, force)
    src = _source_folder(model_dir)
    hf_config = load_config(resolve(str(src)))
    check_decoder_only(hf_config)
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    quant_method = qc.get("quant_method")
    if quant_method and quant_method != "gptq":
        raise ShrinkError(
            f"cannot export a '{quant_method}' checkpoint to ONNX; give the "
            "unquantized folder or a GPTQ one"
        )
    if quant_method == "gptq" and precision != "int4":
        raise ShrinkError("a GPTQ checkpoint keeps its 4-bit weights in ONNX: use --onnx int4")
    versions = check_runtime(target)

    def compute(tmp: Path) -> StageOutput:
        nonlocal head
        say(
            f"building ONNX ({precision}{f', {head} LM head' if head else ''}, {target}) with "
            "the onnxruntime-genai model builder"
        )
        tied = bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", False))
        block = None if quant_method else config.block_size
        ok, builder_error = _run_builder(
            src,
            tmp,
            precision,
            target,
            builder_options(precision, head, tied, block),
            getattr(hf_config.get_text_config(), "num_hidden_layers", None),
            log is not None,
        )
        if ok:
            method, kv_cache = "onnxruntime-genai builder", True
        else:
            if not config.fallback or quant_method:
                raise ShrinkError(f"the onnxruntime-genai model builder failed: {builder_error}")
            for f in list(tmp.iterdir()):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            say(
                f"the model builder cannot build this model ({builder_error}); falling back to "
                "torch.onnx.export"
            )
            say(f"warning: {NO_KV_NOTE}")
            head = _torch_export(src, tmp, precision, target, head, config.block_size)
            method, kv_cache = "torch.onnx.export", False
        _keep_generation_config(src, tmp)
        model_bytes = folder_bytes(tmp, (".onnx", ".onnx.data", ".data"))
        record = {
            "format": "onnx",
            "source": str(src),
            "precision": precision,
            "lm_head": head,
            "target": target,
            "method": method,
            "block_size": (block or "GPTQ groups") if precision == "int4" else None,
            "kv_cache": kv_cache,
            "runtime": "onnxruntime-genai" if kv_cache else "onnxruntime",
            "note": None if kv_cache else NO_KV_NOTE,
            "builder_error": builder_error or None,
            "source_quantization": quant_method,
            "model_bytes": model_bytes,
            "source_bytes": folder_bytes(src),
            "files": sorted(f.name for f in tmp.iterdir()),
            "onnx_versions": versions,
        }
        result = OnnxResult(
            Path(output),
            precision,
            target,
            method,
            kv_cache,
            model_bytes,
            folder_bytes(tmp),
            record["source_bytes"],
            head,
            builder_error or None,
        )

        def check_it(folder: Path) -> dict:
            from shrink.runtime import kinds

            return kinds.verify(folder, "onnx", source=src, precision=precision, target=target)

        return StageOutput(result, record, check_it, {"source_model": str(model_dir)})

    return run_stage(
        "export",
        output,
        compute,
        source=src,
        settings=config.settings(),
        force=force,
        verify=verify,
        log=say,
    )


def _keep_generation_config(src: Path, out: Path) -> None:
    """genai_config.json's search settings follow the source's generation config: an artifact
    decodes like its source (greedy unless the source samples)."""
    cfg = out / "genai_config.json"
    if not cfg.is_file():
        return
    f = src / "generation_config.json"
    gen = json.loads(f.read_text()) if f.is_file() else {}
    data = json.loads(cfg.read_text())
    search = data.setdefault("search", {})
    search["do_sample"] = bool(gen.get("do_sample", False))
    if search["do_sample"]:
        search.update({k: gen[k] for k in ("top_k", "top_p", "temperature") if k in gen})
    else:
        search["top_k"] = 1
    cfg.write_text(json.dumps(data, indent=4) + "\n")
