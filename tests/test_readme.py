"""The README's two setup commands are what CI runs; the README is a front door (small, a
page in docs/ for every command, numbers tied to results files) and no link in it or in docs/
points at a missing file."""

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


README_LIMIT = 15_000  # bytes: the README is a front door; the manual is docs/
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _commands() -> list[str]:
    from shrink.cli import main

    return sorted(main.commands)


def _relative_links(path: Path) -> list[str]:
    """Targets of the markdown links in ``path`` that point into the repository (code blocks,
    where brackets are not links, are left out)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [
        t
        for t in LINK.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")
    ]


def test_readme_is_a_front_door():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


def test_every_command_has_a_page_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    commands = _commands()
    assert {"build", "prune", "heal", "score"} <= set(commands)
    for name in commands:
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file(), f"no docs/{name}.md for 'shrink {name}'"
        assert f"`shrink {name}`" in page.read_text().split("\n", 1)[0], (
            f"docs/{name}.md does not start with a title naming 'shrink {name}'"
        )
        assert re.search(rf"\|\s*\[`shrink {name}`\]\(docs/{name}\.md\)", readme), (
            f"the README's command table does not link docs/{name}.md"
        )


def test_every_relative_link_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for f in files:
        for target in _relative_links(f):
            dest = (f.parent / target.split("#", 1)[0]).resolve()
            if not dest.exists():
                broken.append(f"{f.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)


def test_the_link_checker_sees_links():
    # a checker that found no links would pass on anything
    readme = _relative_links(ROOT / "README.md")
    assert "docs/architecture.md" in readme and "bench/results/" in readme
    assert len(readme) >= 15


def test_readme_numbers_point_to_results():
    """A section of the README that states a measurement links the results file that shows it."""
    text = (ROOT / "README.md").read_text()
    for section in re.split(r"\n## ", text):
        body = re.sub(r"```.*?```", "", section, flags=re.S)
        if re.search(r"\d+\.\d+x|\d+(\.\d+)? (MB|GB|GiB|tokens/s|tok/s)\b", body):
            assert "bench/results/" in body, (
                "a README section states numbers without a link to bench/results/: " + section[:60]
            )
