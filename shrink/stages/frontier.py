"""``shrink frontier``: prune or quantize harder? Every artifact measured at equal footing.

For the dense model, llama.cpp's quantization ladder (with shrink's importance matrix, and a few
types also without it, to show what the matrix buys); for pruned models at several depths (the
build's own strategy, bridge and healing), healed and unhealed, the GGUF types that fit; and as a
control the dense model given the same fine-tune. Each artifact: bytes on disk, perplexity on both
held-out domains (the fixed evaluation sets), and decode tokens/s and peak memory measured by
``shrink bench`` (fresh processes, interleaved, threads recorded).

Every step runs as a shrink command in a fresh process (the way a user would run it, and so that
no step's memory or threads leak into the next one's measurement); a step whose result file
exists is not run again, so an interrupted frontier resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field, field_validator

from shrink.analysis.frontier import Point, mark_front
from shrink.core.errors import ShrinkError
from shrink.stages.configs import Config

DENSE_LADDER = [
    "f16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q4_k_m",
    "iq4_nl",
    "q4_0",
    "q3_k_m",
    "q2_k",
    "iq3_s",
    "iq2_m",
]
PLAIN_ALSO = ["q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_0", "q3_k_m", "q2_k"]
REFERENCE = "dense f16"


class FrontierConfig(Config):
    """``shrink frontier``: the size / speed / quality frontier of pruning against quantization."""

    dense_types: list[str] = Field(DENSE_LADDER, description="GGUF types of the dense model.")
    plain_types: list[str] = Field(
        PLAIN_ALSO,
        description="Dense types also measured without an importance matrix ('' for none).",
    )
    depths: list[float] = Field(
        [0.1, 0.2, 0.3],
        description="Pruning depths: fractions of the layers (0.2) or layer counts (6).",
    )
    pruned_types: list[str] = Field(
        ["iq4_nl", "q2_k"],
        description="GGUF types of every pruned model (and of the fine-tuned dense control).",
    )
    unhealed: bool = Field(True, description="Also measure each pruned model before healing.")
    control: bool = Field(
        True,
        description="Give the dense model the same fine-tune as the "
        "pruned ones and measure it too.",
    )
    speed: bool = Field(
        True,
        description="Measure decode tokens/s and peak memory (shrink "
        "bench, fresh processes, interleaved).",
    )
    threads: int = Field(1, ge=1, le=1024, description="CPU threads for the speed runs.")
    repeats: int = Field(2, ge=1, le=100, description="Interleaved speed rounds (median).")

    @field_validator("dense_types", "plain_types", "pruned_types", "depths", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if any(not (math.isfinite(d) and d > 0) for d in v):  # [] measures the dense ladder only
            raise ValueError("depths must be positive fractions (0.2) or layer counts (6)")
        return v


def layer_drops(depths: list[float], n_layers: int) -> list[int]:
    """Fractions -> layer counts (rounded, at least 1), counts kept; each below ``n_layers``."""
    drops = []
    for d in depths:
        n = int(round(d * n_layers)) if d < 1 else int(d)
        if not 1 <= n < n_layers:
            raise ShrinkError(f"depth {d}: {n} of {n_layers} layers cannot be removed")
        drops.append(n)
    return sorted(set(drops))


def _flags(values: dict) -> list[str]:
    """A config section as CLI flags (the same names config_options generates)."""
    out: list[str] = []
    for name, v in values.items():
        flag = "--" + name.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{name.replace('_', '-')}")
        elif isinstance(v, (list, tuple)):
            out += [flag, ",".join(str(x) for x in v)]
        else:
            out += [flag, str(v)]
    return out


class Runner:
    """Runs shrink commands in fresh processes, logging each, skipping finished steps."""

    def __init__(self, work: Path, log=None):
        self.work = work
        self.log = log or (lambda msg: None)
        work.mkdir(parents=True, exist_ok=True)

    def shrink(self, args: list[str], done: Path) -> dict:
        if done.is_file():
            return json.loads(done.read_text())
        log_file = self.work / "commands.log"
        t0 = time.perf_counter()
        self.log("shrink " + " ".join(args))
        with open(log_file, "a") as f:
            f.write("$ shrink " + " ".join(args) + "\n")
            f.flush()
            env = {**os.environ, "SHRINK_NO_PROGRESS": "1"}
            rc = subprocess.call(
                [sys.executable, "-m", "shrink", *args], stdout=f, stderr=f, env=env
            )
        if rc != 0:
            raise ShrinkError(
                f"frontier step failed (exit {rc}): shrink {' '.join(args)}; see {log_file}"
            )
        if not done.is_file():
            raise ShrinkError(f"frontier step wrote no result: shrink {' '.join(args)}")
        data = json.loads(done.read_text())
        data["_seconds"] = time.perf_counter() - t0
        done.write_text(json.dumps(data))
        return data


def _gguf_point(
    run: Runner,
    source: str,
    label: str,
    family: str,
    drop: int,
    healed: bool,
    gguf_type: str,
    imatrix: bool,
) -> Point:
    """Export ``source`` to ``gguf_type`` and measure its perplexity on both domains."""
    slug = label.replace(" ", "-")
    folder = run.work / slug
    flags = [] if imatrix else ["--no-imatrix"]
    run.shrink(
        [
            "export",
            source,
            "--gguf",
            gguf_type,
            *flags,
            "-o",
            str(folder),
            "--force",
            "--no-verify",
            "--json",
            str(run.work / f"{slug}.export.json"),
        ],
        run.work / f"{slug}.export.json",
    )
    ev = run.shrink(
        ["eval", str(folder), "--json", str(run.work / f"{slug}.eval.json")],
        run.work / f"{slug}.eval.json",
    )
    ev = ev.get("result", ev)  # write_json wraps the result with the command and settings
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ShrinkError(f"no .gguf file in {folder}")
    ppl = {_domain(ev): ev["perplexity"]}
    if ev.get("second"):
        ppl[_domain(ev["second"])] = ev["second"]["perplexity"]
    from shrink.stages.export.gguf_types import IMATRIX_TYPES

    return Point(
        label=label,
        family=family,
        drop=drop,
        healed=healed,
        format=gguf_type,
        bytes=files[0].stat().st_size,
        ppl=ppl,
        imatrix=imatrix and gguf_type in IMATRIX_TYPES,
        path=str(folder),
    )


def _domain(result: dict) -> str:
    source = (result.get("data") or {}).get("source", "")
    return (
        "technical"
        if str(source).startswith("tech")
        else "Persuasion"
        if str(source).startswith("austen")
        else str(source)
    )


def base_recipe(model: str):
    """The build recipe the pruned points use: the shipped recipe named like the model if there
    is one (the default build's own settings), else the build's defaults for ``model``."""
    from shrink.stages.build import load_recipe
    from shrink.stages.configs import BuildConfig

    try:
        config, _ = load_recipe(model)
        return config
    except ShrinkError:
        return BuildConfig(model=model)


def _heal_args(config) -> list[str]:
    values = config.heal.model_dump(exclude_defaults=True) if config.heal else {}
    # heal's own before/after perplexity is not needed here: the frontier measures every point
    return _flags(values) + ["--eval-samples", "1", "--eval-second", ""]


def frontier(
    model: str, output: str | Path, config: FrontierConfig | None = None, *, log=None
) -> dict:
    """Measure the frontier of ``model`` into ``output`` (frontier.json, frontier.md, plots)."""
    from shrink.core.models import load_config, resolve
    from shrink.report.frontier import write_frontier

    config = config or FrontierConfig()
    log = log or (lambda msg: None)
    out = Path(output).expanduser()
    run = Runner(out / "work", log)
    recipe = base_recipe(model)
    n_layers = int(load_config(resolve(model)).num_hidden_layers)
    drops = layer_drops(config.depths, n_layers)
    t0 = time.perf_counter()
    points = _dense_points(run, model, config)
    if config.control and recipe.heal is not None:
        points += _control_points(run, model, recipe, config)
    for drop in drops:
        points += _pruned_points(run, model, recipe, drop, config)
    if config.speed:
        _measure_speed(run, points, config)
    mark_front(points)
    result = {
        "model": model,
        "layers": n_layers,
        "drops": drops,
        "settings": config.settings(),
        "recipe": recipe.model_dump(mode="json"),
        "reference": REFERENCE,
        "seconds": time.perf_counter() - t0,
        "cpu": _cpu_model(),
        "load_average": list(os.getloadavg()),
        "points": [p.to_dict() for p in points],
    }
    write_frontier(result, out)
    return result


def _dense_points(run: Runner, model: str, config: FrontierConfig) -> list[Point]:
    points = [
        _gguf_point(run, model, f"dense {t}", "dense", 0, False, t, True)
        for t in config.dense_types
    ]
    points += [
        _gguf_point(run, model, f"dense {t} plain", "dense", 0, False, t, False)
        for t in config.plain_types
        if t
    ]
    return points


def _control_points(run: Runner, model: str, recipe, config: FrontierConfig) -> list[Point]:
    healed = run.work / "dense-healed"
    run.shrink(
        [
            "heal",
            model,
            "-o",
            str(healed),
            "--force",
            "--no-verify",
            *_heal_args(recipe),
            "--json",
            str(run.work / "dense-healed.json"),
        ],
        run.work / "dense-healed.json",
    )
    return [
        _gguf_point(run, str(healed), f"dense healed {t}", "dense-healed", 0, True, t, True)
        for t in config.pruned_types
    ]


def _pruned_points(
    run: Runner, model: str, recipe, drop: int, config: FrontierConfig
) -> list[Point]:
    pruned = run.work / f"drop{drop}"
    prune = recipe.prune.model_dump(exclude_defaults=True)
    prune.pop("layers", None)
    prune["drop"] = drop
    run.shrink(
        [
            "prune",
            model,
            *_flags(prune),
            "-o",
            str(pruned),
            "--force",
            "--no-verify",
            "--json",
            str(run.work / f"drop{drop}.json"),
        ],
        run.work / f"drop{drop}.json",
    )
    points = []
    if config.unhealed:
        points += [
            _gguf_point(run, str(pruned), f"drop {drop} {t}", "pruned", drop, False, t, True)
            for t in config.pruned_types
        ]
    if recipe.heal is not None:
        healed = run.work / f"drop{drop}-healed"
        run.shrink(
            [
                "heal",
                str(pruned),
                "-o",
                str(healed),
                "--force",
                "--no-verify",
                *_heal_args(recipe),
                "--json",
                str(run.work / f"drop{drop}-healed.json"),
            ],
            run.work / f"drop{drop}-healed.json",
        )
        points += [
            _gguf_point(
                run, str(healed), f"drop {drop} healed {t}", "pruned-healed", drop, True, t, True
            )
            for t in config.pruned_types
        ]
    return points


def _measure_speed(run: Runner, points: list[Point], config: FrontierConfig) -> None:
    done = run.work / "bench.json"
    names = [p.path for p in points if p.path]
    bench = run.shrink(
        [
            "bench",
            *names,
            "--threads",
            str(config.threads),
            "--repeats",
            str(config.repeats),
            "--ppl-samples",
            "0",
            "--json",
            str(done),
        ],
        done,
    )
    by_path = {r["path"]: r for r in bench.get("result", bench).get("results", [])}
    for p in points:
        r = by_path.get(str(Path(p.path).resolve())) or by_path.get(p.path)
        if r:
            p.decode_tps = r["median"].get("decode_tokens_per_s")
            rss = r["median"].get("peak_rss_bytes")
            p.peak_rss = int(rss) if rss else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load_frontier(path: str | Path) -> list[Point]:
    """The points of a frontier.json written by :func:`frontier` (a file or its folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "frontier.json"
    if not p.is_file():
        raise ShrinkError(
            f"no frontier results at {path}: run 'shrink frontier MODEL -o DIR' "
            "first and pass --frontier DIR"
        )
    try:
        data = json.loads(p.read_text())
        return [Point.from_dict(d) for d in data["points"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ShrinkError(f"{p} is not a frontier.json written by shrink frontier ({e})") from None


def budget_config(
    config, points: list[Point], *, target_size: str | None = None, target_speed: str | None = None
):
    """The build ``config`` rewritten to make the frontier's best artifact under the budget:
    its depth (or no pruning), healed or not, and its GGUF type; with the :class:`Choice` that
    lists every rejected candidate and why. Refuses when nothing measured fits."""
    from shrink.analysis.frontier import choose, parse_size, parse_speed, speed_floor
    from shrink.stages.configs import ExportConfig

    max_bytes = parse_size(target_size) if target_size else None
    min_tps, budget = None, []
    if max_bytes is not None:
        budget.append(f"at most {max_bytes / 1e6:.1f} MB")
    if target_speed:
        value, unit = parse_speed(target_speed)
        min_tps = speed_floor(points, value, unit, REFERENCE)
        budget.append(
            f"at least {min_tps:.1f} decode tok/s"
            + (f" ({value}x {REFERENCE})" if unit == "x" else "")
        )
    choice = choose(points, max_bytes=max_bytes, min_tps=min_tps, budget=", ".join(budget))
    if choice.chosen is None:
        smallest = min(points, key=lambda p: p.bytes, default=None)
        hint = (
            f"; the smallest measured is {smallest.label}, {smallest.bytes / 1e6:.1f} MB"
            if smallest
            else ""
        )
        raise ShrinkError(f"no measured artifact meets the budget ({choice.budget}){hint}")
    c = choice.chosen
    prune = (
        config.prune.model_copy(update={"drop": c.drop, "layers": None})
        if c.drop and config.prune is not None
        else None
    )
    if c.drop and prune is None:
        raise ShrinkError(f"the budget picks {c.label}, but this recipe does not prune")
    heal = config.heal if c.healed else None
    if c.healed and heal is None:
        raise ShrinkError(f"the budget picks {c.label}, but this recipe does not heal")
    export = ExportConfig(gguf=c.format, imatrix=c.imatrix)
    return config.model_copy(
        update={"prune": prune, "heal": heal, "quantize": None, "export": export}
    ), choice
