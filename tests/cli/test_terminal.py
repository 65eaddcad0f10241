"""The real CLI process: what reaches its stdout/stderr when third-party output is captured to a
log file (only a real process has file descriptors to capture, so these run one)."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHRINK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "shrink.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_subcommand_help_reaches_stdout(tmp_path):
    """`shrink eval --help` printed nothing: the help went into the third-party log file."""
    for args in (["eval", "--help"], ["build", "-h"]):
        proc = _run(*args, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ") and f" {args[0]} [OPTIONS]" in proc.stdout, (
            proc.stdout[:200]
        )


def test_usage_error_is_one_line_on_stderr(tmp_path):
    proc = _run("eval", "--no-such-option", tmp_path=tmp_path)
    assert proc.returncode == 2 and "No such option" in proc.stderr and not proc.stdout
