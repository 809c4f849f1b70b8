"""The run manifest: the inputs, every planned block, its state, its shards' checksums.

``manifest.json`` in the run directory is rewritten atomically (at most every few seconds while
blocks complete, and at the end). For resuming it is a record, not the source of truth: a block
counts as done when its shards exist and verify (:meth:`sfxflow.io.results.RunDir.verify_shards`,
against the manifest checksums when present, else by the shard's own metadata and row count), so
a run killed between writing a shard and the manifest still resumes without recomputing it.

It is the source of truth for *what* the run is about: the input files with their size and
modification time (or ETag). A rerun whose inputs differ is refused unless forced
(:meth:`Manifest.input_changes`), so a run directory never mixes two data sets.

Block states:

* ``pending`` - not yet done;
* ``done`` - shards written and verified;
* ``failed`` - the block itself failed (retries spent, or it crashed the process): its frames
  are recorded as ``failed``; it is tried again on the next resume;
* ``unread`` - storage could not deliver some of its frames (an outage longer than the retry
  period): they are recorded as ``failed`` (stage ``read``) for now, and a rerun reads the
  block again.

Every URL written here has any ``user:password@`` replaced by ``***@``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sfxflow.errors import InputError
from sfxflow.io.storage import shown_url as _shown

if TYPE_CHECKING:
    from sfxflow.pipeline.blocks import BlockReport

__all__ = ["BLOCK_STATES", "BlockEntry", "InputFile", "Manifest"]

BLOCK_STATES = ("pending", "done", "failed", "unread")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2


@dataclass
class BlockEntry:
    """One planned block: where its frames are, what happened to it.

    ``start``/``stop`` are frame indices in ``url`` (``stop`` exclusive); a file that could not
    be opened has ``start = -1, stop = 0`` and yields one ``failed`` record with frame_index -1.
    ``crashes`` counts the times the block killed the process running it (a native decoder's
    segmentation fault): such a block only ever runs again in a child process.
    """

    block_id: str
    url: str
    start: int
    stop: int
    state: str = "pending"
    n_frames: int = 0
    checksums: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    reason: str = ""
    worker: str = ""
    finished_at: float = 0.0
    crashes: int = 0

    def __post_init__(self) -> None:
        self.url = _shown(self.url)

    @property
    def expected_rows(self) -> int:
        """Rows in the block's frames shard."""
        return 1 if self.start < 0 else self.stop - self.start


@dataclass(frozen=True)
class InputFile:
    """One input file as the run saw it: what tells that its content changed since."""

    url: str
    size: int
    version: str  # "mtime_ns:..." for local files, "etag:..." for objects ("" when unknown)


@dataclass
class Manifest:
    """Blocks of a run, keyed by block id, in plan order; the input files they come from."""

    inputs: list[str]
    blocks: dict[str, BlockEntry]
    created_at: float = field(default_factory=time.time)
    version: int = MANIFEST_VERSION
    #: SHA-256 of the CrystFEL geometry text the blocks were processed with ("" without one)
    geometry_sha256: str = ""
    files: list[InputFile] = field(default_factory=list)

    @classmethod
    def from_plan(cls, inputs: Iterable[str], entries: Iterable[BlockEntry],
                  files: Iterable[InputFile] = ()) -> Manifest:
        blocks: dict[str, BlockEntry] = {}
        for e in entries:
            if e.block_id in blocks:
                raise ValueError(f"duplicate block id {e.block_id!r} in the plan")
            blocks[e.block_id] = e
        return cls(inputs=[_shown(u) for u in inputs], blocks=blocks,
                   files=[InputFile(_shown(f.url), f.size, f.version) for f in files])

    # ---------------------------------------------------------------------------- updates
    def keep_done(self, block_id: str, n_frames: int, old: BlockEntry | None) -> None:
        """The block's shards verified: it stays done (with what the old manifest knew)."""
        entry = self.blocks[block_id]
        entry.state = "done"
        entry.n_frames = n_frames
        if old is not None:
            entry.checksums, entry.worker = dict(old.checksums), old.worker
            entry.finished_at, entry.attempts = old.finished_at, old.attempts
            entry.crashes = old.crashes

    def carry_history(self, block_id: str, old: BlockEntry | None) -> None:
        """A block to run again keeps its attempt and crash counts."""
        if old is not None:
            entry = self.blocks[block_id]
            entry.attempts, entry.crashes = old.attempts, old.crashes

    def record_report(self, report: BlockReport) -> BlockEntry:
        """A block's task finished: ``done``, or ``unread`` when storage left frames unread."""
        entry = self.blocks[report.block_id]
        entry.state = "unread" if report.unread_reason else "done"
        entry.n_frames = report.n_frames
        entry.checksums = dict(report.checksums)
        entry.worker = report.worker
        entry.attempts += 1
        entry.reason = report.unread_reason
        entry.finished_at = time.time()
        return entry

    def record_failure(self, block_id: str, reason: str, *, crashed: bool = False) -> BlockEntry:
        """A block failed for good in this run (its frames hold ``failed`` records)."""
        entry = self.blocks[block_id]
        entry.state = "failed"
        entry.reason = reason
        entry.attempts += 1
        entry.crashes += int(crashed)
        entry.n_frames = entry.expected_rows
        entry.checksums = {}
        entry.finished_at = time.time()
        return entry

    def record_crash(self, block_id: str) -> None:
        """The block was in flight when the process running it died."""
        self.blocks[block_id].crashes += 1

    # ---------------------------------------------------------------------------- queries
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(BLOCK_STATES, 0)
        for b in self.blocks.values():
            out[b.state] = out.get(b.state, 0) + 1
        return out

    def input_changes(self, files: Iterable[InputFile]) -> tuple[list[str], list[str]]:
        """How ``files`` differ from the input files recorded here: ``(changes, added)``.

        ``changes`` are files gone from the inputs or whose size or version differ (results
        made from them would be wrong or lost); ``added`` are new files (a data set that grew
        while being processed: their blocks are simply processed too). Only files both listings
        could read are compared by size and version; an input that could not be listed then (a
        prefix or glob on storage that was down) is not "gone" when it names files now; a
        manifest that predates input recording (version 1) compares nothing.
        """
        if self.version < 2:
            return [], []
        old = {f.url: f for f in self.files}
        new = {_shown(f.url): f for f in files}
        added = [u for u in new if u not in old]
        changes = [f"{u} no longer among the inputs" for u, f in old.items()
                   if u not in new and not (not f.version and _expands_to(u, new))]
        for url, f in new.items():
            was = old.get(url)
            if was is None or not (f.version and was.version):
                continue
            if (was.size, was.version) != (f.size, f.version):
                changes.append(f"{url} changed (size {was.size} -> {f.size}, "
                               f"{was.version} -> {f.version})")
        return changes, added

    # ---------------------------------------------------------------------------- JSON
    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "created_at": self.created_at,
                "inputs": self.inputs,
                "files": [asdict(f) for f in self.files],
                "geometry_sha256": self.geometry_sha256,
                "counts": self.counts(),
                "blocks": [asdict(b) for b in self.blocks.values()],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            data: dict[str, Any] = json.loads(text)
            blocks = [BlockEntry(**b) for b in data["blocks"]]
            files = [InputFile(**f) for f in data.get("files", [])]
            m = cls.from_plan(data["inputs"], blocks, files)
            m.created_at = float(data.get("created_at", m.created_at))
            m.version = int(data.get("version", 1))
            m.geometry_sha256 = str(data.get("geometry_sha256", ""))
            return m
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where}: not a valid sfxflow manifest ({exc})") from None


def _expands_to(pattern: str, urls: Iterable[str]) -> bool:
    """Whether an input that could not be listed then (a folder, prefix or glob) names one of
    ``urls`` now: it was not a file that went away.

    >>> _expands_to("s3://b/in/", ["s3://b/in/run_1.cxi"]), _expands_to("d/*.cxi", ["d/a.cxi"])
    (True, True)
    >>> _expands_to("s3://b/in/run_1.cxi", ["s3://b/in/run_2.cxi"])
    False
    """
    import fnmatch

    prefix = pattern.rstrip("/") + "/"
    return any(u.startswith(prefix) or fnmatch.fnmatchcase(u, pattern) for u in urls)


def input_files(infos: Iterable[Any]) -> list[InputFile]:
    """:class:`InputFile` records for files from :func:`sfxflow.io.sources.discover` (a file
    that could not be listed has no version: only its presence is compared)."""
    return [InputFile(f.url, int(f.size_bytes), str(getattr(f, "version", ""))) for f in infos]
