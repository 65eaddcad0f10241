"""The shape of the CLI: one short module per command, the defaults a build applies in its help,
the same model forms for every command, and bench's one table in two renderings."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

import shrink.cli.commands as commands
from shrink.cli import main
from shrink.stages.configs import MIXED_CALIBRATION, MIXED_HEALING

COMMANDS_DIR = Path(commands.__file__).parent


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _default(help_text: str, option: str) -> str:
    """The ``[default: ...]`` shown for ``option``: its line and the wrapped lines after it."""
    lines = help_text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if re.match(r"\s+(-\w, )?" + re.escape(option) + r"[ /=]", line)
    )
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines)
    )
    m = re.search(r"\[default: ([^\]]+)\]", " ".join(lines[start:end]))
    assert m, f"no default shown for {option}"
    return m.group(1).replace(" ", "")


def test_every_command_is_one_short_module():
    modules = sorted(p.stem for p in COMMANDS_DIR.glob("*.py") if p.stem != "__init__")
    assert sorted(commands.NAMES) == modules
    assert sorted(main.commands) == modules
    for name in modules:
        module = importlib.import_module(f"shrink.cli.commands.{name}")
        assert main.commands[name] is module.command
        lines = len((COMMANDS_DIR / f"{name}.py").read_text().splitlines())
        assert lines < 150, f"shrink/cli/commands/{name}.py has {lines} lines"


def test_package_module_is_tiny():
    assert len((COMMANDS_DIR.parent / "__init__.py").read_text().splitlines()) < 30


def test_build_help_shows_the_build_defaults():
    text = _help("build")
    assert _default(text, "--strategy") == "auto"
    assert _default(text, "--bridge") == "auto"
    assert _default(text, "--prune-data") == MIXED_CALIBRATION
    assert _default(text, "--heal-data") == MIXED_HEALING
    assert _default(text, "--drop") == "6"
    # the stage commands keep their own defaults
    prune = _help("prune")
    assert _default(prune, "--strategy") == "bi" and _default(prune, "--bridge") == "none"
    assert _default(_help("heal"), "--data") == "austen:healing"


def test_export_resolves_an_alias_like_every_command(tmp_path, monkeypatch):
    """`shrink export smollm2-135m` reaches the export with the embedded model's folder."""
    import shrink.core.models as models
    import shrink.stages.export as export_stage

    embedded = tmp_path / "embedded"
    embedded.mkdir()
    monkeypatch.setattr(models, "ensure_embedded", lambda: embedded)
    seen = {}

    def fake_export(model_dir, output, config, **kwargs):
        seen["model_dir"] = model_dir
        return {}

    monkeypatch.setattr(export_stage, "export", fake_export)
    result = CliRunner().invoke(
        main, ["export", "smollm2-135m", "--onnx", "int4", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert Path(seen["model_dir"]) == embedded


def test_model_folder_forms(tmp_path, monkeypatch):
    import huggingface_hub

    from shrink.cli.common import model_folder
    from shrink.core.errors import ShrinkError

    folder = tmp_path / "m"
    folder.mkdir()
    assert model_folder(str(folder)) == str(folder)  # a folder as given
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: f"/hub/{repo}")
    assert model_folder("org/name") == "/hub/org/name"
    try:
        model_folder(str(tmp_path / "missing" / "x"))
    except ShrinkError as e:
        assert "no such model folder" in str(e)
    else:
        raise AssertionError("a missing folder must fail")


def test_bench_table_and_markdown_share_their_cells():
    from shrink.report.tables import bench_markdown, bench_table
    from shrink.stages.bench import ArtifactResult, BenchReport

    median = {
        "ttft_s": 0.0123,
        "decode_tokens_per_s": 45.67,
        "prefill_tokens_per_s": 890.0,
        "peak_rss_bytes": 300 * 2**20,
        "perplexity": 12.5,
        "roofline_fraction": 0.42,
    }
    r = ArtifactResult(
        "out/pruned",
        "out/pruned",
        "hf",
        270_000_000,
        24,
        2.5e8,
        1e8,
        median=median,
        ratios={"decode_tokens_per_s": 1.25, "size_bytes": 0.8, "flops_per_token": 0.8},
    )
    settings = {
        "device": "cpu",
        "prompt_len": 128,
        "gen_len": 64,
        "batch": 1,
        "repeats": 3,
        "ppl_samples": 4,
    }
    report = BenchReport(settings, "out/pruned", [r], {})
    console = Console(record=True, width=300)
    console.print(bench_table(report, settings))
    shown = console.export_text()
    md = bench_markdown(report)
    for cell in ("45.7", "12.50", "42%", "1.25", "0.250", "300", "24"):
        assert cell in shown and f"| {cell} |" in md, cell
    assert "pruned" in shown and "| out/pruned |" in md
    assert "size x" in shown and "size x" not in md  # each keeps its own columns
    assert "cores busy" in md and "cores busy" not in shown


def test_under_a_data_limit_the_allocators_hold_no_idle_address_space():
    """Arrow's mimalloc pool reserves 1 GiB of writable address space, which a data limit
    counts: the CLI under such a limit gives Arrow (and the processes it starts) the system
    allocator, and glibc two arenas. Without a limit nothing in the environment changes."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("pyarrow")  # installed with datasets (GPTQModel's dependency)
    code = (
        "import os, resource, sys\n"
        "from shrink.core.peaks import status_bytes\n"
        "limited = sys.argv[1] == 'limited'\n"
        "if limited:\n"
        "    limit = status_bytes('VmData') + (6 << 30)\n"
        "    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))\n"
        "from shrink.cli import main\n"
        "try:\n"
        "    main(['estimate', 'smollm2-135m', '--drop', '1', '--ram', '8GB'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "import pyarrow\n"
        "print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('ARROW_DEFAULT_MEMORY_POOL'),"
        " pyarrow.default_memory_pool().backend_name)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    # (without a limit Arrow keeps its build's default pool: mimalloc or jemalloc)
    for mode, want in (("limited", "2 system system"), ("free", "None None")):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1].startswith(want), out.stdout
