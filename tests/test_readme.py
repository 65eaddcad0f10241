"""The README's two setup commands are what CI runs, and the README documents every command."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_ci_runs_the_readme_commands():
    install, tests = _setup_blocks()[:2]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [re.sub(r"\s-q\b", "", ln) for ln in ci]
    for step in install.split(" && "):
        step = step.strip()
        if step.startswith("python3 -m venv"):
            continue
        assert step in ci, f"README step not in .ci/run: {step}"
    assert re.sub(r"\s-q\b", "", tests.split(" && ")[-1].strip()) in ci


def test_every_cli_command_is_documented():
    from shrink.cli import main

    readme = (ROOT / "README.md").read_text()
    for name in main.commands:
        assert f"shrink {name}" in readme, name
