"""Hook-based layer scoring (shrink) vs the naive ``output_hidden_states=True`` approach.

Both compute Block Influence over the same calibration blocks of the embedded SmolLM2-135M. Each
measurement runs in its own fresh process (clean peak RSS), A and B interleaved, repeated; the
report gives medians and B/A ratios taken in the same run. Peak memory is the process's peak RSS
during scoring minus its RSS after the model was loaded (VmHWM reset through /proc/self/clear_refs).

    python bench/scoring.py [--samples 16] [--seq-len 512] [--batch-size 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(method: str, samples: int, seq_len: int, batch_size: int) -> dict:
    import torch
    import torch.nn.functional as F

    import shrink

    torch.set_grad_enabled(False)
    loaded = shrink.load_model("smollm2-135m")
    ids = shrink.token_blocks(loaded.tokenizer, shrink.CALIBRATION, samples, seq_len).input_ids
    model = loaded.model
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if method == "shrink":
        bi = shrink.score_layers(
            model, ids, batch_size=batch_size, skip_first=0, show_progress=False
        ).bi
    else:  # what a script without hooks does: keep every hidden state, then compare
        L = model.config.num_hidden_layers
        sums = torch.zeros(L, dtype=torch.float64)
        for s in range(0, ids.shape[0], batch_size):
            hs = model(ids[s : s + batch_size], output_hidden_states=True).hidden_states
            for i in range(L):  # hs[L] is after the final norm: the naive way is wrong there
                sums[i] += (1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1)).sum().double()
        bi = (sums / ids.numel()).tolist()
    seconds = time.perf_counter() - t0
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_bytes": _status("VmHWM") - base,
        "tokens": ids.numel(),
        "bi": bi,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["shrink", "naive"])
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.samples, a.seq_len, a.batch_size)))
        return
    runs: dict[str, list[dict]] = {"shrink": [], "naive": []}
    for r in range(a.repeats):
        for method in ("shrink", "naive") if r % 2 == 0 else ("naive", "shrink"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--samples",
                    str(a.samples),
                    "--seq-len",
                    str(a.seq_len),
                    "--batch-size",
                    str(a.batch_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(method, f"{runs[method][-1]['seconds']:.2f} s", file=sys.stderr)
    med = {
        m: {
            "seconds": statistics.median(x["seconds"] for x in v),
            "peak_extra_mb": statistics.median(x["peak_extra_bytes"] for x in v) / 2**20,
        }
        for m, v in runs.items()
    }
    agree = max(
        abs(p - q) for p, q in zip(runs["shrink"][0]["bi"][:-1], runs["naive"][0]["bi"][:-1])
    )
    last = (runs["shrink"][0]["bi"][-1], runs["naive"][0]["bi"][-1])
    cmd = "python bench/scoring.py " + " ".join(sys.argv[1:])
    report = {
        "command": cmd.strip(),
        "machine": f"{platform.machine()}, {platform.processor() or ''} "
        f"{__import__('os').cpu_count()} cores",
        "model": "smollm2-135m (30 layers, fp32, CPU)",
        "samples": a.samples,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "median": med,
        "time_ratio_naive_over_shrink": med["naive"]["seconds"] / med["shrink"]["seconds"],
        "peak_memory_ratio_naive_over_shrink": med["naive"]["peak_extra_mb"]
        / med["shrink"]["peak_extra_mb"],
        "max_bi_difference_layers_0_to_L-2": agree,
        "last_layer_bi_shrink_vs_naive": last,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# Layer scoring: shrink's hooks vs naive output_hidden_states\n",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; model: "
        f"{report['model']}; {a.samples} x {a.seq_len} tokens, batch {a.batch_size}, "
        f"{a.repeats} interleaved repeats (medians), each in a fresh process.\n",
        "| method | time (s) | peak memory above the loaded model (MiB) |",
        "|---|---|---|",
    ]
    for m in ("shrink", "naive"):
        md.append(f"| {m} | {med[m]['seconds']:.2f} | {med[m]['peak_extra_mb']:.0f} |")
    md += [
        "",
        f"- naive / shrink time: **{report['time_ratio_naive_over_shrink']:.2f}x**",
        f"- naive / shrink peak memory: **{report['peak_memory_ratio_naive_over_shrink']:.2f}x**",
        f"- BI agreement on layers 0..L-2: max difference {agree:.2e}",
        f"- last layer: shrink {last[0]:.4f} vs naive {last[1]:.4f} — the naive value compares "
        "against the hidden state after the final norm, which is not the layer's output.",
    ]
    (RESULTS / "scoring.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
