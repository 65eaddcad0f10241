"""shrink's own voice on stderr (rich): notes and progress bars with ETAs. Progress is off when
SHRINK_NO_PROGRESS is set, enabled=False, or the console is quiet (``shrink -q``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
stderr = Console(stderr=True)


def progress_bar(
    items: Iterable[T], description: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    if not enabled or os.environ.get("SHRINK_NO_PROGRESS") or stderr.quiet:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def progress_named(
    items: list[T], description: str, name: Callable[[T], str], enabled: bool = True
) -> Iterator[T]:
    """A progress bar over ``items`` whose label names the item being worked on."""
    if not enabled or os.environ.get("SHRINK_NO_PROGRESS") or stderr.quiet:
        yield from items
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            bar.update(task, description=f"{description} {name(item)}")
            yield item
            bar.advance(task)
