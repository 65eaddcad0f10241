"""Streamed pruning: copy the kept tensors byte for byte, renumbered, with a rewritten config;
tensors the caller modified (the linear bridge's folded down-projections) are written in place of
their originals."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shrink.core.errors import ShrinkError
from shrink.core.models import find_layers
from shrink.core.progress import progress_bar, stderr
from shrink.streaming.checkpoint import (
    COPY_CHUNK,
    DTYPES,
    INDEX,
    SINGLE,
    Checkpoint,
    TensorInfo,
    load_folder_config,
    write_safetensors,
)
from shrink.streaming.memory import available_memory, gb
from shrink.streaming.skeleton import build_skeleton, copy_tokenizer, module_name, tied_keys


def fits_for_verify(params: int) -> bool:
    """Whether the fresh-process check (it loads the model in float32) fits in RAM."""
    return params * 4 * 1.3 < available_memory("cpu")


@dataclass
class StreamPlan:
    """What a streamed prune will write: the kept tensors per source shard, renamed."""

    folder: Path
    skeleton: nn.Module  # weightless, already pruned: its config is the output's config
    removed: list[int]
    kept: list[int]
    num_layers: int
    shards: list[tuple[Path, list[tuple[str, TensorInfo]]]]
    params_before: int
    params_after: int
    metadata: dict
    names: dict[str, str]  # source tensor name -> its name in the output (kept tensors only)

    @property
    def copy_bytes(self) -> int:
        return sum(t.nbytes for _, e in self.shards for _, t in e)


def plan_stream_prune(
    model_dir: str | Path, remove: list[int], trust_remote_code: bool = False
) -> StreamPlan:
    """Check that ``model_dir`` without layers ``remove`` makes a complete checkpoint for the
    pruned config (every tensor it expects, with its shape) before anything is written."""
    from shrink.core.layers import check_remove, swap_layers

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

    shards: list[tuple[Path, list[tuple[str, TensorInfo]]]] = []
    names: dict[str, str] = {}
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
                names[key] = new
                params_after += t.numel
        if entries:
            shards.append((path, entries))
    swap_layers(skeleton, keep)
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    written = {new: t.shape for _, entries in shards for new, t in entries}
    missing = sorted(set(expected) - set(written) - tied_keys(skeleton))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or wrong:
        raise ShrinkError(
            f"the pruned checkpoint would not match its config "
            f"(missing {missing[:3]}, wrong shapes {wrong[:3]}); use --no-streaming"
        )
    return StreamPlan(
        folder, skeleton, remove, keep, L, shards, params_before, params_after, ck.metadata, names
    )


def substitutions(plan: StreamPlan, replace: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``replace`` (source tensor name -> new value) keyed by output name, each checked against
    the tensor it replaces (kept, same shape) and cast to that tensor's dtype in the checkpoint,
    as the in-memory path saves in the source checkpoint's dtype."""
    infos = {new: t for _, entries in plan.shards for new, t in entries}
    out: dict[str, torch.Tensor] = {}
    for src, value in replace.items():
        new = plan.names.get(src)
        if new is None:
            raise ShrinkError(
                f"cannot substitute tensor '{src}': it is not among the tensors "
                "the pruned checkpoint keeps"
            )
        info = infos[new]
        if list(value.shape) != info.shape:
            raise ShrinkError(
                f"cannot substitute tensor '{src}': shape {list(value.shape)}, "
                f"the checkpoint's is {info.shape}"
            )
        out[new] = value.detach().to("cpu", DTYPES[info.dtype])
    return out


def write_stream_prune(
    plan: StreamPlan,
    out: Path,
    *,
    replace: dict[str, torch.Tensor] | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
) -> dict:
    """Copy the planned tensors byte for byte into ``out`` (64 MiB at a time), with the pruned
    config, a new index, the tokenizer and the generation config. ``replace`` maps source tensor
    names to new values written instead of the originals (see :func:`substitutions`); they are
    the only tensors held in memory. Returns what was written."""
    subs = substitutions(plan, replace or {})
    if show_progress:
        stderr.print(
            f"streamed prune: copy {gb(plan.copy_bytes)} in {len(plan.shards)} shard(s), "
            f"peak memory one {COPY_CHUNK >> 20} MiB buffer",
            highlight=False,
        )
    weight_map: dict[str, str] = {}
    total = 0
    n = len(plan.shards)
    for k, (path, entries) in enumerate(
        progress_bar(plan.shards, "copying shards", enabled=show_progress)
    ):
        name = SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        meta = dict(plan.metadata.get(path) or {}) or {"format": "pt"}
        total += write_safetensors(
            out / name, [(new, subs.get(new, t)) for new, t in entries], meta
        )
        for new, _ in entries:
            weight_map[new] = name
    if n > 1:
        (out / INDEX).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
            + "\n"
        )
    cfg = plan.skeleton.config
    cfg.architectures = [type(plan.skeleton).__name__]
    cfg.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (plan.folder / extra).is_file():
            shutil.copy2(plan.folder / extra, out / extra)
    copy_tokenizer(plan.folder, out, trust_remote_code)
    written = {"shards": n, "bytes_written": total}
    if subs:
        written["replaced_tensors"] = sorted(subs)
    return written


def verify_streamed(tmp: Path, params_after: int) -> dict:
    """Reload in a fresh process when the pruned model fits in this machine's RAM; otherwise
    the structural check of :func:`plan_stream_prune` stands, and the record says so."""
    if fits_for_verify(params_after):
        from shrink.runtime.verify import verify_in_subprocess

        return verify_in_subprocess(tmp)
    return {
        "ok": True,
        "reload": "skipped",
        "structure_ok": True,
        "reason": f"the pruned model ({gb(params_after * 4)} in float32) does not fit in "
        "this machine's RAM for the fresh-process reload; every tensor and shape "
        "was checked against the pruned config",
    }
