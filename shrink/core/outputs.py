"""Writing output folders safely: refuse to overwrite without ``force``, write into a temporary
sibling folder, and rename it into place only when it is complete."""
from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shrink.core.errors import ShrinkError

RECORD = "shrink.json"
# files that mark a folder as one shrink (or another model tool) wrote: --force may replace it
_MODEL_MARKERS = (RECORD, "config.json", "genai_config.json", "report.json", "stages")
_LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "SOURCE.md")


def check_output(output: str | Path, force: bool = False) -> Path:
    """Fail early if ``output`` exists and is not an empty folder (unless ``force``)."""
    out = Path(output).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ShrinkError(f"output '{output}' exists and is a file")
        if any(out.iterdir()):
            if not force:
                raise ShrinkError(f"output folder '{output}' exists and is not empty "
                                  "(use --force to replace it)")
            check_replaceable(out)
    parent = existing_ancestor(out.resolve().parent)
    if not parent.is_dir():
        raise ShrinkError(f"cannot write '{output}': '{parent}' is not a folder")
    if not os.access(parent, os.W_OK):
        raise ShrinkError(f"cannot write '{output}': folder '{parent}' is not writable")
    return out


def check_replaceable(folder: Path) -> None:
    """--force replaces model folders, never a folder that holds other work: the current
    folder or one above it, the home folder, a git checkout, or a folder with no model in it."""
    folder = Path(folder).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if folder == home or folder == cwd or folder in cwd.parents or folder == Path(folder.anchor):
        raise ShrinkError(f"refusing to replace '{folder}' with --force: it is the current or "
                          "home folder or above them; choose a new output folder")
    if (folder / ".git").exists():
        raise ShrinkError(f"refusing to replace '{folder}' with --force: it is a git checkout; "
                          "choose a new output folder")
    if not any((folder / m).exists() for m in _MODEL_MARKERS):
        raise ShrinkError(f"refusing to replace '{folder}' with --force: it does not look like "
                          "a model folder (no config.json or shrink.json); remove it yourself "
                          "or choose a new output folder")


def safetensors_bytes(folder: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files at the top of a model folder (its weights)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def folder_bytes(folder: str | Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Bytes of every file under ``folder``, or of those whose names end in ``suffixes``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()
               and (suffixes is None or f.name.endswith(suffixes)))


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above (or at) ``path`` that exists (missing parents get created)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def atomic_output(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output`` in one rename.

    If the block raises, the temporary folder is removed and ``output`` is left untouched.
    """
    out = check_output(output, force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_license_files(src: Path | None, dst: Path) -> list[str]:
    """Carry license and provenance files of a local source model into an output folder."""
    copied: list[str] = []
    if src is None or not src.is_dir():
        return copied
    for pattern in _LICENSE_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def versions() -> dict:
    import torch
    import transformers

    from shrink import __version__

    return {"shrink": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_record(folder: Path, previous: dict | None, stage: dict, **top) -> dict:
    """Write ``shrink.json``: the previous stages of the source model plus this one."""
    record = dict(previous or {"format": 1, "stages": []})
    record.update({k: v for k, v in top.items() if v is not None})
    record["stages"] = list(record.get("stages", [])) + [{**stage, "versions": versions()}]
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
