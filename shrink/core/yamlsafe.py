"""Loading YAML that someone else wrote (a shared recipe) with bounded time and memory.

The text is first walked as a stream of parser events, which never expands anything: aliases and
anchors are refused outright (they are how a few hundred bytes expand to gigabytes), and the
size, the nesting depth and the number of nodes are capped. Only then is it constructed with
``yaml.safe_load``, and the result must be a mapping whose values are plain data (strings,
numbers, booleans, null, lists and mappings with string keys). Every refusal is one ShrinkError
line naming the key path.
"""

from __future__ import annotations

from pathlib import Path

from shrink.core.errors import ShrinkError, first_line

MAX_BYTES = 1 << 20
MAX_DEPTH = 20
MAX_NODES = 100_000
_PLAIN = (str, int, float, bool, type(None))


def read_text_bounded(path: str | Path, where: str, limit: int = MAX_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes (a FIFO, a device, a folder,
    a larger or a binary file is a ShrinkError naming ``where``)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ShrinkError(
                f"{where}: not a regular file (a folder, FIFO or device); give a YAML file"
            )
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise ShrinkError(f"{where}: cannot read it ({first_line(e)})") from None
    if len(raw) > limit:
        raise ShrinkError(f"{where}: larger than {limit // 1024} KB; a recipe is a small text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShrinkError(
            f"{where}: not UTF-8 text (byte {e.start}); is it a binary file?"
        ) from None


def _path(stack: list) -> str:
    parts = [str(frame[2]) for frame in stack if frame[2] is not None]
    return ".".join(parts) or "(top level)"


def _check_events(text: str, where: str) -> None:
    """Walk the parser events: no aliases or anchors, scalar unique keys, bounded depth and
    count. Each frame of the stack is [node, expecting_key, current key or index, keys seen]."""
    import yaml

    stack: list[list] = []
    nodes = 0
    for ev in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(ev, yaml.AliasEvent):
            raise ShrinkError(
                f"{where}: {_path(stack)}: YAML aliases (*{ev.anchor}) are not "
                "allowed in a recipe; write the value out"
            )
        if not isinstance(ev, yaml.NodeEvent) and not isinstance(ev, yaml.CollectionEndEvent):
            continue
        if isinstance(ev, yaml.CollectionEndEvent):
            stack.pop()
            _after_node(stack)
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise ShrinkError(f"{where}: more than {MAX_NODES} values; a recipe is small")
        if ev.anchor is not None:
            raise ShrinkError(
                f"{where}: {_path(stack)}: YAML anchors (&{ev.anchor}) are not "
                "allowed in a recipe; write the value out"
            )
        top = stack[-1] if stack else None
        if top is not None and top[0] == "map" and top[1]:
            if not isinstance(ev, yaml.ScalarEvent):
                raise ShrinkError(
                    f"{where}: {_path(stack[:-1])}: a key must be a plain name, "
                    "not a list or mapping"
                )
            if ev.value in top[3]:
                raise ShrinkError(f"{where}: {_path(stack[:-1])}: key '{ev.value}' appears twice")
            top[3].add(ev.value)
            top[2], top[1] = ev.value, False
            continue
        if top is not None and top[0] == "seq":
            top[2] = top[2] + 1 if isinstance(top[2], int) else 0
        if isinstance(ev, yaml.ScalarEvent):
            _after_node(stack)
            continue
        if len(stack) >= MAX_DEPTH:
            raise ShrinkError(f"{where}: {_path(stack)}: nested deeper than {MAX_DEPTH} levels")
        node = "map" if isinstance(ev, yaml.MappingStartEvent) else "seq"
        stack.append([node, node == "map", None, set()])


def _after_node(stack: list) -> None:
    """A value finished: the mapping holding it next expects a key."""
    if stack and stack[-1][0] == "map":
        stack[-1][1] = True


def _check_plain(value, where: str, path: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ShrinkError(
                    f"{where}: {path or '(top level)'}: key {k!r} is not a name (quote it)"
                )
            _check_plain(v, where, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, where, f"{path}.{i}" if path else str(i))
    elif not isinstance(value, _PLAIN):
        raise ShrinkError(
            f"{where}: {path or '(top level)'}: a {type(value).__name__} value "
            "is not allowed (use a string, number, boolean, list or mapping)"
        )


def load_yaml_mapping(text: str, where: str) -> dict:
    """The mapping that ``text`` holds, checked as described in the module docstring; an empty
    document is an empty mapping. ``where`` names the source in errors."""
    import yaml

    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ShrinkError(
            f"{where}: larger than {MAX_BYTES // 1024} KB; a recipe is a small text file"
        )
    try:
        _check_events(text, where)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or first_line(e)
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ShrinkError(f"{where} is not valid YAML: {problem}{at}") from None
    except RecursionError:  # pragma: no cover - the depth cap comes first
        raise ShrinkError(f"{where}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ShrinkError(
            f"{where} must be a mapping of settings (key: value lines), not a {type(data).__name__}"
        )
    _check_plain(data, where, "")
    return data
