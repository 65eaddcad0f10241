"""bench/big_model.py at a tiny size: every streamed step runs under its data limit and stays
under the memory plan's prediction."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_big_model_bench_smoke(tmp_path):
    out = tmp_path / "big_model.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "big_model.py"),
            "--tiny",
            "--workdir",
            str(tmp_path / "work"),
            "--data-limit",
            str(3 << 30),
            "--samples",
            "4",
            "--seq-len",
            "16",
            "--eval-samples",
            "2",
            "--eval-seq-len",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    steps = [r.split("|")[1].strip() for r in rows]
    assert steps == ["make", "score", "prune", "adapter", "merge", "perplexity", "verify"]
    assert all(r.split("|")[4].strip() == "yes" for r in rows), out.read_text()
