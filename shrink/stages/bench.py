"""Measured side of the benchmark harness: latency, throughput, memory, size, perplexity.

Every measurement of an artifact runs in a fresh process (``python -m shrink.stages.bench --worker``), so
peak memory is that artifact's alone. Artifacts are measured interleaved (baseline, A, B, baseline,
A, B, ...) over ``repeats`` rounds, and the report gives medians and ratios to the baseline taken
in the same run: these machines are noisy, ratios taken together are what can be trusted.

Decode is timed with a plain loop (prefill the prompt, then one token at a time with the KV cache,
greedy, never stopping at EOS), the same loop for every HF and GPTQ model; ONNX artifacts use
onnxruntime-genai's generator the same way, GGUF files llama.cpp's (through llama-cpp-python).

Threads (``threads=[1, 2]``): every artifact is measured at each count, set the way each runtime
is told: ``torch.set_num_threads`` (OpenMP), onnxruntime-genai's ``intra_op_num_threads`` (a
config overlay; inter-op 1), llama.cpp's ``n_threads`` / ``n_threads_batch``. How the threads
wait is each runtime's default (llama.cpp and onnxruntime busy-poll between operators, OpenMP
spins then sleeps); the report measures it instead of assuming it: ``cores_busy`` is the worker's
CPU seconds (user + system, all threads) over the wall seconds of the timed generation, ~= the
thread count when waiting threads spin, lower when they sleep.

Roofline: a decoded token reads every weight once (the KV cache is small at these contexts), so
decode cannot beat ``memory bandwidth / weight bytes``. The bandwidth is measured once per run
per thread count in a fresh process (:func:`memory_bandwidth`: the best of several sums over a
1 GiB float32 tensor, i.e. streaming reads), and each decode speed is reported as a fraction of
that ceiling, with the artifact's weight files (safetensors / ONNX / GGUF bytes) as the bytes
per token.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shrink.core.data import EVALUATION
from shrink.core.errors import ShrinkError
from shrink.core.outputs import folder_bytes
from shrink.runtime import kinds
from shrink.runtime.measure import prompt_ids, time_hf, vm_bytes
from shrink.runtime.worker import run_worker


def _resolve_artifact(name: str) -> tuple[Path, str]:
    from shrink.runtime.artifacts import artifact_path

    path = artifact_path(name)
    return path.resolve(), kinds.detect(path).name


def _config_dict(path: Path) -> dict | None:
    """The HF config of an artifact: its own, or (a GGUF folder) its source's, from shrink.json."""
    folder = path if path.is_dir() else path.parent
    f = folder / "config.json"
    if f.is_file():
        return json.loads(f.read_text())
    from shrink.core.models import read_shrink_json

    stages = (read_shrink_json(folder) or {}).get("stages") or []
    source = stages[-1].get("source") if stages else None
    if source and (Path(source) / "config.json").is_file():
        return json.loads((Path(source) / "config.json").read_text())
    return None


# ----------------------------------------------------------------------------- worker side


def memory_bandwidth(threads: int | None = None, mib: int = 1024, repeats: int = 5) -> dict:
    """Streaming read bandwidth of this machine (worker side): the best of ``repeats`` sums over
    a ``mib`` MiB float32 tensor with ``threads`` torch threads. A sum reads each byte once and
    does one add per 4 bytes, so it is limited by memory, not arithmetic, on any recent CPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    x.sum()  # fault the pages in, warm the threads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return {
        "read_bytes_per_s": x.numel() * 4 / best,
        "threads": torch.get_num_threads(),
        "bytes": x.numel() * 4,
        "repeats": repeats,
        "method": f"best of {repeats} torch.sum over a {mib} MiB float32 tensor",
    }


def measure(
    path: str,
    kind: str,
    device: str = "cpu",
    prompt_len: int = 128,
    gen_len: int = 64,
    batch: int = 1,
    warmup: int = 1,
    ppl_samples: int = 4,
    ppl_seq_len: int = 256,
    threads: int | None = None,
) -> dict:
    """Measure one artifact in THIS process (the worker side); see :func:`bench`."""
    import torch  # noqa: F401 - before the RSS baseline: torch itself is not model memory

    rss0 = vm_bytes("VmRSS")
    t0 = time.perf_counter()
    r = kinds.get(kind).measure(
        Path(path),
        kinds.Measure(
            device=device,
            prompt_len=prompt_len,
            gen_len=gen_len,
            batch=batch,
            warmup=warmup,
            ppl_samples=ppl_samples,
            ppl_seq_len=ppl_seq_len,
            threads=threads,
        ),
    )
    r.update(rss_before_load_bytes=rss0, wall_s=time.perf_counter() - t0)
    return r


# ----------------------------------------------------------------------------- driver side


@dataclass
class ArtifactResult:
    name: str
    path: str
    kind: str
    size_bytes: int
    layers: int | None
    flops_per_token: float | None  # analytic, matmul + attention at the benchmark's context
    weight_bytes_per_token: float | None  # analytic bytes read per decoded token (bandwidth)
    threads: int | None = None  # None: the runtime's default
    weight_file_bytes: int | None = None  # the weights as stored (the roofline's bytes/token)
    runs: list[dict] = field(default_factory=list)
    median: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)


@dataclass
class BenchReport:
    settings: dict
    baseline: str
    results: list[ArtifactResult]
    machine: dict
    bandwidth: dict = field(default_factory=dict)  # threads -> memory_bandwidth() (best run)

    def to_dict(self) -> dict:
        return asdict(self)


def _analytic(path: Path, kind: str, context: int) -> tuple[int | None, float | None, float | None]:
    cfg = _config_dict(path)
    if cfg is None:
        return None, None, None
    from shrink.analysis.estimate import flops_per_token, weight_memory

    try:
        f = flops_per_token(cfg, context=context)
        bits, group = 16, 128
        q = cfg.get("quantization_config") or {}
        if q:
            bits, group = int(q.get("bits", 4)), int(q.get("group_size", 128))
        w = weight_memory(cfg, bits=bits, group_size=group)
        layers = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get(
            "num_hidden_layers"
        )
        return layers, f.total, w.total_bytes
    except ShrinkError:
        return cfg.get("num_hidden_layers"), None, None


def _machine(device: str) -> dict:
    import platform

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run_worker(path: Path, kind: str, opts: dict) -> dict:
    return run_worker("shrink.stages.bench:measure", path=str(path), kind=kind, **opts)


def weight_file_bytes(path: Path, kind: str) -> int:
    """Bytes of an artifact's weight files (what a decoded token streams from memory)."""

    return kinds.get(kind).describe(path)["weight_bytes"]


def bench(
    artifacts: list[str],
    baseline: str | None = None,
    device: str = "cpu",
    prompt_len: int = 128,
    gen_len: int = 64,
    batch: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    ppl_samples: int = 4,
    ppl_seq_len: int = 256,
    tasks: list[str] | None = None,
    tasks_path: str | None = None,
    limit: int | None = None,
    threads: list[int] | None = None,
    show_progress: bool = True,
) -> BenchReport:
    """Benchmark artifacts (HF, GPTQ, ONNX or GGUF folders) against a baseline, interleaved.

    ``threads``: measure every artifact at each of these CPU thread counts (one result per
    artifact and count; ratios are to the baseline at the same count), and the machine's memory
    bandwidth at each count for the roofline (see the module docstring).
    ``tasks``: lm-evaluation-harness tasks run on every HF/GPTQ artifact (the ``eval`` extra)."""
    from shrink.core.models import check_device
    from shrink.core.progress import progress_bar

    device = check_device(device)
    if gen_len < 2 or prompt_len < 2 or batch < 1 or repeats < 1:
        raise ShrinkError("need --gen-len >= 2, --prompt-len >= 2, --batch >= 1, --repeats >= 1")
    names = ([baseline] if baseline else []) + [a for a in artifacts if a != baseline]
    if not names:
        raise ShrinkError("no artifact to benchmark")
    resolved = [_resolve_artifact(n) for n in names]
    manager = None
    if tasks:  # check the extra and the task names before minutes of timing
        from shrink.runtime.lmeval import run_tasks, task_manager

        manager = task_manager(tasks, tasks_path)
    if threads and device != "cpu":
        raise ShrinkError("--threads is for CPU runs (--device cpu)")
    counts: list[int | None] = list(threads) if threads else [None]
    results = []
    for name, (path, kind) in zip(names, resolved):
        layers, flops, wbytes = _analytic(path, kind, prompt_len + gen_len)
        for t in counts:
            results.append(
                ArtifactResult(
                    name,
                    str(path),
                    kind,
                    folder_bytes(path),
                    layers,
                    flops,
                    wbytes,
                    t,
                    weight_file_bytes(path, kind),
                )
            )
    opts = dict(
        device=device,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch=batch,
        warmup=warmup,
        ppl_samples=0,
        ppl_seq_len=ppl_seq_len,
    )
    bandwidth: dict = {}

    def measure_bandwidth() -> None:  # before and after the runs: the best of the two
        for t in counts:
            if device == "cpu":
                bw = run_worker("shrink.stages.bench:memory_bandwidth", threads=t)
                key = str(t if t is not None else "default")
                if (
                    key not in bandwidth
                    or bw["read_bytes_per_s"] > bandwidth[key]["read_bytes_per_s"]
                ):
                    bandwidth[key] = bw

    measure_bandwidth()
    order = []
    for r in range(repeats):
        seq = list(range(len(results)))
        order += seq if r % 2 == 0 else seq[::-1]
    for i in progress_bar(order, "benchmark runs", enabled=show_progress):
        res = results[i]
        run = _run_worker(Path(res.path), res.kind, {**opts, "threads": res.threads})
        run["load_avg_1m"] = os.getloadavg()[0]
        res.runs.append(run)
    measure_bandwidth()
    if ppl_samples:  # perplexity is deterministic: once per artifact
        done: dict[str, float | None] = {}
        for res in progress_bar(results, "perplexity", enabled=show_progress):
            if res.path not in done:
                run = _run_worker(
                    Path(res.path),
                    res.kind,
                    {
                        **opts,
                        "ppl_samples": ppl_samples,
                        "gen_len": 2,
                        "warmup": 0,
                        "threads": max(t for t in counts if t) if threads else None,
                    },
                )
                done[res.path] = run.get("perplexity")
            res.median["perplexity"] = done[res.path]
    if tasks:
        for res in progress_bar(results, "lm-eval tasks", enabled=show_progress):
            if kinds.get(res.kind).lm_eval and res.threads == counts[0]:
                res.median["tasks"] = run_tasks(
                    res.path, tasks, tasks_path, limit=limit, device=device, manager=manager
                )
    for res in results:
        m = res.median
        m["ttft_s"] = statistics.median(r["ttft_s"] for r in res.runs)
        m["decode_tokens_per_s"] = statistics.median(
            batch * (gen_len - 1) / r["decode_s"] for r in res.runs
        )
        m["prefill_tokens_per_s"] = statistics.median(
            batch * prompt_len / r["ttft_s"] for r in res.runs
        )
        m["e2e_s"] = statistics.median(r["ttft_s"] + r["decode_s"] for r in res.runs)
        m["peak_rss_bytes"] = statistics.median(r["peak_rss_bytes"] for r in res.runs)
        m["cores_busy"] = statistics.median(
            r["cpu_s"] / (r["ttft_s"] + r["decode_s"]) for r in res.runs
        )
        m["load_avg_1m"] = [
            min(r["load_avg_1m"] for r in res.runs),
            max(r["load_avg_1m"] for r in res.runs),
        ]
        bw = bandwidth.get(str(res.threads if res.threads is not None else "default"))
        if bw and res.weight_file_bytes:
            m["roofline_tokens_per_s"] = bw["read_bytes_per_s"] / res.weight_file_bytes
            m["roofline_fraction"] = m["decode_tokens_per_s"] / batch / m["roofline_tokens_per_s"]
        if any("peak_cuda_bytes" in r for r in res.runs):
            m["peak_cuda_bytes"] = statistics.median(r["peak_cuda_bytes"] for r in res.runs)
        if res.weight_bytes_per_token and device.startswith("cuda"):
            m["achieved_bandwidth_gb_s"] = (
                res.weight_bytes_per_token * m["decode_tokens_per_s"] / batch / 1e9
            )
    for res in results:
        base = next(b for b in results if b.threads == res.threads)  # same thread count
        r = res.ratios
        for key in (
            "ttft_s",
            "decode_tokens_per_s",
            "prefill_tokens_per_s",
            "e2e_s",
            "peak_rss_bytes",
            "peak_cuda_bytes",
            "perplexity",
        ):
            a, b = res.median.get(key), base.median.get(key)
            if a is not None and b:
                r[key] = a / b
        r["size_bytes"] = res.size_bytes / base.size_bytes
        if res.flops_per_token and base.flops_per_token:
            r["flops_per_token"] = res.flops_per_token / base.flops_per_token
    settings = dict(
        device=device,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        ppl_samples=ppl_samples,
        ppl_seq_len=ppl_seq_len,
        tasks=tasks,
        tasks_path=tasks_path,
        limit=limit,
        threads=threads,
    )
    return BenchReport(settings, names[0], results, _machine(device), bandwidth)


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepPoint:
    drop: int
    removed: list[int]
    perplexity: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    flops_per_token: float | None


def sweep_drop(
    model: str,
    drops: list[int],
    device: str | None = None,
    prompt_len: int = 128,
    gen_len: int = 32,
    repeats: int = 3,
    ppl_samples: int = 4,
    ppl_seq_len: int = 256,
    calib_samples: int = 16,
    calib_seq_len: int = 256,
    show_progress: bool = True,
) -> list[SweepPoint]:
    """Prune by BI at each setting (in memory, one scoring) and measure perplexity and speed.

    Throughput is measured interleaved across settings within each repeat (medians)."""
    from shrink.analysis.estimate import flops_per_token
    from shrink.core.data import CALIBRATION, token_blocks
    from shrink.core.layers import without_layers
    from shrink.core.models import load_model
    from shrink.core.perplexity import perplexity
    from shrink.core.scores import score_layers

    loaded = load_model(model, device=device)
    hf, tok = loaded.model, loaded.tokenizer
    L = hf.config.num_hidden_layers
    bad = [d for d in drops if not 0 <= d < L]
    if bad:
        raise ShrinkError(f"--sweep-drop values {bad} out of range 0..{L - 1}")
    dev = str(next(hf.parameters()).device)
    calib = token_blocks(tok, CALIBRATION, calib_samples, calib_seq_len)
    scores = score_layers(hf, calib.input_ids, show_progress=show_progress)
    evalb = token_blocks(tok, EVALUATION, ppl_samples, ppl_seq_len)
    prompt = prompt_ids(tok, prompt_len, 1).to(dev)
    cfg = hf.config.to_dict()
    timings: dict[int, list[tuple[float, float]]] = {d: [] for d in drops}
    ppl: dict[int, float] = {}

    def removed(d):
        return scores.lowest("bi", d) if d else []

    from contextlib import nullcontext

    from shrink.core.progress import progress_bar

    for rep in progress_bar(range(repeats), "sweep", enabled=show_progress):
        for d in drops if rep % 2 == 0 else drops[::-1]:
            with without_layers(hf, removed(d)) if d else nullcontext(hf):
                time_hf(hf, prompt, 4, dev)  # warm-up
                timings[d].append(time_hf(hf, prompt, gen_len, dev))
                if d not in ppl:
                    ppl[d] = perplexity(hf, evalb.input_ids, show_progress=False).perplexity
    points = []
    for d in drops:
        try:
            f = flops_per_token(cfg, context=prompt_len + gen_len, drop=d).total
        except ShrinkError:
            f = None
        points.append(
            SweepPoint(
                d,
                removed(d),
                ppl[d],
                statistics.median((gen_len - 1) / dec for _, dec in timings[d]),
                statistics.median(prompt_len / t for t, _ in timings[d]),
                f,
            )
        )
    return points
