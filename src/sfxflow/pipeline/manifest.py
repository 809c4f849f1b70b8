"""The run manifest: every planned block, its state, its shards' checksums.

``manifest.json`` in the run directory is rewritten atomically (at most every few seconds while
blocks complete, and at the end). It is a record, not the source of truth for resuming: a block
counts as done when its shards exist and verify (:meth:`sfxflow.io.results.RunDir.verify_shards`,
against the manifest checksums when present, else by the shard's own metadata and row count), so
a run killed between writing a shard and the manifest still resumes without recomputing it.

Block states: ``pending`` (not yet done), ``done`` (shards written and verified), ``failed`` (the
block itself failed ``attempts`` times - its frames are recorded as ``failed`` records and it is
tried again on the next resume).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sfxflow.errors import InputError

__all__ = ["BLOCK_STATES", "BlockEntry", "Manifest"]

BLOCK_STATES = ("pending", "done", "failed")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class BlockEntry:
    """One planned block: where its frames are, what happened to it.

    ``start``/``stop`` are frame indices in ``url`` (``stop`` exclusive); a file that could not
    be opened has ``start = -1, stop = 0`` and yields one ``failed`` record with frame_index -1.
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

    @property
    def expected_rows(self) -> int:
        """Rows in the block's frames shard."""
        return 1 if self.start < 0 else self.stop - self.start


@dataclass
class Manifest:
    """Blocks of a run, keyed by block id, in plan order."""

    inputs: list[str]
    blocks: dict[str, BlockEntry]
    created_at: float = field(default_factory=time.time)
    version: int = MANIFEST_VERSION
    #: SHA-256 of the CrystFEL geometry text the blocks were processed with ("" without one)
    geometry_sha256: str = ""

    @classmethod
    def from_plan(cls, inputs: Iterable[str], entries: Iterable[BlockEntry]) -> Manifest:
        blocks: dict[str, BlockEntry] = {}
        for e in entries:
            if e.block_id in blocks:
                raise ValueError(f"duplicate block id {e.block_id!r} in the plan")
            blocks[e.block_id] = e
        return cls(inputs=list(inputs), blocks=blocks)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(BLOCK_STATES, 0)
        for b in self.blocks.values():
            out[b.state] = out.get(b.state, 0) + 1
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "created_at": self.created_at,
                "inputs": self.inputs,
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
            m = cls.from_plan(data["inputs"], blocks)
            m.created_at = float(data.get("created_at", m.created_at))
            m.version = int(data.get("version", MANIFEST_VERSION))
            m.geometry_sha256 = str(data.get("geometry_sha256", ""))
            return m
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where}: not a valid sfxflow manifest ({exc})") from None
