"""Range-checked command-line options shared by the commands (:mod:`sfxflow.cli`) and the
benchmarks (:mod:`sfxflow.benchmarks`), which must not import the commands.

:class:`Parser` reports a bad option in one line with exit status 2; :func:`number` adds a
numeric option with a declared range, converted and checked by the same code that reads
configuration files. :mod:`sfxflow.cli.options` re-exports both.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from sfxflow.pipeline import params as _params
from sfxflow.settings import Spec

__all__ = ["Parser", "converter", "number"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --x/--no-x: 'v': expected ..." -> "--x 'v': expected ...", as in our messages
        message = re.sub(r"^argument ([^:/ ]+)(?:/[^: ]+)?: ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def converter(tp: Any, spec: Spec, key: str = "") -> Any:
    """The ``type=`` of an option: ``text`` converted and checked, or a one-line error naming
    the value, what is accepted and (for a setting) its configuration ``key``."""
    where = f" (key {key})" if key else ""

    def convert(text: str) -> Any:
        if tp is str and spec.check is not None and not text.strip():
            # empty means "not set here" in a configuration file; a flag given empty is a slip
            raise argparse.ArgumentTypeError(f"{text!r}: expected {spec.expect or 'a value'}{where}")
        try:
            return _params.convert(tp, spec, text)
        except _params.Invalid as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {exc.expected}{where}") from None

    convert.__name__ = getattr(tp, "__name__", "value")  # argparse names it in some messages
    # what tests and docs read back: the type, the declared range, and the words for it
    convert.tp, convert.spec = tp, spec  # type: ignore[attr-defined]
    convert.expected = _params.expected_words(tp, spec)  # type: ignore[attr-defined]
    return convert


def number(parser: Any, *flags: str, kind: type = float, help: str = "",
           default: Any = None, nargs: str | None = None, **spec: Any) -> argparse.Action:
    """A numeric option with a declared range (``ge``, ``gt``, ``le``, ``lt``): NaN, infinities
    and values out of range exit with status 2 naming the option, the value and the range."""
    s = Spec(**spec)
    noun = "an integer" if kind is int else "a number"
    text = f"{help} [{s.describe(noun)}]" if help else s.describe(noun)
    return parser.add_argument(*flags, type=converter(kind, s), default=default, nargs=nargs,
                               help=text.replace("%", "%%"), metavar="N" if kind is int else "X")
