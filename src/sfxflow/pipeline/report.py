"""The run report's data: what a run directory says about itself, gathered for one HTML page.

:func:`build_report` reads a run directory (local or any fsspec URL, while the run goes or after
it) following docs/run-directory.md and returns a :class:`ReportData`; :func:`build_merge_report`
does the same for a folder of ``sfxflow merge`` output. The page itself (HTML, plots, pictures)
is drawn by :mod:`sfxflow.report`, which also writes it and refreshes it while a run goes
(``run_process`` takes a :data:`ReporterFactory`; this layer does not draw).

Where the frames come from: ``frames.parquet`` once every block is done, else every
``shards/*.frames.parquet`` written so far (a shard is written whole or not at all, so a run that
is still going is read safely). Crystals: ``crystals.parquet`` or the crystals shards when the
run has them, else the first crystal of each indexed frame from the frames table. Spots (the
peakogram, the radial histogram, the offsets from the predictions): the spots and reflections
shards of at most :data:`DIAG_BLOCKS` blocks spread along the run, so that the time and the page
stay bounded at any run size. Merged data: ``merge/stats.json`` and ``merge/crystals.parquet``
(or the folder given). Each part that a run lacks, or that cannot be read, becomes an
:class:`Unavailable` with the reason instead of an error.

A run directory is untrusted input: block ids are used as file names only when they are plain
names, and the image pictured is read only when it is one of the inputs the manifest declares.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import re
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sfxflow import __version__
from sfxflow.errors import InputError
from sfxflow.io.results import CELL_COLUMNS, RunDir, read_parquet_bytes
from sfxflow.pipeline.manifest import MANIFEST_NAME, Manifest

__all__ = ["ICE_RINGS_A", "REPORT_NAME", "AlongRun", "CostRow", "Crystals", "Diagnostics",
           "FramePicture", "Merged", "PanelOffsets", "ReportCache", "ReportData", "Reporter",
           "ReporterFactory", "RunOverview", "Scaling", "Throughput", "Unavailable",
           "build_merge_report", "build_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
FRAME_FIELDS = ("source_url", "frame_index", "block_id", "status", "stage", "reason", "n_spots",
                "n_indexed", *CELL_COLUMNS, "t_total_s", "n_crystals", "resolution_limit_a",
                "n_integrated")
CRYSTAL_FIELDS = ("source_url", "frame_index", "block_id", "crystal", *CELL_COLUMNS,
                  "resolution_limit_a", "status")
SPOT_FIELDS = ("source_url", "frame_index", "panel", "fs_px", "ss_px", "intensity", "d_a",
               "indexed", "h", "k", "l")
PREDICTED_FIELDS = ("source_url", "frame_index", "h", "k", "l", "panel", "fs_px", "ss_px")
#: Most blocks whose spots feed the diagnostics (spread evenly along the run), and most spots
#: kept from them: the report's time and size stay bounded at any run size.
DIAG_BLOCKS = 24
DIAG_SPOTS = 300_000
#: A found spot further than this from the prediction of its h k l is not counted as its match.
MATCH_RADIUS_PX = 6.0
#: Hexagonal ice (Ih) powder rings, Å: where salt-free ice on the sample shows up as rings.
ICE_RINGS_A = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.721)
#: Block ids become file names (shards/<id>.*): only plain names are used as such.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:+=@-]*")
#: Node counts the cost table prices the run at (at most one node per block: more would idle).
COST_NODES = (1, 16)
SHARD_READERS = 16


#: Most points drawn along the run; more blocks than this are pooled into consecutive groups.
MAX_POINTS = 400


@dataclass(frozen=True)
class Unavailable:
    """A section (or a part of one) that this run cannot show, and why."""

    reason: str


@dataclass(frozen=True)
class CostRow:
    """What the run would cost on ``n_nodes`` cloud nodes of one type (from the cost planner)."""

    instance: str
    vcpus: int
    price_per_hour: float
    n_nodes: int
    wall_s: float
    cost_usd: float
    placeholder: bool


@dataclass(frozen=True)
class Throughput:
    """Frames finished per worker over time (from the manifest's block records).

    ``times_s[i]`` (seconds since ``t0``) is when a block of ``frames[i]`` frames finished on
    worker ``workers[i]``.
    """

    workers: Sequence[str]
    times_s: np.ndarray
    frames: np.ndarray
    t0_text: str


@dataclass(frozen=True)
class RunOverview:
    """Counts, failures, wall time, throughput and cost of a run."""

    counts: Mapping[str, int]
    hit_rate: float
    indexing_rate: float
    n_crystals: int | None
    blocks_total: int
    blocks_done: int
    blocks_failed: int
    wall_s: float | None
    wall_note: str
    frames_per_s: float | None
    n_cores: int | None
    failures: Sequence[tuple[str, str, int]]
    failed_blocks: Sequence[tuple[str, str]]
    throughput: Throughput | Unavailable
    #: ``None``: not shown (a local run, unless asked for with ``--cost``)
    cost: Sequence[CostRow] | Unavailable | None
    cost_note: str = ""


@dataclass(frozen=True)
class AlongRun:
    """Per-block figures in plan order, and every frame's spot count by status.

    ``frame_end[i]`` is the number of frames up to and including block ``i`` (the x axis).
    """

    frame_end: np.ndarray
    hit_rate: np.ndarray
    indexing_rate: np.ndarray
    mean_spots: np.ndarray
    n_spots: Mapping[str, np.ndarray]
    pooled: int = 1


@dataclass(frozen=True)
class Crystals:
    """Per-crystal cells and resolution limits; crystals per indexed frame."""

    cells: Mapping[str, np.ndarray]
    source: str
    target_cell: tuple[float, ...] | None
    resolution_limit_a: np.ndarray | Unavailable
    crystals_per_frame: np.ndarray | Unavailable


@dataclass(frozen=True)
class Merged:
    """Merging statistics as in ``merge/stats.json`` (docs/run-directory.md)."""

    stats: Mapping[str, Any]
    source: str
    #: (what, resolution in Å) from stats.json's resolution estimate, whatever its keys
    resolution_estimate: Sequence[tuple[str, float]] = ()


@dataclass
class FramePicture:
    """The strongest indexed frame, its found spots and its predicted reflections; the report
    layer draws it (and keeps the PNG in ``png`` so that a live refresh draws it once)."""

    frame: Any
    spots: Mapping[str, pa.Table] | None
    predicted: pa.Table | None
    title: str
    caption: str
    png: bytes | None = None


@dataclass(frozen=True)
class PanelOffsets:
    """Mean found-spot minus predicted position per panel (pixels), over matched spots."""

    panels: np.ndarray
    dfs_px: np.ndarray
    dss_px: np.ndarray
    n: np.ndarray
    #: detector geometry refinements the run recorded (e.g. a refined distance), else empty
    refined: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnostics:
    """Found spots of a sample of blocks: resolution and intensity per spot (peakogram, radial
    histogram), and their offsets from the predictions per panel."""

    d_a: np.ndarray
    intensity: np.ndarray
    indexed: np.ndarray
    offsets: PanelOffsets | Unavailable
    source: str


@dataclass(frozen=True)
class Scaling:
    """Per-crystal results of the merge (``merge/crystals.parquet``): each array is ``None``
    when the merge did not write that column."""

    scale: np.ndarray | None
    b_a2: np.ndarray | None
    cc: np.ndarray | None
    accepted: np.ndarray
    reasons: Sequence[tuple[str, int]]
    source: str
    columns: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows; a section that is ``None`` is left out of the page."""

    title: str
    run_url: str
    state: str
    running: bool
    generated_at: str
    overview: RunOverview | Unavailable | None
    along: AlongRun | Unavailable | None
    crystals: Crystals | Unavailable | None
    merged: Merged | Unavailable | None
    picture: FramePicture | Unavailable | None
    notes: Sequence[str] = field(default_factory=tuple)
    version: str = ""
    refresh_s: int = 60
    diagnostics: Diagnostics | Unavailable | None = None
    scaling: Scaling | Unavailable | None = None
    #: "run" (a run directory's page) or "merge" (a merge folder's page)
    kind: str = "run"
    #: where the other page is, relative to this one (the run's merge page, or the merged run's)
    link: tuple[str, str] | None = None


class Reporter(Protocol):
    """What ``run_process`` calls to keep a run's page current (:class:`sfxflow.report.LiveReport`)."""

    def block_done(self) -> None: ...

    def finish(self) -> None: ...


#: Makes the reporter of a run: ``factory(run_url, storage_options, interval_s)``.
ReporterFactory = Callable[[str, Mapping[str, Any], float], Reporter]


@dataclass
class ReportCache:
    """Tables of shards already read, by relative path (shards never change once written within
    one run invocation), and the last picture drawn."""

    tables: MutableMapping[str, pa.Table] = field(default_factory=dict)
    picture_key: tuple[Any, ...] | None = None
    picture: FramePicture | Unavailable | None = None


# ----------------------------------------------------------------------------------------------
# reading


def _read_columns(data: bytes, wanted: tuple[str, ...]) -> pa.Table:
    pf = pq.ParquetFile(io.BytesIO(data))
    names = [c for c in wanted if c in pf.schema_arrow.names]
    return pf.read(columns=names).replace_schema_metadata(None)


#: What a damaged or foreign Parquet file raises when read (pyarrow's ArrowInvalid is a ValueError).
UNREADABLE = (pa.ArrowException, ValueError, OSError, UnicodeDecodeError, EOFError)


def _read_table(run: RunDir, rel: str, wanted: tuple[str, ...],
                cache: ReportCache | None = None) -> pa.Table:
    if cache is not None and rel in cache.tables:
        return cache.tables[rel]
    table = _read_columns(run.read_bytes(rel), wanted)
    if cache is not None and rel.startswith("shards/"):
        cache.tables[rel] = table
    return table


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    if not tables:
        return None
    # shards from before a stage existed lack its columns: they become nulls
    return pa.concat_tables(tables, promote_options="permissive")


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def _inside(run: RunDir, rel: str) -> bool:
    """Whether ``rel`` stays inside the run directory (no ``..``, and locally no link out)."""
    if rel.startswith("/") or ".." in rel.split("/"):
        return False
    if not run.is_local:
        return True
    root = os.path.realpath(run.root)
    return os.path.realpath(run.path(rel)).startswith(root + os.sep)


def _try_read(run: RunDir, rel: str, wanted: tuple[str, ...], cache: ReportCache | None,
              unreadable: list[str]) -> pa.Table | None:
    """The table, or ``None`` with ``rel`` and why added to ``unreadable``."""
    if not _inside(run, rel):
        unreadable.append(f"{rel} (points outside the run directory: not read)")
        return None
    try:
        return _read_table(run, rel, wanted, cache)
    except FileNotFoundError:
        unreadable.append(f"{rel} (gone)")
    except UNREADABLE as exc:
        unreadable.append(f"{rel} ({_why(exc)})")
    return None


def _load(run: RunDir, whole: str, suffix: str, wanted: tuple[str, ...], prefer_whole: bool,
          cache: ReportCache | None, planned: Mapping[str, Any] | None = None,
          unreadable: list[str] | None = None) -> tuple[pa.Table | None, list[str] | None]:
    """The whole-run table when the run is complete, else the shards written so far (and the
    names of those read: ``None`` for the whole table); with ``planned`` (the manifest's blocks) only
    the shards of planned blocks (a run redone with ``--force`` and other block sizes leaves the
    old ones). Files that cannot be read are named in ``unreadable`` and left out (a damaged
    whole table: the shards are read instead)."""
    bad = unreadable if unreadable is not None else []
    if prefer_whole and run.exists(whole):
        table = _try_read(run, whole, wanted, None, bad)
        if table is not None:
            return table, None
    names = [n for n in run.list("shards") if n.endswith(suffix) and not n.startswith(".")
             and (planned is None or n[: -len(suffix)] in planned)]
    rels = [f"shards/{n}" for n in names]
    # shards are many small objects: on object storage each read is a round trip, so read in
    # parallel (Parquet decoding releases the GIL too)
    with ThreadPoolExecutor(max_workers=SHARD_READERS) as pool:
        tables = list(pool.map(lambda rel: _try_read(run, rel, wanted, cache, bad), rels))
    read = [n for n, t in zip(names, tables, strict=True) if t is not None]
    return _concat([t for t in tables if t is not None]), read


def _column(table: pa.Table, name: str, dtype: Any = float) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count == len(col):
        return None
    if dtype is float:
        return col.cast(pa.float64()).fill_null(math.nan).to_numpy()
    return col.fill_null(0).to_numpy()


def _config(run: RunDir) -> dict[str, Any]:
    """config.toml parsed as plain TOML (a report also reads runs of other sfxflow versions)."""
    try:
        return tomllib.loads(run.read_text("config.toml"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        logger.warning("%s: cannot read config.toml (%s)", run.url, exc)
        return {}


def _json(run: RunDir, rel: str) -> dict[str, Any] | None:
    try:
        data = json.loads(run.read_text(rel))
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------
# sections


def _status_counts(frames: pa.Table) -> dict[str, int]:
    counts = {str(r["values"]): int(r["counts"])
              for r in pc.value_counts(frames.column("status")).to_pylist()}
    indexed = counts.get("indexed", 0)
    return {"frames": frames.num_rows, "hits": counts.get("hit", 0) + indexed, "indexed": indexed,
            "misses": counts.get("miss", 0), "failed": counts.get("failed", 0)}


def _failures(frames: pa.Table) -> list[tuple[str, str, int]]:
    failed = frames.filter(pc.equal(frames.column("status"), "failed"))
    if not failed.num_rows:
        return []
    grouped = failed.group_by(["stage", "reason"]).aggregate([("frame_index", "count")])
    rows = [(str(r["stage"] or ""), str(r["reason"] or ""), int(r["frame_index_count"]))
            for r in grouped.to_pylist()]
    return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))


def _throughput(manifest: Manifest | None) -> Throughput | Unavailable:
    if manifest is None:
        return Unavailable("no manifest.json in the run directory")
    done = [b for b in manifest.blocks.values()
            if b.state == "done" and b.finished_at > 0 and b.worker]
    if not done:
        return Unavailable("no block has finished yet")
    finished = np.array([b.finished_at for b in done])
    # a resumed run keeps the finishing times of blocks done by earlier invocations
    t0 = min(float(manifest.created_at), float(finished.min()))
    return Throughput(workers=[b.worker for b in done], times_s=finished - t0,
                      frames=np.array([b.n_frames for b in done], dtype=float),
                      t0_text=datetime.fromtimestamp(t0, UTC).strftime("%Y-%m-%d %H:%M UTC"))


def _cost(summary: Mapping[str, Any] | None, frames: pa.Table, manifest: Manifest | None,
          frames_per_block: int) -> tuple[list[CostRow] | Unavailable, str]:
    """The run's frames priced on cloud nodes by the cost planner (compute only)."""
    from sfxflow.cost.catalogue import load_catalogue
    from sfxflow.cost.model import (
        Measurement,
        PlanParams,
        measurement_from_summary,
        plan_run,
        split_units,
    )

    n_frames = (sum(b.expected_rows for b in manifest.blocks.values()) if manifest is not None
                else frames.num_rows)
    if n_frames < 1:
        return Unavailable("no frames planned"), ""
    source = ""
    measurement: Measurement | None = None
    if summary and summary.get("core_seconds_per_frame"):
        try:
            measurement = measurement_from_summary(summary, "summary.json")
            source = ("per-frame cost from summary.json: "
                      f"{measurement.core_seconds_per_frame:.3g} core-s/frame, wall time x "
                      "cores, overheads included")
        except InputError as exc:
            logger.warning("%s", exc)
    if measurement is None:
        t = _column(frames, "t_total_s")
        t = t[np.isfinite(t) & (t > 0)] if t is not None else np.zeros(0)
        if not t.size:
            return Unavailable("no per-frame timings yet"), ""
        measurement = Measurement(float(t.mean()), source="frame timings")
        source = (f"per-frame cost from the frames' stage timings so far: {t.mean():.3g} "
                  "core-s/frame, without overheads")
    # frames stand in for bytes: one "byte" per frame, one unit per block
    per_frame = measurement.core_seconds_per_frame_at(None) * measurement.vcpu_speed
    units = split_units(float(n_frames), unit_bytes=float(max(frames_per_block, 1)))
    params = PlanParams(core_seconds_per_byte=per_frame)
    catalogue = load_catalogue()
    rows: list[CostRow] = []
    for name in catalogue.names():
        inst = catalogue[name]
        for nodes in sorted({min(n, units.size) for n in COST_NODES}):
            row, _ = plan_run(inst, nodes, units, params, catalogue)
            rows.append(CostRow(inst.name, inst.vcpus, row.price_per_hour, nodes, row.makespan_s,
                                row.cost_usd, row.placeholder))
    note = (f"{n_frames:,} frames in {units.size:,} blocks, scheduled by the cost planner "
            f"(sfxflow plan); {source}; this machine's cores taken as the catalogue's reference "
            "vCPU; compute only (moving the data to the cloud not included). "
            "* placeholder price: check it.")
    return rows, note


def _overview(frames: pa.Table, manifest: Manifest | None, summary: Mapping[str, Any] | None,
              crystals_n: int | None, running: bool, frames_per_block: int,
              with_cost: bool) -> RunOverview:
    counts = _status_counts(frames)
    judged = counts["frames"] - counts["failed"]
    blocks = list(manifest.blocks.values()) if manifest is not None else []
    now = time.time()
    wall_s: float | None = None
    frames_per_s: float | None = None
    n_cores: int | None = None
    wall_note = ""
    if running and manifest is not None:
        wall_s = now - manifest.created_at
        recent = sum(b.n_frames for b in blocks
                     if b.state == "done" and b.finished_at >= manifest.created_at)
        frames_per_s = recent / wall_s if wall_s > 0 else None
        wall_note = "so far (this invocation)"
    elif summary:
        wall_s = summary.get("total_wall_s") or summary.get("wall_s")
        frames_per_s = summary.get("frames_per_s")
        n_cores = summary.get("n_cores")
        if summary.get("blocks_skipped"):
            wall_note = f"last invocation ({summary['blocks_skipped']} blocks resumed)"
    cost: list[CostRow] | Unavailable | None = None
    cost_note = ""
    if with_cost:
        cost, cost_note = _cost(summary, frames, manifest, frames_per_block)
    return RunOverview(
        counts=counts,
        hit_rate=counts["hits"] / judged if judged else math.nan,
        indexing_rate=counts["indexed"] / counts["hits"] if counts["hits"] else math.nan,
        n_crystals=crystals_n,
        blocks_total=len(blocks) if blocks else int((summary or {}).get("blocks", 0)),
        blocks_done=sum(b.state == "done" for b in blocks),
        blocks_failed=sum(b.state == "failed" for b in blocks),
        wall_s=wall_s, wall_note=wall_note, frames_per_s=frames_per_s, n_cores=n_cores,
        failures=_failures(frames),
        failed_blocks=[(b.block_id, b.reason) for b in blocks if b.state == "failed"],
        throughput=_throughput(manifest), cost=cost, cost_note=cost_note,
    )


def _pool(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over consecutive groups of ``k`` (the last group may be shorter)."""
    return np.add.reduceat(values, np.arange(0, values.size, k)) if k > 1 else values


def _along(frames: pa.Table) -> AlongRun | Unavailable:
    if not frames.num_rows:
        return Unavailable("no frames processed yet")
    # dictionary indices number the blocks in order of first appearance, i.e. along the run
    codes = pc.dictionary_encode(frames.column("block_id")).combine_chunks().indices.to_numpy()
    n_blocks = int(codes.max()) + 1
    status = frames.column("status").to_numpy(zero_copy_only=False)
    is_failed = status == "failed"
    is_indexed = status == "indexed"
    is_hit = (status == "hit") | is_indexed
    spots = frames.column("n_spots").fill_null(0).to_numpy().astype(float)

    def per_block(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(codes, weights=weights, minlength=n_blocks).astype(float)

    k = max(1, math.ceil(n_blocks / MAX_POINTS))
    n = _pool(per_block(None), k)
    failed = _pool(per_block(is_failed.astype(float)), k)
    hits = _pool(per_block(is_hit.astype(float)), k)
    indexed = _pool(per_block(is_indexed.astype(float)), k)
    spot_sum = _pool(per_block(np.where(is_failed, 0.0, spots)), k)
    judged = n - failed
    with np.errstate(invalid="ignore", divide="ignore"):
        hit_rate = np.where(judged > 0, hits / judged, np.nan)
        indexing_rate = np.where(hits > 0, indexed / hits, np.nan)
        mean_spots = np.where(judged > 0, spot_sum / judged, np.nan)
    by_status = {s: spots[status == s].astype(np.int64) for s in ("miss", "hit", "indexed")
                 if (status == s).any()}
    return AlongRun(frame_end=np.cumsum(n), hit_rate=hit_rate, indexing_rate=indexing_rate,
                    mean_spots=mean_spots, n_spots=by_status, pooled=k)


def _target_cell(config: Mapping[str, Any]) -> tuple[float, ...] | None:
    cell = (config.get("target") or {}).get("cell")
    if isinstance(cell, list) and len(cell) == 6:
        try:
            return tuple(float(v) for v in cell)
        except (TypeError, ValueError):
            return None
    return None


def _crystals(frames: pa.Table, crystals: pa.Table | None, target: tuple[float, ...] | None
              ) -> Crystals | Unavailable:
    indexed_frames = frames.filter(pc.equal(frames.column("status"), "indexed"))
    if crystals is not None and crystals.num_rows:
        table, source = crystals, "every crystal (crystals table)"
    elif indexed_frames.num_rows:
        table = indexed_frames
        source = ("the first crystal of each indexed frame (this run has no crystals table: "
                  "made before multi-crystal integration)")
    else:
        return Unavailable("no indexed frame yet")
    cells = {}
    for c in CELL_COLUMNS:
        v = _column(table, c)
        cells[c] = v if v is not None else np.full(table.num_rows, math.nan)
    res = _column(table, "resolution_limit_a")
    resolution: np.ndarray | Unavailable = (
        res if res is not None and np.isfinite(res).any() else
        Unavailable("no per-crystal resolution limit in this run (made before integration)"))
    per_frame: np.ndarray | Unavailable
    n_col = _column(indexed_frames, "n_crystals", dtype=int)
    if n_col is not None:
        per_frame = n_col.astype(np.int64)
    elif crystals is not None and crystals.num_rows:
        grouped = crystals.group_by(["source_url", "frame_index"]).aggregate(
            [("block_id", "count")])
        per_frame = grouped.column("block_id_count").to_numpy().astype(np.int64)
    else:
        per_frame = Unavailable("the frames table has no n_crystals column and the run no "
                                "crystals table (made before multi-crystal indexing)")
    return Crystals(cells=cells, source=source, target_cell=target,
                    resolution_limit_a=resolution, crystals_per_frame=per_frame)


def _length_leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """``(label, Å)`` for every numeric leaf whose key names a length (``*_a``, ``d``,
    ``d_min``, ``resolution``), labelled by its path with its numeric siblings as context."""
    if not isinstance(value, Mapping):
        return []
    lengths: list[tuple[str, float]] = []
    context = []
    for key, v in value.items():
        k = str(key)
        if isinstance(v, Mapping):
            lengths += _length_leaves(v, (*path, k))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            if k.endswith("_a") or k in ("d", "d_min", "resolution"):
                if v > 0:
                    lengths.append((" ".join((*path, k.removesuffix("_a"))), float(v)))
            else:
                context.append(f"{k} {v:g}")
    if context and lengths:
        lengths = [(f"{label} ({', '.join(context)})", v) for label, v in lengths]
    return lengths


def _pretty(label: str) -> str:
    """``cc_half_0p3`` -> ``CC1/2 0.3``.

    >>> _pretty("cc_half_0p3"), _pretty("i_over_sigma_1"), _pretty("resolution_estimate d_min")
    ('CC1/2 0.3', 'I/σ 1', 'd min')
    """
    text = label.removeprefix("resolution_estimate ").removeprefix("resolution ")
    text = re.sub(r"(\d)p(\d)", r"\1.\2", text)
    for a, b in (("cc_half", "CC1/2"), ("cc_star", "CC*"), ("i_over_sigma", "I/σ"),
                 ("isigma", "I/σ"), ("_", " ")):
        text = text.replace(a, b)
    return text.strip()


def _resolution_estimate(stats: Mapping[str, Any]) -> list[tuple[str, float]]:
    """What ``stats.json`` says about the resolution, whatever the keys it uses."""
    found: list[tuple[str, float]] = []
    for key in ("resolution_estimate", "resolution_estimates", "resolution_limit",
                "resolution"):
        value = stats.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            found.append((key.replace("_", " "), float(value)))
        elif isinstance(value, Mapping):
            found += _length_leaves(value, (key,))
    return [(_pretty(label), v) for label, v in found][:8]


def _merged(merge_dir: RunDir) -> Merged | Unavailable:
    try:
        stats = _json(merge_dir, "stats.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Unavailable(f"{merge_dir.url_of('stats.json')} cannot be read ({exc})")
    if stats is None:
        return Unavailable(f"no merged data in this run (no {merge_dir.url_of('stats.json')}; "
                           "sfxflow merge writes it)")
    return Merged(stats=stats, source=merge_dir.url_of("stats.json"),
                  resolution_estimate=_resolution_estimate(stats))


#: Names the merge's crystals table may give each per-crystal figure, the first found is used.
SCALING_COLUMNS = {
    "scale": ("scale", "scale_factor", "osf", "g"),
    "b_a2": ("b_factor_a2", "b_a2", "relative_b_a2", "b_factor", "b"),
    "cc": ("cc_to_reference", "cc_reference", "cc_ref", "cc_to_ref", "cc"),
    "reason": ("rejected_reason", "rejection_reason", "reject_reason", "reason"),
    "accepted": ("accepted", "merged", "used"),
}


def _scaling(merge_dir: RunDir) -> Scaling | Unavailable:
    """Per-crystal scale, B, CC to the reference and rejection reasons of a merge."""
    rel = "crystals.parquet"
    try:
        table = read_parquet_bytes(merge_dir.read_bytes(rel))
    except FileNotFoundError:
        return Unavailable(f"no per-crystal merge results ({merge_dir.url_of(rel)} not found)")
    except UNREADABLE as exc:
        return Unavailable(f"{merge_dir.url_of(rel)} cannot be read ({_why(exc)})")
    names = {k: next((c for c in v if c in table.column_names), None)
             for k, v in SCALING_COLUMNS.items()}
    n = table.num_rows
    if not n:
        return Unavailable(f"{merge_dir.url_of(rel)} has no crystals")
    values = {k: (_column(table, c) if c else None) for k, c in names.items()
              if k in ("scale", "b_a2", "cc")}
    reason = (table.column(names["reason"]).cast(pa.string()).fill_null("")
              .to_numpy(zero_copy_only=False).astype(str) if names["reason"]
              else np.full(n, "", dtype=object))
    if names["accepted"]:
        accepted = table.column(names["accepted"]).fill_null(False).to_numpy(
            zero_copy_only=False).astype(bool)
    else:
        accepted = np.array([not r for r in reason], dtype=bool)
    rejected = [r or "no reason given" for r, ok in zip(reason, accepted, strict=True) if not ok]
    reasons = sorted(Counter(rejected).items(), key=lambda kv: (-kv[1], kv[0]))
    return Scaling(scale=values["scale"], b_a2=values["b_a2"], cc=values["cc"],
                   accepted=accepted, reasons=reasons, source=merge_dir.url_of(rel),
                   columns={k: c for k, c in names.items() if c})


def _plain_block(block: str) -> bool:
    """Whether a block id (from an untrusted run directory) can name a file under shards/."""
    return bool(_PLAIN_NAME.fullmatch(block)) and ".." not in block


def _spread(names: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``names``, evenly spread (first and last included)."""
    if len(names) <= k:
        return list(names)
    picks = np.unique(np.linspace(0, len(names) - 1, k).round().astype(int))
    return [names[i] for i in picks]


#: Columns a run may record a refined detector geometry in (read when present).
REFINED_COLUMNS = ("distance_mm", "refined_distance_mm", "detector_distance_mm",
                   "det_shift_x_mm", "det_shift_y_mm", "detector_shift_x_mm",
                   "detector_shift_y_mm")


def _offsets(spots: pa.Table, predicted: pa.Table | None,
             crystals: pa.Table | None) -> PanelOffsets | Unavailable:
    refined = {}
    if crystals is not None:
        for c in REFINED_COLUMNS:
            v = _column(crystals, c)
            if v is not None and np.isfinite(v).any():
                refined[c] = float(np.nanmedian(v))
    keys = ["source_url", "frame_index", "h", "k", "l", "panel"]
    if predicted is None or not predicted.num_rows:
        return Unavailable("no reflections shards among the blocks read (a run made before "
                           "integration, or no crystal yet)")
    if any(k not in spots.column_names or k not in predicted.column_names for k in keys) or \
            "indexed" not in spots.column_names:
        return Unavailable("the spots or reflections shards lack h k l or panel columns")
    found = spots.filter(pc.fill_null(spots.column("indexed"), False))
    found = found.select([*keys, "fs_px", "ss_px"])
    pred = predicted.select([*keys, "fs_px", "ss_px"]).rename_columns(
        [*keys, "fs_pred", "ss_pred"])
    joined = found.join(pred, keys=keys, join_type="inner")
    if not joined.num_rows:
        return Unavailable("no indexed spot matched a predicted reflection")
    dfs = pc.subtract(joined.column("fs_px"), joined.column("fs_pred")).to_numpy()
    dss = pc.subtract(joined.column("ss_px"), joined.column("ss_pred")).to_numpy()
    panel = joined.column("panel").to_numpy()
    ok = np.isfinite(dfs) & np.isfinite(dss) & (np.hypot(dfs, dss) <= MATCH_RADIUS_PX)
    if not ok.any():
        return Unavailable(f"no indexed spot within {MATCH_RADIUS_PX:g} px of its prediction")
    dfs, dss, panel = dfs[ok], dss[ok], panel[ok].astype(np.int64)
    panels = np.unique(panel)
    idx = np.searchsorted(panels, panel)
    n = np.bincount(idx, minlength=panels.size).astype(float)
    return PanelOffsets(panels=panels, dfs_px=np.bincount(idx, dfs, panels.size) / n,
                        dss_px=np.bincount(idx, dss, panels.size) / n, n=n.astype(np.int64),
                        refined=refined)


def _diagnostics(run: RunDir, planned: Mapping[str, Any] | None, crystals: pa.Table | None,
                 cache: ReportCache | None, unreadable: list[str]) -> Diagnostics | Unavailable:
    suffix = ".spots.parquet"
    blocks = [n[: -len(suffix)] for n in run.list("shards")
              if n.endswith(suffix) and not n.startswith(".")
              and (planned is None or n[: -len(suffix)] in planned)]
    if not blocks:
        return Unavailable("no spots shards in this run directory yet")
    chosen = _spread(blocks, DIAG_BLOCKS)
    spot_tables, predicted_tables = [], []
    names = set(run.list("shards"))
    n_spots = 0
    for block in chosen:
        table = _try_read(run, f"shards/{block}{suffix}", SPOT_FIELDS, cache, unreadable)
        if table is None or not table.num_rows:
            continue
        spot_tables.append(table)
        n_spots += table.num_rows
        if f"{block}.reflections.parquet" in names:
            refl = _try_read(run, f"shards/{block}.reflections.parquet", PREDICTED_FIELDS,
                             cache, unreadable)
            if refl is not None:
                predicted_tables.append(refl)
        if n_spots >= DIAG_SPOTS:
            break
    spots = _concat(spot_tables)
    if spots is None or not spots.num_rows:
        return Unavailable("no spot found in the blocks read")
    d = _column(spots, "d_a")
    intensity = _column(spots, "intensity")
    if d is None or intensity is None:
        return Unavailable("the spots shards have no d_a or intensity column")
    indexed = (spots.column("indexed").fill_null(False).to_numpy(zero_copy_only=False)
               .astype(bool) if "indexed" in spots.column_names
               else np.zeros(spots.num_rows, dtype=bool))
    used = len(spot_tables)
    source = (f"{spots.num_rows:,} spots of {used} of {len(blocks):,} blocks"
              + (" spread along the run" if len(blocks) > used else ""))
    return Diagnostics(d_a=d, intensity=intensity, indexed=indexed,
                       offsets=_offsets(spots, _concat(predicted_tables), crystals),
                       source=source)


def _strongest(frames: pa.Table) -> dict[str, Any] | None:
    indexed = frames.filter(pc.equal(frames.column("status"), "indexed"))
    if not indexed.num_rows:
        return None
    keys = [("n_indexed", "descending"), ("n_spots", "descending")]
    if "n_integrated" in indexed.column_names and indexed.column("n_integrated").null_count == 0:
        keys.insert(0, ("n_integrated", "descending"))
    best: dict[str, Any] = indexed.sort_by(keys).slice(0, 1).to_pylist()[0]
    return best


def _frame_rows(run: RunDir, rel: str, url: str, index: int,
                unreadable: list[str]) -> pa.Table | None:
    if not run.exists(rel):
        return None
    try:
        table = read_parquet_bytes(run.read_bytes(rel))
    except FileNotFoundError:
        return None
    except UNREADABLE as exc:
        unreadable.append(f"{rel} ({_why(exc)})")
        return None
    if "frame_index" not in table.column_names:
        unreadable.append(f"{rel} (no frame_index column)")
        return None
    keep = pc.equal(table.column("frame_index"), index)
    if "source_url" in table.column_names:
        keep = pc.and_(keep, pc.equal(table.column("source_url"), url))
    return table.filter(keep)


def _declared_inputs(manifest: Manifest | None) -> set[str]:
    if manifest is None:
        return set()
    return {b.url for b in manifest.blocks.values()} | {f.url for f in manifest.files}


def _picture(run: RunDir, frames: pa.Table, manifest: Manifest | None,
             config: Mapping[str, Any], storage_options: Mapping[str, Any],
             cache: ReportCache | None) -> FramePicture | Unavailable:
    from sfxflow.io.storage import shown_url

    best = _strongest(frames)
    if best is None:
        return Unavailable("no indexed frame yet")
    url, index, block = str(best["source_url"]), int(best["frame_index"]), str(best["block_id"])
    if url not in _declared_inputs(manifest):
        return Unavailable(f"the strongest indexed frame's file ({shown_url(url)}) is not one "
                           "of the inputs the run's manifest.json declares: not read")
    if not _plain_block(block):
        return Unavailable(f"the strongest indexed frame's block id {block[:80]!r} is not a "
                           "plain name: its shards are not read")
    refl_rel = f"shards/{block}.reflections.parquet"
    has_refl = run.exists(refl_rel)
    key = (url, index, has_refl)
    if cache is not None and cache.picture_key == key and cache.picture is not None:
        return cache.picture
    picture = _read_picture(run, url, index, block, refl_rel if has_refl else None, best,
                            config, storage_options,
                            manifest.geometry_sha256 if manifest is not None else "")
    if cache is not None:
        cache.picture_key, cache.picture = key, picture
    return picture


def _read_picture(run: RunDir, url: str, index: int, block: str, refl_rel: str | None,
                  best: Mapping[str, Any], config: Mapping[str, Any],
                  storage_options: Mapping[str, Any],
                  geometry_sha256: str = "") -> FramePicture | Unavailable:
    import hashlib

    from sfxflow.io.sources import open_source
    from sfxflow.io.storage import shown_url

    geometry_url = str((config.get("io") or {}).get("geometry") or "")
    name = posixpath.basename(url)
    try:
        geometry = None
        if geometry_url:
            from sfxflow.io.geometry import read_geom

            geometry = read_geom(geometry_url, dict(storage_options))
            if geometry_sha256 and hashlib.sha256(
                    geometry.text.encode()).hexdigest() != geometry_sha256:
                return Unavailable(f"the geometry file {shown_url(geometry_url)} is not the one "
                                   "the run used (its checksum in manifest.json differs): "
                                   "the frame is not drawn with it")
        with open_source(url, geometry, dict(storage_options)) as source:
            frame = source.read_frame(index)
    except (InputError, OSError) as exc:
        return Unavailable(f"the strongest indexed frame ({shown_url(url)} frame {index}) "
                           f"cannot be read now: {exc}")
    unreadable: list[str] = []
    overlays: dict[str, pa.Table] = {}
    spots = _frame_rows(run, f"shards/{block}.spots.parquet", url, index, unreadable)
    if spots is not None and spots.num_rows:
        indexed = spots.column("indexed").to_numpy(zero_copy_only=False).astype(bool) \
            if "indexed" in spots.column_names else np.zeros(spots.num_rows, dtype=bool)
        overlays["found spots, not indexed"] = spots.filter(pa.array(~indexed))
        overlays["found spots, indexed"] = spots.filter(pa.array(indexed))
    predicted = _frame_rows(run, refl_rel, url, index, unreadable) if refl_rel else None
    n_pred = predicted.num_rows if predicted is not None else 0
    if predicted is not None:
        pred_text = f" ({n_pred})"
    elif refl_rel:
        pred_text = " (none drawn: the reflections shard cannot be read)"
    else:
        pred_text = " (none: this run has no reflections shards, made before integration)"
    caption = (f"{shown_url(url)} frame {index}: the indexed frame with the most indexed spots "
               f"({best.get('n_indexed')} of {best.get('n_spots')} found spots); circles: found "
               "spots; squares: predicted reflections" + pred_text
               + ". Lab frame seen from behind the detector, log intensity scale."
               + (f" Unreadable: {'; '.join(unreadable)}." if unreadable else ""))
    return FramePicture(frame=frame, spots=overlays or None, predicted=predicted,
                        title=f"{name} frame {index}", caption=caption)


# ----------------------------------------------------------------------------------------------
# entry points


def _mtime(run: RunDir, rel: str) -> float | None:
    try:
        return run.mtime(rel)
    except OSError:
        return None


def _is_cloud(run: RunDir, frames: pa.Table) -> bool:
    """Whether the run directory or any input lies on object storage (not a local file)."""
    from sfxflow.io.storage import is_local

    if not run.is_local:
        return True
    if not frames.num_rows or "source_url" not in frames.column_names:
        return False
    return not all(is_local(str(u)) for u in pc.unique(frames.column("source_url")).to_pylist()
                   if u is not None)


def _open_run(run_url: str, options: Mapping[str, Any]) -> tuple[RunDir, bool]:
    """The run directory and whether it has a manifest; one-line errors for what is not one."""
    from sfxflow.io.storage import is_local, local_path, shown_url

    if is_local(run_url):
        path = local_path(run_url)
        if path.exists() and not path.is_dir():
            raise InputError(f"{run_url}: not a directory; expected the run directory "
                             "(the --out folder of sfxflow process)")
    run = RunDir(run_url, options)
    try:
        has_manifest = run.exists(MANIFEST_NAME)
        is_run = has_manifest or run.exists("frames.parquet") or bool(run.list("shards"))
    except InputError:
        raise
    except Exception as exc:  # credentials and the like: say so in one line
        name = type(exc).__name__
        if "Credential" in name or "credentials" in str(exc):
            raise InputError(f"{shown_url(run.url)}: no storage credentials found (set "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or "
                             "--profile)") from None
        if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or \
                "Forbidden" in str(exc):
            raise InputError(f"{shown_url(run.url)}: access denied ({name})") from None
        raise
    if not is_run:
        raise InputError(f"{shown_url(run.url)}: not an sfxflow run directory (no "
                         f"{MANIFEST_NAME}, frames.parquet or shards/); expected the --out "
                         "folder of sfxflow process")
    return run, has_manifest


#: the frames table of a run without any
_NO_FRAMES = pa.table({c: pa.array([], pa.string()) for c in
                       ("source_url", "block_id", "status", "stage", "reason")}
                      | {"frame_index": pa.array([], pa.int64()),
                         "n_spots": pa.array([], pa.int64())})


def _unreadable_note(unreadable: list[str]) -> str:
    shown = "; ".join(unreadable[:5]) + (f"; and {len(unreadable) - 5} more"
                                          if len(unreadable) > 5 else "")
    return (f"{len(unreadable)} file(s) of the run directory cannot be read and are left out: "
            f"{shown}")


def _manifest_and_summary(run: RunDir, has_manifest: bool, notes: list[str]
                          ) -> tuple[Manifest | None, dict[str, Any] | None]:
    """The run's manifest and ``summary.json``; one that cannot be read is ``None`` and a
    note says why."""
    manifest = None
    if has_manifest:
        try:
            manifest = Manifest.from_json(run.read_text(MANIFEST_NAME),
                                          where=run.url_of(MANIFEST_NAME))
        except (InputError, *UNREADABLE) as exc:
            notes.append(f"the manifest cannot be read ({_why(exc)}); block states are not "
                         "shown")
    try:
        summary = _json(run, "summary.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"summary.json cannot be read ({exc})")
        summary = None
    return manifest, summary


def _run_overview(frames: pa.Table, crystals: pa.Table | None, manifest: Manifest | None,
                  summary: dict[str, Any] | None, running: bool, fpb: int, with_cost: bool
                  ) -> RunOverview | Unavailable:
    if not frames.num_rows:
        return Unavailable("no block has finished yet" if manifest is not None
                           else "no frames recorded in this run directory")
    n_crystals = None
    if crystals is not None:
        n_crystals = crystals.num_rows
    elif "n_crystals" in frames.column_names:
        n_crystals = int(pc.sum(frames.column("n_crystals")).as_py() or 0)
    return _overview(frames, manifest, summary, n_crystals, running, fpb, with_cost)


def _run_state(manifest: Manifest | None, shards_read: list[str] | None, running: bool,
               complete: bool, n_frames: int, overview: RunOverview | Unavailable
               ) -> tuple[str, RunOverview | Unavailable]:
    """The run's state in words (running, stopped, incomplete, complete), and the overview
    without the blocks whose results are gone."""
    total = len(manifest.blocks) if manifest else None
    done = sum(b.state == "done" for b in manifest.blocks.values()) if manifest else None
    lost: list[str] = []
    if manifest is not None and shards_read is not None:
        have = {n.removesuffix(".frames.parquet") for n in shards_read}
        lost = [b for b, e in manifest.blocks.items() if e.state == "done" and b not in have]
        if running:
            # the manifest is rewritten every few seconds only; a shard on disk is a block done
            done = max(done or 0, len(have))
    expected = sum(b.expected_rows for b in manifest.blocks.values()) if manifest else None
    if lost and not running and isinstance(overview, RunOverview):
        # the manifest says done, but their results are gone: not done as far as we can show
        overview = replace(overview, blocks_done=max(0, overview.blocks_done - len(lost)))
    if running:
        return f"running: {done} of {total} blocks done", overview
    if not complete:
        return (f"stopped: {done} of {total} blocks done (run process again to continue)",
                overview)
    if lost or (expected is not None and n_frames < expected):
        return (f"incomplete: {n_frames:,} of {expected:,} frames found"
                + (f", the results of {len(lost)} of {total} blocks missing" if lost else "")
                + " (run process again to redo them)"), overview
    return "complete", overview


def _running_and_complete(run: RunDir, manifest: Manifest | None,
                          running: bool | None) -> tuple[bool, bool]:
    """Whether the run is going now (``running``, else inferred: blocks pending and no
    ``summary.json`` newer than the manifest) and whether no block is pending."""
    pending = manifest.counts()["pending"] if manifest is not None else 0
    if running is None:
        m_time, s_time = _mtime(run, MANIFEST_NAME), _mtime(run, "summary.json")
        running = pending > 0 and (s_time is None or (m_time is not None and m_time > s_time))
    return bool(running), manifest is None or pending == 0


def _frames_and_crystals(run: RunDir, whole: bool, cache: ReportCache | None,
                         planned: Mapping[str, Any] | None, unreadable: list[str]
                         ) -> tuple[pa.Table, pa.Table | None, list[str] | None]:
    """The frame table (sorted by file and index; empty when none is written yet), the crystal
    table and the names of the frame shards read (``None``: the whole-run table)."""
    frames, shards_read = _load(run, "frames.parquet", ".frames.parquet", FRAME_FIELDS, whole,
                                cache, planned, unreadable)
    crystals, _ = _load(run, "crystals.parquet", ".crystals.parquet",
                        CRYSTAL_FIELDS + REFINED_COLUMNS, whole, cache, planned, unreadable)
    if frames is None:
        frames = _NO_FRAMES
    frames = frames.sort_by([("source_url", "ascending"), ("frame_index", "ascending")])
    return frames, crystals, shards_read


def build_report(run_url: str, *, storage_options: Mapping[str, Any] | None = None,
                 merge_url: str | None = None, running: bool | None = None,
                 with_picture: bool = True, cache: ReportCache | None = None,
                 cost: bool | None = None) -> ReportData:
    """Gather the report of the run directory ``run_url``.

    Parameters
    ----------
    run_url : run directory (local path or URL) written by ``sfxflow process``.
    storage_options : fsspec options for the run directory and the image files (never shown).
    merge_url : folder of ``sfxflow merge`` output (default ``RUN/merge``).
    running : whether the run is going now; ``None`` infers it (blocks pending and no
        ``summary.json`` newer than the manifest).
    with_picture : read the strongest frame (one image).
    cache : reuse shard tables and the picture between calls (live refresh).
    cost : price the run on cloud instances; ``None``: only when the run directory or an
        input is on object storage.

    Raises
    ------
    InputError
        When ``run_url`` is not a run directory (or not a directory, or its storage refuses us).
    """
    from sfxflow.io.storage import shown_url

    options = dict(storage_options or {})
    run, has_manifest = _open_run(run_url, options)
    notes: list[str] = []
    unreadable: list[str] = []
    manifest, summary = _manifest_and_summary(run, has_manifest, notes)
    config = _config(run)
    running, complete = _running_and_complete(run, manifest, running)

    planned = manifest.blocks if manifest is not None else None
    whole = complete and not running
    frames, crystals, shards_read = _frames_and_crystals(run, whole, cache, planned, unreadable)
    fpb = int((config.get("io") or {}).get("frames_per_block") or
              (summary or {}).get("frames_per_block") or 1)
    with_cost = _is_cloud(run, frames) if cost is None else cost

    overview = _run_overview(frames, crystals, manifest, summary, running, fpb, with_cost)
    merge_dir = RunDir(merge_url, options) if merge_url else RunDir(run.url_of("merge"), options)
    picture: FramePicture | Unavailable = Unavailable("not drawn (--no-picture)")
    if with_picture:
        picture = _picture(run, frames, manifest, config, options, cache)
    diagnostics = _diagnostics(run, planned, crystals, cache, unreadable)

    state, overview = _run_state(manifest, shards_read, bool(running), complete,
                                 frames.num_rows, overview)
    if unreadable:
        notes.append(_unreadable_note(unreadable))
    name = posixpath.basename(run.url.rstrip("/")) or run.url
    merged = _merged(merge_dir)
    return ReportData(
        title=f"sfxflow run {name}",
        run_url=shown_url(run.url),
        state=state,
        running=bool(running),
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        overview=overview,
        along=_along(frames),
        crystals=_crystals(frames, crystals, _target_cell(config))
        if frames.num_rows or (crystals is not None and crystals.num_rows)
        else Unavailable("no frames processed yet"),
        merged=merged,
        picture=picture,
        notes=tuple(notes),
        version=__version__,
        diagnostics=diagnostics,
        link=(f"{posixpath.basename(merge_dir.url)}/{REPORT_NAME}", "the merge's own page "
              "(per-crystal scaling, rejections, shell table)")
        if isinstance(merged, Merged) and not merge_url else None,
    )


def build_merge_report(merge_url: str, inputs: Sequence[str], *,
                       storage_options: Mapping[str, Any] | None = None) -> ReportData:
    """The page of a merge folder: the merged data, the resolution estimate and the per-crystal
    scaling of this merge (each input run directory's own page shows its frames)."""
    from sfxflow.io.storage import shown_url

    options = dict(storage_options or {})
    merge_dir = RunDir(merge_url, options)
    shown = ", ".join(shown_url(u) for u in inputs[:4]) + (" ..." if len(inputs) > 4 else "")
    parent, name = posixpath.split(merge_url.rstrip("/"))
    if name == "merge" and parent:  # RUN/merge: say whose
        name = f"{posixpath.basename(parent)}/merge"
    name = name or merge_url
    link = None
    runs = [u for u in inputs if not u.endswith(".stream")]
    if len(inputs) == 1 and len(runs) == 1 and merge_url.rstrip("/") == f"{runs[0].rstrip('/')}/merge":
        link = (f"../{REPORT_NAME}", "the run's page (frames, hits, spots, crystals)")
    return ReportData(
        title=f"sfxflow merge {name}",
        run_url=f"{shown_url(merge_dir.url)} · merged from {len(inputs)} input(s): {shown}",
        state="merged",
        running=False, generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        overview=None, along=None, crystals=None, merged=_merged(merge_dir), picture=None,
        version=__version__,
        scaling=_scaling(merge_dir), kind="merge", link=link)
