"""Run-directory storage and per-block result shards (Parquet tables, CrystFEL stream chunks).

A run directory is a local path or any fsspec URL (``s3://bucket/prefix``). Every write of a
shard is atomic: locally the bytes go to a hidden temporary name in the same folder that is then
renamed (``os.replace`` semantics); on object stores a single ``put`` of the whole object is
atomic by itself. A reader therefore sees either no shard or a whole one, and a killed writer
leaves at most a ``.tmp-*`` file that :meth:`RunDir.remove_temporaries` deletes.

Per block ``<id>`` (see :func:`shard_names`)::

    shards/<id>.frames.parquet   one row per frame (FRAME_COLUMNS)
    shards/<id>.spots.parquet    one row per spot, with h k l where the frame was indexed
    shards/<id>.crystals.parquet one row per indexed crystal (CRYSTAL_SCHEMA)
    shards/<id>.reflections.parquet  one row per integrated reflection (REFLECTION_SCHEMA)
    shards/<id>.stream           CrystFEL chunks; ``cat header.stream shards/*.stream`` is a stream

The columns are the contract of ``docs/run-directory.md``.

Each Parquet shard carries key/value metadata ``sfxflow.block_id`` and ``sfxflow.n_frames`` so a
shard verifies itself even without the manifest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import posixpath
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfxflow.errors import InputError, RunDirError, SfxflowError, StorageUnavailable
from sfxflow.io import storage
from sfxflow.models import (
    A_MATRIX_COLUMNS,
    REFLECTION_COLUMNS,
    SPOT_COLUMNS,
    FrameStatus,
    ImageResult,
    a_matrix_columns,
)

T = TypeVar("T")

__all__ = [
    "CELL_COLUMNS",
    "CRYSTAL_SCHEMA",
    "FRAME_COLUMNS",
    "FRAME_SCHEMA",
    "MATRIX_COLUMNS",
    "REFLECTION_SCHEMA",
    "SPOT_SCHEMA",
    "RunDir",
    "ShardBytes",
    "crystals_table",
    "frame_row",
    "frames_table",
    "parquet_bytes",
    "read_parquet_bytes",
    "reflections_table",
    "sha256",
    "shard_names",
    "spots_table",
]

logger = logging.getLogger(__name__)

CELL_COLUMNS = ("a", "b", "c", "alpha", "beta", "gamma")
MATRIX_COLUMNS = A_MATRIX_COLUMNS
STAGES = ("read", "spots", "hit", "index", "integrate")

FRAME_SCHEMA = pa.schema(
    [
        ("source_url", pa.string()),
        ("frame_index", pa.int64()),
        ("event_id", pa.string()),
        ("block_id", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("n_spots", pa.int64()),
        ("n_indexed", pa.int64()),
        ("fraction_indexed", pa.float64()),
        ("rmsd_px", pa.float64()),
        *[(c, pa.float64()) for c in CELL_COLUMNS],
        *[(c, pa.float64()) for c in MATRIX_COLUMNS],
        *[(f"t_{s}_s", pa.float64()) for s in STAGES],
        ("t_total_s", pa.float64()),
        ("n_crystals", pa.int64()),
        ("profile_radius_inv_a", pa.float64()),
        ("resolution_limit_a", pa.float64()),
        ("n_integrated", pa.int64()),
    ]
)
FRAME_COLUMNS: tuple[str, ...] = tuple(FRAME_SCHEMA.names)
#: Columns that depend on timing, not on the data: left out when comparing two runs' results.
TIMING_COLUMNS: tuple[str, ...] = tuple(c for c in FRAME_COLUMNS if c.startswith("t_"))

_ARROW = {"int32": pa.int32(), "float64": pa.float64()}
SPOT_SCHEMA = pa.schema(
    [
        ("source_url", pa.string()),
        ("frame_index", pa.int64()),
        *[(k, _ARROW[v]) for k, v in SPOT_COLUMNS.items()],
        ("indexed", pa.bool_()),
        ("h", pa.int32()),
        ("k", pa.int32()),
        ("l", pa.int32()),
    ]
)


CRYSTAL_SCHEMA = pa.schema(
    [
        ("source_url", pa.string()),
        ("frame_index", pa.int64()),
        ("event_id", pa.string()),
        ("block_id", pa.string()),
        ("crystal", pa.int32()),
        *[(c, pa.float64()) for c in CELL_COLUMNS],
        *[(c, pa.float64()) for c in MATRIX_COLUMNS],
        ("wavelength_a", pa.float64()),
        ("n_indexed", pa.int64()),
        ("rmsd_px", pa.float64()),
        ("profile_radius_inv_a", pa.float64()),
        ("resolution_limit_a", pa.float64()),
        ("n_predicted", pa.int64()),
        ("n_integrated", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

REFLECTION_SCHEMA = pa.schema(
    [
        ("source_url", pa.string()),
        ("frame_index", pa.int64()),
        ("crystal", pa.int32()),
        *[(k, _ARROW[v]) for k, v in REFLECTION_COLUMNS.items()],
    ]
)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the shard checksum kept in the manifest)."""
    return hashlib.sha256(data).hexdigest()


def frame_row(result: ImageResult, block_id: str = "") -> dict[str, Any]:
    """One ``frames.parquet`` row from a per-frame result.

    >>> from sfxflow.models import FrameStatus, ImageResult
    >>> row = frame_row(ImageResult("x.cxi", 3, FrameStatus.MISS, n_spots=2))
    >>> row["status"], row["n_spots"], math.isnan(row["a"])
    ('miss', 2, True)
    """
    row: dict[str, Any] = {
        "source_url": result.source_url,
        "frame_index": int(result.frame_index),
        "event_id": result.event_id,
        "block_id": block_id,
        "status": FrameStatus(result.status).value,
        "stage": result.stage,
        "reason": result.reason,
        "n_spots": int(result.n_spots),
        "n_indexed": int(result.n_indexed),
        "fraction_indexed": (result.n_indexed / result.n_spots) if result.n_spots else math.nan,
        "rmsd_px": float(result.rmsd_px),
    }
    crystal = result.crystal
    if crystal is not None:
        row.update(zip(CELL_COLUMNS, crystal.cell.parameters, strict=True))
        row.update(a_matrix_columns(crystal.a_matrix))
    else:
        row.update(dict.fromkeys(CELL_COLUMNS, math.nan))
        row.update(a_matrix_columns(None))
    t = result.timings_s
    for s in STAGES:
        row[f"t_{s}_s"] = float(t.get(s, 0.0))
    row["t_total_s"] = float(sum(t.values()))
    row["n_crystals"] = len(result.crystals) if result.crystals else int(crystal is not None)
    first = result.crystals[0] if result.crystals else None
    row["profile_radius_inv_a"] = first.profile_radius_inv_a if first else math.nan
    row["resolution_limit_a"] = first.resolution_limit_a if first else math.nan
    row["n_integrated"] = first.n_integrated if first else 0
    return row


def crystals_table(results: Iterable[ImageResult], block_id: str = "",
                   wavelengths_a: Mapping[int, float] | None = None) -> pa.Table:
    """Arrow table with :data:`CRYSTAL_SCHEMA`: one row per crystal of every result
    (``wavelengths_a`` maps frame index to the frame's wavelength; NaN where unknown)."""
    rows: dict[str, list[Any]] = {name: [] for name in CRYSTAL_SCHEMA.names}
    for r in results:
        for i, c in enumerate(r.crystals):
            cell = c.crystal.cell
            values: dict[str, Any] = {
                "source_url": r.source_url, "frame_index": int(r.frame_index),
                "event_id": r.event_id, "block_id": block_id, "crystal": i,
                **dict(zip(CELL_COLUMNS, cell.parameters, strict=True)),
                **a_matrix_columns(c.crystal.a_matrix),
                "wavelength_a": float((wavelengths_a or {}).get(r.frame_index, math.nan)),
                "n_indexed": int(c.n_indexed), "rmsd_px": float(c.rmsd_px),
                "profile_radius_inv_a": float(c.profile_radius_inv_a),
                "resolution_limit_a": float(c.resolution_limit_a),
                "n_predicted": int(c.n_predicted), "n_integrated": int(c.n_integrated),
                "status": c.status, "reason": c.reason,
            }
            for name in CRYSTAL_SCHEMA.names:
                rows[name].append(values[name])
    return pa.Table.from_pydict(rows, schema=CRYSTAL_SCHEMA)


def reflections_table(results: Iterable[ImageResult]) -> pa.Table:
    """Arrow table with :data:`REFLECTION_SCHEMA`: every integrated reflection of every crystal."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in REFLECTION_SCHEMA.names}
    for r in results:
        for i, c in enumerate(r.crystals):
            refl = c.reflections
            if refl is None or len(refl) == 0:
                continue
            n = len(refl)
            parts["source_url"].append(np.array([r.source_url] * n, dtype=object))
            parts["frame_index"].append(np.full(n, r.frame_index, dtype=np.int64))
            parts["crystal"].append(np.full(n, i, dtype=np.int32))
            for k in REFLECTION_COLUMNS:
                parts[k].append(refl[k])
    return _concatenated(parts, REFLECTION_SCHEMA)


def _concatenated(parts: Mapping[str, list[np.ndarray]], schema: pa.Schema) -> pa.Table:
    """The table of ``schema`` whose columns are the concatenated ``parts`` (empty where none)."""
    arrays = [pa.array(np.concatenate(parts[f.name]), type=f.type) if parts[f.name]
              else pa.array([], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def frames_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Arrow table with :data:`FRAME_SCHEMA` from rows made by :func:`frame_row`."""
    cols = {name: [r[name] for r in rows] for name in FRAME_COLUMNS}
    return pa.Table.from_pydict(cols, schema=FRAME_SCHEMA)


def spots_table(results: Iterable[ImageResult]) -> pa.Table:
    """Arrow table with :data:`SPOT_SCHEMA`: every spot of every result, h k l where indexed."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPOT_SCHEMA.names}
    for r in results:
        if r.spots is None or len(r.spots) == 0:
            continue
        n = len(r.spots)
        parts["source_url"].append(np.array([r.source_url] * n, dtype=object))
        parts["frame_index"].append(np.full(n, r.frame_index, dtype=np.int64))
        for k in SPOT_COLUMNS:
            parts[k].append(getattr(r.spots, k))
        hkl = np.zeros((n, 3), dtype=np.int32)
        if r.miller_indices is not None and len(r.miller_indices) == n:
            hkl = np.asarray(r.miller_indices, dtype=np.int32).reshape(n, 3)
        parts["indexed"].append(np.any(hkl != 0, axis=1))
        for j, name in enumerate("hkl"):
            parts[name].append(hkl[:, j])
    return _concatenated(parts, SPOT_SCHEMA)


def parquet_bytes(table: pa.Table, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``table`` (with extra key/value ``metadata``) to Parquet bytes in memory."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet_bytes(data: bytes, columns: Collection[str] | None = None) -> pa.Table:
    """Parquet bytes -> Arrow table: every column, or those of ``columns`` the file has (the
    others are neither read nor decoded)."""
    if columns is None:
        return pq.read_table(io.BytesIO(data))
    file = pq.ParquetFile(io.BytesIO(data))
    return file.read(columns=[c for c in file.schema_arrow.names if c in columns])


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The ``sfxflow.*`` key/value metadata of a shard table."""
    meta = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"sfxflow.")}


def shard_names(block_id: str) -> dict[str, str]:
    """Relative paths of a block's shards, keyed ``frames``, ``spots``, ``stream``.

    >>> shard_names("run_0001.cxi-0-20")["frames"]
    'shards/run_0001.cxi-0-20.frames.parquet'
    """
    return {
        "frames": f"shards/{block_id}.frames.parquet",
        "spots": f"shards/{block_id}.spots.parquet",
        "crystals": f"shards/{block_id}.crystals.parquet",
        "reflections": f"shards/{block_id}.reflections.parquet",
        "stream": f"shards/{block_id}.stream",
    }


@dataclass(frozen=True)
class ShardBytes:
    """A block's serialised shards, ready to be written: relative path -> bytes."""

    block_id: str
    files: dict[str, bytes]
    n_frames: int

    def checksums(self) -> dict[str, str]:
        return {path: sha256(data) for path, data in self.files.items()}

    @property
    def n_bytes(self) -> int:
        return sum(len(v) for v in self.files.values())


class RunDir:
    """A run directory on local disk or any fsspec store, with atomic writes.

    Parameters
    ----------
    url : local path or URL (``s3://bucket/prefix``).
    storage_options : fsspec options (endpoint, credentials); never logged.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if "://" in str(url) and not str(url).split("://", 1)[1].strip("/"):
            # "s3://" would otherwise become the local folder "s3:"
            raise InputError(f"run directory {storage.shown_url(str(url))!r}: no bucket or path "
                             "after '://'; expected e.g. s3://bucket/prefix or a local folder")
        self.url = str(url).rstrip("/") or str(url)
        self.storage_options = dict(storage_options or {})
        self.is_local = storage.is_local(self.url)
        try:
            # other processes (workers) write here: listings are never served from a cache
            self.fs = storage.filesystem(self.url, self.storage_options, cache_listings=False)
        except InputError as exc:
            raise InputError(f"{storage.shown_url(self.url)}: cannot use this run directory: {exc}"
                             ) from None
        if self.is_local:
            self.root = str(storage.local_path(self.url).absolute())
        else:
            self.root = self.url.split("://", 1)[1]

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    def __repr__(self) -> str:  # no storage options: they may hold secrets
        return f"RunDir({self.url!r})"

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if not self.is_local else os.path.join(self.root, rel)

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def makedirs(self) -> None:
        if self.is_local:
            try:
                os.makedirs(os.path.join(self.root, "shards"), exist_ok=True)
            except OSError as exc:  # e.g. --out names an existing file
                raise InputError(f"{self.url}: cannot create the run directory "
                                 f"({exc.strerror or exc}); expected a folder path") from None

    def exists(self, rel: str) -> bool:
        def lookup() -> bool:
            try:
                storage.call_fs(self.fs, "info", self.path(rel))
            except FileNotFoundError:
                return False
            return True

        return bool(self._storage_call(rel, "lookup", lookup))

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self._storage_call(
            rel, "read", lambda: storage.call_fs(self.fs, "cat_file", self.path(rel))))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically (temp + rename locally, one put on object stores).

        Raises
        ------
        RunDirError
            The store refused the write (a full disk, an endpoint dead beyond the retries).
        """
        if self.is_local:
            self._storage_call(rel, "write", lambda: self._write_local(rel, data))
        else:
            self._storage_call(rel, "write",
                               lambda: storage.call_fs(self.fs, "pipe_file", self.path(rel), data))

    def _storage_call(self, rel: str, action: str, call: Callable[[], T]) -> T:
        """``call()``, with transient errors retried and storage failures as one clear
        :class:`RunDirError` (a missing file stays :class:`FileNotFoundError`)."""
        try:
            return call() if self.is_local else storage.retrying(call, self.url_of(rel), action)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if isinstance(exc, SfxflowError) and not isinstance(exc, StorageUnavailable):
                raise
            if not (isinstance(exc, OSError) or storage.is_transient(exc)):
                raise
            text = (getattr(exc, "strerror", None) or str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
            raise RunDirError(storage.shown_url(self.url), f"{action} of {rel} failed "
                              f"({type(exc).__name__}: {storage.redact_urls(str(text))})",
                              "write to" if action == "write" else "read") from None

    def _write_local(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_shards(self, shards: ShardBytes) -> dict[str, str]:
        """Write every file of a block atomically; the frames table last (it marks completion).

        Returns the checksums by relative path.
        """
        order = sorted(shards.files, key=lambda p: p.endswith(".frames.parquet"))
        for rel in order:
            self.write_bytes(rel, shards.files[rel])
        return shards.checksums()

    def remove(self, rel: str) -> None:
        try:
            storage.call_fs(self.fs, "rm", self.path(rel))
        except FileNotFoundError:
            pass

    def list(self, rel: str = "shards") -> list[str]:
        """Names (not paths) of the files directly under ``rel``; empty if it does not exist."""
        try:
            entries = self._storage_call(
                rel, "list", lambda: storage.call_fs(self.fs, "ls", self.path(rel), detail=False))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def remove_temporaries(self) -> int:
        """Delete ``.tmp-*`` files left by interrupted local writes; returns how many."""
        if not self.is_local:
            return 0
        n = 0
        for folder in (self.root, os.path.join(self.root, "shards")):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    try:
                        os.unlink(os.path.join(folder, name))
                        n += 1
                    except FileNotFoundError:
                        pass
        if n:
            logger.info("removed %d temporary file(s) left by an interrupted write in %s", n, self.url)
        return n

    def verify_shards(self, block_id: str, n_frames: int,
                      checksums: Mapping[str, str] | None = None) -> str:
        """Check a block's shards: empty string when they verify, else what is wrong.

        With ``checksums`` (from the manifest) every file must match its SHA-256; without, the
        frames table must parse, name this block and hold ``n_frames`` rows, and the other files
        must exist.
        """
        names = shard_names(block_id)
        try:
            if checksums:
                for rel in names.values():
                    want = checksums.get(rel)
                    if want is None:
                        return f"{rel}: no checksum in the manifest"
                    if sha256(self.read_bytes(rel)) != want:
                        return f"{rel}: checksum differs from the manifest"
                return ""
            table = read_parquet_bytes(self.read_bytes(names["frames"]))
            meta = table_metadata(table)
            if meta.get("sfxflow.block_failed") == "1":
                return f"{names['frames']}: records a block that failed as a whole"
            if meta.get("sfxflow.block_id") != block_id:
                return f"{names['frames']}: written for block {meta.get('sfxflow.block_id')!r}"
            if table.num_rows != n_frames or int(meta.get("sfxflow.n_frames", -1)) != n_frames:
                return f"{names['frames']}: {table.num_rows} rows, expected {n_frames}"
            for rel in (names["spots"], names["crystals"], names["reflections"], names["stream"]):
                if not self.exists(rel):
                    return f"{rel}: missing"
            return ""
        except FileNotFoundError as exc:
            return f"missing shard: {exc}"
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"unreadable shard: {exc}"

    def _read_shard(self, rel: str) -> bytes:
        """A shard of a block recorded as done: missing is an error (never skipped)."""
        try:
            return self.read_bytes(rel)
        except FileNotFoundError:
            raise RunDirError(storage.shown_url(self.url), f"{rel} is missing although its block is recorded as "
                              "done (deleted since?)", "read") from None

    def read_frames_shards(self, block_ids: Iterable[str]) -> pa.Table:
        """Concatenate the frames shards of ``block_ids`` (schema :data:`FRAME_SCHEMA`)."""
        return self._read_tables(block_ids, "frames", FRAME_SCHEMA)

    def _read_tables(self, block_ids: Iterable[str], kind: str, schema: pa.Schema) -> pa.Table:
        tables = []
        for b in block_ids:
            # every block writes all its shards (verify_shards checks them): missing is an error
            rel = shard_names(b)[kind]
            t = read_parquet_bytes(self._read_shard(rel)).replace_schema_metadata(None)
            tables.append(t.select(schema.names))
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables).cast(schema)

    def read_crystals_shards(self, block_ids: Iterable[str]) -> pa.Table:
        """Concatenate the crystals shards of ``block_ids`` (:data:`CRYSTAL_SCHEMA`)."""
        return self._read_tables(block_ids, "crystals", CRYSTAL_SCHEMA)

    def mtime(self, rel: str) -> float | None:
        """Modification time (POSIX seconds) of ``rel`` where the store reports one."""
        try:
            info = storage.call_fs(self.fs, "info", self.path(rel))
        except FileNotFoundError:
            return None
        for key in ("mtime", "LastModified", "last_modified", "created"):
            v = info.get(key)
            if v is None:
                continue
            return float(v.timestamp()) if hasattr(v, "timestamp") else float(v)
        return None


def sort_frames(table: pa.Table) -> pa.Table:
    """Frames ordered by (source_url, frame_index): the canonical order of ``frames.parquet``."""
    return table.sort_by([("source_url", "ascending"), ("frame_index", "ascending")])
