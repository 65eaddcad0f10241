"""SIGTERM handled like Ctrl-C.

A ``kill``, a job scheduler's time limit or a container stop sends SIGTERM, whose default action
ends the process at once: no ``finally`` runs, so a half-written temporary folder, a lock file and
GPTQModel's offload folder would stay behind. Raising KeyboardInterrupt instead runs the same
cleanup as Ctrl-C (atomic outputs remove their temporary folder and release their lock; the
previous output stays as it was) and the CLI exits with its "interrupted" line.
"""

from __future__ import annotations

import signal
import threading


def _raise_interrupt(signum, frame) -> None:
    # a second SIGTERM while cleaning up must not interrupt the cleanup
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_as_interrupt() -> bool:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns whether it was installed
    (only the main thread may set handlers, and a SIGTERM that the parent set to be ignored
    stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        return False
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return True
