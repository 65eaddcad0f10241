"""Memory of this process: the limits it runs under (a data limit, a container's), and the
peaks of a build's stages (this process's resident peak since the stage began, and the peaks of
the fresh processes it ran: verification, llama.cpp, measurements).

Linux keeps a process's resident peak in ``VmHWM`` (/proc/self/status) and resets it when "5" is
written to /proc/self/clear_refs; a child reports its own ``VmHWM`` back through
:func:`shrink.runtime.worker.run_worker`. Elsewhere every figure is None."""

from __future__ import annotations

from pathlib import Path

WORKER_PEAKS: list[int] = []  # the children's peaks, in the order they ended
# Resetting VmHWM changes what the host program reads of its own peak: only the CLI, which owns
# its process, turns this on. Through the Python API a stage's own peak is the process's so far.
RESET_OWN_PEAK = False


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
    if RESET_OWN_PEAK:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    return len(WORKER_PEAKS)


def peaks_since(mark: int) -> dict:
    """{main: this process's peak since the reset (or since it started, see
    ``RESET_OWN_PEAK``), workers: the largest child peak since ``mark`` (None when no child
    ran), main_since: "stage" or "process"}, in bytes."""
    children = WORKER_PEAKS[mark:]
    return {
        "main": status_bytes("VmHWM"),
        "workers": max(children) if children else None,
        "main_since": "stage" if RESET_OWN_PEAK else "process",
    }


def process_limit() -> int | None:
    """The smaller of this process's data limit (``RLIMIT_DATA``) and its cgroup v2 memory
    limit, in bytes; None when neither is set."""
    limits = [x for x, _ in _limits_and_use()]
    return min(limits) if limits else None


def data_limit() -> int | None:
    """This process's data limit (``RLIMIT_DATA``: ``ulimit -d``, ``prlimit --data``), which
    counts writable private address space, a copy-on-write file mapping in full; None when
    unset."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def process_headroom() -> list[int]:
    """Bytes left under each limit of :func:`process_limit` (empty when none is set)."""
    return [max(0, limit - used) for limit, used in _limits_and_use()]


def _limits_and_use() -> list[tuple[int, int]]:
    out = []
    data = data_limit()
    if data is not None:
        out.append((data, status_bytes("VmData") or 0))
    try:  # cgroup v2: the container's limit and what the whole group uses
        cg = Path("/sys/fs/cgroup")
        text = (cg / "memory.max").read_text().strip()
        if text != "max":
            out.append((int(text), int((cg / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    return out
