"""The ``shrink`` command line: a thin layer over the Python API (parse, call, print).

The group, its error handling and log capture are in :mod:`shrink.cli.app`; one module per
command in :mod:`shrink.cli.commands`; the options they share in :mod:`shrink.cli.common`;
the rendering of results in :mod:`shrink.report.tables` and :mod:`shrink.report.summaries`."""

from shrink.cli.app import main
from shrink.cli.commands import register

register(main)

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
