"""The one stage runner: the lifecycle every stage that writes a folder shares.

A stage implements only its own computation, ``compute(tmp) -> StageOutput``: it writes its
artifact into ``tmp`` and returns its typed result, its entry for ``shrink.json`` and, optionally,
a check to run on the written folder in a fresh process. The runner owns the rest:

1. refuse a bad output before anything heavy runs (exists without ``force``, not writable,
   is or holds the input), and hold its lock until the rename;
2. hand the computation a temporary sibling folder (``.OUT.partial-PID``);
3. copy the source's license and provenance files;
4. run the fresh-process verification (``shrink.runtime.worker``) on the temporary folder;
5. write ``shrink.json``: the source's history plus this stage, its settings, timing and versions;
6. rename the folder into place, atomically; on any failure or interrupt nothing is moved and the
   temporary folder is removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.core.models import read_shrink_json
from shrink.core.outputs import (
    atomic_output,
    check_output,
    copy_license_files,
    lock_output,
    write_record,
)
from shrink.core.quiet import hf_quiet


@dataclass
class StageOutput:
    """What a stage's computation hands back to the runner."""

    result: Any  # the stage's typed result; its ``verification``/``record`` fields are filled in
    record: dict  # this stage's entry in shrink.json (without settings, timing, versions)
    verify: Callable[[Path], dict] | None = None  # a fresh-process check of the written folder
    top: dict = field(default_factory=dict)  # shrink.json top-level keys (source_model, ...)


@contextmanager
def claimed_output(
    output: str | Path, force: bool = False, source: Path | None = None, *, lock: bool = True
) -> Iterator[Path]:
    """Step 1 taken before a stage's heavy work: refuse a bad output at once and hold its lock
    for the whole block (``lock=False``: check only, e.g. on the secondary processes of a
    distributed run). :func:`run_stage` inside the block re-enters the same lock."""
    out = check_output(output, force, source)
    with lock_output(out) if lock else nullcontext():
        yield out


def run_stage(
    name: str,
    output: str | Path,
    compute: Callable[[Path], StageOutput],
    *,
    source: Path | None,
    settings: dict,
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run one stage into ``output`` (see the module docstring) and return its result."""
    check_output(output, force, source)
    previous = read_shrink_json(source) if source is not None and source.is_dir() else None
    t0 = time.perf_counter()
    with atomic_output(output, force, source=source) as tmp:
        with hf_quiet():  # transformers' own "Writing model shards" bars and notes
            out = compute(tmp)
        if source is not None:
            copy_license_files(source, tmp)
        verification: dict = {}
        if verify and out.verify is not None:
            if log:
                log(f"verifying the {name} output in a fresh process")
            verification = out.verify(tmp)
        # built after the check, which may add to the stage's record (quantize: perplexity_after)
        entry = {"stage": name, **out.record, "settings": settings}
        if verify and out.verify is not None:
            entry["verification"] = verification
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        record = write_record(tmp, previous, entry, **out.top)
    result = out.result
    for attr, value in (
        ("output", Path(output)),
        ("verification", verification),
        ("record", record),
    ):
        if hasattr(result, attr):
            setattr(result, attr, value)
    return result
