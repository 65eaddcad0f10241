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

# loggers that print import-time or per-call noise through the Python API: torchao ("Failed to
# load ... .so"), torch's pytree deprecations, huggingface_hub's per-request warnings
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "huggingface_hub", "torch.onnx",
                 "onnxruntime.quantization", "gptqmodel", "bitsandbytes", "accelerate")


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
    """Everything a library call may quiet, restored afterwards: transformers, the noisy loggers
    and Python warnings."""
    with hf_quiet(), loggers_at(logging.ERROR, *NOISY_LOGGERS), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
