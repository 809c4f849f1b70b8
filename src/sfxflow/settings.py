"""Declaring settings: the valid range of a parameter, next to the field it belongs to.

Every ``Params`` dataclass (next to its algorithm) declares its numeric fields with
:func:`setting`, which records the range in the field's metadata (and a bound set by another
field: ``at_least="min_spot_pixels"``), and its nested sections with :func:`section`.
``__post_init__`` calls :func:`check_fields`, so a value out of range is refused wherever the
object is built, and this is the one place ranges are checked: configuration files and
``--set`` only convert types, and every bad setting is a :class:`SettingError`. The
configuration layer (:mod:`sfxflow.pipeline.params`) reads the
same metadata to generate command-line flags, config-file keys, ``--print-config`` and
``docs/config.md``: one declaration, every surface. The one-line documentation of a setting is
the entry for its name in the class's numpydoc ``Parameters`` section.

This module sits below ``models`` (standard library only) so that every layer can use it.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Blur:
...     sigma_px: float = setting(1.0, gt=0, le=50)
...     passes: int = setting(1, ge=1, le=10)
...     def __post_init__(self) -> None:
...         check_fields(self)
>>> Blur(sigma_px=2.0).sigma_px
2.0
>>> Blur(passes=0)
Traceback (most recent call last):
...
sfxflow.settings.SettingError: Blur.passes = 0: expected an integer from 1 to 10
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sfxflow.errors import ConfigError

__all__ = ["SettingError", "Spec", "check_fields", "check_value", "refuse", "section", "setting",
           "spec_of"]

_KEY = "sfxflow"


class SettingError(ConfigError, ValueError):
    """Every bad setting: an unknown key, a value of the wrong type or out of range, settings that
    contradict each other (a user error: exit 2; and a ValueError for library callers).

    ``field`` (the field's name), ``value`` and ``expected`` (in words) are kept when the error
    is about one field, so that the configuration layer can name the file, ``--set`` or flag the
    value came from; ``also`` is the other field of a cross-field check. ``located``: the
    message already names that source (a nested section's error passing through its parents).
    """

    def __init__(self, message: str, *, field: str = "", value: Any = None, expected: str = "",
                 also: str = "", located: bool = False) -> None:
        super().__init__(message)
        self.field, self.value, self.expected, self.also = field, value, expected, also
        self.located = located


@dataclass(frozen=True)
class Spec:
    """What values a setting accepts, and how it is named on the command line.

    Parameters
    ----------
    ge, gt, le, lt : inclusive / exclusive bounds of a number (``None``: no bound).
    choices : the accepted values of a text setting.
    odd : an integer that must be odd.
    finite : a float must be finite (the default; NaN and infinities are never a setting).
    flag : command-line flag name without the leading dashes, instead of the field's name.
    flag_prefix : for a section: prefix of its fields' flags (``None``: ``"<name>-"``).
    doc : one-line documentation when the class docstring has no entry for the field.
    check : a callable that raises ValueError for a value it refuses (a space group, a cell, an
        address), applied to the whole value; ``expect`` says in words what it accepts.
    at_least, above : the name of another field of the same class that bounds this one from
        below (``>=``, ``>``); a ``None`` on either side is no bound.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    odd: bool = False
    finite: bool = True
    flag: str | None = None
    flag_prefix: str | None = None
    doc: str = ""
    check: Callable[[Any], Any] | None = None
    expect: str = ""
    at_least: str = ""
    above: str = ""

    @property
    def has_range(self) -> bool:
        """Whether a lower and an upper limit (or a list of choices, or a check) are declared."""
        return bool(self.choices) or self.check is not None or (
            (self.ge is not None or self.gt is not None) and (self.le is not None or self.lt is not None)
        )

    def describe(self, kind: str = "a number") -> str:
        """``"an odd integer from 3 to 63"``: the accepted values, for messages and docs."""
        if self.expect:
            return self.expect
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        noun = f"an odd {kind.split()[-1]}" if self.odd else kind
        lo = (self.ge, ">=") if self.ge is not None else (self.gt, ">")
        hi = (self.le, "<=") if self.le is not None else (self.lt, "<")
        if hi[0] is not None and abs(hi[0]) >= _NO_LIMIT:  # a machine limit (2**63 - 1), not a range
            hi = (None, "")
        if lo[1] == ">=" and hi[1] == "<=" and lo[0] is not None and hi[0] is not None:
            return f"{noun} from {_num(lo[0])} to {_num(hi[0])}"
        parts = [f"{op} {_num(v)}" for v, op in (lo, hi) if v is not None]
        return f"{noun} {' and '.join(parts)}" if parts else noun

    def problem(self, value: Any) -> bool:
        """Whether ``value`` (already of the field's type) is outside the accepted values."""
        if self.choices:
            return value not in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if isinstance(value, float) and self.finite and not math.isfinite(value):
            return True
        if math.isnan(value):
            return True
        return ((self.ge is not None and not value >= self.ge)
                or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le)
                or (self.lt is not None and not value < self.lt)
                or (self.odd and int(value) % 2 == 0))


#: upper bounds from here on are a machine limit: "an integer >= 0", not "0 to 9.22337e+18"
_NO_LIMIT = 1e15


def _num(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:g}"


def setting(default: Any, **spec: Any) -> Any:
    """A dataclass field with a default and a :class:`Spec` (``ge=0, le=10``, ``choices=...``)."""
    return dataclasses.field(default=default, metadata={_KEY: Spec(**spec)})


def section(cls: type, **spec: Any) -> Any:
    """A nested ``Params`` section (default: ``cls()``); ``flag_prefix`` names its flags."""
    return dataclasses.field(default_factory=cls, metadata={_KEY: Spec(**spec)})


def spec_of(f: dataclasses.Field) -> Spec:
    """The :class:`Spec` of a field (an empty one when none was declared)."""
    spec = f.metadata.get(_KEY)
    return spec if isinstance(spec, Spec) else Spec()


def value_problem(spec: Spec, value: Any) -> str:
    """What ``value`` (already of the field's type) should have been, or ``""`` when it is fine."""
    values: Sequence[Any] = value if isinstance(value, tuple | list) and not spec.choices else (value,)
    for v in values:
        if v is not None and spec.problem(v):
            return spec.describe("an integer" if type(v) is int else "a number")
    if spec.check is not None and value is not None:
        try:
            spec.check(value)
        except (ValueError, TypeError):
            return spec.expect or "a valid value"
    return ""


def check_value(spec: Spec, value: Any, name: str) -> None:
    """Raise :class:`SettingError` ``"NAME = VALUE: expected RANGE"`` when out of range."""
    expected = value_problem(spec, value)
    if expected:
        raise SettingError(f"{name} = {value!r}: expected {expected}",
                           field=name.rpartition(".")[2], value=value, expected=expected)


def refuse(obj: Any, name: str, expected: str, also: str = "") -> NoReturn:
    """Raise :class:`SettingError` for ``obj.name`` (a check no :class:`Spec` can declare)."""
    value = getattr(obj, name)
    raise SettingError(f"{type(obj).__name__}.{name} = {value!r}: expected {expected}",
                       field=name, value=value, expected=expected, also=also)


def check_fields(obj: Any) -> None:
    """Check every field of a dataclass instance against its declared :class:`Spec`."""
    for f in dataclasses.fields(obj):
        spec = spec_of(f)
        value = getattr(obj, f.name)
        check_value(spec, value, f"{type(obj).__name__}.{f.name}")
        for other, strict in ((spec.at_least, False), (spec.above, True)):
            bound = getattr(obj, other) if other else None
            if value is not None and bound is not None and (value <= bound if strict else value < bound):
                refuse(obj, f.name, f"{'>' if strict else '>='} {other} ({bound!r})", also=other)
