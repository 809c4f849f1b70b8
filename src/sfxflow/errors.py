"""Exceptions. ``InputError`` and its children are user errors: the CLI prints one line, exits 2.

Any other exception escaping the CLI is a bug and is shown with its traceback.
"""

from __future__ import annotations


class SfxflowError(Exception):
    """Base of all sfxflow exceptions."""


class InputError(SfxflowError):
    """Bad input from the user: a file, a value, an option. The message names what and why."""


class GeometryError(InputError):
    """A detector geometry that cannot be read or does not fit the data."""


class SourceError(InputError):
    """An image source (file or object) that cannot be listed or read.

    The message always names the URL; ``url`` and ``frame`` are kept for result records.
    """

    def __init__(self, url: str, problem: str, frame: int | None = None) -> None:
        where = url if frame is None else f"{url} frame {frame}"
        super().__init__(f"{where}: {problem}")
        self.url = url
        self.frame = frame
        self.problem = problem


class ConfigError(InputError):
    """A configuration file or option with a bad key or value."""


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the exception's type and its message's first line.

    This is the ``reason`` recorded for a failed frame or block.

    >>> failure_reason(ValueError("bad gain\\nsecond line"))
    'ValueError: bad gain'
    >>> failure_reason(MemoryError())
    'MemoryError'
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
