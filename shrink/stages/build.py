"""``shrink build``: score -> prune -> heal -> GPTQ and/or ONNX -> evaluate -> report.

Each stage writes into ``OUT/stages/NN-name/`` and, when it completes, a marker
``OUT/stages/NN-name/done.json`` holding a hash of the stage's settings and of the previous
stage's marker. ``resume=True`` skips every stage whose marker matches and reruns the rest, so a
changed setting reruns from the first stage it affects. Every stage is deterministic for a seed,
so an interrupted and resumed build ends with the same weights as an uninterrupted one. Final
artifacts are ``OUT/model`` (HF or GPTQ folder), ``OUT/onnx`` and ``OUT/gguf``, each moved into place
atomically, plus ``OUT/README.md`` (a Hugging Face model card) and ``OUT/report.json``.
"""
from __future__ import annotations

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

from pydantic import ValidationError

from shrink.stages.configs import BuildConfig, ModelOptions, describe
from shrink.core.errors import ShrinkError
from shrink.core.outputs import (atomic_output, check_not_source, check_replaceable, check_resumable,
                                 existing_ancestor, folder_bytes, lock_output, mark_output,
                                 output_id, safetensors_bytes)
from shrink.core.progress import stderr

MARKER = "done.json"


def load_recipe(path_or_name: str) -> tuple[BuildConfig, str]:
    """A YAML recipe (a path, or the name of a recipe shipped with shrink) as a BuildConfig, and
    its text. Unknown keys, wrong types and impossible values name the key path."""
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
    data.pop("description", None)
    return recipe_config(data, str(path_or_name)), text


def recipe_config(data: dict, where: str = "recipe") -> BuildConfig:
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as e:
        raise ShrinkError(f"{where}: {describe(e)}") from None


def validate(c: BuildConfig) -> int:
    """Check every setting before any stage runs; returns the model's layer count."""
    from shrink.core.models import check_device
    from shrink.stages.prune import check

    check_device(c.device)
    L = check(c.model, c.prune, c.model_options())
    if c.export is not None and not c.export.formats():
        raise ShrinkError("export: choose a format (export: {onnx: int4} or {gguf: q4_k_m})")
    if c.quantize is not None and c.quantize.group_size not in (None, -1):
        from shrink.core.models import load_config, resolve
        from shrink.stages.quantize import choose_group_size, quantizable_linears

        choose_group_size(quantizable_linears(load_config(resolve(c.model))), c.quantize.group_size)
    return L


def estimate_disk(s: BuildConfig, source: Path | None) -> int:
    """Bytes the build will write at most: pruned and healed copies, GPTQ, ONNX, finals."""
    base = safetensors_bytes(source) if source is not None else 0
    total = base  # prune
    if s.heal is not None:
        total += base * 2  # healed model + trainer checkpoints (adapter-sized, bounded by base)
    if s.quantize is not None:
        total += base // 2
    if s.export is not None and s.export.onnx:
        total += base if s.export.onnx == "fp32" else base // 2
    if s.export is not None and s.export.gguf:
        total += base * 2  # the lossless intermediate and the file
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
    settings: BuildConfig
    stages: list[StageRun]
    report: dict

    def to_dict(self) -> dict:
        return {"output": str(self.output), "settings": self.settings.settings(),
                "stages": [asdict(s) for s in self.stages], "report": self.report}


def _inputs(name: str, c: BuildConfig, state: dict) -> dict:
    """A stage's key inputs: its config, the model options and the previous stage's key."""
    cfg = getattr(c, name)
    return {"stage": name, "config": cfg.settings(), "load": c.model_options().settings(),
            "input": state["key"]}


def _run(name: str, c: BuildConfig, stage_dir: Path, state: dict, resume: bool,
         show_progress: bool) -> dict:
    """Run one stage into stage_dir; return what later stages and the report need."""
    load = c.model_options()
    if name == "prune":
        from shrink.stages.prune import prune

        r = prune(c.model, stage_dir / "model", c.prune, load=load, force=True,
                  show_progress=show_progress)
        if r.quality is not None and not r.quality["ok"] and c.heal is not None \
                and not c.allow_degraded:
            raise ShrinkError(f"{r.quality['message']}. The build stops before healing; "
                              "pass --allow-degraded to heal it anyway, or choose another "
                              "strategy (--strategy auto measures the candidates)")
        return {"model": str(stage_dir / "model"), "removed": r.removed, "reason": r.reason,
                "bridge": r.bridge, "quality": r.quality,
                "strategy": r.strategy, "num_layers": [r.num_layers_before, len(r.kept)],
                "params": [r.params_before, r.params_after],
                "scores": r.scores.to_dict() if r.scores is not None else None}
    if name == "heal":
        from shrink.stages.heal import heal

        r = heal(state["model"], stage_dir / "model", c.heal, evaluation=c.evaluate, load=load,
                 force=True, resume=resume, show_progress=show_progress)
        return {"model": str(stage_dir / "model"), "steps": r.steps, "final_loss": r.final_loss,
                "ppl_before": r.ppl_before, "ppl_after": r.ppl_after,
                "ppl_before_second": r.ppl_before_second, "ppl_after_second": r.ppl_after_second,
                "evaluation": c.evaluate.name(), "settings": r.settings}
    if name == "quantize":
        from shrink.stages.quantize import quantize

        # no evaluation here: the evaluate stage measures the input and the output of this
        # stage on the same blocks; measuring here too would reload the float model for it
        r = quantize(state["model"], stage_dir / "model", c.quantize, evaluation=None,
                     device=c.device, force=True, show_progress=show_progress)
        return {"model": str(stage_dir / "model"), "quantized": str(stage_dir / "model"),
                "bits": r.bits, "group_size": r.group_size, "group_size_note": r.group_size_note,
                "bits_per_weight": r.bits_per_weight, "size_bytes": r.size_bytes_after}
    if name == "export":
        log = stderr.print if show_progress else None
        done: dict = {}
        if c.export.onnx:
            from shrink.stages.export.onnx import export_onnx

            # int4 from the GPTQ checkpoint when there is one (the builder keeps its calibrated
            # weights; measured better than the builder's own round-to-nearest int4), else from
            # the full-precision model
            src = state["model"] if c.export.onnx == "int4" else state["float_model"]
            r = export_onnx(src, stage_dir / "onnx", c.export, force=True, log=log)
            done["onnx"] = {"path": str(stage_dir / "onnx"), "kv_cache": r.kv_cache,
                            "method": r.method, "precision": r.precision, "lm_head": r.lm_head,
                            "size_bytes": r.folder_bytes, "verification": r.verification}
        if c.export.gguf:
            from shrink.stages.export.gguf import export_gguf

            # from the full-precision model: llama.cpp quantizes it itself (a GPTQ checkpoint
            # would be dequantized and rounded twice)
            layers = state.get("layers")
            g = export_gguf(state["float_model"], stage_dir / "gguf", c.export.gguf, force=True,
                            threads=c.export.threads, log=log,
                            name=f"{Path(c.model.rstrip('/')).name}-{layers}L" if layers else None)
            done["gguf"] = {"path": str(stage_dir / "gguf"), "type": g["type"],
                            "file": g["file"], "size_bytes": g["bytes"],
                            "block_count": g.get("block_count"),
                            "verification": g.get("verification")}
        return done
    if name == "evaluate":
        from shrink.stages.evaluate import evaluate

        rows = {}
        for label, path in state["evaluate"].items():
            res = evaluate(path, c.evaluate, load=ModelOptions(device=c.device),
                           show_progress=show_progress)
            rows[label] = {"perplexity": res.perplexity, "tokens": res.tokens,
                           "path": str(path)}
            if res.second is not None:
                rows[label]["second"] = res.second.perplexity
        return {"perplexity": rows, "set": c.evaluate.name(),
                "second_set": c.evaluate.name(c.evaluate.second) if c.evaluate.second else None}
    raise AssertionError(name)


def plan(c: BuildConfig, L: int, out: Path, disk: int) -> str:
    """What the build will do, printed before the first stage."""
    p = c.prune
    what = (f"layers {p.layers}" if p.layers is not None else f"{p.drop} of {L} layers by "
            f"{p.strategy}")
    bridge = {"linear": ", bridged by a linear map", "auto": ", bridged where the "
              "architecture allows", "none": ""}[p.bridge]
    steps = [f"prune ({what}, scored on {p.samples} x {p.seq_len} tokens of {p.data}{bridge})"]
    if c.heal is not None:
        h = c.heal
        steps.append(f"heal ({h.method or 'lora'}{', preset ' + h.preset if h.preset else ''}, "
                     f"{h.steps or 'default'} steps on {h.data})")
    if c.quantize is not None:
        steps.append(f"quantize (GPTQ {c.quantize.gptq}, {c.quantize.samples} x "
                     f"{c.quantize.seq_len} calibration tokens of {c.quantize.data})")
    if c.export is not None and c.export.onnx:
        steps.append(f"export ONNX ({c.export.onnx}, LM head {c.export.lm_head}, "
                     f"{c.export.target})")
    if c.export is not None and c.export.gguf:
        steps.append(f"export GGUF ({c.export.gguf}, for llama.cpp)")
    steps.append(f"evaluate (every artifact on {c.evaluate.name()})")
    lines = [f"shrink build {c.model} -> {out} (at most {disk / 1e9:.1f} GB of disk while it "
             "runs):"]
    lines += [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    return "\n".join(lines)


def default_output(c: BuildConfig) -> str:
    base = Path(c.model.rstrip("/")).name or "model"
    parts = [base, f"drop{c.prune.count()}"]
    if c.heal is not None:
        parts.append("healed")
    if c.quantize is not None:
        parts.append(f"gptq{c.quantize.bits()}")
    if c.export is not None and c.export.onnx:
        parts.append(f"onnx-{c.export.onnx}")
    if c.export is not None and c.export.gguf:
        parts.append(f"gguf-{c.export.gguf}")
    return "-".join(parts)


def build(config: BuildConfig | None = None, output: str | Path | None = None,
          resume: bool = False, force: bool = False, command: str | None = None,
          keep_stages: bool = False, show_progress: bool = True) -> BuildResult:
    """Run the whole chain into ``output``; see the module docstring."""
    from shrink.core.models import resolve

    s = config or BuildConfig()
    L = validate(s)
    out = Path(output or default_output(s)).expanduser()
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"output '{out}' exists and is a file")
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise ShrinkError(f"output folder '{out}' exists and is not empty (use --resume to "
                          "continue it, --force to start over)")
    resolved = resolve(s.model)
    check_not_source(out, resolved.path)
    if resume and out.exists() and any(out.iterdir()):
        check_resumable(out)  # only a folder a shrink build created
    check_disk(out, estimate_disk(s, resolved.path))
    lock = lock_output(out)  # a second build into the same folder stops here
    if force and not resume and out.exists():
        if any(out.iterdir()):
            check_replaceable(out)
        shutil.rmtree(out)
    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out)
    if show_progress:
        stderr.print(plan(s, L, out, estimate_disk(s, resolved.path)), highlight=False)
    names = s.stages()
    runs: list[StageRun] = []
    state: dict = {"model": s.model, "float_model": s.model,
                   "key": _hash({"source": resolved.location, "layers": L})}
    info_by_stage: dict[str, dict] = {}
    for n, name in enumerate(names, 1):
        stage_dir = stages_dir / f"{n:02d}-{name}"
        key = _hash(_inputs(name, s, state))
        marker = _done(stage_dir, key) if resume else None
        t0 = time.perf_counter()
        if marker is None:
            if stage_dir.exists() and name != "heal":  # heal resumes its own checkpoints
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            if show_progress:
                stderr.rule(f"[bold]stage {n}/{len(names)}: {name}")
            state["evaluate"] = _eval_targets(s, info_by_stage)
            info = _run(name, s, stage_dir, state, resume, show_progress)
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
            if name == "prune":
                state["layers"] = info["num_layers"][1]
        elif name == "quantize":
            state["model"] = info["model"]
        runs.append(StageRun(name, key, skipped, marker.get("seconds", 0.0), info))
        state["key"] = key
    report = _finish(out, s, resolved, state, info_by_stage, runs, command)
    if not keep_stages:
        freed = folder_bytes(stages_dir)
        shutil.rmtree(stages_dir, ignore_errors=True)
        report["intermediates_removed_bytes"] = freed
        # the report's paths: the copies in OUT for the final artifacts, none for the removed
        moved = {str(Path(state["model"])): out / "model",
                 **{row["path"]: out / fmt for fmt, row in
                    info_by_stage.get("export", {}).items()}}
        for row in (report.get("perplexity") or {}).values():
            p = row.get("path")
            if p and Path(p).is_relative_to(stages_dir):
                row["path"] = str(moved[p]) if p in moved else None
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if show_progress:
            stderr.print(f"removed the intermediate stage folders ({freed / 1e6:.0f} MB; "
                         "--keep-stages keeps them for --resume)", highlight=False)
    from shrink.core.quiet import CURRENT_LOG

    if CURRENT_LOG is not None and CURRENT_LOG.is_file():  # the CLI's third-party output
        shutil.copy2(CURRENT_LOG, out / "build.log")
    mark_output(out)
    lock.release()
    return BuildResult(out, s, runs, report)


def _eval_targets(s: BuildConfig, info: dict) -> dict[str, str]:
    """What the evaluate stage measures: the source and every artifact the build made."""
    targets = {"dense": s.model}
    for stage, label in (("prune", "pruned"), ("heal", "healed"), ("quantize", "quantized")):
        if stage in info:
            targets[label] = info[stage]["model"]
    for fmt, row in info.get("export", {}).items():
        targets[fmt] = row["path"]
    return targets


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst, force=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _finish(out: Path, s: BuildConfig, resolved, state: dict, info: dict,
            runs: list[StageRun], command: str | None) -> dict:
    from shrink import __version__
    from shrink.analysis.estimate import flops_per_token, weight_memory
    from shrink.core.models import read_shrink_json
    import yaml

    from shrink.report.modelcard import artifact_card, model_card

    final_model = Path(state["model"])
    _copy_atomic(final_model, out / "model")
    exports = info.get("export", {})
    for fmt, row in exports.items():
        _copy_atomic(Path(row["path"]), out / fmt)
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
    for fmt, row in exports.items():
        sizes[fmt] = row["size_bytes"]
    ppl = dict(info.get("evaluate", {}).get("perplexity", {}))
    report = {
        "shrink_version": __version__, "source_model": s.model,
        "base_model": record.get("base_model"), "settings": s.settings(),
        "output_id": output_id(out),
        "evaluation_set": s.evaluate.name(),
        "second_evaluation_set": info.get("evaluate", {}).get("second_set"),
        "removed_layers": info["prune"]["removed"], "strategy": info["prune"]["strategy"],
        "reason": info["prune"]["reason"], "num_layers": info["prune"]["num_layers"],
        "bridge": info["prune"].get("bridge"), "quality": info["prune"].get("quality"),
        "params": info["prune"]["params"], "sizes_bytes": sizes, "perplexity": ppl,
        "arithmetic": {"context": ctx, **arith},
        "heal": info.get("heal"), "quantize": info.get("quantize"),
        "export": {fmt: {k: v for k, v in row.items() if k not in ("verification", "path")}
                   for fmt, row in exports.items()} or None,
        "stages": [{"name": r.name, "seconds": r.seconds, "skipped": r.skipped, "key": r.key}
                   for r in runs],
        "command": command, "artifacts": {"model": "model", **{fmt: fmt for fmt in exports}},
    }
    scores = info["prune"].get("scores")
    plot = None
    if scores:
        from shrink.report.plots import plot_scores
        from shrink.core.scores import LayerScores

        plot = plot_scores(LayerScores.from_dict(scores), out / "scores.png",
                           chosen=info["prune"]["removed"])
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    recipe = ("# every setting of this build: shrink build --config recipe.yaml\n"
              + yaml.safe_dump(s.settings(), sort_keys=False))
    (out / "recipe.yaml").write_text(recipe)
    (out / "README.md").write_text(model_card(report, scores, plot is not None, recipe))
    for artifact in report["artifacts"]:  # each published folder stands on its own
        card = out / artifact / "README.md.tmp"
        card.write_text(artifact_card(report, artifact))
        os.replace(card, out / artifact / "README.md")
        mark_output(out / artifact)  # the card is shrink's: a later --force may replace it
    return report


def command_line() -> str | None:
    """The command as typed, when shrink runs as the command-line program."""
    if "build" not in sys.argv[1:]:
        return None  # called through the Python API or a test runner
    return "shrink " + " ".join(shlex.quote(a) for a in sys.argv[1:])
