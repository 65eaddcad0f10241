"""GGUF types on the embedded SmolLM2-135M (dense, or pruned with shrink first): size, perplexity
in llama.cpp vs PyTorch on the same held-out blocks, greedy agreement with PyTorch, top-1 agreement.

Every type goes through ``shrink.stages.export.gguf.export_gguf`` exactly as an export runs it: write
(f32/f16/bf16/q8_0 by shrink, the others by llama.cpp's quantizer), then a fresh process loads
the file in llama.cpp, checks it against the HF config and tokenizer, generates greedily on fixed
prompts next to PyTorch, and measures perplexity. Writes bench/results/gguf_types[-<tag>].md/.json.

    python bench/gguf_types.py [--drop 6 --strategy bi] [--types f16 q8_0 q4_0 q4_k_m ...]
                               [--samples 8] [--seq-len 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--drop", type=int, default=0, help="prune this many layers first")
    p.add_argument("--strategy", default="bi", help="bi or relmag (layer scores)")
    p.add_argument(
        "--types", nargs="+", default=["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
    )
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    os.environ.setdefault("SHRINK_NO_PROGRESS", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shrink  # top-level names only: the same before and after the restructuring
    from shrink.stages.export.gguf import export_gguf

    if args.model:
        src = Path(args.model)
    else:
        from shrink.core.models import ensure_embedded

        src = ensure_embedded()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shrink-bench-gguf-") as tmp:
        model_dir = src
        tok = AutoTokenizer.from_pretrained(src)
        if args.drop:  # layer scores on 32 x 256 calibration tokens: shrink prune's defaults
            model = AutoModelForCausalLM.from_pretrained(src, dtype="float32").eval()
            calib = shrink.token_blocks(tok, shrink.CALIBRATION, 32, 256, 0)
            scores = shrink.score_layers(model, calib.input_ids, show_progress=False)
            shrink.prune_model(model, scores.lowest(args.strategy, args.drop))
            model_dir = Path(tmp) / "pruned"
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
            del model
        blocks = shrink.token_blocks(tok, shrink.EVALUATION, args.samples, args.seq_len, 0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
        ref = shrink.perplexity(model, blocks.input_ids, show_progress=False)
        n_layers = model.config.num_hidden_layers
        del model
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        print(
            json.dumps({"torch_fp32_perplexity": ref.perplexity, "layers": n_layers}),
            file=sys.stderr,
        )
        for t in args.types:
            t0 = time.perf_counter()
            info = export_gguf(
                model_dir,
                Path(tmp) / f"{t}.gguf",
                t,
                threads=args.threads,
                samples=args.samples,
                seq_len=args.seq_len,
            )
            v = info["verification"]
            row = {
                "type": t,
                "bytes": info["bytes"],
                "perplexity": v["perplexity"],
                "greedy_equal": v["greedy_equal"],
                "greedy_token_agreement": v["greedy_token_agreement"],
                "top1_agreement": v["top1_agreement"],
                "tensor_types": v["tensor_types"],
                "completion": v["completion"],
                "seconds_write": info["seconds_write"],
                "seconds_total": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    cmd = "python bench/gguf_types.py " + " ".join(sys.argv[1:])
    tag = args.tag or (f"{n_layers}L" if args.drop else "dense")
    lines = [
        f"# GGUF types of SmolLM2-135M ({tag}, {n_layers} layers): llama.cpp vs PyTorch",
        "",
        f"Command: `{cmd}` (threads {args.threads}; llama-cpp-python {version('llama-cpp-python')}, "
        f"gguf {version('gguf')}, torch {version('torch')}; {platform.machine()}, "
        f"{os.cpu_count()} cores).",
        "",
        f"Held-out text: {blocks.source}, {args.samples} blocks x {args.seq_len} tokens (seed 0), "
        "the same blocks and arithmetic in both runtimes. PyTorch fp32 perplexity: "
        f"**{ref.perplexity:.2f}** (safetensors {weights / 1e6:.1f} MB). Greedy: 16 tokens on 3 "
        "fixed prompts, llama.cpp vs PyTorch; top-1: next-token argmax agreement over one block.",
        "",
        "| type | size MB | perplexity (llama.cpp) | greedy = torch | greedy token agreement | "
        'top-1 agreement | tensor types | "The capital of France is" |',
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["tensor_types"].items()))
        comp = r["completion"].replace("\n", " ").replace("|", "/")[:40]
        lines.append(
            f"| {r['type']} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | "
            f"{'yes' if r['greedy_equal'] else 'no'} | {r['greedy_token_agreement']:.2f} "
            f"| {r['top1_agreement']:.3f} | {types} | {comp} |"
        )
    RESULTS.mkdir(exist_ok=True)
    stem = f"gguf_types-{tag}"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": cmd,
                "torch_fp32_perplexity": ref.perplexity,
                "layers": n_layers,
                "data": blocks.describe(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
