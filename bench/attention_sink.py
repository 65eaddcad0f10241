"""Why `--skip-first 1` is the default: how the first position of a block behaves in SmolLM2.

For every layer: BI of position 0 alone vs BI of the other positions, and the residual-stream
norm at position 0 vs elsewhere. Writes bench/results/attention_sink.md.

    python bench/attention_sink.py [--samples 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import shrink


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    loaded = shrink.load_model("smollm2-135m")
    ids = shrink.token_blocks(loaded.tokenizer, shrink.CALIBRATION, a.samples, a.seq_len).input_ids
    model = loaded.model
    ins, outs = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, args, kw, i=i: ins.__setitem__(
                    i, kw.get("hidden_states", args[0] if args else None)
                ),
                with_kwargs=True,
            )
        )
        hooks.append(
            layer.register_forward_hook(lambda m, args, out, i=i: outs.__setitem__(i, out))
        )
    with torch.no_grad():
        model.model(input_ids=ids)
    for h in hooks:
        h.remove()
    with_0 = shrink.score_layers(model, ids, skip_first=0, show_progress=False)
    without_0 = shrink.score_layers(model, ids, skip_first=1, show_progress=False)
    rows = [
        "| layer | BI position 0 | BI other positions | norm position 0 | mean norm others "
        "| BI all tokens | BI skip first |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in sorted(ins):
        cos = F.cosine_similarity(ins[i].float(), outs[i].float(), dim=-1)
        n = ins[i].float().norm(dim=-1)
        rows.append(
            f"| {i} | {1 - cos[:, 0].mean():.4f} | {1 - cos[:, 1:].mean():.4f} | "
            f"{n[:, 0].mean():.0f} | {n[:, 1:].mean():.0f} | {with_0.bi[i]:.4f} | "
            f"{without_0.bi[i]:.4f} |"
        )
    order0 = sorted(range(len(with_0.bi)), key=lambda i: with_0.bi[i])
    order1 = sorted(range(len(without_0.bi)), key=lambda i: without_0.bi[i])
    text = (
        "\n".join(
            [
                "# The first position of a block in SmolLM2-135M (attention sink)\n",
                f"Command: `python bench/attention_sink.py {' '.join(sys.argv[1:])}`  ",
                f"{a.samples} x {a.seq_len} tokens of austen:calibration, fp32, CPU.\n",
                *rows,
                "",
                f"BI ranking, all tokens:      {order0}",
                f"BI ranking, first skipped:   {order1}",
                f"6 lowest, all tokens: {sorted(order0[:6])}; first skipped: {sorted(order1[:6])}",
            ]
        )
        + "\n"
    )
    out = Path(__file__).parent / "results" / "attention_sink.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
