"""One protocol for running a function in a fresh Python process and reading back its result.

Every check that must not trust the writing process (reload a pruned folder in transformers, a
GPTQ checkpoint with GPTQModel, an ONNX export in onnxruntime, a GGUF in llama.cpp) and every
benchmark measurement (a process whose peak memory is its own) goes through :func:`run_worker`::

    result = run_worker("shrink.runtime.verify:verify_model_dir", path=str(folder))

The child is ``python -m shrink.runtime.worker MODULE:FUNCTION JSON_KWARGS``. It quiets third-party
logging for its own process, sends anything printed to stdout (banners) to stderr, calls the
function and prints one line ``SHRINK_RESULT <json>`` on stdout. A ShrinkError in the child
comes back as a ShrinkError with the same message; any other failure as a ShrinkError naming the
task and the child's last line of stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from shrink.core.errors import ShrinkError

RESULT = "SHRINK_RESULT "
ERROR = "SHRINK_ERROR "
PEAK = "SHRINK_PEAK "  # the child's resident peak in bytes, before its result line


def run_worker(
    task: str, *, timeout: float = 3600, env: dict | None = None, log: Path | None = None, **kwargs
) -> dict:
    """Run ``task`` ("module:function") with JSON-serialisable ``kwargs`` in a fresh process."""
    cmd = [sys.executable, "-m", "shrink.runtime.worker", task, json.dumps(kwargs, default=str)]
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault(
        "GPTQMODEL_CPU_WORKERS", str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2)))
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        raise ShrinkError(
            f"{task} did not finish within {timeout:.0f} s in a fresh process"
        ) from None
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"--- worker {task}\n{proc.stderr}")
    from shrink.core.peaks import WORKER_PEAKS

    for line in proc.stdout.splitlines():
        if line.startswith(PEAK):
            WORKER_PEAKS.append(int(line[len(PEAK) :]))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
        if line.startswith(ERROR):
            raise ShrinkError(line[len(ERROR) :])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
    raise ShrinkError(f"{task.split(':')[-1]} failed in a fresh process: {tail}")


def main(argv: list[str]) -> int:
    from shrink.core.quiet import quiet_process, stdout_to_stderr

    task, payload = argv[0], json.loads(argv[1])
    module, _, name = task.partition(":")
    quiet_process()
    real_stdout = os.fdopen(os.dup(1), "w")
    try:
        with stdout_to_stderr():
            fn = getattr(importlib.import_module(module), name)
            result = fn(**payload)
    except ShrinkError as e:
        real_stdout.write(ERROR + str(e).replace("\n", " ") + "\n")
        real_stdout.flush()
        return 2
    from shrink.core.peaks import status_bytes

    peak = status_bytes("VmHWM")
    if peak is not None:
        real_stdout.write(f"{PEAK}{peak}\n")
    real_stdout.write(RESULT + json.dumps(result, default=str) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
