"""Streamed pruning: copy the kept tensors byte for byte, renumbered, with a rewritten config."""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers, read_shrink_json
from shrink.core.progress import progress_bar, stderr
from shrink.streaming.checkpoint import COPY_CHUNK, Checkpoint, INDEX, SINGLE, TensorInfo, load_folder_config, write_safetensors
from shrink.streaming.memory import available_memory, gb
from shrink.streaming.score import score_model_streaming
from shrink.streaming.skeleton import build_skeleton, copy_tokenizer, module_name, tied_keys


@dataclass
class StreamPruneResult:
    output: Path
    removed: list[int]
    kept: list[int]
    num_layers_before: int
    params_before: int
    params_after: int
    shards: int
    bytes_written: int
    seconds: float
    verification: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def fits_for_verify(params: int) -> bool:
    """Whether the fresh-process check (it loads the model in float32) fits in RAM."""
    return params * 4 * 1.3 < available_memory("cpu")


def stream_prune(model_dir: str | Path, output: str | Path, remove: list[int],
                 force: bool = False, verify: bool = True, *, stage: dict | None = None,
                 source_model: str | None = None, base_model: str | None = None,
                 show_progress: bool = True, trust_remote_code: bool = False,
                 ) -> StreamPruneResult:
    """Write ``model_dir`` without decoder layers ``remove`` to ``output``, shard by shard.

    Kept tensors are copied byte for byte (bitwise equal to the source), layer indices renamed;
    the config is rewritten by the in-memory path's own ``swap_layers`` (num_hidden_layers,
    per-layer lists such as ``layer_types``, ``max_window_layers``); a new index json, the
    tokenizer, generation config, license files and a ``shrink.json`` stage are written; then the
    folder is reloaded in a fresh process (``verify``) when it fits in this machine's RAM, and
    otherwise checked structurally (every tensor the pruned config expects, with its shape)."""
    from shrink.core.outputs import atomic_output, check_output, copy_license_files, write_record
    from shrink.stages.prune import check_remove, swap_layers

    t0 = time.perf_counter()
    check_output(output, force)
    folder = Path(model_dir)
    config = load_folder_config(folder, trust_remote_code)
    ck = Checkpoint(folder)
    skeleton = build_skeleton(config, torch.float32)
    _, _, layers = find_layers(skeleton)
    prefix = module_name(skeleton, layers)
    L = len(layers)
    remove = check_remove(list(remove), L)
    keep = [i for i in range(L) if i not in remove]
    new_index = {old: new for new, old in enumerate(keep)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")

    def rename(key: str) -> str | None:
        m = pat.match(key)
        if not m:
            return key
        i = int(m.group(1))
        if i >= L:
            raise ShrinkError(f"tensor '{key}' names layer {i} but the config has {L} layers")
        return f"{prefix}.{new_index[i]}.{m.group(2)}" if i in new_index else None

    plan: list[tuple[Path, list[tuple[str, TensorInfo]]]] = []
    params_before = params_after = 0
    for path in ck.files:
        entries = []
        for key, t in ck.tensors.items():
            if t.file != path:
                continue
            params_before += t.numel
            new = rename(key)
            if new is not None:
                entries.append((new, t))
                params_after += t.numel
        if entries:
            plan.append((path, entries))
    swap_layers(skeleton, keep)
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    written = {new: t.shape for _, entries in plan for new, t in entries}
    missing = sorted(set(expected) - set(written) - tied_keys(skeleton))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or wrong:
        raise ShrinkError(f"the pruned checkpoint would not match its config "
                          f"(missing {missing[:3]}, wrong shapes {wrong[:3]}); use --no-streaming")
    reload_ok = fits_for_verify(params_after)
    if show_progress:
        copy = sum(t.nbytes for _, e in plan for _, t in e)
        stderr.print(f"streamed prune: copy {gb(copy)} in {len(plan)} shard(s), peak memory one "
                     f"{COPY_CHUNK >> 20} MiB buffer, estimated {copy / 5e8:.0f} s at 0.5 GB/s",
                     highlight=False)
    with atomic_output(output, force) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        n = len(plan)
        for k, (path, entries) in enumerate(progress_bar(plan, "copying shards",
                                                         enabled=show_progress)):
            name = SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            meta = dict(ck.metadata.get(path) or {}) or {"format": "pt"}
            total += write_safetensors(tmp / name, entries, meta)
            for new, _ in entries:
                weight_map[new] = name
        if n > 1:
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        cfg = skeleton.config
        cfg.architectures = [type(skeleton).__name__]
        cfg.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (folder / extra).is_file():
                shutil.copy2(folder / extra, tmp / extra)
        copy_tokenizer(folder, tmp, trust_remote_code)
        copy_license_files(folder, tmp)
        stage = dict(stage or {})
        stage.setdefault("stage", "prune")
        stage.setdefault("source", str(folder))
        stage.update({"num_layers_before": L, "num_layers_after": len(keep),
                      "removed_layers": remove, "kept_layers": keep,
                      "params_before": params_before, "params_after": params_after,
                      "streaming": {"shards": n, "bytes_written": total}})
        verification: dict = {}
        if verify and reload_ok:
            from shrink.runtime.verify import verify_in_subprocess

            if show_progress:
                stderr.print("verifying: reload in a fresh process, logits, cached generation")
            verification = verify_in_subprocess(tmp)
            stage["verification"] = verification
        elif verify:
            verification = {"ok": True, "reload": "skipped", "structure_ok": True,
                            "reason": f"the pruned model ({gb(params_after * 4)} in float32) "
                                      "does not fit in this machine's RAM for the fresh-process "
                                      "reload; every tensor and shape was checked against the "
                                      "pruned config"}
            stage["verification"] = verification
            if show_progress:
                stderr.print(f"[yellow]note[/]: {verification['reason']}", highlight=False)
        record = write_record(tmp, read_shrink_json(folder), stage,
                              source_model=source_model or str(model_dir), base_model=base_model)
    return StreamPruneResult(Path(output), remove, keep, L, params_before, params_after, n, total,
                             time.perf_counter() - t0, verification, record)


def prune_streaming(model: str, output, resolved, L: int, remove: list[int] | None, drop,
                    strategy: str, calib: str, samples: int, seq_len: int, seed: int,
                    skip_first: int, batch_size: int, dtype, device, force: bool,
                    trust_remote_code: bool, verify: bool, show_progress: bool,
                    offload_dir=None):
    """:func:`shrink.stages.prune.prune` for a model that does not fit: stream-score when the strategy
    needs scores, choose, then :func:`stream_prune`. Returns a ``PruneResult``."""
    from shrink.stages.prune import PruneResult, base_model_id, choose_layers, original_layers

    scores = None
    calib_info = None
    if remove is not None:
        strategy, reason = "explicit", "listed by the user"
    elif strategy in ("bi", "angular", "relmag"):
        scores = score_model_streaming(model, resolved, calib, samples, seq_len, seed,
                                       batch_size, skip_first, dtype, device, trust_remote_code,
                                       show_progress, offload_dir)
        calib_info = scores.settings.get("data")
        remove, reason = choose_layers(strategy, drop, L, scores, seed)
    elif strategy in ("last", "random"):
        remove, reason = choose_layers(strategy, drop, L, None, seed)
    else:
        raise ShrinkError(f"strategy '{strategy}' needs the whole model in memory and cannot "
                          "stream; use bi, angular, relmag, last or random")
    previous = read_shrink_json(resolved.path)
    orig = original_layers(previous, L)
    kept = [i for i in range(L) if i not in remove]
    stage = {"stage": "prune", "source": resolved.location, "strategy": strategy,
             "reason": reason, "removed_original_layers": [orig[i] for i in remove],
             "kept_original_layers": [orig[i] for i in kept], "seed": seed,
             "skip_first": skip_first, "calibration": calib_info,
             "scores": scores.to_dict() if scores is not None else None}
    config = load_folder_config(resolved.path, trust_remote_code)
    res = stream_prune(resolved.path, output, remove, force=force, verify=verify, stage=stage,
                       source_model=model, base_model=base_model_id(resolved, config, previous),
                       show_progress=show_progress, trust_remote_code=trust_remote_code)
    return PruneResult(res.output, res.removed, res.kept, stage["removed_original_layers"],
                       strategy, reason, L, res.params_before, res.params_after, scores,
                       res.verification, res.record)
