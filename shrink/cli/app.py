"""The ``shrink`` group: -v/-q, third-party output captured to a log file, and expected failures
turned into one line on stderr. The commands live in :mod:`shrink.cli.commands`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from rich.markup import escape

from shrink.cli.common import console, err
from shrink.core.errors import ShrinkError
from shrink.core.quiet import capture_to, has_terminal_fds


class ShrinkGroup(click.Group):
    """Turns ShrinkError (and other expected failures) into one line on stderr and exit 2."""

    def invoke(self, ctx):
        verbose, quiet = ctx.params.get("verbose"), ctx.params.get("quiet")
        err.quiet = bool(quiet)
        log = None
        try:
            # no capture for --help: click prints it to stdout inside the command's parsing
            asks_help = any(a in ctx.help_option_names for a in ctx.args)
            if verbose or not has_terminal_fds() or not ctx.protected_args or asks_help:
                return super().invoke(ctx)
            log = log_path(ctx.protected_args[0])
            with capture_to(log, keep=(console, err)):
                return super().invoke(ctx)
        except ShrinkError as e:
            err.quiet = False
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            if log is not None and log.stat().st_size:
                err.print(f"[dim](third-party output of this run: {log})[/]", highlight=False)
            sys.exit(2)
        except KeyboardInterrupt:
            interrupted()
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line
            if os.environ.get("SHRINK_DEBUG"):
                raise
            line = (str(e).strip().splitlines() or [""])[0]
            err.quiet = False
            err.print(
                f"[bold red]error:[/] {type(e).__name__}: {escape(line)} "
                "(set SHRINK_DEBUG=1 for the traceback"
                + (f"; third-party output: {log}" if log is not None else "")
                + ")",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(1)


def allocate_for_a_limit() -> None:
    """Under a data limit (``ulimit -d``, ``prlimit --data``), which counts writable address
    space rather than resident pages, keep the allocators from holding address space they do
    not use. For this process and, through the environment, the fresh processes it starts:

    - Arrow's default pool (mimalloc, imported with datasets by GPTQModel) reserves 1 GiB on
      its first allocation; the system allocator reserves nothing.
    - glibc gives each thread its own arena (up to 8 per core, each growing by up to 64 MB)
      and raises its mmap threshold to 32 MB after large frees, so freed tensors stay in the
      heap as address space. Two arenas and a fixed 1 MB threshold (every tensor its own
      mapping, unmapped when freed) cut GPTQ's peak under the limit by about 0.5 GB.
    """
    import ctypes
    import platform

    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if platform.libc_ver()[0] != "glibc":
        return
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold, m_arena_max = -3, -8  # malloc.h
    libc.mallopt(m_arena_max, int(os.environ["MALLOC_ARENA_MAX"]))
    libc.mallopt(m_mmap_threshold, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))


def interrupted() -> None:
    """Ctrl-C: one line and exit 130."""
    err.quiet = False
    err.print("[bold red]interrupted[/]: nothing was moved into place")
    from shrink.runtime import gptq

    if gptq.INTERRUPTED:
        # GPTQModel's worker threads can hang (or abort with 134) at interpreter shutdown
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)
    sys.exit(130)


def log_path(command: str) -> Path:
    """Where a CLI run's third-party output goes (``shrink build`` copies it into OUT)."""
    from shrink.core.models import cache_dir

    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"shrink-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@click.group(
    cls=ShrinkGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="shrink-llm", prog_name="shrink")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Show third-party libraries' logs (by default "
    "they go to a log file, named when something fails).",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Errors only on stderr (results still go to stdout)."
)
def main(verbose, quiet):
    """Turn a large language model into a smaller, faster one: score its layers, remove the
    least useful, and prove what was done.

    MODEL is a local Hugging Face folder, a hub id (org/name), an alias such as llama-2-13b, or
    the embedded default smollm2-135m (no network needed).
    """
    import shrink.core.peaks as peaks
    from shrink.core.quiet import quiet_process
    from shrink.core.signals import install_sigterm_as_interrupt

    quiet_process()
    install_sigterm_as_interrupt()  # a kill cleans up like Ctrl-C
    peaks.RESET_OWN_PEAK = True  # the CLI owns its process: each stage gets its own peak
    if peaks.data_limit():
        allocate_for_a_limit()
