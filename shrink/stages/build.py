"""``shrink build``: score -> prune -> heal -> GPTQ and/or ONNX -> evaluate -> report.

Each stage writes into ``OUT/stages/NN-name/`` and, when it completes, a marker
``OUT/stages/NN-name/done.json`` holding a hash of the stage's settings and of the previous
stage's marker. ``resume=True`` skips every stage whose marker matches and reruns the rest, so a
changed setting reruns from the first stage it affects. Every stage is deterministic for a seed,
so an interrupted and resumed build ends with the same weights as an uninterrupted one. Final
artifacts are ``OUT/model`` (HF or GPTQ folder) and ``OUT/onnx``, each moved into place
atomically, plus ``OUT/README.md`` (a Hugging Face model card) and ``OUT/report.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from shrink.core.data import CALIBRATION, EVALUATION, HEALING
from shrink.core.errors import ShrinkError
from shrink.core.outputs import atomic_output, check_replaceable, existing_ancestor, safetensors_bytes
from shrink.core.progress import stderr

MARKER = "done.json"


@dataclass
class BuildSettings:
    """Everything a build does; a YAML recipe holds the same keys."""

    model: str = "smollm2-135m"
    drop: int | None = None
    layers: list[int] | None = None
    strategy: str = "bi"
    skip_first: int = 1
    calib: str = CALIBRATION
    calib_samples: int = 32
    calib_seq_len: int = 256
    heal: bool = True
    method: str = "lora"
    preset: str | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None
    heal_steps: int | None = 100
    lr: float | None = None
    warmup: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    heal_seq_len: int | None = None
    heal_data: str = HEALING
    teacher: str | None = None
    temperature: float = 2.0
    kd_alpha: float | None = None
    gptq: str | None = None  # "4bit", "8bit", ...
    group_size: int | None = None
    desc_act: bool = False
    sym: bool = True
    damp: float = 0.01
    gptq_samples: int = 64
    gptq_seq_len: int = 512
    onnx: str | None = None  # "int4", "fp16", "fp32"
    onnx_target: str = "cpu"
    onnx_lm_head: str = "int8"
    eval_data: str = EVALUATION
    eval_samples: int = 8
    eval_seq_len: int = 512
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name for f in dataclasses.fields(BuildSettings)}


def load_recipe(path_or_name: str) -> dict:
    """Read a YAML recipe (a path, or the name of a recipe shipped with shrink)."""
    import yaml

    p = Path(path_or_name).expanduser()
    if not p.is_file():
        shipped = resources.files("shrink") / "recipes" / f"{path_or_name}.yaml"
        if not shipped.is_file():
            names = sorted(f.name[:-5] for f in (resources.files("shrink") / "recipes").iterdir()
                           if f.name.endswith(".yaml"))
            raise ShrinkError(f"no recipe '{path_or_name}': give a YAML file or one of "
                              f"{', '.join(names)}")
        text = shipped.read_text()
    else:
        text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ShrinkError(f"recipe {path_or_name} is not valid YAML: {str(e).splitlines()[0]}"
                          ) from None
    if not isinstance(data, dict):
        raise ShrinkError(f"recipe {path_or_name} must be a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS - {"output", "description"})
    if unknown:
        raise ShrinkError(f"recipe {path_or_name}: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(FIELDS))}")
    return data


def make_settings(values: dict) -> BuildSettings:
    """BuildSettings from a dict, with types checked (recipes are user input)."""
    out = BuildSettings()
    for f in dataclasses.fields(BuildSettings):
        if f.name not in values or values[f.name] is None:
            continue
        v = values[f.name]
        default = getattr(out, f.name)
        kind = type(default) if default is not None else None
        if f.name == "layers":
            if not (isinstance(v, list) and all(isinstance(i, int) for i in v)):
                raise ShrinkError("setting 'layers' must be a list of integers")
        elif kind is bool and not isinstance(v, bool):
            raise ShrinkError(f"setting '{f.name}' must be true or false, got {v!r}")
        elif kind in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ShrinkError(f"setting '{f.name}' must be a number, got {v!r}")
        elif f.name in ("drop", "rank", "heal_steps", "warmup", "batch_size", "grad_accum",
                        "heal_seq_len", "group_size") and not isinstance(v, int):
            raise ShrinkError(f"setting '{f.name}' must be an integer, got {v!r}")
        setattr(out, f.name, v)
    return out


# ----------------------------------------------------------------------------- checks


def validate(s: BuildSettings) -> int:
    """Check settings before any stage runs; returns the model's layer count."""
    from shrink.stages.quantize import parse_bits
    from shrink.core.models import load_config, num_layers, resolve
    from shrink.stages.prune import STRATEGIES, check_remove, choose_layers

    if s.strategy not in STRATEGIES:
        raise ShrinkError(f"unknown strategy '{s.strategy}'; use one of {', '.join(STRATEGIES)}")
    L = num_layers(load_config(resolve(s.model), s.trust_remote_code))
    if s.layers is not None:
        check_remove(list(s.layers), L)
    elif s.drop is None:
        raise ShrinkError("give --drop N (or layers in the recipe)")
    else:
        choose_layers("last", s.drop, L)
    if s.gptq is not None:
        parse_bits(s.gptq)
    if s.onnx is not None:
        if s.onnx not in ("int4", "fp16", "fp32"):
            raise ShrinkError(f"unknown ONNX precision '{s.onnx}'; use int4, fp16 or fp32")
        if s.onnx_target not in ("cpu", "cuda"):
            raise ShrinkError(f"unknown ONNX target '{s.onnx_target}'; use cpu or cuda")
        if s.onnx_lm_head not in ("int8", "int4"):
            raise ShrinkError(f"unknown ONNX LM head '{s.onnx_lm_head}'; use int8 or int4")
        if s.onnx == "fp16" and s.onnx_target == "cpu":
            raise ShrinkError("--onnx fp16 needs --onnx-target cuda (fp16 ONNX runs on GPUs)")
    if s.heal:
        if s.method not in ("lora", "qlora"):
            raise ShrinkError(f"unknown heal method '{s.method}'; use lora or qlora")
        if s.heal_steps is not None and s.heal_steps < 1:
            raise ShrinkError("--heal-steps must be >= 1")
    return L


def estimate_disk(s: BuildSettings, source: Path | None) -> int:
    """Bytes the build will write at most: pruned and healed copies, GPTQ, ONNX, finals."""
    base = safetensors_bytes(source) if source is not None else 0
    total = base  # prune
    if s.heal:
        total += base * 2  # healed model + trainer checkpoints (adapter-sized, bounded by base)
    if s.gptq:
        total += base // 2
    if s.onnx:
        total += base if s.onnx == "fp32" else base // 2
    total += base  # final copies
    return total


def check_disk(out: Path, need: int) -> None:
    probe = existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ShrinkError(f"not enough disk space in {probe}: the build writes about "
                          f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


# ----------------------------------------------------------------------------- stages


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(stage_dir: Path, key: str) -> dict | None:
    f = stage_dir / MARKER
    if not f.is_file():
        return None
    marker = json.loads(f.read_text())
    return marker if marker.get("key") == key else None


def _mark(stage_dir: Path, key: str, info: dict) -> dict:
    marker = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    tmp = stage_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str))
    os.replace(tmp, stage_dir / MARKER)
    return marker


@dataclass
class StageRun:
    name: str
    key: str
    skipped: bool
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class BuildResult:
    output: Path
    settings: BuildSettings
    stages: list[StageRun]
    report: dict

    def to_dict(self) -> dict:
        return {"output": str(self.output), "settings": self.settings.to_dict(),
                "stages": [asdict(s) for s in self.stages], "report": self.report}


def _stage_list(s: BuildSettings) -> list[str]:
    names = ["prune"]
    if s.heal:
        names.append("heal")
    if s.gptq:
        names.append("quantize")
    if s.onnx:
        names.append("export")
    return names + ["evaluate"]


def _stage_settings(name: str, s: BuildSettings) -> dict:
    d = s.to_dict()
    keys = {
        "prune": ["model", "drop", "layers", "strategy", "skip_first", "calib", "calib_samples",
                  "calib_seq_len", "seed", "dtype", "trust_remote_code"],
        "heal": ["method", "preset", "rank", "alpha", "targets", "heal_steps", "lr", "warmup",
                 "batch_size", "grad_accum", "heal_seq_len", "heal_data", "teacher",
                 "temperature", "kd_alpha", "seed", "eval_data"],
        "quantize": ["gptq", "group_size", "desc_act", "sym", "damp", "calib", "gptq_samples",
                     "gptq_seq_len", "seed"],
        "export": ["onnx", "onnx_target", "onnx_lm_head", "gptq"],
        "evaluate": ["eval_data", "eval_samples", "eval_seq_len", "model"],
    }[name]
    return {k: d[k] for k in keys}


def _run_stage(name: str, s: BuildSettings, stage_dir: Path, inputs: dict[str, Path],
               show_progress: bool) -> dict:
    """Run one stage into stage_dir; return what later stages and the report need."""
    if name == "prune":
        from shrink.stages.prune import prune

        r = prune(s.model, stage_dir / "model", drop=s.drop, strategy=s.strategy,
                  layers=s.layers, calib=s.calib, samples=s.calib_samples,
                  seq_len=s.calib_seq_len, seed=s.seed, skip_first=s.skip_first, dtype=s.dtype,
                  device=s.device, force=True, trust_remote_code=s.trust_remote_code,
                  show_progress=show_progress)
        return {"model": str(stage_dir / "model"), "removed": r.removed, "reason": r.reason,
                "strategy": r.strategy, "num_layers": [r.num_layers_before, len(r.kept)],
                "params": [r.params_before, r.params_after],
                "scores": r.scores.to_dict() if r.scores is not None else None}
    if name == "heal":
        from shrink.stages.heal import heal

        r = heal(str(inputs["model"]), stage_dir / "model", method=s.method, rank=s.rank,
                 alpha=s.alpha, targets=s.targets, steps=s.heal_steps, lr=s.lr, warmup=s.warmup,
                 batch_size=s.batch_size, grad_accum=s.grad_accum, seq_len=s.heal_seq_len,
                 data=s.heal_data, eval_data=s.eval_data, seed=s.seed, teacher=s.teacher,
                 temperature=s.temperature, kd_alpha=s.kd_alpha, preset=s.preset, force=True,
                 resume=True, device=s.device, show_progress=show_progress)
        return {"model": str(stage_dir / "model"), "steps": r.steps, "final_loss": r.final_loss,
                "ppl_before": r.ppl_before, "ppl_after": r.ppl_after, "settings": r.settings}
    if name == "quantize":
        from shrink.stages.quantize import quantize_gptq

        # eval_samples=0: the evaluate stage measures the input and the output of this stage on
        # the same blocks; measuring here too would reload the full-precision model for it
        r = quantize_gptq(inputs["model"], stage_dir / "model", bits=s.gptq,
                          group_size=s.group_size, desc_act=s.desc_act, sym=s.sym, damp=s.damp,
                          calib=s.calib, samples=s.gptq_samples, seq_len=s.gptq_seq_len,
                          seed=s.seed, eval_samples=0, device=s.device, force=True,
                          show_progress=show_progress)
        return {"model": str(stage_dir / "model"), "quantized": str(stage_dir / "model"),
                "bits": r.bits, "group_size": r.group_size, "group_size_note": r.group_size_note,
                "bits_per_weight": r.bits_per_weight, "size_bytes": r.size_bytes_after}
    if name == "export":
        from shrink.stages.export.onnx import export_onnx

        # int4 from the GPTQ checkpoint when there is one (the builder keeps its calibrated
        # weights; measured better than the builder's own round-to-nearest int4), else from
        # the full-precision model
        src = inputs["model"] if s.onnx == "int4" else inputs["float_model"]
        r = export_onnx(src, stage_dir / "onnx", precision=s.onnx, target=s.onnx_target,
                        lm_head=s.onnx_lm_head, force=True,
                        log=stderr.print if show_progress else None)
        return {"onnx": str(stage_dir / "onnx"), "kv_cache": r.kv_cache, "method": r.method,
                "lm_head": r.lm_head,
                "size_bytes": r.folder_bytes, "verification": r.verification}
    if name == "evaluate":
        from shrink.stages.evaluate import evaluate

        rows = {}
        for label, path in inputs["evaluate"].items():
            res = evaluate(path, data=s.eval_data, samples=s.eval_samples,
                           seq_len=s.eval_seq_len, seed=0, device=s.device,
                           show_progress=show_progress)
            rows[label] = {"perplexity": res.perplexity, "tokens": res.tokens,
                           "path": str(path)}
        return {"perplexity": rows}
    raise AssertionError(name)


def default_output(s: BuildSettings) -> str:
    base = Path(s.model.rstrip("/")).name or "model"
    parts = [base, f"drop{s.drop if s.layers is None else len(s.layers)}"]
    if s.heal:
        parts.append("healed")
    if s.gptq:
        parts.append(f"gptq{s.gptq.replace('bit', '')}")
    if s.onnx:
        parts.append(f"onnx-{s.onnx}")
    return "-".join(parts)


def build(settings: BuildSettings, output: str | Path | None = None, resume: bool = False,
          force: bool = False, command: str | None = None, recipe_text: str | None = None,
          show_progress: bool = True) -> BuildResult:
    """Run the whole chain into ``output``; see the module docstring."""
    from shrink.core.models import resolve

    s = settings
    L = validate(s)
    out = Path(output or default_output(s)).expanduser()
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"output '{out}' exists and is a file")
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise ShrinkError(f"output folder '{out}' exists and is not empty (use --resume to "
                          "continue it, --force to start over)")
    resolved = resolve(s.model)
    check_disk(out, estimate_disk(s, resolved.path))
    if force and not resume and out.exists():
        if any(out.iterdir()):
            check_replaceable(out)
        shutil.rmtree(out)
    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    names = _stage_list(s)
    runs: list[StageRun] = []
    state: dict = {"model": None}
    prev_key = _hash({"source": resolved.location, "layers": L})
    info_by_stage: dict[str, dict] = {}
    for n, name in enumerate(names, 1):
        stage_dir = stages_dir / f"{n:02d}-{name}"
        key = _hash({"stage": name, "settings": _stage_settings(name, s), "input": prev_key})
        marker = _done(stage_dir, key) if resume else None
        t0 = time.perf_counter()
        if marker is None:
            if stage_dir.exists() and name != "heal":  # heal resumes its own checkpoints
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            if show_progress:
                stderr.rule(f"[bold]stage {n}/{len(names)}: {name}")
            inputs = {"model": Path(state["model"]) if state["model"] else None,
                      "float_model": Path(state.get("float_model") or state["model"] or "."),
                      "evaluate": _eval_targets(s, info_by_stage)}
            info = _run_stage(name, s, stage_dir, inputs, show_progress)
            marker = _mark(stage_dir, key, {"stage": name, "info": info,
                                            "seconds": time.perf_counter() - t0})
            skipped = False
        else:
            skipped = True
            if show_progress:
                stderr.print(f"stage {n}/{len(names)}: {name} [green]done earlier[/] (resume)")
        info = marker["info"]
        info_by_stage[name] = info
        if name in ("prune", "heal"):
            state["model"] = info["model"]
            state["float_model"] = info["model"]
        elif name == "quantize":
            state["model"] = info["model"]
        runs.append(StageRun(name, key, skipped, marker.get("seconds", 0.0), info))
        prev_key = key
    report = _finish(out, s, resolved, state, info_by_stage, runs, command, recipe_text)
    return BuildResult(out, s, runs, report)


def _eval_targets(s: BuildSettings, info: dict) -> dict[str, str]:
    """What the evaluate stage measures: the source and every artifact the build made."""
    targets = {"dense": s.model}
    for stage, label, key in (("prune", "pruned", "model"), ("heal", "healed", "model"),
                              ("quantize", "quantized", "model"), ("export", "onnx", "onnx")):
        if stage in info:
            targets[label] = info[stage][key]
    return targets


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst, force=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _finish(out: Path, s: BuildSettings, resolved, state: dict, info: dict,
            runs: list[StageRun], command: str | None, recipe_text: str | None) -> dict:
    from shrink import __version__
    from shrink.analysis.estimate import flops_per_token, weight_memory
    from shrink.core.models import read_shrink_json
    import yaml

    from shrink.report.modelcard import model_card

    final_model = Path(state["model"])
    _copy_atomic(final_model, out / "model")
    if "export" in info:
        _copy_atomic(Path(info["export"]["onnx"]), out / "onnx")
    record = read_shrink_json(out / "model") or {}
    dense_cfg = json.loads((Path(resolved.path) / "config.json").read_text()) if resolved.path \
        else None
    pruned_cfg = json.loads((Path(info["prune"]["model"]) / "config.json").read_text())
    ctx = 2048
    arith = {}
    try:
        for label, cfg in (("dense", dense_cfg), ("pruned", pruned_cfg)):
            if cfg is None:
                continue
            f = flops_per_token(cfg, context=ctx)
            w = weight_memory(cfg, bits=16)
            arith[label] = {"flops_per_token": f.total, "matmul_flops_per_token": f.matmul,
                            "weight_bytes_fp16": w.total_bytes,
                            "layers": cfg.get("num_hidden_layers")}
    except ShrinkError as e:
        arith["error"] = str(e)
    sizes = {"dense": safetensors_bytes(Path(resolved.path)) if resolved.path else None,
             "pruned": safetensors_bytes(Path(info["prune"]["model"])),
             "final_model": safetensors_bytes(out / "model")}
    if "export" in info:
        sizes["onnx"] = info["export"]["size_bytes"]
    ppl = dict(info.get("evaluate", {}).get("perplexity", {}))
    report = {
        "shrink_version": __version__, "source_model": s.model,
        "base_model": record.get("base_model"), "settings": s.to_dict(),
        "removed_layers": info["prune"]["removed"], "strategy": info["prune"]["strategy"],
        "reason": info["prune"]["reason"], "num_layers": info["prune"]["num_layers"],
        "params": info["prune"]["params"], "sizes_bytes": sizes, "perplexity": ppl,
        "arithmetic": {"context": ctx, **arith},
        "heal": info.get("heal"), "quantize": info.get("quantize"),
        "export": {k: v for k, v in info.get("export", {}).items() if k != "verification"}
        if "export" in info else None,
        "stages": [{"name": r.name, "seconds": r.seconds, "skipped": r.skipped, "key": r.key}
                   for r in runs],
        "command": command, "artifacts": {"model": "model", **({"onnx": "onnx"} if "export" in
                                                               info else {})},
    }
    scores = info["prune"].get("scores")
    plot = None
    if scores:
        from shrink.report.plots import plot_scores
        from shrink.core.scores import LayerScores

        plot = plot_scores(LayerScores.from_dict(scores), out / "scores.png",
                           chosen=info["prune"]["removed"])
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    effective = yaml.safe_dump({k: v for k, v in s.to_dict().items() if v is not None},
                               sort_keys=False)
    (out / "recipe.yaml").write_text("# every setting of this build: shrink build --config "
                                     "recipe.yaml\n" + effective)
    (out / "README.md").write_text(model_card(report, scores, plot is not None,
                                              recipe_text or effective))
    return report


def command_line() -> str | None:
    """The command as typed, when shrink runs as the command-line program."""
    if "build" not in sys.argv[1:]:
        return None  # called through the Python API or a test runner
    return "shrink " + " ".join(shlex.quote(a) for a in sys.argv[1:])
