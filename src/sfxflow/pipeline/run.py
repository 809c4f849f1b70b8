"""``run_process``: a whole run - discover, plan, resume, execute, merge, summarise.

The run directory (local or ``s3://``) ends up holding::

    config.toml            the resolved configuration, every key
    manifest.json          every block with its state and shard checksums
    header.stream          CrystFEL stream header (geometry + target cell), written once
    shards/<block>.*       one frames/spots/stream shard triple per block (atomic writes)
    frames.parquet         all frames, one row each, sorted by (source_url, frame_index)
    crystals.parquet       all indexed crystals, one row each (see docs/run-directory.md)
    summary.json           counts, rates, throughput (see sfxflow.pipeline.summary)

Running the same command again resumes: a block whose shards exist and verify is skipped; blocks
recorded as failed or unread are tried again. ``force=True`` recomputes everything. Changing a
setting that changes results (spots, hit, index, target, block size, geometry path or contents,
turning the stream on) or the input files (added, removed, or with another size, modification
time or ETag) on an existing run directory is refused unless ``force`` is given.

One run at a time: ``run.lock`` (:mod:`sfxflow.pipeline.runlock`) refuses a second live
``process`` on the same directory.

The work is three steps: :func:`plan_and_resume` (discover, cut into blocks, decide what is
left), :func:`execute_plan` (run the blocks serially or on Dask, updating the manifest) and
:func:`reduce_run` (frames.parquet and summary.json).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sfxflow.errors import ConfigError, InputError
from sfxflow.io.results import RunDir, parquet_bytes, shard_names, sort_frames
from sfxflow.pipeline import params as _params
from sfxflow.pipeline.blocks import BlockContext, BlockRef, BlockReport, apply_storage_retry
from sfxflow.pipeline.cluster import ClusterInfo, cluster_threads, open_cluster
from sfxflow.pipeline.config import ProcessConfig, changed_settings, config_from_toml, with_target
from sfxflow.pipeline.manifest import MANIFEST_NAME, BlockEntry, Manifest, input_files
from sfxflow.pipeline.progress import Progress
from sfxflow.pipeline.report import Reporter, ReporterFactory
from sfxflow.pipeline.runlock import LockInfo, RunLock
from sfxflow.pipeline.summary import build_summary, keep_measured_figures

if TYPE_CHECKING:  # imported where the blocks run: it imports distributed (0.7 s), which a
    # user error found before (preflight imports this module) need not wait for
    from sfxflow.pipeline.execute import BlockFailure

__all__ = ["Execution", "RunPlan", "RunResult", "execute_plan", "plan_and_resume",
           "reduce_run", "resolve_config", "run_process"]

logger = logging.getLogger(__name__)

#: Settings that change per-frame results: a run directory made with other values is not resumed.
RESULT_SECTIONS = ("detector", "spots", "hit", "index", "predict", "integrate", "target")
RESULT_IO_KEYS = ("frames_per_block", "geometry")


@dataclass
class RunResult:
    """What :func:`run_process` did."""

    run_url: str
    summary: dict[str, Any]
    blocks_total: int
    blocks_skipped: int
    blocks_done: int
    blocks_failed: int
    complete: bool
    cluster: ClusterInfo | None = None
    reports: list[BlockReport] = field(default_factory=list)
    #: blocks storage could not deliver (an outage longer than the retries): rerun to read them
    blocks_unread: int = 0
    unread_reasons: dict[str, int] = field(default_factory=dict)


def resolve_config(config: ProcessConfig) -> ProcessConfig:
    """Resolve ``target.cell_file`` into ``target.cell``/``space_group`` (space group given,
    or from the file; an :class:`~sfxflow.errors.InputError` when neither says one)."""
    if not config.target.cell_file or config.target.cell is not None:
        return config
    from sfxflow.io.cellfile import read_cell_file

    cf = read_cell_file(config.target.cell_file)
    return with_target(config, cf.cell.parameters,
                       cf.indexing_space_group(config.target.space_group,
                                               f"--cell-file {config.target.cell_file}"))


def _failed_file_ref(url: str) -> BlockRef:
    from sfxflow.io.sources import file_tag

    return BlockRef(f"{file_tag(url)}-unreadable", url, -1, 0)


def _refuse_same_file_twice(urls: Sequence[str]) -> None:
    """One local file named twice (``a/x.cxi`` and ``a/../a/x.cxi``, a symlink) would be
    processed twice under two names: refuse, as for a file listed twice."""
    from sfxflow.io.storage import is_local, local_path

    seen: dict[str, str] = {}
    for url in urls:
        key = os.path.realpath(local_path(url)) if is_local(url) else url
        if key in seen and seen[key] != url:
            raise InputError(f"input {url} is the same file as {seen[key]}; give each file once")
        seen.setdefault(key, url)


def _blocks_of(files: Sequence[Any], config: ProcessConfig
               ) -> tuple[list[BlockRef], dict[str, str], int, set[str]]:
    """Blocks, file errors, input bytes and the ids of files unread for storage reasons.

    Files that cannot be opened become one block with ``start = -1`` (one ``failed`` record,
    ``frame_index = -1``: their frame count is unknown); the file errors map such a block's id
    to the reason.
    """
    from sfxflow.io.sources import plan_blocks

    _refuse_same_file_twice([f.url for f in files if f.ok])
    good = [f for f in files if f.ok and f.n_frames > 0]
    for f in files:
        if f.ok and f.n_frames == 0:
            logger.warning("%s: no frames; nothing to process in it", f.url)
    blocks = [BlockRef(b.block_id, b.url, b.start, b.stop)
              for b in plan_blocks(good, config.io.frames_per_block)]
    file_errors: dict[str, str] = {}
    unreachable: set[str] = set()
    for f in files:
        if not f.ok:
            ref = _failed_file_ref(f.url)
            blocks.append(ref)
            file_errors[ref.block_id] = str(f.error)
            if getattr(f, "transient", False):
                unreachable.add(ref.block_id)
    ids = [b.block_id for b in blocks]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"input {dup[0]} is listed more than once; give each file once")
    return blocks, file_errors, sum(f.size_bytes for f in good), unreachable


def _check_compatible(run: RunDir, config: ProcessConfig) -> None:
    if not run.exists("config.toml"):
        return
    old = config_from_toml(run.read_text("config.toml"), where=run.url_of("config.toml"))
    written = config_from_toml(config.to_toml())  # as written: without passwords in URLs
    diffs = {k: v for k, v in _params.differences(old, written).items()
             if k.split(".")[0] in RESULT_SECTIONS
             or (k.startswith("io.") and k.split(".")[1] in RESULT_IO_KEYS)}
    if config.io.write_stream and not old.io.write_stream:
        # blocks done without a stream have empty stream shards: the stream would lack them
        diffs = {"io.write_stream": (False, True), **diffs}
    if diffs:
        key, (was, now) = next(iter(diffs.items()))
        raise ConfigError(
            f"{run.url}: this run directory was made with {key} = {was!r}, now {now!r} "
            f"({len(diffs)} result setting(s) differ); use --force to recompute or a new --out"
        )


def _stream_parts(config: ProcessConfig, geometry: Any, inputs: list[str],
                  storage_options: Mapping[str, Any]) -> tuple[str | None,
                                                               Callable[..., str] | None]:
    """Header text and chunk function for CrystFEL stream shards."""
    from sfxflow.pipeline.streams import stream_chunk, stream_header

    chunk = stream_chunk if geometry is None else functools.partial(stream_chunk, geometry=geometry)
    return stream_header(config, geometry, inputs, storage_options), chunk


def _detector_info(geometry: Any, reports: Sequence[BlockReport]) -> dict[str, Any]:
    name = "from image headers"
    if geometry is not None:
        name = str(getattr(geometry, "source", "geometry")).rsplit("/", 1)[-1]
    n_pixels = next((r.n_pixels for r in reports if r.n_pixels), 0)
    return {"name": name, "n_pixels": n_pixels}


#: decoded pixels (float32) of one block at most: a worker holds a whole block (and the next,
#: prefetched) in memory, and its peak is a few times the pixels (measured: 0.59 GB at 10
#: frames of 1 Mpx, 2.09 GB with a whole 1 Mpx file as one block)
MAX_BLOCK_BYTES = 1 << 30


def _check_block_memory(config: ProcessConfig, geometry: Any) -> None:
    """Refuse a block size whose pixels alone would not fit a worker's memory."""
    from sfxflow.errors import GeometryError

    n = config.io.frames_per_block
    try:
        n_px = geometry.detector().n_pixels if geometry is not None else 0
    except (GeometryError, KeyError, ValueError):  # per-frame header values: known per frame
        n_px = 0
    if not n_px or n * 4 * n_px <= MAX_BLOCK_BYTES:
        return
    most = max(1, MAX_BLOCK_BYTES // (4 * n_px))
    raise ConfigError(f"--frames-per-block {n}: a block of {n} frames of this detector "
                      f"({n_px / 1e6:.2f} Mpx) holds {n * 4 * n_px / 1e9:.1f} GB of pixels in a "
                      f"worker's memory; expected at most {most} (blocks of "
                      f"{MAX_BLOCK_BYTES >> 20} MiB)")


@dataclass
class RunPlan:
    """What a run will do: every block, those left to do, and the manifest that tracks them."""

    blocks: list[BlockRef]
    todo: list[BlockRef]
    skipped: int
    manifest: Manifest
    file_errors: dict[str, str]
    input_bytes: int
    #: blocks that crashed a process before: they run only in a child process
    isolated: set[str] = field(default_factory=set)
    #: file blocks whose file could not be listed for storage reasons (unread, not failed)
    unreachable: set[str] = field(default_factory=set)
    #: one-record blocks of files unopenable before and planned in full now: ``{id: URL}``
    superseded: dict[str, str] = field(default_factory=dict)


@dataclass
class Execution:
    """What :func:`execute_plan` did."""

    reports: list[BlockReport]
    failures: list[BlockFailure]
    wall_s: float
    n_cores: int
    cluster: ClusterInfo | None
    live_report: Reporter | None = None


def _problem_kind(problem: str) -> str:
    """A short class of a shard verification problem, for one summary log line."""
    for needle, kind in (("missing", "missing shard"), ("checksum", "checksum differs"),
                         ("failed as a whole", "failed before"), ("rows, expected", "row count"),
                         ("written for block", "other block's shard"),
                         ("unreadable", "unreadable shard")):
        if needle in problem:
            return kind
    return "other"


def _geometry(config: ProcessConfig, storage_options: Mapping[str, Any]) -> Any:
    """The CrystFEL geometry of the run (``None`` without one); an absurd beam is refused."""
    if not config.io.geometry:
        return None
    from sfxflow.errors import GeometryError
    from sfxflow.io.checks import beam_problem
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.storage import shown_url

    geometry = read_geom(config.io.geometry, dict(storage_options))
    try:
        beam = geometry.beam()
    except GeometryError:  # read per frame: each frame's beam is checked when it is read
        beam = None
    problem = beam_problem(beam) if beam is not None else ""
    if problem:
        raise GeometryError(f"{shown_url(config.io.geometry)}: {problem}")
    return geometry


def _old_manifest(run: RunDir) -> Manifest | None:
    if not run.exists(MANIFEST_NAME):
        return None
    try:
        return Manifest.from_json(run.read_text(MANIFEST_NAME), where=run.url_of(MANIFEST_NAME))
    except InputError as exc:
        logger.warning("ignoring the old manifest: %s", exc)
        return None


#: what a shard file's name ends with (``shards/<block id><suffix>``)
SHARD_SUFFIXES = tuple(rel.split("shards/x", 1)[1] for rel in shard_names("x").values())


def _same_spelling(files: Sequence[Any], old: Manifest | None) -> list[Any]:
    """Local input files under the spelling the run directory recorded them with
    (``segv.cxi`` and ``/data/segv.cxi`` are one file): block ids hash the URL, so a rerun that
    names a file another way would otherwise recompute it under new ids."""
    if old is None:
        return list(files)
    from dataclasses import replace

    from sfxflow.io.storage import is_local, local_path

    def key(url: str) -> str:
        return os.path.realpath(local_path(url))

    recorded = {key(f.url): f.url for f in old.files if is_local(f.url)}
    recorded.update({key(b.url): b.url for b in old.blocks.values() if is_local(b.url)})
    out = []
    for f in files:
        was = recorded.get(key(f.url)) if is_local(f.url) else None
        out.append(replace(f, url=was) if was is not None and was != f.url else f)
    return out


def _keep_blocks_of_unopenable(blocks: list[BlockRef], file_errors: dict[str, str],
                               unreachable: set[str], old: Manifest | None) -> list[BlockRef]:
    """A file that cannot be opened now (permission denied, a broken link, storage down) but
    was processed before keeps its blocks: those that verify stay done, the others are tried
    (and fail at read) instead of the whole file becoming one failed record."""
    if old is None:
        return blocks
    from sfxflow.io.storage import shown_url

    by_url: dict[str, list[BlockEntry]] = {}
    for e in old.blocks.values():
        if e.start >= 0:
            by_url.setdefault(e.url, []).append(e)
    out: list[BlockRef] = []
    for b in blocks:
        before = by_url.get(shown_url(b.url)) if b.start < 0 else None
        if not before:
            out.append(b)
            continue
        reason = file_errors.pop(b.block_id, "cannot be opened")
        unreachable.discard(b.block_id)
        logger.warning("%s; keeping its %d block(s) from the previous run (those not done are "
                       "tried again)", reason, len(before))
        out += [BlockRef(e.block_id, b.url, e.start, e.stop) for e in before]
    return out


def _foreign_shards(run: RunDir, blocks: Sequence[BlockRef], superseded: Mapping[str, str]
                    ) -> list[str]:
    """Shard files under ``shards/`` of blocks this run does not plan (other files - notes, a
    user's own data - are not shards and are never touched)."""
    keep = {name.rsplit("/", 1)[-1] for b_id in [*(b.block_id for b in blocks), *superseded]
            for name in shard_names(b_id).values()}
    return [n for n in run.list("shards") if n not in keep and not n.startswith(".")
            and n.endswith(SHARD_SUFFIXES)]


def _settle_foreign_shards(run: RunDir, blocks: Sequence[BlockRef],
                           superseded: Mapping[str, str], force: bool) -> None:
    """Shards of blocks not planned would be read by merge and report as if they belonged to
    this run: refused, or removed with ``force`` (nothing else in the folder is touched)."""
    stale = _foreign_shards(run, blocks, superseded)
    if not stale:
        return
    if not force:
        raise ConfigError(
            f"{run.url_of('shards')} holds {len(stale)} shard file(s) of blocks that are not "
            f"part of this run ({stale[0]}{', ...' if len(stale) > 1 else ''}); use --force to "
            "remove them, or a new --out")
    for name in stale:
        run.remove(f"shards/{name}")
    logger.info("--force: removed %d shard file(s) of blocks that are not part of this run",
                len(stale))


def _superseded_placeholders(blocks: Sequence[BlockRef], old: Manifest | None) -> dict[str, str]:
    """Old one-record blocks of files (or patterns, prefixes) that could not be opened or listed
    then and can now: ``{block id: shown URL}``. Their shards stay until every block of the
    file - of the whole run, for a pattern - is done again."""
    if old is None:
        return {}
    planned = {b.block_id for b in blocks}
    return {e.block_id: e.url for e in old.blocks.values()
            if e.start < 0 and e.block_id not in planned}


def _refuse_changed_geometry(run: RunDir, config: ProcessConfig, old_manifest: Manifest | None,
                             manifest: Manifest) -> None:
    """Refuse a run directory made with other contents of the same --geometry path."""
    if old_manifest is None or not old_manifest.geometry_sha256:
        return
    if old_manifest.geometry_sha256 != manifest.geometry_sha256:
        # the same --geometry path with edited contents: done blocks would be kept as they were
        raise ConfigError(f"{run.url}: the geometry file {config.io.geometry} changed since "
                          "this run directory was made (its contents differ); use --force to "
                          "recompute or a new --out")


def _refuse_changed_inputs(run: RunDir, old_manifest: Manifest, manifest: Manifest) -> None:
    """Refuse input files that differ from the run directory's; new files are only noted."""
    changes, added = old_manifest.input_changes(manifest.files)
    if changes:
        more = f" (and {len(changes) - 1} more change(s))" if len(changes) > 1 else ""
        raise ConfigError(f"{run.url}: the input files differ from the ones this run directory "
                          f"was made with: {changes[0]}{more}; use --force to recompute with "
                          "the new inputs, or a new --out")
    if added:
        logger.info("%d input file(s) new since the last run (%s%s): processing them too",
                    len(added), added[0], ", ..." if len(added) > 1 else "")


def _sort_done_from_todo(run: RunDir, blocks: Sequence[BlockRef], old_manifest: Manifest | None,
                         manifest: Manifest, force: bool
                         ) -> tuple[list[BlockRef], int, Counter[str]]:
    """Blocks to run, how many are done (their shards verified, kept in ``manifest``) and why
    the others are recomputed: ``(todo, skipped, {reason: count})``."""
    todo: list[BlockRef] = []
    skipped = 0
    recomputed: Counter[str] = Counter()
    for b in blocks:
        old = old_manifest.blocks.get(b.block_id) if old_manifest else None
        if not force and (old is None or old.state not in ("failed", "unread")):
            problem = run.verify_shards(b.block_id, b.expected_rows,
                                        old.checksums if old and old.state == "done" else None)
            if not problem:
                manifest.keep_done(b.block_id, b.expected_rows, old)
                skipped += 1
                continue
            never_written = _problem_kind(problem) == "missing shard" and (
                old is None or old.state == "pending")
            if not never_written:
                recomputed[_problem_kind(problem)] += 1
        elif old is not None:
            recomputed[f"{old.state} before"] += 1
        manifest.carry_history(b.block_id, old)
        todo.append(b)
    return todo, skipped, recomputed


def _record_crashed_blocks(crashed_lock: LockInfo, manifest: Manifest) -> None:
    """The blocks a dead run had in flight count a crash (so they run in a child process)."""
    for block_id in crashed_lock.in_flight.split(","):
        if block_id in manifest.blocks:
            logger.warning("block %s was being processed when the previous run (%s) died; "
                           "it will run in a separate process", block_id,
                           crashed_lock.describe())
            manifest.record_crash(block_id)


def _log_resume(skipped: int, n_todo: int, recomputed: Counter[str]) -> None:
    """Say how much of the run is already done and why blocks are done again."""
    if skipped:
        logger.info("resuming: %d block(s) already done, %d to do", skipped, n_todo)
    if recomputed:
        logger.info("%d block(s) will be recomputed (%s)", sum(recomputed.values()),
                    ", ".join(f"{n} {kind}" for kind, n in recomputed.most_common()))


def plan_and_resume(inputs: Sequence[str], run: RunDir, config: ProcessConfig, geometry: Any,
                    storage_options: Mapping[str, Any], *, force: bool = False,
                    crashed_lock: LockInfo | None = None) -> RunPlan:
    """Discover and plan the inputs, compare with what the run directory holds, decide what to do.

    Parameters
    ----------
    inputs, run, config, geometry, storage_options : as for :func:`run_process`.
    force : recompute everything, and accept another input set (removing the shard files of
        blocks that are not planned; without it such shards are refused, never deleted).
    crashed_lock : the stale lock of a run that died: the blocks it had in flight are run only
        in a child process from now on.

    Raises
    ------
    ConfigError
        The input files or the geometry differ from the ones the run directory was made with.
    """
    from sfxflow.io.sources import discover

    old_manifest = None if force else _old_manifest(run)
    files = _same_spelling(discover(list(inputs), geometry=geometry,
                                    storage_options=dict(storage_options)), old_manifest)
    blocks, file_errors, input_bytes, unreachable = _blocks_of(files, config)
    blocks = _keep_blocks_of_unopenable(blocks, file_errors, unreachable, old_manifest)
    if not blocks:
        raise InputError(f"no frames found in {', '.join(inputs)}")
    logger.info("%d block(s) of up to %d frames from %d input(s), %.1f MB",
                len(blocks), config.io.frames_per_block, len(inputs), input_bytes / 1e6)

    manifest = Manifest.from_plan(list(inputs), [BlockEntry(b.block_id, b.url, b.start, b.stop)
                                                 for b in blocks],
                                  input_files(files))
    if geometry is not None:
        manifest.geometry_sha256 = hashlib.sha256(geometry.text.encode()).hexdigest()
    _refuse_changed_geometry(run, config, old_manifest, manifest)
    # storage that did not answer while listing leaves the input set unknown: nothing is
    # compared or removed on its account (its blocks are "unread" and the run asks for a rerun)
    listed = not any(getattr(f, "transient", False) for f in files)
    if old_manifest is not None and listed:
        _refuse_changed_inputs(run, old_manifest, manifest)
    superseded = _superseded_placeholders(blocks, old_manifest)
    if listed:
        _settle_foreign_shards(run, blocks, superseded, force)

    todo, skipped, recomputed = _sort_done_from_todo(run, blocks, old_manifest, manifest, force)
    if crashed_lock is not None:
        _record_crashed_blocks(crashed_lock, manifest)
    _log_resume(skipped, len(todo), recomputed)
    if config.run.max_blocks and len(todo) > config.run.max_blocks:
        logger.info("run.max_blocks = %d: doing %d of %d remaining block(s) now",
                    config.run.max_blocks, config.run.max_blocks, len(todo))
        todo = todo[: config.run.max_blocks]
    isolated = {b.block_id for b in todo if manifest.blocks[b.block_id].crashes > 0}
    return RunPlan(blocks, todo, skipped, manifest, file_errors, input_bytes, isolated,
                   unreachable & {b.block_id for b in todo}, superseded)


def _progress_for(progress: Progress | None, total_rows: int) -> Progress:
    """The caller's progress display counting ``total_rows``, or a plain (non-tty) one."""
    if progress is None:
        return Progress(total_rows, tty=False)
    progress.total = total_rows
    return progress


def _dispatch(client: Any, info: ClusterInfo, plan: RunPlan, ctx: BlockContext,
              config: ProcessConfig, on_report: Callable[[BlockReport], None],
              on_failure: Callable[[BlockFailure], None], lock: RunLock | None) -> int:
    """Run the blocks to do in this process (no ``client``) or on Dask; the cores they had."""
    from sfxflow.pipeline.execute import execute_dask, execute_serial

    if client is None:
        execute_serial(plan.todo, ctx, on_report, on_failure,
                       prefetch_depth=config.io.prefetch_depth,
                       attempts=1 + config.run.task_retries, file_errors=plan.file_errors,
                       isolated=plan.isolated, lock=lock)
        return 1
    execute_dask(client, plan.todo, ctx, on_report, on_failure,
                 prefetch_depth=config.io.prefetch_depth,
                 task_retries=config.run.task_retries,
                 file_errors=plan.file_errors)
    return max(info.n_threads, 1, cluster_threads(client))


def execute_plan(plan: RunPlan, ctx: BlockContext, config: ProcessConfig, *,
                 lock: RunLock | None = None, progress: Progress | None = None,
                 on_block: Callable[[BlockReport], None] | None = None,
                 on_cluster: Callable[[ClusterInfo], None] | None = None,
                 reporter: ReporterFactory | None = None) -> Execution:
    """Run the plan's blocks (serially or on Dask), keeping the manifest current (and the
    report, made by ``reporter`` when ``run.report`` is on)."""
    run, manifest = ctx.run, plan.manifest
    reports: list[BlockReport] = []
    failures: list[BlockFailure] = []
    total_todo = sum(b.expected_rows for b in plan.todo)
    progress = _progress_for(progress, total_todo)
    last_manifest = [time.perf_counter()]
    live_report = (reporter(run.url, dict(ctx.storage_options), config.run.report_interval_s)
                   if config.run.report and reporter is not None else None)

    def save_manifest(force_write: bool = False) -> None:
        now = time.perf_counter()
        if force_write or now - last_manifest[0] >= config.run.manifest_interval_s:
            run.write_text(MANIFEST_NAME, manifest.to_json())
            last_manifest[0] = now

    def on_report(report: BlockReport) -> None:
        report.received_at = time.perf_counter() - t_exec0
        if report.block_id in plan.unreachable and not report.unread_reason:
            report.unread_reason = plan.file_errors.get(report.block_id, "storage unreachable")
        reports.append(report)
        manifest.record_report(report)
        progress.update(report.n_frames, hits=report.hits, indexed=report.counts.get("indexed", 0),
                        failed=report.counts.get("failed", 0))
        save_manifest()
        if live_report is not None:
            live_report.block_done()
        if on_block is not None:
            on_block(report)

    def on_failure(failure: BlockFailure) -> None:
        manifest.record_failure(failure.block.block_id, failure.reason, crashed=failure.crashed)
        failures.append(failure)
        progress.update(failure.block.expected_rows, failed=failure.block.expected_rows)
        save_manifest()

    save_manifest(force_write=True)
    if lock is not None:  # the dead run's blocks in flight are in the manifest now
        lock.previous_recorded()
    n_cores = 1
    info: ClusterInfo | None = None
    t_exec0 = time.perf_counter()
    t_exec1 = 0.0
    try:
        with open_cluster(config.cluster,
                          allowed_failures=config.run.allowed_failures) as (client, info):
            if on_cluster is not None:
                on_cluster(info)
            t_exec0 = time.perf_counter()
            n_cores = _dispatch(client, info, plan, ctx, config, on_report, on_failure, lock)
            t_exec1 = time.perf_counter()
    finally:
        progress.close()
        try:
            save_manifest(force_write=True)
        finally:
            run.remove_temporaries()
    wall_s = (t_exec1 or time.perf_counter()) - t_exec0
    return Execution(reports, failures, wall_s, n_cores, info, live_report)


def _drop_replaced_placeholders(run: RunDir, plan: RunPlan) -> None:
    """A file's old one-record shards go once every block of the file is done (verified)."""
    from sfxflow.io.storage import shown_url

    for block_id, url in plan.superseded.items():
        states = [plan.manifest.blocks[b.block_id].state for b in plan.blocks
                  if b.start >= 0 and shown_url(b.url) == url] or [
            b.state for b in plan.manifest.blocks.values()]  # a pattern: the whole run
        if all(s == "done" for s in states):
            for rel in shard_names(block_id).values():
                run.remove(rel)


def reduce_run(plan: RunPlan, execution: Execution, run: RunDir, config: ProcessConfig,
               geometry: Any, t_start: float) -> RunResult:
    """Concatenate the frames shards into frames.parquet and write summary.json."""
    manifest = plan.manifest
    counts = manifest.counts()
    complete = counts["pending"] == 0 and counts["unread"] == 0
    done_ids = [b.block_id for b in plan.blocks if manifest.blocks[b.block_id].state != "pending"]
    frames = sort_frames(run.read_frames_shards(done_ids))
    if counts["pending"] == 0:  # every frame has its record (unread ones as failed, for now)
        meta = {"sfxflow.blocks": str(len(plan.blocks))}
        run.write_bytes("frames.parquet", parquet_bytes(frames, meta))
        crystals = sort_frames(run.read_crystals_shards(done_ids))
        run.write_bytes("crystals.parquet", parquet_bytes(crystals, meta))
    else:
        for name in ("frames.parquet", "crystals.parquet"):
            if run.exists(name):
                run.remove(name)
    _drop_replaced_placeholders(run, plan)
    unread = {b.block_id: b.reason for b in manifest.blocks.values() if b.state == "unread"}
    reports, failures, info = execution.reports, execution.failures, execution.cluster
    summary = build_summary(
        frames, reports, wall_s=execution.wall_s, n_cores=execution.n_cores,
        detector=_detector_info(geometry, reports),
        extra={
            "complete": complete,
            "blocks": len(plan.blocks),
            "blocks_skipped": plan.skipped,
            "blocks_processed": len(reports),
            "blocks_failed": len(failures),
            "blocks_unread": len(unread),
            "failed_blocks": {f.block.block_id: f.reason for f in failures},
            "unread_blocks": unread,
            "frames_per_block": config.io.frames_per_block,
            "prefetch_depth": config.io.prefetch_depth,
            "input_bytes": plan.input_bytes,
            "cluster": info.kind if info else config.cluster.kind,
            "total_wall_s": time.perf_counter() - t_start,
        },
    )
    if run.exists("summary.json"):
        try:
            previous = json.loads(run.read_text("summary.json"))
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("%s: unreadable (%s); its throughput figures are not kept",
                           run.url_of("summary.json"), exc)
        else:
            summary = keep_measured_figures(summary, previous)
            was = previous.get("detector")
            if not summary["detector"]["n_pixels"] and isinstance(was, dict) and \
                    was.get("n_pixels"):  # nothing read now (a no-op rerun): what was read then
                summary["detector"] = {**summary["detector"], "n_pixels": was["n_pixels"]}
    run.write_text("summary.json", json.dumps(summary, indent=1, sort_keys=False))
    if execution.live_report is not None:
        execution.live_report.finish()
    return RunResult(run_url=run.url, summary=summary, blocks_total=len(plan.blocks),
                     blocks_skipped=plan.skipped, blocks_done=len(reports),
                     blocks_failed=len(failures), complete=complete, cluster=info,
                     reports=reports, blocks_unread=len(unread),
                     unread_reasons=dict(Counter(unread.values())))


def run_process(
    inputs: Sequence[str],
    out: str,
    config: ProcessConfig,
    *,
    storage_options: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_block: Callable[[BlockReport], None] | None = None,
    on_cluster: Callable[[ClusterInfo], None] | None = None,
    frame_fn: Callable[..., Any] | None = None,
    reporter: ReporterFactory | None = None,
) -> RunResult:
    """Process ``inputs`` into the run directory ``out``.

    Parameters
    ----------
    inputs : files, globs, folders or ``s3://`` prefixes.
    out : run directory, local path or URL.
    config : the configuration (``cluster`` says where to run).
    storage_options : fsspec options for inputs and the run directory (never written or logged).
    force : recompute every block even if its shards verify, and accept changed inputs.
    progress : a :class:`Progress` to update (the CLI makes one); ``None`` logs only.
    on_block : called after each finished block (tests use it to stop a run part way).
    on_cluster : called once the cluster is up (the CLI prints its address).
    frame_fn : replace :func:`~sfxflow.pipeline.frame.process_frame` (tests).
    reporter : makes what keeps ``RUN/report.html`` current while the run goes (the CLI passes
        :class:`sfxflow.report.page.LiveReport`); ``None``: no report.

    Returns
    -------
    RunResult

    Raises
    ------
    InputError
        Bad inputs or options, changed inputs or settings (unless ``force``), or another live
        run in ``out`` (:class:`~sfxflow.pipeline.runlock.RunLocked`).
    RunDirError
        The run directory cannot be written; rerunning resumes.
    """
    t_start = time.perf_counter()
    storage_options = dict(storage_options or {})
    config = resolve_config(config)
    if config.target.cell is None:
        logger.warning("no target cell: hits will not be indexed")
    else:
        config.target_cell()  # validate the space group now, not on every worker
    for key, (default, value) in changed_settings(config).items():
        logger.info("setting %s = %r (default %r)", key, value, default)
    apply_storage_retry(config)
    geometry = _geometry(config, storage_options)
    _check_block_memory(config, geometry)

    run = RunDir(out, storage_options)
    run.makedirs()
    with RunLock(run) as lock:
        run.remove_temporaries()
        if not force:
            _check_compatible(run, config)
        plan = plan_and_resume(inputs, run, config, geometry, storage_options, force=force,
                               crashed_lock=lock.previous)
        run.write_text("config.toml", config.to_toml())
        header, chunker = None, None
        if config.io.write_stream:
            first_urls = [b.url for b in plan.blocks if b.start >= 0][:1]
            header, chunker = _stream_parts(config, geometry, first_urls, storage_options)
            if header is not None and (force or not run.exists("header.stream")):
                run.write_text("header.stream", header)
        ctx = BlockContext(config=config, run=run, geometry=geometry,
                           storage_options=storage_options, frame_fn=frame_fn,
                           stream_chunk_fn=chunker)
        execution = execute_plan(plan, ctx, config, lock=lock, progress=progress,
                                 on_block=on_block, on_cluster=on_cluster,
                                 reporter=reporter)
        return reduce_run(plan, execution, run, config, geometry, t_start)
