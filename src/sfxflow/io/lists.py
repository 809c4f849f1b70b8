"""Input lists: CrystFEL ``.lst`` files and ``@list`` arguments.

A list names one image file per line, as indexamajig's ``-i files.lst`` reads it::

    # comments and blank lines are ignored
    /data/run_0001.cxi            every frame of the file
    /data/run_0002.cxi //3        only frame (event) 3 of that file
    idx-0001.cbf                  relative: to the current folder, as indexamajig does

Any input argument that ends in ``.lst`` or starts with ``@`` (``@files.txt``) is read as a list;
its entries may be paths, globs, folders or URLs, mixed with plain arguments. Relative entries are
taken relative to the current directory (CrystFEL's rule; indexamajig's ``--prefix`` is
``prefix`` here). Lists may live on object storage (``s3://bucket/files.lst``).

>>> entries = parse_list("a.cbf\\n# note\\n\\n/d/run.cxi //3\\n/d/run.cxi //5\\n", "x.lst")
>>> [(e.url, e.event) for e in entries]
[('a.cbf', None), ('/d/run.cxi', 3), ('/d/run.cxi', 5)]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sfxflow.errors import InputError

__all__ = ["ListEntry", "expand_lists", "is_list", "parse_list", "read_list"]

_EVENT = re.compile(r"^(?P<url>.*?)\s+//(?P<event>\S*)$")


@dataclass(frozen=True)
class ListEntry:
    """One input: a path, glob, folder or URL, and the one frame (event) meant, if any."""

    url: str
    event: int | None = None


def is_list(text: str) -> bool:
    """``True`` for ``@name`` and ``*.lst`` arguments.

    >>> is_list("@files.txt"), is_list("s3://b/run.lst"), is_list("run.cxi")
    (True, True, False)
    """
    return text.startswith("@") or text.lower().endswith(".lst")


def parse_list(text: str, where: str, prefix: str = "") -> list[ListEntry]:
    """The entries of a list's text (``where`` names it in errors).

    Raises
    ------
    InputError
        An event that is not an integer >= 0, naming the list, the line and the value.
    """
    entries: list[ListEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        event: int | None = None
        match = _EVENT.match(line)
        if match:
            word = match["event"]
            if not word.isdigit():
                raise InputError(f"{where} line {number}: event '//{word}'; expected //N with N "
                                 "an integer >= 0 (the frame in the file, from 0)")
            line, event = match["url"].strip(), int(word)
        entries.append(ListEntry(prefix + line, event))
    return entries


def read_list(name: str, storage_options: Mapping[str, Any] | None = None,
              prefix: str = "") -> list[ListEntry]:
    """The entries of the list file ``name`` (``@`` stripped; a path or URL).

    Raises
    ------
    InputError
        The list cannot be read, is not text, or names no file.
    """
    from sfxflow.io import storage

    url = name[1:] if name.startswith("@") else name
    data = storage.read_bytes(url, storage_options)  # SourceError naming the URL
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{storage.shown_url(url)}: not a text list; expected one image file "
                         "per line (CrystFEL .lst)") from None
    if "\x00" in text:
        raise InputError(f"{storage.shown_url(url)}: not a text list (binary content); expected "
                         "one image file per line (CrystFEL .lst)")
    entries = parse_list(text, storage.shown_url(url), prefix)
    if not entries:
        raise InputError(f"{storage.shown_url(url)}: the list names no file; expected one image "
                         "file per line")
    return entries


def expand_lists(inputs: Iterable[str], storage_options: Mapping[str, Any] | None = None,
                 prefix: str = "") -> list[ListEntry]:
    """Every input, with each list replaced by its entries (in order; lists do not nest)."""
    out: list[ListEntry] = []
    for text in inputs:
        if is_list(text):
            out.extend(read_list(text, storage_options, prefix))
        else:
            out.append(ListEntry(text))
    return out
