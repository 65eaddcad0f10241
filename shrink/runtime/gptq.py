"""GPTQModel as a runtime: the install check, its CPU worker pool, and keeping its logs in place."""
from __future__ import annotations

import contextlib
import os
from importlib.util import find_spec
from pathlib import Path

from shrink.core.errors import ShrinkError
from shrink.core.quiet import env


INSTALL = "pip install 'shrink-llm[gptq]'"
def require_gptq(what: str = "GPTQ quantization") -> None:
    """Fail with the install line when the ``gptq`` extra (GPTQModel + optimum) is missing."""
    missing = [name for name, mod in (("gptqmodel", "gptqmodel"), ("optimum", "optimum"))
               if find_spec(mod) is None]
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
