"""Peak memory of a build's stages: the resident peak of this process since the stage began, and
the peaks of the fresh processes it ran (verification, llama.cpp, measurements).

Linux keeps a process's resident peak in ``VmHWM`` (/proc/self/status) and resets it when "5" is
written to /proc/self/clear_refs; a child reports its own ``VmHWM`` back through
:func:`shrink.runtime.worker.run_worker`. Elsewhere every figure is None."""

from __future__ import annotations

from pathlib import Path

WORKER_PEAKS: list[int] = []  # the children's peaks, in the order they ended


def status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status in bytes (VmHWM, VmRSS, VmData); None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak() -> int:
    """Start a new peak for this process (VmHWM back to the current RSS); returns the index
    of the next child peak, for :func:`peaks_since`."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return len(WORKER_PEAKS)


def peaks_since(mark: int) -> dict:
    """{main: this process's peak since the reset, workers: the largest child peak since
    ``mark`` (None when no child ran)}, in bytes."""
    children = WORKER_PEAKS[mark:]
    return {"main": status_bytes("VmHWM"), "workers": max(children) if children else None}
