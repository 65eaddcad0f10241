"""Writing output folders safely: refuse to overwrite without ``force``, write into a temporary
sibling folder, and rename it into place only when it is complete."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shrink.core.errors import ShrinkError, first_line

RECORD = "shrink.json"
# Every folder shrink writes carries this file: {"format", "tool", "id", "pid", "created",
# "files"}. "id" is random and is also recorded in shrink.json (and a build's report.json) as
# "output_id"; "files" lists the top-level entries shrink wrote. --force replaces a folder only
# when the marker, the records and the listing agree (or when it is a recognisable model folder).
MARKER = ".shrink-output"
_LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "SOURCE.md")
# what a model folder written by transformers, GPTQModel, onnxruntime-genai or a hub download
# holds; anything else (paper.tex, a notes folder) means the folder holds other work
_MODEL_FILE_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.onnx",
    "*.onnx.data",
    "*.onnx_data",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "*.md",
    "*.csv",
    "*.png",
    "*.py",
    ".gitattributes",
    *_LICENSE_PATTERNS,
)
_MODEL_DIRS = (".cache", "adapter")


def check_output(output: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """Fail early if ``output`` exists and is not an empty folder (unless ``force`` and it is a
    folder shrink may replace, see :func:`check_replaceable`), or if it is, holds or lies inside
    the input model folder ``source`` (:func:`check_not_source`)."""
    out = Path(output).expanduser()
    check_not_link(out)
    check_not_source(out, source)
    if out.exists():
        if not out.is_dir():
            raise ShrinkError(f"output '{output}' exists and is a file")
        if any(out.iterdir()):
            if not force:
                raise ShrinkError(
                    f"output folder '{output}' exists and is not empty (use --force to replace it)"
                )
            check_replaceable(out)
    _check_not_above_work(out.resolve(), "write into")
    parent = existing_ancestor(out.resolve().parent)
    if not parent.is_dir():
        raise ShrinkError(f"cannot write '{output}': '{parent}' is not a folder")
    if not os.access(parent, os.W_OK):
        raise ShrinkError(f"cannot write '{output}': folder '{parent}' is not writable")
    return out


def check_not_link(output: str | Path) -> None:
    """Refuse an output that is a symbolic link: writing or replacing "it" would write wherever
    the link points (the input model, the home folder, /), not where the user looked."""
    out = Path(output).expanduser()
    if out.is_symlink():
        raise ShrinkError(
            f"output '{output}' is a symbolic link (to {os.readlink(out)}); shrink "
            "does not write through links: give a real folder path"
        )


def check_writable_file(path: str | Path, option: str = "--json") -> None:
    """Fail before any work when the file ``path`` (a --json, --plot or --markdown file) cannot
    be written: a folder, a device or FIFO, a link, a read-only file, a missing or read-only
    folder around it."""
    p = Path(path).expanduser()
    if p.is_symlink():
        raise ShrinkError(f"{option} '{path}' is a symbolic link; give a plain file path")
    if p.is_dir():
        raise ShrinkError(f"{option} '{path}' is a folder; give a file path")
    if p.exists() and not p.is_file():
        raise ShrinkError(
            f"{option} '{path}' is not a regular file (a device or FIFO); give a file path"
        )
    if p.exists() and not os.access(p, os.W_OK):
        raise ShrinkError(f"{option} '{path}' is not writable")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise ShrinkError(f"cannot write '{path}': folder '{parent}' does not exist")
    if not p.exists() and not os.access(parent, os.W_OK):
        raise ShrinkError(f"cannot write '{path}': folder '{parent}' is not writable")


def _check_not_above_work(folder: Path, verb: str) -> None:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if folder == Path(folder.anchor):
        raise ShrinkError(
            f"refusing to {verb} '{folder}': it is the filesystem root; choose a new output folder"
        )
    if folder in (home, cwd) or folder in home.parents or folder in cwd.parents:
        raise ShrinkError(
            f"refusing to {verb} '{folder}': it is the current or home folder or "
            "a folder above them; choose a new output folder"
        )


def check_not_source(output: str | Path, source: str | Path | None) -> None:
    """Refuse an output folder that is the input model folder, inside it or around it: replacing
    it would destroy the input (with --force) or mix the output into it."""
    if source is None:
        return
    out = Path(output).expanduser().resolve()
    src = Path(source).expanduser().resolve()
    if out == src:
        raise ShrinkError(
            f"output '{output}' is the input model folder; choose a new output folder"
        )
    if src in out.parents:
        raise ShrinkError(
            f"output '{output}' is inside the input model folder {src}; choose a folder outside it"
        )
    if out in src.parents:
        raise ShrinkError(
            f"output '{output}' holds the input model folder {src}; choose a "
            "folder that does not contain it"
        )


def read_marker(folder: str | Path) -> dict | None:
    """The ``.shrink-output`` marker of a folder (None if absent or unreadable)."""
    f = Path(folder) / MARKER
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"] else None


def output_id(folder: str | Path) -> str | None:
    """The random id of the shrink output being written in ``folder`` (for its records)."""
    m = read_marker(folder)
    return m["id"] if m else None


def mark_output(folder: str | Path, files: list[str] | None = None) -> str:
    """Write (or refresh) the marker that says shrink wrote ``folder``; return its id. The id is
    kept when the folder already has a valid marker; ``files`` defaults to the folder's current
    top-level entries (call it again after writing more, e.g. after each build stage)."""
    folder = Path(folder)
    m = read_marker(folder) or {
        "format": 1,
        "tool": "shrink",
        "id": uuid.uuid4().hex,
        "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if files is None:
        files = sorted(e.name for e in folder.iterdir() if e.name != MARKER)
    m["files"] = sorted(files)
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)
    return m["id"]


def shrink_output_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not (provably) a folder that shrink wrote, or None if it is: its marker
    is valid, shrink.json / report.json carry the same id, and it holds nothing shrink did not
    write."""
    folder = Path(folder)
    m = read_marker(folder)
    if m is None:
        return f"it has no valid {MARKER} marker (shrink did not write it)"
    for name in (RECORD, "report.json"):
        f = folder / name
        if f.is_file():
            try:
                rid = json.loads(f.read_text(encoding="utf-8")).get("output_id")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                return f"its {name} is damaged"
            if rid is not None and rid != m["id"]:
                return f"its {name} belongs to another output than its {MARKER} marker"
    listed = m.get("files")
    entries = [
        e for e in folder.iterdir() if e.name != MARKER and not e.name.startswith(f"{MARKER}.tmp-")
    ]
    if isinstance(listed, list):
        foreign = [e.name for e in entries if e.name not in listed]
    else:
        foreign = _foreign_to_model_folder(entries)
    if foreign:
        return f"it holds files shrink did not write ({', '.join(sorted(foreign)[:5])})"
    return None


def _foreign_to_model_folder(entries: list[Path]) -> list[str]:
    from fnmatch import fnmatch

    return [
        e.name
        for e in entries
        if not (e.is_dir() and e.name in _MODEL_DIRS)
        and not (e.is_file() and any(fnmatch(e.name, p) for p in _MODEL_FILE_PATTERNS))
    ]


def _model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a recognisable model folder (config + weights, nothing else)."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.onnx"))
    has_config = (folder / "config.json").is_file() or (folder / "genai_config.json").is_file()
    if not (has_config and has_weights):
        return "it does not look like a model folder (no config.json with safetensors weights)"
    foreign = _foreign_to_model_folder(list(folder.iterdir()))
    if foreign:
        return f"it holds files that are not part of a model ({', '.join(sorted(foreign)[:5])})"
    return None


def check_replaceable(folder: Path) -> None:
    """--force replaces only a folder that shrink wrote (its marker, records and listing agree)
    or a recognisable model folder with nothing else in it; never the filesystem root, the
    current or home folder or a folder above them, or a git checkout, or a symbolic link."""
    check_not_link(folder)
    folder = Path(folder).expanduser().resolve()
    _check_not_above_work(folder, "replace")
    if (folder / ".git").exists():
        raise ShrinkError(
            f"refusing to replace '{folder}' with --force: it is a git checkout; "
            "choose a new output folder"
        )
    if read_marker(folder) is not None:
        problem = shrink_output_problem(folder)
    else:
        problem = _model_folder_problem(folder)
    if problem:
        raise ShrinkError(
            f"refusing to replace '{folder}' with --force: {problem}; remove it "
            "yourself or choose a new output folder"
        )


def check_resumable(folder: str | Path) -> None:
    """``build --resume`` continues only a folder that a shrink build created (its marker), so
    it never overwrites files it did not write."""
    folder = Path(folder).expanduser()
    if not folder.exists() or not any(folder.iterdir()):
        return
    if read_marker(folder) is None:
        raise ShrinkError(
            f"--resume: '{folder}' was not written by shrink (no {MARKER} marker); "
            "choose a new output folder"
        )
    problem = shrink_output_problem(folder)
    if problem:
        raise ShrinkError(f"--resume: refusing to write into '{folder}': {problem}")


def safetensors_bytes(folder: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files at the top of a model folder (its weights)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def folder_bytes(folder: str | Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Bytes of every file under ``folder``, or of those whose names end in ``suffixes``."""
    return sum(
        f.stat().st_size
        for f in Path(folder).rglob("*")
        if f.is_file() and (suffixes is None or f.name.endswith(suffixes))
    )


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above (or at) ``path`` that exists (missing parents get created)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class OutputLock:
    """An exclusive lock on an output folder: ``fcntl.flock`` on the sibling file ``.OUT.lock``,
    which holds the owner's pid. The kernel releases it when the process dies, however it dies.
    Re-entrant within one process (a stage that holds it may call atomic_output)."""

    _held: dict[Path, list] = {}  # lock path -> [fd, count]

    def __init__(self, output: str | Path):
        self._released = True  # nothing to release until the lock is held
        out = Path(output).expanduser().resolve()
        self.output = out
        self.path = out.parent / f".{out.name}.lock"
        self.reentered = False
        held = OutputLock._held.get(self.path)
        if held is not None:
            held[1] += 1
            self.reentered = True
            self._released = False
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:  # never through a link planted at the lock's path
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise ShrinkError(
                    f"cannot create the lock {self.path} ({first_line(e)}); "
                    "remove it if it is a link, or choose another output "
                    "folder"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.lseek(fd, 0, os.SEEK_SET)
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ShrinkError(
                    f"another shrink process is writing {out} (pid {pid}); wait "
                    "for it to finish or choose another output folder"
                ) from None
            try:  # the file we locked must still be the one at the path (see release)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        OutputLock._held[self.path] = [fd, 1]
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        held = OutputLock._held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del OutputLock._held[self.path]
        try:
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode
        except FileNotFoundError:
            pass
        os.close(held[0])

    def __del__(self) -> None:  # a stage that raised drops its lock with its frame
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(output: str | Path) -> OutputLock:
    """Take the output's lock (ShrinkError naming the holder's pid if another process has it);
    release it with ``.release()`` or use it as a context manager."""
    return OutputLock(output)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _path_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink())


def remove_stale_temporaries(output: str | Path) -> tuple[int, int, list[str]]:
    """Remove ``.OUT.partial-PID``, ``.OUT.old-PID`` and ``.OUT.gptq-PID`` (GPTQModel's offload)
    siblings of ``output`` whose process is
    dead (a kill -9, a power cut); return (how many, bytes freed, notes). A heal's work folder
    ``.OUT.heal-work`` is kept (``heal --resume`` continues from it) and only reported."""
    out = Path(output).expanduser().resolve()
    removed, freed, notes = 0, 0, []
    if not out.parent.is_dir():
        return removed, freed, notes
    pattern = re.compile(re.escape(f".{out.name}.") + r"(partial|old|gptq)-(\d+)$")
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and entry.is_dir():
            # died between its two renames: the previous output is still whole; put it back
            os.replace(entry, out)
            notes.append(
                f"restored {out} from {entry.name}, left by a shrink process that "
                "died while replacing it"
            )
            continue
        size = _path_bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed, freed = removed + 1, freed + size
    if removed:
        notes.append(
            f"removed {removed} temporary folder(s) left beside {out} by shrink "
            f"processes that died ({freed / 1e6:.1f} MB freed)"
        )
    work = out.parent / f".{out.name}.heal-work"
    if work.is_dir():
        notes.append(
            f"{work} ({_path_bytes(work) / 1e6:.1f} MB) holds the checkpoints of an "
            "interrupted heal: 'shrink heal ... --resume' continues it; remove it if "
            "you do not need it"
        )
    return removed, freed, notes


def _print_note(note: str) -> None:
    print(f"note: {note}", file=sys.stderr)


@contextmanager
def atomic_output(
    output: str | Path,
    force: bool = False,
    on_note: Callable[[str], None] | None = _print_note,
    source: str | Path | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output`` in one rename.

    The output's lock (:class:`OutputLock`) is held from before anything is written until after
    the rename, so a second run into the same output fails at once. Temporaries of dead shrink
    runs beside the output are removed first (``on_note`` hears how many bytes that freed). The
    folder carries the :data:`MARKER` (its id goes into shrink.json through write_record). At the
    rename, an output that appeared meanwhile is replaced only with ``force`` and only if
    :func:`check_replaceable` allows it. If the block raises, the temporary folder is removed and
    ``output`` is left untouched.
    """
    out = check_output(output, force, source).resolve()
    lock = OutputLock(out)
    try:
        _, _, notes = remove_stale_temporaries(out)
        for note in notes:
            # a stage holding the lock already (heal) owns the heal work folder beside it
            if on_note is not None and not (lock.reentered and ".heal-work" in note):
                on_note(note)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            mark_output(tmp, files=[])
            yield tmp
            mark_output(tmp)  # keeps the id (a copied-in marker's, with its shrink.json)
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                if not force:
                    raise ShrinkError(
                        f"output '{output}' appeared while this run was writing "
                        "it (another process?); nothing was replaced (use --force "
                        "to replace it)"
                    )
                check_replaceable(out)
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
    finally:
        lock.release()


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

    return {
        "shrink": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_record(folder: Path, previous: dict | None, stage: dict, **top) -> dict:
    """Write ``shrink.json``: the previous stages of the source model plus this one."""
    record = dict(previous or {"format": 1, "stages": []})
    record.update({k: v for k, v in top.items() if v is not None})
    oid = output_id(folder)  # the id of this output's marker (atomic_output wrote it)
    if oid is not None:
        record["output_id"] = oid
    else:
        record.pop("output_id", None)
    record["stages"] = list(record.get("stages", [])) + [{**stage, "versions": versions()}]
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
