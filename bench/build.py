"""Wall time and peak memory of `shrink build` with no arguments (the embedded default, end to end:
score, prune 6 of 30 layers, LoRA heal, GPTQ 4-bit, ONNX int4, evaluate, model card).

Peak memory is the largest peak RSS of any single process of the build (the build itself or one
of its fresh-process verifications), from getrusage(RUSAGE_CHILDREN). Writes
bench/results/build.md and .json.

    python bench/build.py [--out /tmp/shrink-build]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/shrink-build-bench")
    a = ap.parse_args()
    cmd = ["shrink", "build", "-o", a.out, "--force"]
    env = {**os.environ, "SHRINK_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed: {proc.stderr.strip().splitlines()[-1:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = json.loads((Path(a.out) / "report.json").read_text())
    result = {
        "command": " ".join(cmd),
        "bench_command": "python bench/build.py " + " ".join(sys.argv[1:]),
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        "stages": report["stages"],
        "perplexity": report["perplexity"],
        "sizes_bytes": report["sizes_bytes"],
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# `shrink build` with no arguments (embedded SmolLM2, end to end)\n",
        f"Command: `{result['bench_command'].strip()}` (runs `{result['command']}`)  ",
        f"Machine: {result['machine']}.\n",
        f"- wall time: **{wall / 60:.1f} min** (target: under 15 min on 2 cores)",
        f"- peak memory (largest single process): **{peak / 2**30:.2f} GiB**",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {s['name']} | {s['seconds']:.0f} |" for s in report["stages"]]
    lines += ["", "| model | perplexity |", "|---|---|"]
    lines += [f"| {k} | {v['perplexity']:.2f} |" for k, v in report["perplexity"].items()]
    lines += ["", "| artifact | size |", "|---|---|"]
    lines += [f"| {k} | {v / 1e6:.1f} MB |" for k, v in report["sizes_bytes"].items() if v]
    (out / "build.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
