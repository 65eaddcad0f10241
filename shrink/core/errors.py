"""The one exception type that shrink shows to users as a single line."""


class ShrinkError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` on stderr and exits non-zero, without a traceback.
    Messages are one line and say what to do about it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    the one-line errors shrink shows when a library fails."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def install_hint(extra: str) -> str:
    """How to install one of shrink's extras. shrink is not on PyPI yet: from a clone of its
    repository, ``pip install -e '.[EXTRA]'`` (the package's name is shrink-llm)."""
    return f"pip install -e '.[{extra}]' in a clone of shrink (the shrink-llm[{extra}] extra)"
