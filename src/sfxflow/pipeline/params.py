"""Typed, frozen parameter trees: build from mappings (TOML/YAML), override, diff, write back.

A parameter tree is a frozen dataclass whose fields are scalars (bool, int, float, str), optional
scalars, tuples of scalars, enums/literals, or nested frozen dataclasses (one section per
algorithm, each defined next to its code). This module knows nothing about crystallography; it
only checks keys and types so that a misspelt key or a wrong value is a one-line
:class:`~sfxflow.errors.ConfigError` naming the key, the value and what was expected.

>>> from dataclasses import dataclass, field
>>> @dataclass(frozen=True)
... class Inner:
...     sigma: float = 3.0
...     mode: str = "fast"
>>> @dataclass(frozen=True)
... class Outer:
...     inner: Inner = field(default_factory=Inner)
...     n: int = 1
>>> tree = from_mapping(Outer, {"inner": {"sigma": 4}, "n": 2})
>>> tree.inner.sigma, tree.n
(4.0, 2)
>>> apply_overrides(tree, ["inner.mode=slow"]).inner.mode
'slow'
>>> differences(Outer(), tree)
{'inner.sigma': (3.0, 4.0), 'n': (1, 2)}
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sfxflow.errors import ConfigError

__all__ = [
    "apply_overrides",
    "differences",
    "from_mapping",
    "load_mapping",
    "set_path",
    "to_mapping",
    "to_toml",
]

T = TypeVar("T")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: use the default value's type
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            default = _default_of(f)
            if not isinstance(f.type, str):
                out[f.name] = f.type
            elif default is not dataclasses.MISSING and default is not None:
                out[f.name] = type(default)
            else:
                out[f.name] = Any
        return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} is not valid; expected {expected}")

    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise bad(f"one of {list(allowed)}")
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, list | tuple):
            raise bad("a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad(f"a list of {len(args)} values")
            items = [_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else list(items)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad(f"a table of {tp.__name__} settings")
        return from_mapping(tp, value, prefix=f"{key}.", where=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise bad(f"one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise bad(f"a {tp.__name__}") from None
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "",
                 where: str = "configuration") -> T:
    """Build the frozen dataclass ``cls`` from a nested mapping; missing keys keep defaults.

    Parameters
    ----------
    cls : a (frozen) dataclass type.
    data : nested mapping (e.g. parsed TOML); ``None`` means all defaults.
    prefix : dotted path of ``cls`` inside the whole tree, for messages.
    where : the file or option the values came from, for messages.

    Raises
    ------
    ConfigError
        For an unknown key (listing the accepted ones) or a value of the wrong type.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]}; accepted keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints.get(name, Any), f"{prefix}{name}", where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid {prefix.rstrip('.') or cls.__name__} settings: {exc}") from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_mapping(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def to_mapping(tree: Any) -> dict[str, Any]:
    """Nested plain dict of a parameter tree (enums as values, tuples as lists)."""
    return {f.name: _plain(getattr(tree, f.name)) for f in dataclasses.fields(tree) if f.init}


def _toml_safe(value: Any) -> Any:
    """TOML has no null and no NaN-free guarantee: write None as "none" and inf/nan as strings."""
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
    """The whole tree as TOML text (every key, defaults included), readable by :func:`load_mapping`."""
    import tomli_w

    plain = _toml_safe(to_mapping(tree))
    scalars = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in plain.items() if isinstance(v, dict)}
    return tomli_w.dumps({**scalars, **tables})


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


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set ``a.b.c = value`` in a nested dict (creating tables), returning ``data``."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {part} is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    return data


def apply_overrides(tree: T, overrides: Sequence[str], where: str = "--set") -> T:
    """Apply ``section.key=value`` strings (values parsed as TOML, else kept as text).

    Raises ConfigError for a malformed override, an unknown key or a bad value.
    """
    if not overrides:
        return tree
    data = to_mapping(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where} {item!r}: expected section.key=value")
        _check_path(type(tree), key, where)
        set_path(data, key, _parse_value(raw.strip()))
    return from_mapping(type(tree), _none_strings(type(tree), data), where=where)  # type: ignore[return-value]


def _check_path(cls: type, dotted: str, where: str) -> None:
    node: Any = cls
    done: list[str] = []
    for part in dotted.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            raise ConfigError(f"{where} {dotted}: {'.'.join(done)} is a value, not a section")
        names = [f.name for f in dataclasses.fields(node) if f.init]
        if part not in names:
            scope = ".".join(done) or "the top level"
            raise ConfigError(
                f"{where}: unknown key {'.'.join([*done, part])}; accepted keys in {scope}: "
                f"{', '.join(sorted(names))}"
            )
        node = _hints(node).get(part)
        done.append(part)


def _none_strings(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of the TOML ``None -> "none"`` mapping, for fields whose type admits None."""
    hints = _hints(cls)
    out = dict(data)
    for name, value in data.items():
        tp = hints.get(name)
        if isinstance(value, dict) and isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out[name] = _none_strings(tp, value)
        elif isinstance(value, str) and value.lower() == "none":
            args = typing.get_args(tp) if tp is not None else ()
            if type(None) in args:
                out[name] = None
    return out


def from_toml_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Like :func:`from_mapping` but reads back the ``"none"`` strings :func:`to_toml` writes."""
    return from_mapping(cls, _none_strings(cls, dict(data)), where=where)


def differences(default: Any, tree: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value in ``tree`` differs from ``default``: key -> (default, value)."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(tree):
        if not f.init:
            continue
        a = getattr(default, f.name)
        b = getattr(tree, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(b) and not isinstance(b, type) and type(a) is type(b):
            out.update(differences(a, b, prefix=f"{key}."))
        elif _plain(a) != _plain(b):
            out[key] = (_plain(a), _plain(b))
    return out
