"""GPTQModel as a runtime: the install check, its CPU worker pool, and keeping its logs in place."""

from __future__ import annotations

import contextlib
import os
from importlib.util import find_spec
from pathlib import Path

from shrink.core.errors import ShrinkError, install_hint
from shrink.core.quiet import env

INSTALL = install_hint("gptq")


def require_gptq(what: str = "GPTQ quantization") -> None:
    """Fail with the install line when the ``gptq`` extra (GPTQModel + optimum) is missing."""
    missing = [
        name
        for name, mod in (("gptqmodel", "gptqmodel"), ("optimum", "optimum"))
        if find_spec(mod) is None
    ]
    if missing:
        raise ShrinkError(f"{what} needs {' and '.join(missing)}: run {INSTALL}")


def cpu_workers() -> contextlib.AbstractContextManager:
    """GPTQModel sizes its CPU thread pool from os.cpu_count() but always asks for 2 loader
    workers; with fewer than 2 pool workers (a 2-core machine) it fails with "Virtual pool
    'model_loader:cpu' requests 2 workers". GPTQMODEL_CPU_WORKERS is set for the block (unless
    the user set it) and restored afterwards."""
    cpus = os.cpu_count() or 1
    return env(GPTQMODEL_CPU_WORKERS=str(max(2, min(12, (cpus + 1) // 2))))


@contextlib.contextmanager
def logs_outside_cwd():
    """GPTQModel 7.6 writes a per-run log into ./logs of the current directory; point it at a
    temporary folder instead (the same per-module losses land in quant_log.csv in the output)."""
    import tempfile

    try:
        from gptqmodel.looper import loop_processor
    except ImportError:
        yield
        return
    if not hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        yield
        return
    saved = loop_processor._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="shrink-gptq-logs-") as tmp:
        loop_processor._PROJECT_LOG_DIR = Path(tmp)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = saved


# set when a Ctrl-C stopped GPTQ: GPTQModel's worker threads may still be running, and letting
# the interpreter shut down normally then hangs (joining them) or aborts in C++ ("terminate
# called without an active exception", exit 134). The CLI should leave with os._exit(130) after
# printing its line when this is set.
INTERRUPTED = False


def gptq_work_dir(output: str | Path) -> Path:
    """The folder GPTQModel's offload and temporary files go to: a hidden sibling of the output,
    ``.OUT.gptq-PID`` (removed at the end; a dead run's is removed by the next run's
    atomic_output)."""
    out = Path(output).expanduser().resolve()
    return out.parent / f".{out.name}.gptq-{os.getpid()}"


@contextlib.contextmanager
def gptq_interrupts(output: str | Path):
    """Run GPTQModel so that Ctrl-C stops it and nothing is left in the system temp folder.

    - SIGINT gets a handler that raises KeyboardInterrupt (Python's own behaviour), whatever a
      library installed before; GPTQModel 7.6 installs its own SIGINT/SIGTERM handler only in
      checkpointed quantization (looper/gptq_checkpoint.py), and restores ours afterwards. A
      second Ctrl-C (the first did not get through: a native wait, a hung worker) removes the
      work folder and leaves at once with exit 130.
    - ``tempfile.tempdir`` and ``TMPDIR`` point at :func:`gptq_work_dir` for the block, so the
      offload folder GPTQModel creates by default (``TemporaryDirectory(prefix="gptqmodel_")``
      in QuantizeConfig.__post_init__: build the QuantizeConfig inside this block, or pass
      ``offload_to_disk_path`` = the yielded folder) lands there, not in /tmp.
    Yields the work folder; it is removed when the block ends, however it ends.
    """
    global INTERRUPTED
    import shutil
    import signal
    import sys
    import tempfile
    import threading

    work = gptq_work_dir(output)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    main = threading.current_thread() is threading.main_thread()
    saved_handler = signal.getsignal(signal.SIGINT) if main else None
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    hits = [0]

    def on_sigint(signum, frame):
        hits[0] += 1
        if hits[0] == 1:
            raise KeyboardInterrupt
        shutil.rmtree(work, ignore_errors=True)
        try:
            sys.stderr.write("\ninterrupted: nothing was moved into place\n")
            sys.stderr.flush()
        finally:
            os._exit(130)

    if main:
        signal.signal(signal.SIGINT, on_sigint)
    tempfile.tempdir = str(work)
    os.environ["TMPDIR"] = str(work)
    try:
        yield work
    except KeyboardInterrupt:
        INTERRUPTED = True
        raise
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        if main:
            signal.signal(signal.SIGINT, saved_handler)
        shutil.rmtree(work, ignore_errors=True)
