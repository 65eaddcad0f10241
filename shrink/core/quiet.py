"""Keeping third-party chatter out of the user's terminal without touching the host program.

shrink is a guest in its user's program: a library call may quiet transformers, GPTQModel or
torch for the duration of the call, and restores every logging level, warning filter and
environment variable it changed on the way out. Only the CLI (its own process) and the fresh
worker processes set them for good, through :func:`quiet_process`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

CURRENT_LOG: Path | None = None  # the log file capture_to writes, while it is active

# loggers that print import-time or per-call noise through the Python API: torchao ("Failed to
# load ... .so"), torch's pytree deprecations, huggingface_hub's per-request warnings
NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "huggingface_hub",
    "torch.onnx",
    "onnxruntime.quantization",
    "gptqmodel",
    "bitsandbytes",
    "accelerate",
)


@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    """transformers at error level without its progress bars, for this block only."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def loggers_at(level: int, *names: str) -> Iterator[None]:
    """Set the named loggers' levels for this block only."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(level)
    try:
        yield
    finally:
        for n, lv in saved.items():
            logging.getLogger(n).setLevel(lv)


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Environment variables for this block only (None: leave an existing value alone)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None and k not in os.environ:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Everything a library call may quiet or change, restored afterwards: transformers, the
    noisy loggers, Python warnings and the environment (GPTQModel, imported by peft's LoRA
    dispatch, sets PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER on import)."""
    saved = dict(os.environ)
    try:
        with hf_quiet(), loggers_at(logging.ERROR, *NOISY_LOGGERS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        for k, v in saved.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Third-party banners and tables printed to stdout go to stderr for this block, at the
    Python and the file-descriptor level, so that shrink's own stdout (``--json -``) stays clean."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def quiet_process() -> None:
    """For shrink's own processes only (the CLI, fresh worker processes): quiet third-party
    logging and warnings for the whole process."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@contextlib.contextmanager
def capture_to(log_path: str | os.PathLike, keep: tuple = ()) -> Iterator[None]:
    """For the CLI's own process: everything third-party libraries print (file descriptors 1 and
    2, ``sys.stdout``/``sys.stderr``, Python logging) goes to ``log_path`` for the block, while the
    rich consoles in ``keep`` (shrink's own output and progress) still reach the terminal."""
    global CURRENT_LOG
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    CURRENT_LOG = Path(log_path)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = {
        fd: os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        for fd in (1, 2)
    }
    files = [(c, c.file) for c in keep]
    for c in keep:  # rich Console: stderr consoles keep fd 2's terminal, stdout ones fd 1's
        c.file = terminal[2] if getattr(c, "stderr", False) else terminal[1]
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        root.removeHandler(handler)
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        for c, f in files:
            c.file = f
        for f in terminal.values():
            f.flush()
            f.close()
        log.close()
        CURRENT_LOG = None


def has_terminal_fds() -> bool:
    """Whether sys.stdout/sys.stderr are the process's file descriptors 1 and 2 (not a test
    runner's buffers): only then is there anything to capture at the descriptor level."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
