"""Click options generated from the stage configs (the way mergekit builds its shared options
from its options model): one field, one option, with the field's name, type, default and help.

``config_options(PruneConfig)`` adds ``--drop``, ``--strategy``, ``--samples``... to a command;
``config_options(HealConfig, prefix="heal")`` adds ``--heal-seq-len``... (``shrink build`` prefixes
the settings whose names more than one stage uses). ``values(...)`` reads back only what the
user actually gave, so a recipe's values are overridden by explicit options alone.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable

import click
from click.core import ParameterSource
from pydantic import BaseModel

from shrink.core.errors import ShrinkError


def parse_layers(text: str) -> list[int]:
    """``21,22,25-27`` -> [21, 22, 25, 26, 27]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ShrinkError(
                f"--layers: '{part}' is not a layer number or range like 21-25"
            ) from None
    return out


class StrategyType(click.ParamType):
    """The registered strategies, read when the option is parsed or its help is shown, so a
    strategy registered after import is a valid choice."""

    name = "strategy"

    def get_metavar(self, param, ctx=None) -> str:
        from shrink.stages.strategies import STRATEGIES

        return "[" + "|".join(STRATEGIES) + "]"

    def convert(self, value, param, ctx):
        from shrink.stages.strategies import STRATEGIES

        if value not in STRATEGIES:
            self.fail(f"'{value}' is not one of {', '.join(STRATEGIES)}", param, ctx)
        return value


def parse_ints(text: str) -> list[int]:
    """``1,2`` -> [1, 2]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ShrinkError(f"'{text}' is not a list of integers like 1,2") from None


PARSERS: dict[str, tuple[click.ParamType, Callable]] = {
    "layers": (click.STRING, parse_layers),
    "ints": (click.STRING, parse_ints),
    "strategy": (StrategyType(), lambda v: v),
}


def _unwrap(annotation) -> tuple[object, bool]:
    """(inner type, optional) for ``X | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}_{name}" if prefix else name


DEFAULT_NOTE = re.compile(r"\s*\[default: [^\]]*\]")


def show(value):
    """A default as the option would be typed (lists as ``1,2``)."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def config_options(
    cls: type[BaseModel],
    prefix: str = "",
    *,
    exclude: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> Callable:
    """A decorator adding one click option per field of ``cls``. ``defaults`` replaces the
    fields' own defaults where a command applies others (``shrink build`` runs the build's)."""
    decorators = []
    defaults = defaults or {}
    for name, field in cls.model_fields.items():
        if name in exclude:
            continue
        hints = (
            (field.json_schema_extra or {}).get("cli", {})
            if isinstance(field.json_schema_extra, dict)
            else {}
        )
        flag = "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")
        dest = _dest(prefix, name)
        inner, optional = _unwrap(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        kw: dict = {"help": field.description or "", "show_default": default is not None}
        if name in defaults:  # shown by click, in place of a default the description names
            default = show(defaults[name])
            kw["help"] = DEFAULT_NOTE.sub("", kw["help"])
            kw["show_default"] = default is not None
        if "parse" in hints:
            kw["type"] = PARSERS[hints["parse"]][0]
        elif inner is bool:
            pre = f"{prefix}-" if prefix else ""
            off = f"--{pre}no-{name.replace('_', '-')}"
            decorators.append(click.option(f"{flag}/{off}", dest, default=default, **kw))
            continue
        elif typing.get_origin(inner) is typing.Literal:
            kw["type"] = click.Choice([str(a) for a in typing.get_args(inner)])
        elif inner in (int, float):
            kw["type"] = click.INT if inner is int else click.FLOAT
        if "metavar" in hints:
            kw["metavar"] = hints["metavar"]
        if name in required:
            kw["required"] = True
        decorators.append(click.option(flag, dest, default=default, **kw))

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def values(
    cls: type[BaseModel],
    kwargs: dict,
    prefix: str = "",
    *,
    ctx: click.Context | None = None,
    only_given: bool = False,
) -> dict:
    """The settings of ``cls`` in ``kwargs`` (popped), parsed; with ``only_given`` only those the
    user typed on the command line."""
    out = {}
    for name, field in cls.model_fields.items():
        dest = _dest(prefix, name)
        if dest not in kwargs:
            continue
        value = kwargs.pop(dest)
        if (
            only_given
            and ctx is not None
            and ctx.get_parameter_source(dest) != ParameterSource.COMMANDLINE
        ):
            continue
        hints = (
            (field.json_schema_extra or {}).get("cli", {})
            if isinstance(field.json_schema_extra, dict)
            else {}
        )
        if value is not None and "parse" in hints:
            value = PARSERS[hints["parse"]][1](value)
        out[name] = value
    return out
