"""The package's shape: no import cycles, no private names imported across modules.

Run as a script for the figures quoted in the README's Development section:
``python tests/test_layout.py`` prints the largest file, the longest function, the number of
CLI option declarations and every import cycle (module-level and function-level imports alike).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shrink"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between shrink modules (every import, at any depth) and private-name imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    private: list[str] = []

    def target(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("shrink") and (t := target(a.name)) and t != mod:
                        graph[mod].add(t)
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node)
                if not src.startswith("shrink"):
                    continue
                for a in node.names:
                    full = f"{src}.{a.name}"
                    t = target(full) if full in files else target(src)
                    if t and t != mod:
                        graph[mod].add(t)
                    if a.name.startswith("_") and not a.name.startswith("__") and full not in files:
                        private.append(f"{mod} imports {src}.{a.name}")
    return graph, private


def _is_ancestor(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules is not a cycle of concern."""
    return b.startswith(a + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {
        m: {t for t in ts if not _is_ancestor(m, t) and not _is_ancestor(t, m)}
        for m, ts in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def figures() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in files}
    longest = ("", 0)
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > longest[1]:
                    longest = (f"{p.relative_to(PACKAGE.parent)}:{node.name}", n)
    cli = [p for p in files if "cli" in p.relative_to(PACKAGE).parts or p.name == "cli.py"]
    options = sum(p.read_text().count("click.option(") for p in cli)
    graph, private = import_graph()
    largest = max(sizes.items(), key=lambda kv: kv[1])
    return {
        "largest_file": largest,
        "longest_function": longest,
        "cli_option_declarations": options,
        "import_cycles": cycles(graph),
        "private_imports": private,
    }


def test_no_import_cycles():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []


# The shape the package keeps. These lists name what is over the limits today; they may only
# shrink: a test fails when an entry is no longer over (remove it) or something new is.
# Lengths are logical lines: the lines on which a statement starts (a docstring counts as one).
# The formatter puts each argument of a long call on its own line; that is layout, not length.
# 300 logical lines is about 500 lines of hand-wrapped code, 40 about 60.
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 40
MAX_PARAMETERS = 8
LARGE_MODULES = {
    "shrink/analysis/estimate.py",
    "shrink/core/models.py",
    "shrink/core/outputs.py",
    "shrink/runtime/gguf.py",
    "shrink/stages/export/gguf.py",
    "shrink/stages/export/onnx.py",
}
LONG_STAGE_FUNCTIONS = {
    "shrink/stages/bench.py:bench",
    "shrink/stages/export/gguf.py:_write_metadata",
    "shrink/stages/export/gguf_vocab.py:write_vocab",
    "shrink/stages/export/gguf.py:export_gguf",
    "shrink/stages/export/onnx.py:_torch_export",
    "shrink/stages/export/onnx.py:verify_onnx",
    "shrink/stages/export/onnx.py:export_onnx",
    "shrink/stages/quantize.py:quantize",
}
WIDE_STAGE_FUNCTIONS = {
    "shrink/stages/auto.py:choose_auto",
    "shrink/stages/bench.py:measure",
    "shrink/stages/bench.py:bench",
    "shrink/stages/bench.py:sweep_drop",
    "shrink/stages/export/gguf.py:export_gguf",
    "shrink/stages/heal/__init__.py:heal",
    "shrink/stages/heal/merge.py:merge",
    "shrink/stages/heal/trainer.py:train",
    "shrink/stages/quantize.py:quantize",
}


def logical_lines(node: ast.AST) -> int:
    """Lines on which a statement of ``node`` starts (nested statements included)."""
    return len({n.lineno for n in ast.walk(node) if isinstance(n, ast.stmt)})


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return len([n for n in names if n not in ("self", "cls")])


def stage_functions() -> tuple[set[str], set[str]]:
    """Functions in shrink/stages over the line limit, and those over the parameter limit."""
    long, wide = set(), set()
    for p in sorted((PACKAGE / "stages").rglob("*.py")):
        rel = p.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if logical_lines(node) > MAX_FUNCTION_LINES:
                    long.add(f"{rel}:{node.name}")
                if _parameters(node) > MAX_PARAMETERS:
                    wide.add(f"{rel}:{node.name}")
    return long, wide


def test_modules_stay_under_the_size_limit():
    large = {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*.py")
        if logical_lines(ast.parse(p.read_text())) >= MAX_MODULE_LINES
    }
    assert large - LARGE_MODULES == set(), "new modules over the limit: split them"
    assert LARGE_MODULES - large == set(), "now under the limit: remove them from LARGE_MODULES"


def test_stage_functions_stay_short_and_narrow():
    long, wide = stage_functions()
    assert long - LONG_STAGE_FUNCTIONS == set(), f"over {MAX_FUNCTION_LINES} lines: split them"
    assert wide - WIDE_STAGE_FUNCTIONS == set(), f"over {MAX_PARAMETERS} parameters"
    assert LONG_STAGE_FUNCTIONS - long == set(), "now short: remove them from the list"
    assert WIDE_STAGE_FUNCTIONS - wide == set(), "now narrow: remove them from the list"


def test_the_build_is_a_loop_over_stages():
    text = (PACKAGE / "stages" / "build.py").read_text()
    assert 'name == "' not in text and 'kind == "' not in text


def test_cycle_detector_finds_a_cycle():
    # the checker itself must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


if __name__ == "__main__":
    import json

    print(json.dumps(figures(), indent=2))
