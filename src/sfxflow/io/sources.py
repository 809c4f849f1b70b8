"""Image sources, discovery and blocks of frames: the unit of work of the whole system.

* :func:`open_source` opens one file or object (CBF, HDF5 CXI with a CrystFEL geometry, NeXus
  NXmx, an LCLS-II XTC2 file, or a European XFEL run folder) as an :class:`ImageSource`.
* :func:`discover` lists inputs (paths, globs, folders, ``s3://`` prefixes) and counts frames per
  file from metadata only; a file that cannot be listed gets a :class:`FileInfo` with ``error``
  set instead of stopping the others.
* :func:`plan_blocks` cuts files into :class:`Block` s (a block never spans two files);
  :func:`read_block` decodes one block into frames.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sfxflow.errors import ConfigError, GeometryError, InputError, SourceError
from sfxflow.io import storage
from sfxflow.io.cbf import CbfSource, is_cbf
from sfxflow.io.euxfel import is_euxfel_run
from sfxflow.io.hdf5 import open_hdf5_source
from sfxflow.io.source_base import ImageSource

if TYPE_CHECKING:
    from sfxflow.io.geometry import CrystfelGeometry
    from sfxflow.models import Frame

__all__ = [
    "Block",
    "FileInfo",
    "ImageSource",
    "discover",
    "file_tag",
    "open_source",
    "plan_blocks",
    "read_block",
    "source_kind",
]

log = logging.getLogger(__name__)

CBF_EXTENSIONS = (".cbf",)
HDF5_EXTENSIONS = (".h5", ".hdf5", ".cxi", ".nxs", ".nx5", ".hdf")
XTC2_EXTENSIONS = (".xtc2",)
IMAGE_EXTENSIONS = CBF_EXTENSIONS + HDF5_EXTENSIONS + XTC2_EXTENSIONS
_GLOB_CHARS = re.compile(r"[*?\[]")
#: an LCLS-II run as psana names it: ``exp=EXPERIMENT:run=N[:dir=FOLDER]``
_LCLS_RUN = re.compile(r"^exp=(?P<exp>[A-Za-z0-9_]+):run=(?P<run>\d+)(?::dir=(?P<dir>.+))?$")


def _extension(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    return next((ext for ext in IMAGE_EXTENSIONS if name.endswith(ext)), "")


def source_kind(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``"cbf"``, ``"hdf5"``, ``"xtc2"`` or ``"euxfel"``: from the extension or the folder's
    sequence files, else from the first bytes.

    >>> source_kind("/data/idx-0001.cbf"), source_kind("s3://b/run_0001.cxi")
    ('cbf', 'hdf5')
    >>> source_kind("/data/xpptut15-r0014-s000-c000.xtc2")
    'xtc2'
    """
    ext = _extension(url)
    if ext in CBF_EXTENSIONS:
        return "cbf"
    if ext in HDF5_EXTENSIONS:
        return "hdf5"
    if ext in XTC2_EXTENSIONS:
        return "xtc2"
    if storage.is_local(url) and is_euxfel_run(storage.local_path(url)):
        return "euxfel"
    head = storage.read_bytes(url, storage_options, start=0, end=64)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if is_cbf(head):
        return "cbf"
    raise SourceError(url, "unknown image format (expected CBF, HDF5 or XTC2 by extension or "
                           "content, or a European XFEL run folder)")


def open_source(
    url: str,
    geometry: CrystfelGeometry | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    metadata_only: bool = False,
) -> ImageSource:
    """Open one file or object of frames.

    Parameters
    ----------
    url : local path or fsspec URL.
    geometry : CrystFEL geometry; required for CXI/Cheetah HDF5, ignored for CBF (the header
        describes the detector), optional for NXmx (the file's own geometry is used when none).
    storage_options : fsspec options for remote URLs.
    metadata_only : open for counting frames only (remote HDF5 is then read in small ranges
        instead of being fetched whole).

    Raises
    ------
    SourceError, GeometryError
    """
    kind = source_kind(url, storage_options)
    if kind == "cbf":
        return CbfSource(url, storage_options)
    if kind == "xtc2":
        from sfxflow.io.xtc2 import Xtc2Source

        return Xtc2Source(url, geometry, storage_options)
    if kind == "euxfel":
        from sfxflow.io.euxfel import EuXfelRunSource

        return EuXfelRunSource(url, geometry)
    return open_hdf5_source(url, geometry, storage_options, metadata_only=metadata_only)


@dataclass(frozen=True)
class FileInfo:
    """One input file as seen by :func:`discover` (metadata only)."""

    url: str
    n_frames: int
    size_bytes: int
    kind: str
    error: str | None = None
    #: what tells that the content changed: ``mtime_ns:...`` (local) or ``etag:...`` (object)
    version: str = ""
    #: the error is a storage outage (retries spent), not a problem of the file
    transient: bool = False
    #: only these frames (events ``//N`` of an input list); ``None`` = every frame
    frames: tuple[int, ...] | None = None
    #: what kind of error: ``"missing"`` (the input names nothing), ``"geometry"`` (the
    #: geometry does not fit the file) or ``"unreadable"``; ``""`` without an error
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def _expand(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """A URL, glob, folder or LCLS-II run -> image file URLs (sorted); a European XFEL run
    folder stays one input."""
    lcls_run = _LCLS_RUN.match(url)
    if lcls_run:
        folder = lcls_run["dir"] or "."
        url = f"{folder.rstrip('/')}/{lcls_run['exp']}-r{int(lcls_run['run']):04d}-s*-c*.xtc2"
        found = _expand(url, storage_options)
        if not found:
            raise SourceError(url, "no XTC2 files of this LCLS-II run (expected "
                                   "EXP-rNNNN-sNNN-cNNN.xtc2 in the run's dir)")
        return found
    if storage.is_local(url):
        path = storage.local_path(url)
        if is_euxfel_run(path):
            return [str(path)]
        if _GLOB_CHARS.search(str(path)):
            import glob

            return sorted(glob.glob(str(path)))
        if path.is_dir():
            return sorted(
                str(p) for p in path.iterdir() if p.is_file() and _extension(p.name)
            )
        if not path.exists():
            raise SourceError(url, "no such file or folder")
        return [str(path)]
    fs = storage.filesystem(url, storage_options)
    proto = url.split("://", 1)[0]
    # s3://b/k -> b/k, but an http(s) request needs its whole URL
    key = url.split("://", 1)[1] if proto in ("s3", "s3a") else storage._strip(url, fs)

    def full(name: str) -> str:
        return name if "://" in name else f"{proto}://{name}"

    try:
        if _GLOB_CHARS.search(key):
            found = storage.retrying(lambda: storage.call_fs(fs, "glob", key), url, "list")
            return sorted(full(p) for p in found)
        info = storage.retrying(lambda: storage.call_fs(fs, "info", key), url, "list")
        if info.get("type") == "directory":
            return sorted(
                full(e["name"])
                for e in storage.retrying(lambda: storage.call_fs(fs, "ls", key, detail=True),
                                          url, "list")
                if e.get("type") != "directory" and _extension(e["name"])
            )
    except FileNotFoundError as exc:
        raise SourceError(storage.shown_url(url), "no such file, folder or object") from exc
    except SourceError:
        raise
    except Exception as exc:  # botocore/aiohttp errors come in many types
        raise storage._wrap_storage_error(url, exc) from exc
    return [url]


def discover(
    urls: str | Iterable[str],
    geometry: CrystfelGeometry | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    threads: int = 8,
) -> list[FileInfo]:
    """List input files and count their frames (metadata only, no pixel reads).

    Parameters
    ----------
    urls : one or more paths/URLs; globs (``run_*.cxi``) and folders/prefixes are expanded;
        lists (``files.lst``, ``@files.txt``: see :mod:`sfxflow.io.lists`) are read, and their
        ``//N`` events select frames.
    geometry : CrystFEL geometry for CXI files.
    storage_options : fsspec options.
    threads : files described at once (many files or URLs are opened in parallel, bounded).

    Returns
    -------
    One :class:`FileInfo` per file, in input order (each expansion sorted). A file or pattern
    that cannot be listed or opened yields ``FileInfo(error=...)`` and the others still go.
    A file named with events carries them in ``frames``.

    Raises
    ------
    InputError
        A list file that cannot be read or holds a bad event.
    """
    from concurrent.futures import ThreadPoolExecutor

    from sfxflow.io.lists import expand_lists

    if isinstance(urls, str):
        urls = [urls]
    slots: list[FileInfo | str] = []
    events: dict[str, list[int] | None] = {}
    for entry in expand_lists([str(u) for u in urls], storage_options):
        try:
            files = _expand(entry.url, storage_options)
        except InputError as exc:
            slots.append(FileInfo(entry.url, 0, 0, "unknown", storage.redact_urls(str(exc)),
                                  transient=storage.is_transient(exc), problem="missing"))
            continue
        if not files:
            slots.append(FileInfo(entry.url, 0, 0, "unknown",
                                  f"{storage.shown_url(entry.url)}: matched no image files",
                                  problem="missing"))
            continue
        for url in files:
            chosen = events.get(url)
            if entry.event is not None and chosen:  # one more event of a file already listed
                chosen.append(entry.event)
                continue
            slots.append(url)  # a file named twice is refused later, as ever
            events[url] = None if entry.event is None else [entry.event]
    todo = [s for s in slots if isinstance(s, str)]
    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        described = dict(zip(todo, pool.map(
            lambda u: _describe(u, geometry, storage_options), todo), strict=True))
    return [slot if isinstance(slot, FileInfo) else _select(described[slot], events[slot])
            for slot in slots]


def _select(info: FileInfo, events: list[int] | None) -> FileInfo:
    """``info`` restricted to the frames named by a list's ``//N`` events."""
    if events is None or not info.ok:
        return info
    wanted = tuple(sorted(set(events)))
    outside = [e for e in wanted if e >= info.n_frames]
    if outside:
        shown = storage.shown_url(info.url)
        return replace(info, problem="missing",
                       error=f"{shown}: event //{outside[0]} out of range; expected an integer "
                             f"from 0 to {info.n_frames - 1} (the file has {info.n_frames} "
                             "frame(s))")
    return replace(info, frames=wanted)


def _describe(
    url: str, geometry: CrystfelGeometry | None, storage_options: Mapping[str, Any] | None
) -> FileInfo:
    size = 0
    version = ""
    kind = "unknown"
    shown = storage.shown_url(url)
    try:
        size, version = storage.object_stamp(url, storage_options)
        kind = source_kind(url, storage_options)
        if kind == "cbf":
            if size == 0:
                raise SourceError(shown, "empty file")
            return FileInfo(url, 1, size, "cbf", version=version)
        with open_source(url, geometry, storage_options, metadata_only=True) as src:
            return FileInfo(url, src.n_frames, size, src.kind, version=version)
    except (InputError, OSError) as exc:
        text = storage.redact_urls(str(exc))
        msg = text if shown in text else f"{shown}: {text}"
        log.debug("cannot list %s: %s", shown, msg)  # the caller says it once for all files
        return FileInfo(url, 0, size, kind, msg, version, storage.is_transient(exc),
                        problem="geometry" if isinstance(exc, GeometryError) else "unreadable")


@dataclass(frozen=True)
class Block:
    """Frames ``start .. stop-1`` of one file: the unit of work.

    >>> b = Block("s3://bucket/run_0001.cxi", 0, 50)
    >>> b.block_id == Block("s3://bucket/run_0001.cxi", 0, 50).block_id, b.n_frames
    (True, 50)
    >>> b.block_id.startswith("run_0001.cxi-") and b.block_id.endswith("-000000-000050")
    True
    """

    url: str
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"block needs 0 <= start < stop, got {self.start}..{self.stop}")

    @property
    def n_frames(self) -> int:
        return self.stop - self.start

    @property
    def block_id(self) -> str:
        """Deterministic, filesystem-safe name: file stem, URL hash, frame range."""
        return f"{file_tag(self.url)}-{self.start:06d}-{self.stop:06d}"


def file_tag(url: str) -> str:
    """Filesystem-safe name of a file: its stem and a hash of its URL (the start of its block
    ids).

    >>> file_tag("s3://me:secret@host/run_0001.cxi") == file_tag("s3://***@host/run_0001.cxi")
    True
    """
    # from the URL as shown: a password inside it must not leak through the hash
    shown = storage.shown_url(url)
    name = shown.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:48].strip(".") or "file"
    return f"{stem}-{hashlib.sha1(shown.encode()).hexdigest()[:10]}"


def plan_blocks(files: Sequence[FileInfo], frames_per_block: int) -> list[Block]:
    """Cut every good file into blocks of at most ``frames_per_block`` frames.

    Files with an ``error`` or no frames are skipped.

    >>> plan_blocks([FileInfo("a.cxi", 5, 10, "cxi"), FileInfo("b.cbf", 1, 10, "cbf")], 2)
    [Block(url='a.cxi', start=0, stop=2), Block(url='a.cxi', start=2, stop=4), \
Block(url='a.cxi', start=4, stop=5), Block(url='b.cbf', start=0, stop=1)]
    """
    if int(frames_per_block) < 1:
        raise ConfigError(f"frames_per_block must be >= 1, got {frames_per_block}")
    n = int(frames_per_block)
    blocks: list[Block] = []
    for f in files:
        if f.error is not None or f.n_frames <= 0:
            continue
        for first, stop in _runs(f.frames, f.n_frames):
            for start in range(first, stop, n):
                blocks.append(Block(f.url, start, min(start + n, stop)))
    return blocks


def _runs(frames: Sequence[int] | None, n_frames: int) -> list[tuple[int, int]]:
    """Selected frames as ``(start, stop)`` runs of consecutive frames.

    >>> _runs(None, 5), _runs((0, 1, 2, 7, 9, 10), 12)
    ([(0, 5)], [(0, 3), (7, 8), (9, 11)])
    """
    if frames is None:
        return [(0, n_frames)]
    runs: list[tuple[int, int]] = []
    for i in sorted(set(frames)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def read_block(
    block: Block,
    geometry: CrystfelGeometry | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Frame]:
    """Decode the frames of one block.

    Raises
    ------
    SourceError, GeometryError
        Naming the block's URL and the problem.
    """
    with open_source(block.url, geometry, storage_options) as src:
        return src.read_frames(block.start, block.stop)
