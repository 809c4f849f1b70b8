"""Parameter trees: every setting's key, flag, type, range and doc, from the dataclasses themselves.

A parameter tree is a frozen dataclass whose fields are settings (bool, int, float, str, optional
values, tuples) or nested sections (one frozen ``Params`` per algorithm, next to its code). Each
setting is a :class:`Leaf`: its dotted config-file key, its command-line flag, its type, default,
valid range (:class:`~sfxflow.settings.Spec` from the field's metadata) and its one-line doc (the
class docstring's numpydoc entry). From the leaves come, with no code per setting: loading and
layering configuration files, presets and ``--set`` overrides (:func:`resolve`), the flags of
every command (:mod:`sfxflow.cli.options`), ``--print-config`` (:func:`commented_toml`) and
``docs/config.md`` (:func:`markdown`). A misspelt key or a bad value is a one-line
:class:`~sfxflow.settings.SettingError` naming where it came from, the value and what is
accepted; values are converted here and checked once, by the dataclasses' own ``__post_init__``.

>>> from dataclasses import dataclass, field
>>> from sfxflow.settings import check_fields, setting
>>> @dataclass(frozen=True)
... class Inner:
...     '''Parameters
...     ----------
...     sigma : threshold in standard deviations.
...     '''
...     sigma: float = setting(3.0, ge=0, le=100)
...     mode: str = "fast"
...     def __post_init__(self) -> None:
...         check_fields(self)
>>> @dataclass(frozen=True)
... class Outer:
...     inner: Inner = field(default_factory=Inner)
...     n: int = setting(1, ge=1, le=9)
...     def __post_init__(self) -> None:
...         check_fields(self)
>>> [(leaf.key, leaf.flag) for leaf in leaves(Outer)]
[('inner.sigma', 'inner-sigma'), ('inner.mode', 'inner-mode'), ('n', 'n')]
>>> tree = resolve(Outer, [("file.toml", {"inner": {"sigma": 4}}), ("--set", {"n": "2"})])
>>> tree.inner.sigma, tree.n
(4.0, 2)
>>> differences(Outer(), tree)
{'inner.sigma': (3.0, 4.0), 'n': (1, 2)}
>>> resolve(Outer, [("--set", {"inner.sigma": -1})])
Traceback (most recent call last):
...
sfxflow.settings.SettingError: --set inner.sigma = -1: expected a number from 0 to 100
"""

import dataclasses
import functools
import inspect
import logging
import math
import operator
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sfxflow.errors import ConfigError
from sfxflow.settings import SettingError, Spec, spec_of, value_problem

__all__ = [
    "Leaf",
    "commented_toml",
    "convert",
    "differences",
    "expected_words",
    "first_sentence",
    "from_mapping",
    "leaves",
    "load_mapping",
    "markdown",
    "parse_override",
    "resolve",
    "sections",
    "to_mapping",
    "to_toml",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Invalid(ValueError):
    """A value that does not convert; ``expected`` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


@dataclass(frozen=True)
class Leaf:
    """One setting of a tree: ``key`` (dotted), ``flag`` (no dashes), type, default, range, doc."""

    key: str
    flag: str
    type: Any
    default: Any
    spec: Spec
    doc: str
    section: str  # dotted key of the owning section ("" at the top level)

    @property
    def expected(self) -> str:
        """What the setting accepts, in words: ``"a number from 0 to 1"``."""
        return expected_words(self.type, self.spec)

    @property
    def accepted(self) -> str:
        """:attr:`expected` and a bound set by another field (``">= min_spot_pixels"``)."""
        bound = (f">= {self.spec.at_least}" if self.spec.at_least else
                 f"> {self.spec.above}" if self.spec.above else "")
        return f"{self.expected}, {bound}" if bound else self.expected


@dataclass(frozen=True)
class Section:
    """A section of a tree: dotted key ("" for the root), its dataclass and one-line doc."""

    key: str
    cls: type
    doc: str


# ---------------------------------------------------------------------------- introspection


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``name -> text`` from the numpydoc ``Parameters`` section of ``cls``'s docstring."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines[:-1])
                     if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return out
    names: list[str] = []
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1].strip() and set(lines[i + 1].strip()) == {"-"}:
            break  # the next numpydoc section
        if line.startswith(">>>"):
            break
        m = re.match(r"^(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)$", line)
        if m and not line.startswith(" "):
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif line.strip() and names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}"
    return out


def _plain_text(text: str) -> str:
    """Docstring text without reST markup: ``:class:`~a.B``` -> ``B``, double backquotes -> none."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def first_sentence(text: str) -> str:
    """The first sentence of a doc entry (up to a '.' or ';' outside parentheses), plain text."""
    text = " ".join(_plain_text(text).strip().split("\n\n")[0].split())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch in ".;" and (i + 1 == len(text) or text[i + 1] == " ") \
                and text[max(i - 3, 0):i + 1] not in ("e.g.", "i.e."):
            return text[:i]
    return text.rstrip(".;")


@functools.cache
def _walk(cls: type) -> tuple[tuple[Section, ...], tuple[Leaf, ...]]:
    secs: list[Section] = [Section("", cls, first_sentence(inspect.cleandoc(cls.__doc__ or "")))]
    out: list[Leaf] = []

    def visit(c: type, key_prefix: str, flag_prefix: str) -> None:
        hints = typing.get_type_hints(c)
        docs = field_docs(c)
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            tp, spec = hints[f.name], spec_of(f)
            key = f"{key_prefix}{f.name}"
            if _is_section(tp):
                prefix = spec.flag_prefix if spec.flag_prefix is not None else f"{f.name}-"
                doc = first_sentence(spec.doc or docs.get(f.name, ""))
                if len(doc.split()) < 2:  # only a reference to the class: use its own summary
                    doc = first_sentence(inspect.cleandoc(tp.__doc__ or ""))
                secs.append(Section(key, tp, doc))
                visit(tp, f"{key}.", prefix)
                continue
            name = f.name.replace("_", "-")
            if spec.flag:
                flag = spec.flag
            elif flag_prefix and name.startswith(flag_prefix):
                flag = name  # refine_distance in "refine-": --refine-distance
            else:
                flag = f"{flag_prefix}{name}"
            out.append(Leaf(key, flag, tp, _default(f), spec, spec.doc or docs.get(f.name, ""),
                            key_prefix.rstrip(".")))

    visit(cls, "", "")
    seen: dict[str, str] = {}
    for leaf in out:
        if leaf.flag in seen:  # a programming error in the tree, found by the tests
            raise TypeError(f"{cls.__name__}: settings {seen[leaf.flag]} and {leaf.key} would "
                            f"share the flag --{leaf.flag}; give one a flag or flag_prefix")
        seen[leaf.flag] = leaf.key
    return tuple(secs), tuple(out)


def leaves(cls: type) -> tuple[Leaf, ...]:
    """Every setting of the tree ``cls``, depth first in field order."""
    return _walk(cls)[1]


def leaves_by_key(cls: type) -> dict[str, Leaf]:
    """Every setting of the tree ``cls`` by its dotted key."""
    return {leaf.key: leaf for leaf in leaves(cls)}


def sections(cls: type) -> tuple[Section, ...]:
    """Every section of the tree ``cls`` (the root first, key ``""``)."""
    return _walk(cls)[0]


# ---------------------------------------------------------------------------- conversion


def expected_words(tp: Any, spec: Spec) -> str:
    """What a setting of type ``tp`` within ``spec`` accepts, in words (for messages and docs)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if spec.expect:
        return f"{spec.expect} or none" if type(None) in args else spec.expect
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(expected_words(a, spec) for a in inner)
        return f"{text} or none" if type(None) in args else text
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values, each {expected_words(args[0], spec)}"
        return f"a list, each {expected_words(args[0], spec)}" if args else "a list"
    if tp is bool:
        return "true or false"
    if tp is int:
        return spec.describe("an integer")
    if tp is float:
        return spec.describe("a finite number" if not spec.has_range and spec.finite else "a number")
    if tp is str:
        return spec.describe("text") if spec.choices else "text"
    return f"a {getattr(tp, '__name__', tp)}"


_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _scalar(value: Any, tp: Any) -> Any:
    if (isinstance(value, bool) and tp in (int, float)) \
            or (tp is str and not isinstance(value, str | int | float)):
        raise ValueError  # true is not 1, and a table is not text
    if tp is bool:
        return value if isinstance(value, bool) else _BOOLS[str(value).strip().lower()]
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
    if tp is int:
        return int(value.strip()) if isinstance(value, str) else int(value)
    if tp in (float, str):
        return tp(value)
    return value if tp is Any or isinstance(value, tp) else tp(value)


def convert(tp: Any, spec: Spec, value: Any) -> Any:
    """``value`` (text from a flag) as type ``tp``, checked against ``spec`` (a flag's value is
    refused as it is parsed, naming the flag).

    Raises :class:`Invalid` with what would have been accepted.
    """
    out = _convert(tp, spec, value)
    if value_problem(spec, out):
        raise Invalid(expected_words(tp, spec))
    return out


def _convert(tp: Any, spec: Spec, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is not type(None):
                try:
                    return _convert(a, spec, value)
                except Invalid:
                    pass
        raise Invalid(expected_words(tp, spec))
    if origin is tuple or tp is tuple:
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise Invalid(expected_words(tp, spec))
        try:
            if args and args[-1] is not Ellipsis:
                if len(items) != len(args):
                    raise Invalid(expected_words(tp, spec))
                return tuple(_convert(a, spec, v) for a, v in zip(args, items, strict=True))
            return tuple(_convert(args[0] if args else Any, spec, v) for v in items)
        except Invalid:
            raise Invalid(expected_words(tp, spec)) from None
    try:
        return _scalar(value, tp)
    except (TypeError, ValueError, OverflowError, KeyError):
        raise Invalid(expected_words(tp, spec)) from None


# ---------------------------------------------------------------------------- building trees


def _flatten(cls: type, data: Mapping[str, Any], where: str, strict: bool,
             moved: Mapping[str, str], warn_moved: bool = True) -> dict[str, Any]:
    """Nested or dotted mapping -> ``{dotted key: value}``; unknown keys raise unless not strict;
    a key that ``moved`` (old -> new) is read as the new one, with a warning (``warn_moved``)."""
    known = {leaf.key for leaf in leaves(cls)}
    secs = {s.key: s.cls for s in sections(cls)}
    out: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for raw_key, value in node.items():
            key = f"{prefix}{raw_key}"
            if key in secs:
                if not isinstance(value, Mapping):
                    raise SettingError(f"{where}: {key} = {value!r}: expected a table of "
                                       f"{secs[key].__name__} settings")
                visit(value, f"{key}.")
            elif key in known:
                out[key] = value
            elif moved.get(key) in known:
                logger.log(logging.WARNING if warn_moved else logging.DEBUG,
                           "%s: %s is deprecated; use %s", where, key, moved[key])
                out[moved[key]] = value
            elif strict:
                _unknown(cls, key, where)

    visit(data, "")
    return out


def _unknown(cls: type, key: str, where: str) -> typing.NoReturn:
    parts = key.split(".")
    secs = {s.key: s.cls for s in sections(cls)}
    for i in range(1, len(parts)):
        above = ".".join(parts[:i])
        if above not in secs and any(leaf.key == above for leaf in leaves(cls)):
            raise SettingError(f"{where} {key}: {above} is a value, not a section")
    scope = ".".join(parts[:-1])
    while scope and scope not in secs:
        scope = scope.rpartition(".")[0]
    names = sorted(f.name for f in dataclasses.fields(secs.get(scope, cls)) if f.init)
    raise SettingError(f"{where}: unknown key {key}; accepted keys in {scope or 'the top level'}: "
                       f"{', '.join(names)}")


#: the layer name :func:`resolve` gives command-line flags (messages name each flag)
FLAGS = "command line"
#: where a value came from: dotted key -> (how messages name it, the value as given there)
Sources = Mapping[str, tuple[str, Any]]


def _label(where: str, leaf: Leaf) -> str:
    """``"--set a.b"``, ``"file.toml: a.b"`` or ``"--a-b (key a.b)"`` for a flag."""
    if where == FLAGS:
        return f"--{leaf.flag} (key {leaf.key})"
    return f"{where} {leaf.key}" if where.startswith("--") else f"{where}: {leaf.key}"


def _located(exc: SettingError, prefix: str, sources: Sources) -> SettingError:
    """``exc`` (from a ``__post_init__``) naming the layer and key the bad value came from.

    A cross-field check (``at_least``) that fails because of the *other* field, the one given
    (a minimum raised above the default maximum), is reported on that field.
    """
    field, value, expected = exc.field, exc.value, exc.expected
    if exc.also and f"{prefix}{field}" not in sources and f"{prefix}{exc.also}" in sources:
        op = {">=": "<=", ">": "<"}.get(expected.split(" ", 1)[0], "")
        if op:
            field, value, expected = exc.also, exc.value, f"{op} {exc.field} ({exc.value!r})"
    label, value = sources.get(f"{prefix}{field}", (f"{prefix}{field}", value))
    return SettingError(f"{label} = {value!r}: expected {expected}", field=field, value=value,
                        expected=expected, also=exc.also, located=True)


def _construct(cls: type[T], values: Mapping[str, Any], sources: Sources, prefix: str = "") -> T:
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}{f.name}"
        if _is_section(hints[f.name]):
            if any(k.startswith(f"{key}.") for k in values):
                kwargs[f.name] = _construct(hints[f.name], values, sources, f"{key}.")
        elif key in values:
            kwargs[f.name] = values[key]
    try:
        return cls(**kwargs)
    except SettingError as exc:  # the one range check, in __post_init__: say where it came from
        if exc.located or not exc.field:
            raise
        if not exc.also and f"{prefix}{exc.field}" in sources:  # its words: "... or none"
            exc.expected = leaves_by_key(cls)[exc.field].expected
        raise _located(exc, prefix, sources) from None
    except (ValueError, TypeError) as exc:
        raise SettingError(f"invalid {prefix.rstrip('.') or cls.__name__} settings: {exc}") from None


def resolve(cls: type[T], layers: Iterable[tuple[str, Mapping[str, Any]]], *,
            base: T | None = None, strict: bool = True, moved: Mapping[str, str] | None = None,
            warn_moved: bool = True) -> T:
    """Build the tree ``cls`` from layers applied in order over ``base`` (default: defaults).

    Parameters
    ----------
    cls : the tree's root dataclass.
    layers : ``(where, mapping)`` pairs, later ones winning; ``mapping`` is nested (a parsed
        file) or has dotted keys (``--set``); ``where`` names the source in messages.
    base : the tree the layers apply to.
    strict : refuse keys the tree lacks (presets are applied with ``strict=False``).
    moved : old dotted key -> new one, for settings that moved (read with a warning).
    warn_moved : ``False`` for files sfxflow wrote itself (a run directory's ``config.toml``
        from an older version lists every key): the user wrote none of them.

    Raises
    ------
    SettingError
        For an unknown key (listing the accepted ones) or a value of the wrong type or range,
        naming the layer, the key, the value and what is accepted. Values are converted to
        their types here; ranges are checked once, by the dataclasses themselves.
    """
    values: dict[str, Any] = {}
    if base is not None:
        values.update(_flat_values(base))
    by_key = leaves_by_key(cls)
    sources: dict[str, tuple[str, Any]] = {}
    for where, data in layers:
        for key, value in _flatten(cls, data, where, strict, moved or {}, warn_moved).items():
            leaf = by_key[key]
            try:
                values[key] = _convert(leaf.type, leaf.spec, value)
            except Invalid as exc:
                raise SettingError(f"{_label(where, leaf)} = {value!r}: expected {exc.expected}",
                                   field=key.rpartition(".")[2], value=value,
                                   expected=exc.expected) from None
            sources[key] = (_label(where, leaf), value)
    return _construct(cls, values, sources)


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "configuration") -> T:
    """Build ``cls`` from one nested mapping (e.g. parsed TOML); missing keys keep defaults."""
    return resolve(cls, [(where, data or {})])


def _flat_values(tree: Any) -> dict[str, Any]:
    """``{dotted key: value}`` of every setting of ``tree``."""
    return {leaf.key: operator.attrgetter(leaf.key)(tree) for leaf in leaves(type(tree))}


def parse_override(item: str, where: str = "--set") -> tuple[str, Any]:
    """``"section.key=value"`` -> ``(key, value)``, the value parsed as TOML, else kept as text."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingError(f"{where} {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_overrides(tree: T, overrides: Sequence[str], where: str = "--set") -> T:
    """Apply ``section.key=value`` strings to ``tree`` (see :func:`parse_override`)."""
    data = dict(parse_override(item, where) for item in overrides)
    return resolve(type(tree), [(where, data)], base=tree)


# ---------------------------------------------------------------------------- writing trees


def _plain(value: Any) -> Any:
    """``value`` with dataclasses as dicts and tuples as lists (as TOML and YAML read back)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return {str(k): _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def to_mapping(tree: Any) -> dict[str, Any]:
    """Nested plain dict of a parameter tree (tuples as lists)."""
    return _plain(tree)  # type: ignore[no-any-return]


def _toml_safe(value: Any) -> Any:
    """TOML has no null: write None as "none" (read back for optional settings)."""
    if value is None:
        return "none"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value]
    return value


def to_toml(tree: Any) -> str:
    """The whole tree as TOML text (every key, defaults included), readable by :func:`resolve`."""
    import tomli_w

    plain = _toml_safe(to_mapping(tree))
    scalars = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in plain.items() if isinstance(v, dict)}
    return tomli_w.dumps({**scalars, **tables})


def _toml_value(value: Any) -> str:
    import tomli_w

    plain = _toml_safe(_plain(value))
    if isinstance(plain, list):  # one line, whatever its length
        return "[" + ", ".join(_toml_value(v) for v in plain) + "]"
    return tomli_w.dumps({"v": plain})[4:].strip()


def _grouped(cls: type) -> list[tuple[Section, list[Leaf]]]:
    """The sections that hold settings, each with its own settings, in tree order."""
    return [(sec, own) for sec in sections(cls)
            if (own := [leaf for leaf in leaves(cls) if leaf.section == sec.key])]


def commented_toml(tree: Any) -> str:
    """The whole resolved tree as TOML, each key with its one-line doc, range and default.

    The text is itself a valid configuration file (``--config``).
    """
    flat = _flat_values(tree)
    lines: list[str] = []
    for sec, own in _grouped(type(tree)):
        if sec.key:
            lines += ["", f"[{sec.key}]  # {sec.doc}"]
        for leaf in own:
            value = flat[leaf.key]
            note = f"{first_sentence(leaf.doc)}" if leaf.doc else ""
            extra = [f"--{leaf.flag}", leaf.accepted]
            if _plain(value) != _plain(leaf.default):
                extra.append(f"default {_toml_value(leaf.default)}")
            lines.append(f"{leaf.key.rpartition('.')[2]} = {_toml_value(value)}  # {note}"
                         f"{' ' if note else ''}[{'; '.join(extra)}]")
    return "\n".join(lines).lstrip("\n") + "\n"


def markdown(cls: type, title: str, intro: str = "") -> str:
    """A Markdown reference of the tree ``cls``: one table per section."""
    out = [f"## {title}", ""]
    if intro:
        out += [intro, ""]
    for sec, own in _grouped(cls):
        head = f"`[{sec.key}]`" if sec.key else "top level"
        out += [f"### {head}: {sec.doc}", "",
                f"From `{sec.cls.__module__}.{sec.cls.__name__}`.", "",
                "| key | flag | default | accepted | meaning |", "|---|---|---|---|---|"]
        for leaf in own:
            doc = _plain_text(leaf.doc).replace("|", "\\|")
            default = "none" if leaf.default is None else _toml_value(leaf.default)
            out.append(f"| `{leaf.key.rpartition('.')[2]}` | `--{leaf.flag}` | "
                       f"`{default}` | {leaf.accepted} | {doc} |")
        out.append("")
    return "\n".join(out)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.yaml``/``.yml`` configuration file into a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: configuration file not found")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            problem = str(exc).replace("\n", " ")
            raise ConfigError(f"{p}: not valid YAML: {problem}") from None
    else:
        raise ConfigError(f"{p}: unknown configuration format {suffix!r}; expected .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of sections at the top level, got {type(data).__name__}")
    return data


def differences(default: Any, tree: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value in ``tree`` differs from ``default``: key -> (default, value)."""
    a, b = _flat_values(default), _flat_values(tree)
    return {k: (_plain(a.get(k)), _plain(v)) for k, v in b.items() if _plain(a.get(k)) != _plain(v)}
