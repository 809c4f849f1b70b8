"""Command-line flags generated from the configuration trees, and range-checked numeric options.

:func:`add_settings` gives a command one flag per setting of its tree (``--sigma-strong``,
``--hit-min-spots``, ``--refine-cell/--no-refine-cell``), each converted and range-checked by
the same code that reads configuration files, plus ``--preset``, ``--config``, ``--set`` and
``--print-config``. :func:`settings_from` turns the parsed flags into the frozen tree (defaults <
presets < file < flags < ``--set``). :func:`number` adds an option of a command's own (not a
setting) with a declared range. A bad value exits with status 2 and one line naming the option,
the value and the accepted range.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from sfxflow.options import Parser, number
from sfxflow.options import converter as _converter
from sfxflow.pipeline import params as _params

T = TypeVar("T")

__all__ = ["Parser", "add_settings", "deprecated", "given", "number", "print_config", "settings_from"]


class _Deprecated(argparse.Action):
    """A renamed option: stores under the new name and leaves a note for the log."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "",
                 store: Any = None, append: bool = False, **kwargs: Any) -> None:
        self.new = new
        self.store = store
        self.append = append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.dest == "presets" or self.append:
            value = self.store if self.dest == "presets" else values
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), value])
        else:
            setattr(namespace, self.dest, self.store if self.nargs == 0 else values)
        notes = list(getattr(namespace, "_deprecated", []))
        notes.append(f"{option_string} is deprecated; use {self.new}")
        namespace._deprecated = notes


def deprecated(parser: Any, option: str, dest: str, new: str, *, kind: Any = None,
               append: bool = False) -> None:
    """A renamed option kept as a hidden alias: stores into ``dest`` and logs a note."""
    parser.add_argument(option, dest=dest, action=_Deprecated, new=new, type=kind, append=append,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _metavar(leaf: _params.Leaf) -> str:
    if leaf.spec.choices:
        return "{" + ",".join(str(c) for c in leaf.spec.choices) + "}"
    text = str(leaf.type)
    return next((m for word, m in (("tuple", '"A B ..."'), ("int", "N"), ("float", "X"))
                 if word in text), "TEXT")


def _help(leaf: _params.Leaf) -> str:
    doc = _params.first_sentence(leaf.doc) if leaf.doc else leaf.key
    default = leaf.default
    shown = ("none" if default is None else '""' if default == "" else
             " ".join(map(str, default)) or "[]" if isinstance(default, tuple) else default)
    extra = "" if leaf.type is bool else f"{leaf.expected}; "
    return f"{doc} [{extra}default {shown}; key {leaf.key}]".replace("%", "%%")


class _HelpAll(argparse.Action):
    """``--help-all``: the help with every setting's flag (``--help`` shows the essential ones)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        for action in parser._actions:
            full = getattr(action, "full_help", None)
            if full is not None:
                action.help = full
        parser.print_help()
        parser.exit()


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--config``, ``--set`` and ``--print-config``."""
    from sfxflow.pipeline.config import preset_names

    cfg = parser.add_argument_group("configuration (see --print-config and docs/config.md)")
    cfg.add_argument("--preset", dest="presets", action="append", default=[],
                     choices=preset_names(), metavar="NAME",
                     help=f"shipped settings for a detector: {', '.join(preset_names())}")
    cfg.add_argument("--config", metavar="FILE", help="TOML or YAML configuration file")
    cfg.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    cfg.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration (TOML, with docs and ranges) and exit")


def _add_setting_flags(parser: argparse.ArgumentParser, tree: type,
                       by_key: Mapping[str, _params.Leaf], short: Mapping[str, str]) -> None:
    """One flag per setting (plus its ``short`` option strings), grouped by section."""
    extra: dict[str, list[str]] = {}
    for option, key in short.items():
        extra.setdefault(key, []).append(option)
    groups: dict[str, Any] = {}
    for sec in _params.sections(tree):
        if any(leaf.section == sec.key for leaf in by_key.values()):
            title = f"[{sec.key}] {sec.doc}" if sec.key else sec.doc
            groups[sec.key] = parser.add_argument_group(title)
    for leaf in by_key.values():
        group = groups[leaf.section]
        names = [f"--{leaf.flag}", *extra.get(leaf.key, [])]
        if leaf.type is bool:
            group.add_argument(*names, dest=leaf.key, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=_help(leaf))
        elif leaf.type == tuple[str, ...]:  # a list of texts: one per use of the flag
            group.add_argument(*names, dest=leaf.key, action="append", default=argparse.SUPPRESS,
                               metavar="TEXT",
                               help=_help(leaf).replace("[a list, each text; ", "[repeatable; "))
        else:
            group.add_argument(*names, dest=leaf.key, type=_converter(leaf.type, leaf.spec, leaf.key),
                               default=argparse.SUPPRESS, metavar=_metavar(leaf), help=_help(leaf))


def _show_essential_only(parser: argparse.ArgumentParser, by_key: Mapping[str, _params.Leaf],
                         essential: Sequence[str]) -> None:
    """``--help`` shows the ``essential`` settings' flags, ``--help-all`` every one."""
    parser.add_argument("--help-all", action=_HelpAll,
                        help="show every option (each setting of --print-config) and exit")
    shown = set(essential)
    for action in parser._actions:
        if action.dest in by_key:
            action.full_help = action.help  # type: ignore[attr-defined]
            leaf = by_key[action.dest]
            # shown: its first sentence (range, default and key: --help-all)
            brief = _params.first_sentence(leaf.doc) if leaf.doc else leaf.key
            action.help = brief.replace("%", "%%") if action.dest in shown \
                else argparse.SUPPRESS


def _add_old_names(parser: argparse.ArgumentParser, by_key: Mapping[str, _params.Leaf],
                   renamed: Mapping[str, tuple[str, str]], aliases: Mapping[str, str]) -> None:
    """Hidden deprecated flags: renamed sections', moved keys' and the command's aliases."""
    from sfxflow.pipeline.config import MOVED

    old: dict[str, str] = {f"--{old_prefix}{leaf.flag[len(new_prefix):]}": leaf.key
                           for key, (new_prefix, old_prefix) in renamed.items()
                           for leaf in by_key.values() if leaf.flag.startswith(new_prefix)
                           and f"{leaf.section}.".startswith(f"{key}.")}
    old.update({f"--{k.replace('.', '-').replace('_', '-')}": new for k, new in MOVED.items()
                if new in by_key})
    for option, key in {**old, **aliases}.items():
        if key.startswith("preset:"):
            parser.add_argument(option, dest="presets", action=_Deprecated, nargs=0,
                                store=key.split(":", 1)[1], default=argparse.SUPPRESS,
                                new=f"--preset {key.split(':', 1)[1]}", help=argparse.SUPPRESS)
            continue
        leaf = by_key[key]
        if option == f"--{leaf.flag}":  # the key moved, its flag did not (--spots-radial-snr)
            continue
        if leaf.type is bool:
            for option_, value in ((option, True), (f"--no-{option[2:]}", False)):
                parser.add_argument(option_, dest=key, action=_Deprecated, nargs=0, store=value,
                                    new=f"--{'' if value else 'no-'}{leaf.flag}",
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            deprecated(parser, option, key, f"--{leaf.flag}",
                       kind=_converter(leaf.type, leaf.spec, leaf.key),
                       append=leaf.type == tuple[str, ...])


def add_settings(parser: argparse.ArgumentParser, tree: type, *,
                 aliases: Mapping[str, str] | None = None,
                 short: Mapping[str, str] | None = None,
                 essential: Sequence[str] | None = None,
                 renamed: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Flags for every setting of ``tree`` plus ``--preset/--config/--set/--print-config``.

    Parameters
    ----------
    parser : the command's parser.
    tree : the configuration tree (e.g. :class:`~sfxflow.pipeline.config.ProcessConfig`).
    aliases : deprecated option strings -> dotted key (or ``"preset:NAME"``), hidden from help.
    short : extra option strings -> dotted key, e.g. ``{"-g": "io.geometry"}``.
    essential : when given, ``--help`` shows only these settings' flags (dotted keys) and
        ``--help-all`` every one (each flag works either way).
    renamed : section key -> ``(new flag prefix, old flag prefix)``: the old flags of that
        section's settings stay as hidden deprecated aliases (one flag name per setting across
        commands: ``--index-max-crystals`` everywhere, ``--max-crystals`` still accepted).
    """
    _add_config_options(parser)
    by_key = {leaf.key: leaf for leaf in _params.leaves(tree)}
    _add_setting_flags(parser, tree, by_key, short or {})
    if essential is not None:
        _show_essential_only(parser, by_key, essential)
    _add_old_names(parser, by_key, renamed or {}, aliases or {})


def given(args: argparse.Namespace, tree: type) -> dict[str, Any]:
    """The settings given as flags: ``{dotted key: value}``."""
    return {leaf.key: getattr(args, leaf.key) for leaf in _params.leaves(tree)
            if hasattr(args, leaf.key)}


def settings_from(args: argparse.Namespace, tree: type[T]) -> T:
    """The tree from defaults < ``--preset`` < ``--config`` < flags < ``--set``."""
    from sfxflow.pipeline.config import resolve_tree

    return resolve_tree(tree, presets=getattr(args, "presets", None) or (),
                        path=getattr(args, "config", None), flags=given(args, tree),
                        overrides=getattr(args, "overrides", None) or ())


def print_config(tree: Any) -> int:
    """``--print-config``: the resolved tree as commented TOML on stdout."""
    sys.stdout.write(_params.commented_toml(tree))
    return 0

