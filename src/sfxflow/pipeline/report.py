"""The run report's data: what a run directory says about itself, gathered for one HTML page.

:func:`build_report` reads a run directory (local or any fsspec URL, while the run goes or after
it) following docs/run-directory.md and returns a :class:`~sfxflow.report.html.ReportData`;
:func:`write_report` renders it and writes the page atomically (``RUN/report.html`` unless told
otherwise); :class:`LiveReport` is what ``run_process`` calls after each block to refresh the page
now and then, and once at the end.

Where the frames come from: ``frames.parquet`` once every block is done, else every
``shards/*.frames.parquet`` written so far (a shard is written whole or not at all, so a run that
is still going is read safely). Crystals: ``crystals.parquet`` or the crystals shards when the
run has them, else the first crystal of each indexed frame from the frames table. Merged data:
``merge/stats.json`` (or the folder given). Each part that a run lacks becomes an
:class:`~sfxflow.report.html.Unavailable` with the reason instead of an error.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sfxflow import __version__
from sfxflow.errors import InputError, SfxflowError
from sfxflow.io.results import CELL_COLUMNS, RunDir, read_parquet_bytes
from sfxflow.pipeline.manifest import MANIFEST_NAME, Manifest
from sfxflow.report.html import (
    MAX_POINTS,
    AlongRun,
    CostRow,
    Crystals,
    FramePicture,
    Merged,
    ReportData,
    RunOverview,
    Throughput,
    Unavailable,
    render_report_html,
)

__all__ = ["REPORT_NAME", "LiveReport", "build_report", "write_merge_report", "write_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
FRAME_FIELDS = ("source_url", "frame_index", "block_id", "status", "stage", "reason", "n_spots",
                "n_indexed", *CELL_COLUMNS, "t_total_s", "n_crystals", "resolution_limit_a",
                "n_integrated")
CRYSTAL_FIELDS = ("source_url", "frame_index", "block_id", "crystal", *CELL_COLUMNS,
                  "resolution_limit_a", "status")
#: Node counts the cost table prices the run at (at most one node per block: more would idle).
COST_NODES = (1, 16)
SHARD_READERS = 16


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


def _load(run: RunDir, whole: str, suffix: str, wanted: tuple[str, ...], prefer_whole: bool,
          cache: ReportCache | None, planned: Mapping[str, Any] | None = None
          ) -> tuple[pa.Table | None, int | None]:
    """The whole-run table when the run is complete, else the shards written so far (and how
    many: ``None`` for the whole table); with ``planned`` (the manifest's blocks) only the
    shards of planned blocks (a run redone with ``--force`` and other block sizes leaves the
    old ones)."""
    if prefer_whole and run.exists(whole):
        return _read_table(run, whole, wanted), None
    names = [n for n in run.list("shards") if n.endswith(suffix) and not n.startswith(".")
             and (planned is None or n[: -len(suffix)] in planned)]
    rels = [f"shards/{n}" for n in names]
    # shards are many small objects: on object storage each read is a round trip, so read in
    # parallel (Parquet decoding releases the GIL too)
    with ThreadPoolExecutor(max_workers=SHARD_READERS) as pool:
        tables = list(pool.map(lambda rel: _read_table(run, rel, wanted, cache), rels))
    return _concat(tables), len(names)


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
              crystals_n: int | None, running: bool, frames_per_block: int) -> RunOverview:
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


def _merged(merge_dir: RunDir) -> Merged | Unavailable:
    try:
        stats = _json(merge_dir, "stats.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Unavailable(f"{merge_dir.url_of('stats.json')} cannot be read ({exc})")
    if stats is None:
        return Unavailable(f"no merged data in this run (no {merge_dir.url_of('stats.json')}; "
                           "sfxflow merge writes it)")
    return Merged(stats=stats, source=merge_dir.url_of("stats.json"))


def _strongest(frames: pa.Table) -> dict[str, Any] | None:
    indexed = frames.filter(pc.equal(frames.column("status"), "indexed"))
    if not indexed.num_rows:
        return None
    keys = [("n_indexed", "descending"), ("n_spots", "descending")]
    if "n_integrated" in indexed.column_names and indexed.column("n_integrated").null_count == 0:
        keys.insert(0, ("n_integrated", "descending"))
    best: dict[str, Any] = indexed.sort_by(keys).slice(0, 1).to_pylist()[0]
    return best


def _frame_rows(run: RunDir, rel: str, url: str, index: int) -> pa.Table | None:
    if not run.exists(rel):
        return None
    table = read_parquet_bytes(run.read_bytes(rel))
    keep = pc.equal(table.column("frame_index"), index)
    if "source_url" in table.column_names:
        keep = pc.and_(keep, pc.equal(table.column("source_url"), url))
    return table.filter(keep)


def _picture(run: RunDir, frames: pa.Table, config: Mapping[str, Any],
             storage_options: Mapping[str, Any], cache: ReportCache | None
             ) -> FramePicture | Unavailable:
    best = _strongest(frames)
    if best is None:
        return Unavailable("no indexed frame yet")
    url, index, block = str(best["source_url"]), int(best["frame_index"]), str(best["block_id"])
    refl_rel = f"shards/{block}.reflections.parquet"
    has_refl = run.exists(refl_rel)
    key = (url, index, has_refl)
    if cache is not None and cache.picture_key == key and cache.picture is not None:
        return cache.picture
    picture = _draw_picture(run, url, index, block, refl_rel if has_refl else None, best, config,
                            storage_options)
    if cache is not None:
        cache.picture_key, cache.picture = key, picture
    return picture


def _draw_picture(run: RunDir, url: str, index: int, block: str, refl_rel: str | None,
                  best: Mapping[str, Any], config: Mapping[str, Any],
                  storage_options: Mapping[str, Any]) -> FramePicture | Unavailable:
    from sfxflow.io.sources import open_source
    from sfxflow.io.storage import shown_url
    from sfxflow.report.picture import render_frame_png

    geometry_url = str((config.get("io") or {}).get("geometry") or "")
    name = posixpath.basename(url)
    try:
        geometry = None
        if geometry_url:
            from sfxflow.io.geometry import read_geom

            geometry = read_geom(geometry_url, dict(storage_options))
        with open_source(url, geometry, dict(storage_options)) as source:
            frame = source.read_frame(index)
    except (InputError, OSError) as exc:
        return Unavailable(f"the strongest indexed frame ({shown_url(url)} frame {index}) "
                           f"cannot be read now: {exc}")
    overlays: dict[str, Any] = {}
    spots = _frame_rows(run, f"shards/{block}.spots.parquet", url, index)
    if spots is not None and spots.num_rows:
        indexed = spots.column("indexed").to_numpy(zero_copy_only=False).astype(bool) \
            if "indexed" in spots.column_names else np.zeros(spots.num_rows, dtype=bool)
        overlays["found spots, not indexed"] = spots.filter(pa.array(~indexed))
        overlays["found spots, indexed"] = spots.filter(pa.array(indexed))
    predicted = _frame_rows(run, refl_rel, url, index) if refl_rel else None
    with tempfile.TemporaryDirectory(prefix="sfxflow-report-") as tmp:
        path = os.path.join(tmp, "frame.png")
        render_frame_png(frame, path, spots=overlays or None, predicted=predicted,
                         title=f"{name} frame {index}", max_size_px=1200, dpi=130,
                         low_percentile=90.0, high_percentile=99.98)
        with open(path, "rb") as f:
            png = f.read()
    n_pred = predicted.num_rows if predicted is not None else 0
    caption = (f"{shown_url(url)} frame {index}: the indexed frame with the most indexed spots "
               f"({best.get('n_indexed')} of {best.get('n_spots')} found spots); circles: found "
               "spots; squares: predicted reflections"
               + (f" ({n_pred})" if predicted is not None else
                  " (none: this run has no reflections shards, made before integration)")
               + ". Lab frame seen from behind the detector, log intensity scale.")
    return FramePicture(png=png, caption=caption)


# ----------------------------------------------------------------------------------------------
# entry points


def _mtime(run: RunDir, rel: str) -> float | None:
    try:
        return run.mtime(rel)
    except OSError:
        return None


def build_report(run_url: str, *, storage_options: Mapping[str, Any] | None = None,
                 merge_url: str | None = None, running: bool | None = None,
                 with_picture: bool = True, cache: ReportCache | None = None) -> ReportData:
    """Gather the report of the run directory ``run_url``.

    Parameters
    ----------
    run_url : run directory (local path or URL) written by ``sfxflow process``.
    storage_options : fsspec options for the run directory and the image files (never shown).
    merge_url : folder of ``sfxflow merge`` output (default ``RUN/merge``).
    running : whether the run is going now; ``None`` infers it (blocks pending and no
        ``summary.json`` newer than the manifest).
    with_picture : draw the strongest frame (reads one image).
    cache : reuse shard tables and the picture between calls (live refresh).

    Raises
    ------
    InputError
        When ``run_url`` is not a run directory.
    """
    options = dict(storage_options or {})
    run = RunDir(run_url, options)
    has_manifest = run.exists(MANIFEST_NAME)
    if not has_manifest and not run.exists("frames.parquet") and not run.list("shards"):
        raise InputError(f"{run.url}: not an sfxflow run directory (no {MANIFEST_NAME}, "
                         "frames.parquet or shards/); expected the --out folder of "
                         "sfxflow process")
    notes: list[str] = []
    manifest = None
    if has_manifest:
        try:
            manifest = Manifest.from_json(run.read_text(MANIFEST_NAME),
                                          where=run.url_of(MANIFEST_NAME))
        except InputError as exc:
            notes.append(f"the manifest cannot be read ({exc}); block states are not shown")
    try:
        summary = _json(run, "summary.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"summary.json cannot be read ({exc})")
        summary = None
    config = _config(run)
    pending = manifest.counts()["pending"] if manifest is not None else 0
    if running is None:
        m_time, s_time = _mtime(run, MANIFEST_NAME), _mtime(run, "summary.json")
        running = pending > 0 and (s_time is None or (m_time is not None and m_time > s_time))
    complete = manifest is None or pending == 0

    planned = manifest.blocks if manifest is not None else None
    whole = complete and not running
    frames, n_shards = _load(run, "frames.parquet", ".frames.parquet", FRAME_FIELDS, whole,
                             cache, planned)
    crystals, _ = _load(run, "crystals.parquet", ".crystals.parquet", CRYSTAL_FIELDS, whole,
                        cache, planned)
    if frames is None:
        frames = pa.table({c: pa.array([], pa.string()) for c in
                           ("source_url", "block_id", "status", "stage", "reason")}
                          | {"frame_index": pa.array([], pa.int64()),
                             "n_spots": pa.array([], pa.int64())})
    frames = frames.sort_by([("source_url", "ascending"), ("frame_index", "ascending")])
    fpb = int((config.get("io") or {}).get("frames_per_block") or
              (summary or {}).get("frames_per_block") or 1)

    if frames.num_rows:
        n_crystals = None
        if crystals is not None:
            n_crystals = crystals.num_rows
        elif "n_crystals" in frames.column_names:
            n_crystals = int(pc.sum(frames.column("n_crystals")).as_py() or 0)
        overview: RunOverview | Unavailable = _overview(frames, manifest, summary, n_crystals,
                                                        running, fpb)
    else:
        overview = Unavailable("no block has finished yet" if manifest is not None
                               else "no frames recorded in this run directory")
    merge_dir = RunDir(merge_url, options) if merge_url else RunDir(run.url_of("merge"), options)
    picture: FramePicture | Unavailable = Unavailable("not drawn (--no-picture)")
    if with_picture:
        picture = _picture(run, frames, config, options, cache)

    done = sum(b.state == "done" for b in manifest.blocks.values()) if manifest else None
    if done is not None and n_shards is not None:
        # the manifest is rewritten every few seconds only; a shard on disk is a block done
        done = max(done, n_shards)
    total = len(manifest.blocks) if manifest else None
    if running:
        state = f"running: {done} of {total} blocks done"
    elif not complete:
        state = f"stopped: {done} of {total} blocks done (run process again to continue)"
    else:
        state = "complete"
    name = posixpath.basename(run.url.rstrip("/")) or run.url
    from sfxflow.io.storage import shown_url

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
        merged=_merged(merge_dir),
        picture=picture,
        notes=tuple(notes),
        version=__version__,
    )


def write_report(run_url: str, out: str | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, merge_url: str | None = None,
                 running: bool | None = None, with_picture: bool = True,
                 cache: ReportCache | None = None) -> str:
    """Build the report of ``run_url`` and write it atomically; returns where it went.

    ``out`` defaults to ``RUN/report.html``; a local path or URL. The page replaces the old one
    in one step (rename locally, a single put on object stores): a browser never reads half.
    """
    data = build_report(run_url, storage_options=storage_options, merge_url=merge_url,
                        running=running, with_picture=with_picture, cache=cache)
    page = render_report_html(data).encode("utf-8")
    if out is None:
        run = RunDir(run_url, storage_options)
        run.write_bytes(REPORT_NAME, page)
        return run.url_of(REPORT_NAME)
    folder, name = posixpath.split(out.rstrip("/")) if "://" in out else os.path.split(out)
    if not name:
        raise InputError(f"--out {out!r}: expected a file name such as report.html")
    target = RunDir(folder or ".", storage_options)
    try:
        target.write_bytes(name, page)
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise InputError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    return target.url_of(name)


def _merge_only(merge_url: str, inputs: list[str], options: Mapping[str, Any]) -> ReportData:
    """The page of a merge of several inputs: merged data only (each run has its own report)."""
    from sfxflow.io.storage import shown_url

    shown = ", ".join(shown_url(u) for u in inputs[:4]) + (" ..." if len(inputs) > 4 else "")
    what = (f"this merge has {len(inputs)} inputs ({shown})" if len(inputs) > 1
            else f"the merge's input ({shown}) is not a run directory of sfxflow process")
    why = Unavailable(f"{what}; each run directory's report.html shows its own frames")
    name = posixpath.basename(merge_url.rstrip("/")) or merge_url
    return ReportData(
        title=f"sfxflow merge {name}", run_url=shown_url(merge_url), state="merged",
        running=False, generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        overview=why, along=why, crystals=why, merged=_merged(RunDir(merge_url, options)),
        picture=why, version=__version__)


def write_merge_report(merge_url: str, inputs: list[str], *,
                       storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Reports after ``sfxflow merge``: ``MERGE/report.html`` and, when the merge went into a
    run's own ``RUN/merge``, that run's ``RUN/report.html`` (now with its merged data).

    With one input run directory the merge folder's page is that run's report with the merged
    data; with several inputs (or streams) it shows the merged data and says where the rest is.
    Returns the pages written.
    """
    options = dict(storage_options or {})
    runs = [u for u in inputs if not u.endswith(".stream")]
    written: list[str] = []
    if len(inputs) == 1 and len(runs) == 1:
        run = runs[0].rstrip("/")
        try:
            written.append(write_report(run, f"{merge_url.rstrip('/')}/{REPORT_NAME}",
                                        storage_options=options, merge_url=merge_url))
        except InputError as exc:  # e.g. reflections shards without the rest of a run
            logger.info("%s: merged data only in the report (%s)", run, exc)
        else:
            if merge_url.rstrip("/") == f"{run}/merge" or (
                    "://" not in merge_url and "://" not in run
                    and os.path.realpath(merge_url)
                    == os.path.realpath(os.path.join(run, "merge"))):
                written.append(write_report(run, storage_options=options, merge_url=merge_url))
            return written
    page = render_report_html(_merge_only(merge_url, list(inputs), options)).encode()
    target = RunDir(merge_url, options)
    target.write_bytes(REPORT_NAME, page)
    written.append(target.url_of(REPORT_NAME))
    return written


class LiveReport:
    """Refreshes ``RUN/report.html`` while a run goes, and once at the end.

    After a block, when at least ``interval_s`` seconds (and ten times the last build's time,
    so that drawing takes at most a tenth of the client's time) have passed, the page is rebuilt
    in a background thread: the client goes on collecting results and handing out blocks
    meanwhile (block finishing times in the manifest stay true). :meth:`finish` waits for it and
    writes the final page.

    Never raises: a report that cannot be written is logged and the run goes on.
    """

    def __init__(self, run_url: str, storage_options: Mapping[str, Any] | None = None,
                 interval_s: float = 30.0) -> None:
        self.run_url = run_url
        self.storage_options = dict(storage_options or {})
        self.interval_s = interval_s
        self.cache = ReportCache()
        self._last = -math.inf
        self._build_s = 0.0
        self._thread: threading.Thread | None = None
        self.written = 0

    def _write(self, running: bool) -> None:
        t0 = time.perf_counter()
        try:
            write_report(self.run_url, storage_options=self.storage_options, running=running,
                         cache=self.cache)
            self.written += 1
        except Exception as exc:  # the report must never stop a run
            # a full disk or a dead endpoint says all in one line; anything else is a bug
            logger.warning("%s: report not updated: %s", self.run_url, exc,
                           exc_info=not isinstance(exc, SfxflowError))
        self._build_s = time.perf_counter() - t0
        self._last = time.perf_counter()

    def block_done(self) -> None:
        """Call after each finished block."""
        if self._thread is not None and self._thread.is_alive():
            return
        if time.perf_counter() - self._last >= max(self.interval_s, 10 * self._build_s):
            self._last = time.perf_counter()
            self._thread = threading.Thread(target=self._write, args=(True,), daemon=True,
                                            name="sfxflow-report")
            self._thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for a refresh in progress."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def finish(self) -> None:
        """Call once the run has written its summary."""
        self.wait()
        self._write(running=False)
