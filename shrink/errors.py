"""The one exception type that shrink shows to users as a single line."""


class ShrinkError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` on stderr and exits non-zero, without a traceback.
    Messages are one line and say what to do about it.
    """
