"""Benchmark: the streamed stages on a synthetic Llama larger than the memory they may use.

Builds a seeded random Llama from a config (default hidden 2048, 16 layers, ~3.7 GB of float32
weights, the embedded SmolLM2 tokenizer), saved in shards without ever holding the model, then
runs each streamed step in a fresh process under ``prlimit --data=LIMIT`` (RLIMIT_DATA: private
writable memory; default half the float32 weights):

  score (stream_score) -> prune (plan/write_stream_prune) -> adapter (a random LoRA on the MLPs,
  written tensor by tensor) -> merge (merge_adapter_streamed) -> perplexity (stream_perplexity)
  -> verify (verify_streamed)

Each step reports its peak RSS (VmHWM of its own process: getrusage's ru_maxrss would carry the
parent's peak across fork+exec) and its time, next to the memory plan's prediction
(shrink.analysis.memory.plan_build for the same model and settings, no GPU, RAM = the limit).

Usage: python bench/big_model.py [--workdir DIR] [--hidden 2048] [--layers 16] [--drop 4]
       [--data-limit BYTES] [--out bench/results/big_model.md]
       python bench/big_model.py --tiny --workdir /tmp/bm --data-limit 3000000000   (smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("make", "score", "prune", "adapter", "merge", "perplexity", "verify")
PLAN_ROW = {"score": "score", "prune": "prune", "merge": "merge", "perplexity": "evaluate"}
RANK = 8


def shape_args(a) -> dict:
    if a.tiny:
        return dict(hidden=64, layers=6, intermediate=128, heads=4, kv_heads=2)
    return dict(
        hidden=a.hidden,
        layers=a.layers,
        intermediate=a.intermediate,
        heads=a.heads,
        kv_heads=a.kv_heads,
    )


def synthetic_config(hidden, layers, intermediate, heads, kv_heads):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        torch_dtype="float32",
    )


def blocks(samples: int, seq_len: int, seed: int):
    import torch

    return torch.randint(
        3, 49152, (samples, seq_len), generator=torch.Generator().manual_seed(seed)
    )


def write_adapter(pruned: Path, out: Path, seed: int = 0) -> dict:
    """A LoRA adapter (rank 8, alpha 16) on every MLP projection of ``pruned``, random A and B,
    one tensor at a time, in peft's file format."""
    import torch
    from safetensors.torch import save_file

    from shrink.streaming import Checkpoint

    ck = Checkpoint(pruned)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in ck.tensors.items():
        if ".mlp." in name and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            n, k = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(RANK, k, generator=g) * 0.01
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(n, RANK, generator=g) * 0.01
            )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": 2 * RANK,
                "use_rslora": False,
                "target_modules": ["gate_proj", "up_proj", "down_proj"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    return {"lora_tensors": len(tensors)}


def run_child(step: str, work: Path, a) -> dict:
    """One step, in this (limited) process."""
    from shrink.streaming import plan_stream_prune, stream_score, write_stream_prune
    from shrink.streaming.merge import merge_adapter_streamed
    from shrink.streaming.perplexity import stream_perplexity
    from shrink.streaming.verify import verify_streamed

    dense, pruned, merged = work / "dense", work / "pruned", work / "merged"
    if step == "make":
        from shrink.core.models import ensure_embedded
        from shrink.streaming import write_random_checkpoint

        write_random_checkpoint(
            synthetic_config(**shape_args(a)), dense, max_shard_bytes=a.shard, seed=a.seed
        )
        src = ensure_embedded()
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
                shutil.copy(f, dense / f.name)
        return {"bytes": sum(p.stat().st_size for p in dense.glob("*.safetensors"))}
    if step == "score":
        s = stream_score(
            dense, blocks(a.samples, a.seq_len, 0), batch_size=4, device="cpu", show_progress=False
        )
        inner = list(range(1, len(s.bi) - 1))  # keep the first and last layers
        remove = sorted(sorted(inner, key=lambda i: s.bi[i])[: a.drop])
        (work / "remove.json").write_text(json.dumps(remove))
        return {"remove": remove}
    if step == "prune":
        remove = json.loads((work / "remove.json").read_text())
        shutil.rmtree(pruned, ignore_errors=True)
        pruned.mkdir()
        return write_stream_prune(plan_stream_prune(dense, remove), pruned, show_progress=False)
    if step == "adapter":
        return write_adapter(pruned, work / "adapter", a.seed)
    if step == "merge":
        shutil.rmtree(merged, ignore_errors=True)
        info = merge_adapter_streamed(pruned, work / "adapter", merged)
        return {"merged_tensors": len(info["merged_tensors"]), "shards": info["shards"]}
    if step == "perplexity":
        r = stream_perplexity(merged, blocks(a.eval_samples, a.eval_seq_len, 1))
        return {"perplexity": r.perplexity, "tokens": r.tokens}
    if step == "verify":
        r = verify_streamed(merged)
        return {k: r[k] for k in ("ok", "tensors_checked", "cache_relative_logit_diff")}
    raise SystemExit(f"unknown step {step}")


def child_main(a) -> None:
    t0 = time.perf_counter()
    from shrink.core.peaks import status_bytes

    out = {"step": a.child, "baseline_rss": status_bytes("VmRSS") or 0}
    try:
        out["result"] = run_child(a.child, Path(a.workdir), a)
        out["ok"] = True
    except (MemoryError, RuntimeError, OSError) as e:
        out.update(ok=False, error=(type(e).__name__ + ": " + str(e).splitlines()[0])[:240])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = status_bytes("VmHWM") or 0
    print(json.dumps(out))


def predictions(a, limit: int) -> dict[str, float]:
    """Predicted host peak of each step, from the memory plan."""
    from shrink.analysis.estimate import count_params
    from shrink.analysis.memory import HOST_RUNTIME_CPU as HOST_RUNTIME
    from shrink.analysis.memory import PlanSettings, plan_build

    cfg = synthetic_config(**shape_args(a)).to_dict()
    st = PlanSettings(
        score_samples=a.samples,
        score_seq_len=a.seq_len,
        eval_samples=a.eval_samples,
        eval_seq_len=a.eval_seq_len,
        gptq_bits=None,
        gguf=None,
    )
    plan = plan_build(cfg, gpu_bytes=0, ram_bytes=limit, drop=a.drop, settings=st)
    pred = {step: plan.stage(row).host_bytes for step, row in PLAN_ROW.items()}
    p = count_params(cfg, a.drop)
    pred["make"] = HOST_RUNTIME + 2 * a.shard  # one shard, and its bytes as save_file writes them
    adapter = p.layers * 3 * RANK * (cfg["hidden_size"] + cfg["intermediate_size"]) * 4
    pred["adapter"] = HOST_RUNTIME + 2 * adapter  # its tensors and the file being written
    pred["verify"] = HOST_RUNTIME + 4 * (p.embedding + p.head + 2 * p.per_layer)
    return pred


# the plan's rows behind each stage of a build
BUILD_ROWS = {
    "prune": ("score", "prune", "bridge"),
    "heal": ("heal", "merge"),
    "quantize": ("quantize",),
    "export": ("export gguf",),
    "evaluate": ("evaluate",),
}


def build_flags(a) -> list[str]:
    """The whole build of the synthetic model, scaled down in tokens, not in weights."""
    return [
        "--drop",
        str(a.drop),
        "--strategy",
        "bi",
        "--prune-samples",
        str(a.samples),
        "--prune-seq-len",
        str(a.seq_len),
        "--steps",
        str(a.heal_steps),
        "--heal-batch-size",
        "1",
        "--heal-seq-len",
        "128",
        "--warmup",
        "0",
        *(
            ["--gptq", "4bit", "--quantize-samples", "4", "--quantize-seq-len", "128"]
            if a.gptq
            else []
        ),
        "--gguf",
        a.gguf,
        "--imatrix-samples",
        "4",
        "--imatrix-seq-len",
        "128",
        "--eval-samples",
        str(a.eval_samples),
        "--eval-seq-len",
        str(a.eval_seq_len),
        "--keep-stages",
        "--resume" if a.resume else "--force",
    ]


def run_build(a, work: Path, limit: int, weights: int) -> list[str]:
    """``shrink build`` of the synthetic model in one process under the data limit; each
    stage's peak (its own and its fresh processes') next to the plan the build printed and
    recorded."""
    out = work / "build"
    cmd = [
        "prlimit",
        f"--data={limit}",
        sys.executable,
        "-m",
        "shrink",
        "build",
        str(work / "dense"),
    ]
    cmd += ["-o", str(out), *build_flags(a)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "build.stderr").write_text(proc.stderr)
    lines = [
        f"## The whole build in one process under `prlimit --data={limit}` "
        f"({limit / 1e9:.2f} GB, {limit / weights:.0%} of the float32 weights)",
        "",
        f"Command: `prlimit --data={limit} shrink build {work / 'dense'} -o {out} "
        f"{' '.join(build_flags(a))}` (exit code {proc.returncode}, wall {wall:.0f} s).",
        "",
    ]
    if proc.returncode != 0 or not (out / "report.json").is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return lines + [f"The build failed: `{tail[:300]}`", ""]
    report = json.loads((out / "report.json").read_text())
    plan = {row["stage"]: row for row in report.get("memory_plan") or []}
    lines += [
        "| stage | plan: where, how | predicted host peak | measured peak RSS (own / fresh "
        "processes) | within plan | seconds |",
        "|---|---|---:|---:|---|---:|",
    ]
    for st in report["stages"]:
        rows = [plan[r] for r in BUILD_ROWS.get(st["name"], ()) if r in plan]
        predicted = max((r["host_bytes"] for r in rows), default=0)
        how = "; ".join(f"{r['stage']}: {r['device']}, {r['mode']}, {r['precision']}" for r in rows)
        peaks = st.get("peak_rss_bytes") or {}
        own, child = peaks.get("main") or 0, peaks.get("workers") or 0
        measured = max(own, child)
        within = predicted and measured <= 1.25 * predicted
        lines.append(
            f"| {st['name']} | {how or '-'} | {predicted / 1e9:.2f} GB | {measured / 1e9:.2f} GB "
            f"({own / 1e9:.2f} / {child / 1e9:.2f}) | {'yes' if within else 'NO'} | "
            f"{st['seconds']:.1f} |"
        )
    ppl = report.get("perplexity") or {}
    lines += [
        "",
        "Perplexity (random weights: only finiteness and agreement between runtimes mean "
        "anything): "
        + ", ".join(
            f"{k} {v.get('perplexity', float('nan')):.4g}"
            for k, v in ppl.items()
            if isinstance(v, dict)
        ),
        "",
    ]
    return lines


def weights_bytes(a) -> int:
    from shrink.analysis.estimate import count_params

    return count_params(synthetic_config(**shape_args(a)).to_dict()).total * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/shrink-big-model")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--drop", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="a 6-layer hidden-64 model (smoke run)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--shard", type=int, default=500 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data-limit",
        type=int,
        default=None,
        help="RLIMIT_DATA bytes of each step (default: half the float32 weights)",
    )
    ap.add_argument("--out", default=None, help="markdown table (default: print only)")
    ap.add_argument(
        "--build",
        action="store_true",
        help="also run the whole `shrink build` of the model under the limit (after the steps)",
    )
    ap.add_argument("--build-only", action="store_true", help="only the whole build")
    ap.add_argument("--heal-steps", type=int, default=2)
    ap.add_argument(
        "--resume", action="store_true", help="resume the build's finished stages (--resume)"
    )
    ap.add_argument("--gguf", default="q4_k_m")
    ap.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a)
    if shutil.which("prlimit") is None:
        raise SystemExit("prlimit (util-linux) is needed to cap each step's data segment")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    weights = weights_bytes(a)
    limit = a.data_limit or weights // 2
    pred = predictions(a, limit)
    rows = []
    for step in STEPS if not a.build_only else ("make",) if not (work / "dense").is_dir() else ():
        cmd = [
            "prlimit",
            f"--data={limit}",
            sys.executable,
            __file__,
            *sys.argv[1:],
            "--child",
            step,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        out = (
            json.loads(lines[-1])
            if lines
            else {
                "ok": False,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:240],
                "peak_rss": 0,
                "seconds": 0,
            }
        )
        out["predicted"] = pred[step]
        rows.append(out)
        print(
            f"{step:<11} ok={out['ok']} peak {out['peak_rss'] / 1e9:.2f} GB "
            f"(plan {pred[step] / 1e9:.2f} GB) {out['seconds']:.1f} s "
            f"{out.get('result') or out.get('error')}",
            flush=True,
        )
        if not out["ok"]:
            break
    table = report(rows, a, weights, limit) if rows else []
    if a.build or a.build_only:
        table += [""] + run_build(a, work, limit, weights)
    print("\n".join(table))
    if a.out:
        Path(a.out).write_text("\n".join(table) + "\n")


def report(rows: list[dict], a, weights: int, limit: int) -> list[str]:
    s = shape_args(a)
    lines = [
        f"# Streamed stages on a synthetic Llama ({s['layers']} layers, hidden {s['hidden']}, "
        f"{weights / 1e9:.2f} GB of float32 weights)",
        "",
        f"Each step in a fresh process under `prlimit --data={limit}` "
        f"({limit / 1e9:.2f} GB, {limit / weights:.0%} of the weights); drop {a.drop} layers; "
        f"{platform.processor() or platform.machine()}, {platform.python_version()}.",
        "",
        "| step | predicted host peak | measured peak RSS | within plan | seconds | result |",
        "|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        within = r["peak_rss"] <= 1.25 * r["predicted"] if r["ok"] else False
        lines.append(
            f"| {r['step']} | {r['predicted'] / 1e9:.2f} GB | {r['peak_rss'] / 1e9:.2f} GB "
            f"| {'yes' if within else 'NO'} | {r['seconds']:.1f} | "
            f"{json.dumps(r.get('result') or r.get('error'))} |"
        )
    return lines


if __name__ == "__main__":
    main()
