"""One module per command. Each defines ``command`` (a click command); adding a command is a
module here and its name in ``NAMES``."""

from __future__ import annotations

import importlib

import click

NAMES = (
    "bench",
    "build",
    "claims",
    "estimate",
    "eval",
    "export",
    "frontier",
    "generate",
    "heal",
    "prune",
    "quantize",
    "score",
)


def register(group: click.Group) -> None:
    """Add every command of ``NAMES`` to ``group``."""
    for name in NAMES:
        group.add_command(importlib.import_module(f"{__name__}.{name}").command)
