"""One block of frames, start to finish: read, process every frame, write the block's shards.

:func:`run_block` is what a Dask task (or the serial loop) executes. It never loses a frame:

* the block is read in one go (:func:`sfxflow.io.sources.read_block`); if that fails, the frames
  are read one by one so that a corrupt frame fails only itself (stage ``read``);
* every frame goes through the context's frame function (:func:`sfxflow.pipeline.frame.process_frame`),
  which returns a record for bad data instead of raising;
* a file that could not even be opened (planned as a block with ``start = -1``) yields one
  ``failed`` record with ``frame_index = -1`` (its frame count is unknown);
* the shards are written atomically under the block's deterministic name, the frames table last.

A bug (an exception escaping the frame function or a failed write) propagates: Dask retries the
task and the run records the block as ``failed`` with that reason once the retries are spent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sfxflow.errors import failure_reason, raise_interrupt_behind
from sfxflow.io import storage
from sfxflow.io.results import (
    RunDir,
    ShardBytes,
    crystals_table,
    frame_row,
    frames_table,
    parquet_bytes,
    reflections_table,
    shard_names,
    spots_table,
)
from sfxflow.models import Frame, FrameStatus, ImageResult

__all__ = [
    "BlockContext",
    "BlockReport",
    "Fetched",
    "failed_block_shards",
    "fetch_block",
    "run_block",
]

logger = logging.getLogger(__name__)

FrameFn = Callable[[Frame, Any], ImageResult]


@dataclass(frozen=True)
class BlockRef:
    """The minimum the pipeline needs to know about a block (mirrors ``io.sources.Block``)."""

    block_id: str
    url: str
    start: int
    stop: int

    @property
    def expected_rows(self) -> int:
        return 1 if self.start < 0 else self.stop - self.start


@dataclass(frozen=True)
class BlockContext:
    """Everything a worker needs to run any block of a run (sent once per worker).

    Parameters
    ----------
    config : the resolved :class:`~sfxflow.pipeline.config.ProcessConfig`.
    run : the run directory the shards go to.
    geometry : CrystFEL geometry for HDF5/CXI inputs (``None`` for self-describing files).
    storage_options : fsspec options for reading inputs (may hold credentials: never logged).
    frame_fn : per-frame function ``(frame, config) -> ImageResult``.
    read_fn : ``(block, ctx) -> list[Frame]``; default :func:`read_frames_of`.
    stream_chunk_fn : ``(result, frame) -> str`` CrystFEL chunk text, or ``None`` for an empty
        stream shard.
    """

    config: Any
    run: RunDir
    geometry: Any = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    frame_fn: FrameFn | None = None
    read_fn: Callable[[BlockRef, BlockContext], list[Frame]] | None = None
    stream_chunk_fn: Callable[[ImageResult, Frame], str] | None = None

    def __repr__(self) -> str:  # storage options may hold secrets
        return f"BlockContext(run={self.run.url!r})"


@dataclass
class Fetched:
    """A block's frames (or the exception reading it raised) and the time spent fetching."""

    frames: list[Frame] | None
    error: BaseException | None
    fetch_s: float
    wait_s: float = 0.0
    prefetched: bool = False


@dataclass
class BlockReport:
    """What a block's task returns to the client (small: no per-frame data)."""

    block_id: str
    n_frames: int
    counts: dict[str, int]
    checksums: dict[str, str]
    stage_seconds: dict[str, float]
    fetch_s: float = 0.0
    fetch_wait_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    busy_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    prefetched: bool = False
    worker: str = "serial"
    failed_reasons: dict[str, int] = field(default_factory=dict)
    n_pixels: int = 0  # detector pixels of the block's frames (0 when none could be read)
    received_at: float = 0.0  # set by the client (its clock), seconds since the run started
    #: why some frames could not be read for storage reasons (an outage that outlasted the
    #: retries): the block is then not done, and a rerun reads it again; "" when all were read
    unread_reason: str = ""

    @property
    def hits(self) -> int:
        return self.counts.get("hit", 0) + self.counts.get("indexed", 0)


_bytes_lock = threading.Lock()
_bytes_reported = 0


def _bytes_read_since_last_report() -> int:
    """Process-wide bytes fetched from storage since the previous call (exact in total)."""
    global _bytes_reported
    with _bytes_lock:
        now = storage.read_stats().bytes_read
        delta = now - _bytes_reported
        _bytes_reported = now
    return max(delta, 0)


def read_frames_of(block: BlockRef, ctx: BlockContext) -> list[Frame]:
    """Default reader: :func:`sfxflow.io.sources.read_block` on the block's frame range."""
    from sfxflow.io.sources import Block, read_block

    return read_block(Block(block.url, block.start, block.stop), geometry=ctx.geometry,
                      storage_options=dict(ctx.storage_options))


def apply_storage_retry(config: Any) -> None:
    """Use the run's retry period for transient storage errors in this process."""
    total_s = float(getattr(getattr(config, "run", None), "storage_retry_s", 60.0))
    if storage.retry_policy().total_s != total_s:
        storage.set_retry_policy(storage.RetryPolicy(total_s=total_s))


def fetch_block(block: BlockRef, ctx: BlockContext) -> Fetched:
    """Read a block's frames, capturing (not raising) a read failure; timed."""
    apply_storage_retry(ctx.config)
    t0 = time.perf_counter()
    if block.start < 0:
        return Fetched(None, None, 0.0)
    reader = ctx.read_fn or read_frames_of
    try:
        frames = reader(block, ctx)
        return Fetched(frames, None, time.perf_counter() - t0)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # recorded per frame by run_block, after a frame-by-frame retry
        raise_interrupt_behind(exc)  # a signal during a numba decode: not a read failure
        return Fetched(None, exc, time.perf_counter() - t0)


def _failed(url: str, index: int, stage: str, reason: str, event_id: str = "") -> ImageResult:
    return ImageResult(source_url=url, frame_index=index, status=FrameStatus.FAILED,
                       event_id=event_id, stage=stage, reason=reason)


def _unread(block: BlockRef, first: int, exc: BaseException) -> list[ImageResult]:
    """Failure records (stage ``read``) of frames ``first ..`` of a block that could not be
    read, ``exc`` saying why (storage that could not deliver them, retries spent; a file that
    cannot be opened)."""
    reason = failure_reason(exc)
    return [_failed(block.url, i, "read", reason) for i in range(first, block.stop)]


def _salvage(block: BlockRef, ctx: BlockContext,
             error: BaseException) -> tuple[list[Frame | ImageResult], str]:
    """The block could not be read in one go: read frame by frame, failing only bad frames.

    Returns the frames or failure records, and why frames were left unread for storage reasons
    (``''`` when none were): an unreachable store is not bad data, so frames after it are not
    tried one by one (each would wait out the retries again).
    """
    if storage.is_transient(error):
        return list(_unread(block, block.start, error)), failure_reason(error)
    out: list[Frame | ImageResult] = []
    if ctx.read_fn is not None:  # an injected reader has no per-frame access
        return list(_unread(block, block.start, error)), ""
    from sfxflow.io.sources import open_source

    try:
        source = open_source(block.url, geometry=ctx.geometry,
                             storage_options=dict(ctx.storage_options))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:
        raise_interrupt_behind(exc)
        if storage.is_transient(exc):
            return list(_unread(block, block.start, exc)), failure_reason(exc)
        return list(_unread(block, block.start, exc)), ""
    with source:
        for i in range(block.start, block.stop):
            try:
                out.append(source.read_frame(i))
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:
                raise_interrupt_behind(exc)
                if storage.is_transient(exc):
                    out.extend(_unread(block, i, exc))
                    return out, failure_reason(exc)
                out.append(_failed(block.url, i, "read", failure_reason(exc)))
    return out, ""


def _checked(items: list[Frame | ImageResult]) -> list[Frame | ImageResult]:
    """Frames that cannot be diffraction images become ``failed`` records (stage ``read``)."""
    from sfxflow.io.checks import frame_problem

    out: list[Frame | ImageResult] = []
    for item in items:
        problem = frame_problem(item) if isinstance(item, Frame) else ""
        if problem and isinstance(item, Frame):
            out.append(_failed(item.source_url, item.index, "read", problem, item.event_id))
        else:
            out.append(item)
    return out


def shards_for_results(block: BlockRef, results: list[ImageResult],
                       stream_chunk_fn: Callable[[ImageResult, Frame], str] | None = None,
                       frames_by_index: Mapping[int, Frame] | None = None,
                       block_failed: bool = False) -> ShardBytes:
    """Serialise a block's results into its shard files (stream chunks for the frames in
    ``frames_by_index``)."""
    names = shard_names(block.block_id)
    # a password inside an input URL is needed to read it, never to describe it
    results = sorted((_redacted(r) for r in results), key=lambda r: r.frame_index)
    meta = {"sfxflow.block_id": block.block_id, "sfxflow.n_frames": str(len(results)),
            "sfxflow.url": storage.shown_url(block.url), "sfxflow.start": str(block.start),
            "sfxflow.stop": str(block.stop)}
    if block_failed:
        meta["sfxflow.block_failed"] = "1"
    frames = frames_table([frame_row(r, block.block_id) for r in results])
    spots = spots_table(results)
    wavelengths = {i: f.beam.wavelength_a for i, f in (frames_by_index or {}).items()}
    crystals = crystals_table(results, block.block_id, wavelengths)
    reflections = reflections_table(results)
    stream = ""
    if stream_chunk_fn is not None and frames_by_index:
        stream = "".join(stream_chunk_fn(r, frames_by_index[r.frame_index]) for r in results
                         if r.frame_index in frames_by_index)
    files = {
        names["frames"]: parquet_bytes(frames, meta),
        names["spots"]: parquet_bytes(spots, meta),
        names["crystals"]: parquet_bytes(crystals, meta),
        names["reflections"]: parquet_bytes(reflections, meta),
        names["stream"]: stream.encode("utf-8"),
    }
    return ShardBytes(block.block_id, files, len(results))


def _redacted(result: ImageResult) -> ImageResult:
    url, reason = storage.redact_urls(result.source_url), storage.redact_urls(result.reason)
    if url == result.source_url and reason == result.reason:
        return result
    return dataclasses.replace(result, source_url=url, reason=reason)


def failed_block_shards(block: BlockRef, reason: str, stage: str = "block") -> ShardBytes:
    """Shards recording every frame of a block that failed as a whole (retries spent)."""
    if block.start < 0:
        results = [_failed(block.url, -1, "open", reason)]
    else:
        results = [_failed(block.url, i, stage, reason) for i in range(block.start, block.stop)]
    return shards_for_results(block, results, block_failed=True)


def run_block(block: BlockRef, ctx: BlockContext, fetched: Fetched | None = None,
              worker: str = "serial", file_error: str = "") -> BlockReport:
    """Process one block end to end and write its shards; returns a small report.

    Parameters
    ----------
    block : the block (``start = -1`` for a file that could not be opened).
    ctx : the run's context.
    fetched : frames already read (by a prefetcher); ``None`` reads them now.
    worker : name of the executing worker, for the summary.
    file_error : why the file could not be opened (blocks with ``start = -1``).
    """
    t_begin = time.perf_counter()
    if fetched is None:
        fetched = fetch_block(block, ctx)
        fetched.wait_s = fetched.fetch_s
    frame_fn = ctx.frame_fn
    if frame_fn is None:
        from sfxflow.pipeline.frame import process_frame

        frame_fn = process_frame
    results: list[ImageResult] = []
    frames_by_index: dict[int, Frame] = {}
    n_pixels = 0
    unread = ""
    t_compute0 = time.perf_counter()
    if block.start < 0:
        results = [_failed(block.url, -1, "open", file_error or "file could not be opened")]
    else:
        results, frames_by_index, n_pixels, unread = _process_frames(block, ctx, fetched,
                                                                     frame_fn)
    compute_s = time.perf_counter() - t_compute0
    shards = shards_for_results(block, results, ctx.stream_chunk_fn, frames_by_index,
                                block_failed=bool(unread))
    t_write0 = time.perf_counter()
    checksums = ctx.run.write_shards(shards)
    write_s = time.perf_counter() - t_write0
    counts = Counter(FrameStatus(r.status).value for r in results)
    stage_seconds: Counter[str] = Counter()
    for r in results:
        stage_seconds.update(r.timings_s)
    reasons = Counter(r.reason for r in results if r.status == FrameStatus.FAILED)
    return BlockReport(
        block_id=block.block_id,
        n_frames=len(results),
        counts=dict(counts),
        checksums=checksums,
        stage_seconds=dict(stage_seconds),
        fetch_s=fetched.fetch_s,
        fetch_wait_s=fetched.wait_s,
        compute_s=compute_s,
        write_s=write_s,
        busy_s=time.perf_counter() - t_begin + (fetched.wait_s if fetched.prefetched else 0.0),
        bytes_read=_bytes_read_since_last_report(),
        bytes_written=shards.n_bytes,
        prefetched=fetched.prefetched,
        worker=worker,
        failed_reasons=dict(reasons),
        n_pixels=n_pixels,
        unread_reason=unread,
    )


def _process_frames(block: BlockRef, ctx: BlockContext, fetched: Fetched,
                    frame_fn: FrameFn
                    ) -> tuple[list[ImageResult], dict[int, Frame], int, str]:
    """One result per frame of the block: the frames read (or salvaged one by one when reading
    the block failed) through ``frame_fn``, a failure for each frame the reader did not give.
    Returns the results, the frames by index, the detector's pixel count and why frames stayed
    unread (empty when none did)."""
    results: list[ImageResult] = []
    frames_by_index: dict[int, Frame] = {}
    unread = ""
    items: list[Frame | ImageResult]
    if fetched.error is not None:
        logger.warning("block %s: reading failed (%s)%s", block.block_id,
                       failure_reason(fetched.error),
                       "" if storage.is_transient(fetched.error) else "; reading frame by frame")
        items, unread = _salvage(block, ctx, fetched.error)
    else:
        items = list(fetched.frames or [])
    items = _checked(items)
    n_good = sum(isinstance(x, Frame) for x in items)
    n_pixels = next((x.detector.n_pixels for x in items if isinstance(x, Frame)), 0)
    read_per_frame = fetched.fetch_s / n_good if n_good else 0.0
    for item in items:
        if isinstance(item, ImageResult):
            results.append(item)
            continue
        r = frame_fn(item, ctx.config)
        r.timings_s["read"] = read_per_frame
        results.append(r)
        frames_by_index[item.index] = item
    seen = {r.frame_index for r in results}
    missing = [i for i in range(block.start, block.stop) if i not in seen]
    for i in missing:  # a reader that returned fewer frames than asked
        results.append(_failed(block.url, i, "read", "frame not returned by the reader"))
    results = [r for r in results if block.start <= r.frame_index < block.stop]
    return results, frames_by_index, n_pixels, unread
