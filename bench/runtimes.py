"""CPU runtimes side by side: PyTorch fp32, ONNX int4 (onnxruntime-genai) and GGUF (llama.cpp) of the
dense and the pruned embedded SmolLM2, at 1 and 2 threads, in one interleaved ``shrink bench``
run (shrink.stages.bench: every run a fresh process; the machine's memory bandwidth measured per
thread count; decode as a fraction of that roofline; CPU seconds per wall second as the measured
thread-wait behaviour). Writes bench/results/runtimes.md and runtimes.json.

    PYTHONPATH=. python bench/runtimes.py                 # builds the artifacts it lacks first
    PYTHONPATH=. python bench/runtimes.py --onnx-variant block_size=128 ...   # see --help

The pruned model is 6 of 30 layers removed (``--strategy bi``, no healing: speed depends on the
shapes only; its perplexity is the unhealed one). Artifacts are cached in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _onnx_variant(src: Path, out: Path, options: list[str]) -> None:
    """An ONNX int4 export with extra builder options (to compare the builder's knobs)."""
    from shrink.stages.export.onnx import _run_builder, builder_options

    if out.exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", False)
    ok, err = _run_builder(src, tmp, "int4", "cpu", builder_options("int4", "int8", tied) + options)
    if not ok:
        raise SystemExit(f"builder failed for {options}: {err}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).is_file() and not (tmp / f).is_file():
            shutil.copy(src / f, tmp / f)
    tmp.rename(out)


def prepare(work: Path, gguf_types: list[str], variants: list[str], gptq: bool) -> list[str]:
    from shrink.core.models import EMBEDDED, ensure_embedded
    from shrink.stages.configs import ExportConfig, PruneConfig, QuantizeConfig
    from shrink.stages.export import export
    from shrink.stages.prune import prune

    dense = Path(ensure_embedded())
    pruned = work / "pruned-hf"
    if not pruned.exists():
        prune(EMBEDDED, pruned, PruneConfig(drop=6, strategy="bi"), show_progress=False)
    arts = []
    for tag, src in (("dense", dense), ("pruned", pruned)):
        arts.append(str(src))
        onnx = work / f"{tag}-onnx-int4"
        if not onnx.exists():
            export(src, onnx, ExportConfig(onnx="int4"))
        arts.append(str(onnx))
        for v in variants:
            out = work / f"{tag}-onnx-int4-{v.replace('=', '').replace(',', '-')}"
            _onnx_variant(src, out, v.split(","))
            arts.append(str(out))
        for t in gguf_types:
            g = work / f"{tag}-gguf-{t}"
            if not g.exists():
                export(src, g, ExportConfig(gguf=t))
            arts.append(str(g))
        if gptq:
            from shrink.stages.quantize import quantize

            q = work / f"{tag}-gptq-4bit"
            if not q.exists():
                quantize(src, q, QuantizeConfig(gptq="4bit"), evaluation=None, show_progress=False)
            arts.append(str(q))
    return arts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/shrink-bench-runtimes")
    ap.add_argument("--gguf", nargs="*", default=["q4_0", "q4_k_m"])
    ap.add_argument(
        "--onnx-variant",
        nargs="*",
        default=[],
        help="extra ONNX int4 builds, each a comma-separated list of builder "
        "--extra_options, e.g. block_size=128 accuracy_level=1",
    )
    ap.add_argument("--gptq", action="store_true", help="also GPTQ 4-bit (GPTQModel on CPU)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated folder names: bench only "
        "these artifacts (smollm2-135m is the dense HF)",
    )
    ap.add_argument("--prepare-only", action="store_true", help="build the artifacts, no timing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtimes"))
    a = ap.parse_args()
    command = "PYTHONPATH=. python bench/runtimes.py " + " ".join(sys.argv[1:])
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    arts = prepare(work, a.gguf, a.onnx_variant, a.gptq)
    if a.only:
        keep = a.only.split(",")
        arts = [x for x in arts if Path(x).name in keep]
    print(f"artifacts ready in {time.perf_counter() - t0:.0f} s: {arts}", flush=True)
    if a.prepare_only:
        return 0

    from shrink.report.tables import bench_markdown
    from shrink.stages.bench import bench

    load0 = os.getloadavg()
    t1 = time.perf_counter()
    report = bench(
        arts,
        prompt_len=a.prompt_len,
        gen_len=a.gen_len,
        repeats=a.repeats,
        ppl_samples=8,
        ppl_seq_len=512,
        threads=a.threads,
        show_progress=True,
    )
    seconds = time.perf_counter() - t1
    names = {x: (Path(x).name if Path(x).name != "smollm2-135m" else "dense-hf") for x in arts}
    for r in report.results:
        r.name = names.get(r.name, r.name)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = [
        "# CPU runtimes: PyTorch, ONNX int4, GGUF, dense and pruned SmolLM2-135M",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'CPU'}),"
        f" load average {load0[0]:.2f} before and {os.getloadavg()[0]:.2f} after "
        f"({seconds:.0f} s of runs); every run a fresh process, artifacts and thread counts "
        "interleaved.  ",
        "Perplexity: the fixed evaluation set (austen:evaluation, 8 x 512 tokens, seed 0), "
        "measured once per artifact (at the highest thread count).  ",
        "Roofline: measured streaming-read bandwidth / the artifact's weight bytes (file "
        "size), the decode speed if every weight were read once per token at full bandwidth.  ",
        "Cores busy: CPU seconds / wall seconds of the timed generation (all threads); a "
        "runtime whose idle threads spin shows ~= its thread count.  ",
        "Threads: PyTorch `torch.set_num_threads` (OpenMP), onnxruntime-genai "
        "`intra_op_num_threads` (inter-op 1), llama.cpp `n_threads` = `n_threads_batch`; wait "
        "policies are each runtime's default.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(head) + bench_markdown(report))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "load_before": load0,
                "load_after": os.getloadavg(),
                "report": report.to_dict(),
            },
            indent=1,
            default=str,
        )
    )
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
