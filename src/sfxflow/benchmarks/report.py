"""``sfxflow bench report``: time to build the run report for a large run of simulated records.

:func:`write_simulated_run` writes a run directory as ``sfxflow process`` and ``sfxflow merge``
leave it (docs/run-directory.md) from random records instead of images: frames with a hit rate
that drifts along the run, failures at several stages, crystals (one to three per hit) whose
cells scatter around the target, worker finishing times, a summary and merging statistics. The
benchmark builds the report of a 10^5-frame run from ``frames.parquet`` (a finished run) and from
the block shards (a run still going), median of several builds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sfxflow.io.results import parquet_bytes, shard_names
from sfxflow.options import number

HELP = "time to build the run report for a large run of simulated records (goal < 10 s)"
DESCRIPTION = HELP + """

Examples:
  sfxflow bench report
  sfxflow bench report --frames 20000 --repeats 5
"""

TARGET_CELL = (93.0, 93.0, 130.5, 90.0, 90.0, 120.0)
FAILURES = (("read", "frame 7 of the file is truncated (HDF5 chunk read failed)"),
            ("spots", "every pixel is masked"),
            ("index", "refinement diverged (rmsd 4.2 px > 2 px)"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=100_000, ge=1, le=100_000_000,
           help="frames (default 10^5)")
    number(parser, "--frames-per-block", kind=int, default=100, ge=1, le=1_000_000,
           help="frames per block (default 100)")
    number(parser, "--repeats", kind=int, default=3, ge=1, le=1000,
           help="builds timed (default 3)")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the run and its report here and keep them")


def _frames_table(rng: np.random.Generator, n: int, fpb: int, n_files: int,
                  cell_sigma: float) -> tuple[pa.Table, pa.Table]:
    """(frames, crystals) tables for ``n`` frames in blocks of ``fpb``."""
    per_file = -(-n // n_files)
    index = np.arange(n)
    file_no, frame_index = index // per_file, index % per_file
    urls = np.array([f"/beamtime/run{f:04d}.cxi" for f in range(n_files)], dtype=object)[file_no]
    block = np.array([f"run{f:04d}.cxi-{(i // fpb) * fpb:06d}" for f, i in
                      zip(file_no, frame_index, strict=True)], dtype=object)
    # the hit rate drifts along the run (the jet wanders), as at a beamline
    p_hit = 0.25 + 0.15 * np.sin(index / max(n, 1) * 6.0)
    u = rng.random(n)
    status = np.where(u < p_hit, "hit", "miss").astype(object)
    indexed = (status == "hit") & (rng.random(n) < 0.7)
    status[indexed] = "indexed"
    failed = rng.random(n) < 0.004
    status[failed] = "failed"
    stage = np.full(n, "", dtype=object)
    reason = np.full(n, "", dtype=object)
    which = rng.integers(0, len(FAILURES), n)
    for k, (st, why) in enumerate(FAILURES):
        pick = failed & (which == k)
        stage[pick], reason[pick] = st, why
    n_spots = np.where(status == "miss", rng.poisson(3, n), rng.poisson(90, n))
    n_spots[failed] = 0
    n_crystals = np.where(indexed, 1 + rng.binomial(2, 0.15, n), 0)
    n_indexed = np.where(indexed, (n_spots * rng.uniform(0.4, 0.9, n)).astype(np.int64), 0)
    frames: dict[str, Any] = {
        "source_url": pa.array(urls, pa.string()),
        "frame_index": pa.array(frame_index, pa.int64()),
        "event_id": pa.array(np.full(n, "", dtype=object), pa.string()),
        "block_id": pa.array(block, pa.string()),
        "status": pa.array(status, pa.string()),
        "stage": pa.array(stage, pa.string()),
        "reason": pa.array(reason, pa.string()),
        "n_spots": pa.array(n_spots, pa.int64()),
        "n_indexed": pa.array(n_indexed, pa.int64()),
        "n_crystals": pa.array(n_crystals, pa.int64()),
        "t_total_s": pa.array(rng.gamma(4.0, 0.1, n), pa.float64()),
    }
    rows = np.repeat(np.arange(n), n_crystals)
    n_cr = rows.size
    crystal_no = np.concatenate([np.arange(k) for k in n_crystals[n_crystals > 0]]) \
        if n_cr else np.zeros(0, int)
    cells = {name: value * (1.0 + cell_sigma * rng.standard_normal(n_cr)) if value != 90.0
             and value != 120.0 else value + 0.05 * rng.standard_normal(n_cr)
             for name, value in zip(("a", "b", "c", "alpha", "beta", "gamma"), TARGET_CELL,
                                    strict=True)}
    for name in ("a", "b", "c", "alpha", "beta", "gamma"):
        first = np.full(n, np.nan)
        first[rows[crystal_no == 0]] = cells[name][crystal_no == 0]
        frames[name] = pa.array(first, pa.float64())
    crystals = pa.table({
        "source_url": pa.array(urls[rows], pa.string()),
        "frame_index": pa.array(frame_index[rows], pa.int64()),
        "block_id": pa.array(block[rows], pa.string()),
        "crystal": pa.array(crystal_no, pa.int32()),
        **{k: pa.array(v, pa.float64()) for k, v in cells.items()},
        "resolution_limit_a": pa.array(np.clip(rng.gamma(9.0, 0.3, n_cr) + 1.4, 1.4, 12.0)),
        "status": pa.array(np.full(n_cr, "integrated", dtype=object), pa.string()),
    })
    return pa.table(frames), crystals


#: The systematic spot-to-prediction offset (fs, ss px) the simulated spots carry: a detector
#: shift the report's per-panel plot must show.
SIM_SHIFT_PX = (0.8, -0.4)
SIM_ICE_A = (3.897, 3.669, 3.441)


def _spot_shards(rng: np.random.Generator, part: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Found spots of a block's frames (a few on ice rings) and the predictions of the indexed
    ones, offset by :data:`SIM_SHIFT_PX`."""
    n_spots = part.column("n_spots").to_numpy()
    n_indexed = part.column("n_indexed").to_numpy()
    rows = np.repeat(np.arange(part.num_rows), n_spots)
    m = rows.size
    inv_d2 = rng.uniform(1.0 / 30.0**2, 1.0 / 1.9**2, m) ** 1.4 * (1.0 / 1.9**2) ** -0.4
    ice = rng.random(m) < 0.05
    inv_d2[ice] = 1.0 / np.asarray(SIM_ICE_A)[rng.integers(0, len(SIM_ICE_A), ice.sum())] ** 2
    intensity = rng.lognormal(8.0 - 12.0 * inv_d2, 0.8)
    intensity[ice] *= 3.0
    rank = np.arange(m) - np.repeat(np.cumsum(n_spots) - n_spots, n_spots)
    indexed = (rank < n_indexed[rows]) & ~ice
    panel = rng.integers(0, 64, m).astype(np.int32)
    fs, ss = rng.uniform(5, 190, m), rng.uniform(5, 180, m)
    hkl = np.where(indexed, np.arange(m), 0).astype(np.int32)
    urls = part.column("source_url").to_numpy(zero_copy_only=False)[rows]
    index = part.column("frame_index").to_numpy()[rows]
    spots = pa.table({
        "source_url": pa.array(urls, pa.string()), "frame_index": pa.array(index, pa.int64()),
        "panel": pa.array(panel), "fs_px": pa.array(fs), "ss_px": pa.array(ss),
        "intensity": pa.array(intensity), "background": pa.array(np.full(m, 10.0)),
        "snr": pa.array(np.full(m, 8.0)), "n_pixels": pa.array(np.full(m, 6, np.int32)),
        "d_a": pa.array(1.0 / np.sqrt(inv_d2)), "indexed": pa.array(indexed),
        "h": pa.array(hkl), "k": pa.array(hkl), "l": pa.array(hkl)})
    k = np.flatnonzero(indexed)
    predicted = pa.table({
        "source_url": pa.array(urls[k], pa.string()),
        "frame_index": pa.array(index[k], pa.int64()),
        "crystal": pa.array(np.zeros(k.size, np.int32)),
        "h": pa.array(hkl[k]), "k": pa.array(hkl[k]), "l": pa.array(hkl[k]),
        "panel": pa.array(panel[k]),
        "fs_px": pa.array(fs[k] - SIM_SHIFT_PX[0] + 0.3 * rng.standard_normal(k.size)),
        "ss_px": pa.array(ss[k] - SIM_SHIFT_PX[1] + 0.3 * rng.standard_normal(k.size))})
    return spots, predicted


def _merge_crystals(rng: np.random.Generator, crystals: pa.Table) -> pa.Table:
    """The merge's per-crystal table (docs/run-directory.md): scale, B, CC, accepted, reason."""
    n = crystals.num_rows
    cc = np.clip(rng.beta(9.0, 2.0, n), -1.0, 1.0)
    scale = rng.lognormal(0.0, 0.35, n)
    reason = np.where(cc < 0.35, "CC to reference < 0.35",
                      np.where(scale > 2.5, "scale out of range", ""))
    return pa.table({
        "source_url": crystals.column("source_url"),
        "frame_index": crystals.column("frame_index"), "crystal": crystals.column("crystal"),
        "scale": pa.array(scale), "b_a2": pa.array(rng.normal(0.0, 6.0, n)),
        "cc": pa.array(cc), "accepted": pa.array(reason == ""),
        "reason": pa.array(reason.astype(object), pa.string())})


def _merge_stats(rng: np.random.Generator, n_crystals: int) -> dict[str, Any]:
    edges = 1.0 / np.sqrt(np.linspace(1.0 / 30.0**2, 1.0 / 1.8**2, 11))
    shells = []
    for d_max, d_min in itertools.pairwise(edges):
        s = 1.0 / d_min
        cc_half = float(1.0 / (1.0 + np.exp((s - 0.5) * 14.0)))
        shells.append({
            "d_max_a": float(d_max), "d_min_a": float(d_min), "n_obs": int(5e4 * s),
            "n_unique": int(2e3 * s), "n_possible": int(2.05e3 * s),
            "completeness": float(min(1.0, 0.995 - 0.02 * s)),
            "multiplicity": float(25.0 / s), "mean_i_over_sigma": float(12.0 * cc_half + 0.3),
            "cc_half": cc_half, "cc_star": float(np.sqrt(2 * cc_half / (1 + cc_half))),
            "r_split": float(0.1 / max(cc_half, 0.05)), "cc_truth": None,
        })
    inv_d2 = np.linspace(0.01, 1.0 / 1.8**2, 40)
    return {
        "space_group": "P 61 2 2", "cell": list(TARGET_CELL), "wavelength_a": 1.3,
        "model": "partiality", "n_crystals_input": n_crystals,
        "n_crystals_merged": int(n_crystals * 0.93),
        "rejected": {"scale out of range": int(n_crystals * 0.05), "CC to reference < 0.1":
                     int(n_crystals * 0.02)},
        "overall": {**shells[0], "d_max_a": float(edges[0]), "d_min_a": float(edges[-1])},
        "shells": shells,
        "wilson": {"b_a2": 22.0, "inv_d2": inv_d2.tolist(),
                   "ln_mean_i": (9.0 - 11.0 * inv_d2 + 0.05 * rng.standard_normal(40)).tolist()},
    }


def _write_block_shards(root: Path, block_id: str, part: pa.Table, crystals: pa.Table | None,
                        rng: np.random.Generator, with_spots: bool) -> None:
    """A done block's shards: its frames, its spots and predictions (``with_spots``) and its
    crystals (when given)."""
    names = shard_names(block_id)
    (root / names["frames"]).write_bytes(parquet_bytes(
        part, {"sfxflow.block_id": block_id, "sfxflow.n_frames": str(part.num_rows)}))
    if with_spots:
        spots, predicted = _spot_shards(rng, part)
        (root / names["spots"]).write_bytes(parquet_bytes(spots))
        (root / names["reflections"]).write_bytes(parquet_bytes(predicted))
    if crystals is not None:
        (root / names["crystals"]).write_bytes(parquet_bytes(crystals))


def _summary(frames: pa.Table, wall: float, n_workers: int, n_blocks: int,
             frames_per_block: int) -> dict[str, Any]:
    """``summary.json`` of a finished run of ``frames`` that took ``wall`` seconds."""
    n_frames = frames.num_rows
    t = frames.column("t_total_s").to_numpy()
    return {"frames": n_frames, "frames_processed": n_frames, "wall_s": wall - 20.0,
            "total_wall_s": wall, "n_cores": n_workers, "frames_per_s": n_frames / wall,
            "core_seconds_per_frame": n_workers * wall / n_frames,
            "busy_core_seconds_per_frame": float(t.mean()), "hit_rate": 0.3,
            "stage_seconds": {"spots": 0.7 * float(t.sum()), "index": 0.3 * float(t.sum())},
            "blocks": n_blocks, "frames_per_block": frames_per_block, "complete": True}


def _write_merge(folder: Path, rng: np.random.Generator, crystals: pa.Table) -> dict[str, Any]:
    """A merge's ``stats.json`` and ``crystals.parquet``; returns the stats."""
    folder.mkdir(exist_ok=True)
    stats = _merge_stats(rng, crystals.num_rows)
    (folder / "stats.json").write_text(json.dumps(stats))
    (folder / "crystals.parquet").write_bytes(parquet_bytes(_merge_crystals(rng, crystals)))
    return stats


def write_simulated_run(root: str | Path, n_frames: int = 2000, frames_per_block: int = 50, *,
                        n_files: int = 4, n_workers: int = 4, seed: int = 0, done_blocks:
                        int | None = None, with_crystals: bool = True, with_merge: bool = True,
                        cell_sigma: float = 0.004, with_spots: bool = True) -> dict[str, Any]:
    """Write a run directory of simulated records (no images) and return what went in.

    Parameters
    ----------
    root : the run directory to create.
    n_frames, frames_per_block, n_files : size and shape of the run.
    n_workers : workers the blocks are spread over (their finishing times in the manifest).
    done_blocks : write only this many blocks (a run still going: shards, no
        ``frames.parquet``, no summary); ``None`` writes a finished run.
    with_crystals : write crystals shards/table and the ``n_crystals`` column.
    with_merge : write ``merge/stats.json`` and the merge's ``crystals.parquet``.
    with_spots : write spots and reflections shards (found spots, a few on ice rings, and the
        indexed ones' predictions offset by :data:`SIM_SHIFT_PX`).
    cell_sigma : relative scatter of cell lengths.

    Returns
    -------
    dict with ``frames`` and ``crystals`` (the tables written), ``stats`` (or ``None``) and
    ``blocks`` (ids in order, done ones first).
    """
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.manifest import BlockEntry, Manifest

    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames, crystals = _frames_table(rng, n_frames, frames_per_block, n_files, cell_sigma)
    if not with_crystals:
        frames = frames.drop_columns(["n_crystals"])
    block_col = frames.column("block_id").to_numpy(zero_copy_only=False)
    urls = frames.column("source_url").to_numpy(zero_copy_only=False)
    index = frames.column("frame_index").to_numpy()
    starts = np.flatnonzero(np.r_[True, block_col[1:] != block_col[:-1]])
    stops = np.r_[starts[1:], n_frames]
    n_done = len(starts) if done_blocks is None else min(done_blocks, len(starts))
    t_start = 1_790_000_000.0
    per_block_s = frames_per_block * 0.4 / 1.0
    entries = []
    crystal_blocks = crystals.column("block_id").to_numpy(zero_copy_only=False)
    for b, (lo, hi) in enumerate(zip(starts, stops, strict=True)):
        block_id = str(block_col[lo])
        entry = BlockEntry(block_id, str(urls[lo]), int(index[lo]), int(index[hi - 1]) + 1)
        if b < n_done:
            worker = b % n_workers
            entry.state, entry.n_frames, entry.attempts = "done", int(hi - lo), 1
            entry.worker = f"tcp://10.0.0.{worker + 1}:40{worker:03d}"
            entry.finished_at = t_start + 20.0 + (b // n_workers + 1) * per_block_s * (
                1.0 + 0.15 * worker) + rng.normal(0.0, 1.0)
            mine = crystals.filter(pa.array(crystal_blocks == block_id)) if with_crystals \
                else None
            _write_block_shards(root, block_id, frames.slice(int(lo), int(hi - lo)), mine, rng,
                                with_spots)
        entries.append(entry)
    manifest = Manifest.from_plan(sorted(set(urls.tolist())), entries)
    manifest.created_at = t_start
    (root / "manifest.json").write_text(manifest.to_json())
    config = load_config(overrides=[f"io.frames_per_block={frames_per_block}",
                                    f"target.cell={list(TARGET_CELL)}",
                                    "target.space_group='P6122'"])
    (root / "config.toml").write_text(config.to_toml())
    stats = None
    if done_blocks is None:
        (root / "frames.parquet").write_bytes(parquet_bytes(frames))
        if with_crystals:
            (root / "crystals.parquet").write_bytes(parquet_bytes(crystals))
        wall = max(e.finished_at for e in entries) - t_start
        summary = _summary(frames, wall, n_workers, len(entries), frames_per_block)
        (root / "summary.json").write_text(json.dumps(summary))
        if with_merge:
            stats = _write_merge(root / "merge", rng, crystals)
    return {"frames": frames, "crystals": crystals, "stats": stats,
            "blocks": [e.block_id for e in entries]}


def _time_builds(run_dir: Path, repeats: int) -> tuple[float, float, int]:
    from sfxflow.pipeline.report import build_report
    from sfxflow.report.html import render_report_html

    build, render = [], []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = build_report(str(run_dir))
        t1 = time.perf_counter()
        size = len(render_report_html(data).encode())
        render.append(time.perf_counter() - t1)
        build.append(t1 - t0)
    return statistics.median(build), statistics.median(render), size


def run(args: argparse.Namespace) -> int:
    import matplotlib  # noqa: F401  (imported once before timing, as in a running process)

    from sfxflow.report.page import write_report

    with tempfile.TemporaryDirectory(prefix="sfxflow-bench-report-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        n_blocks = -(-args.frames // args.frames_per_block)
        t0 = time.perf_counter()
        done = write_simulated_run(base / "finished", args.frames, args.frames_per_block,
                                   n_workers=16, seed=1)
        running = base / "running"
        write_simulated_run(running, args.frames, args.frames_per_block, n_workers=16, seed=1,
                            done_blocks=n_blocks // 2)
        print(f"simulated records: {args.frames:,} frames in {n_blocks:,} blocks, "
              f"{done['crystals'].num_rows:,} crystals ({time.perf_counter() - t0:.1f} s to "
              "write)", flush=True)
        _time_builds(base / "finished", 1)  # warm-up: first matplotlib figure, fonts
        for label, path in (("finished run (frames.parquet, crystals.parquet, merge stats)",
                             base / "finished"),
                            (f"run going ({n_blocks // 2:,} of {n_blocks:,} blocks' shards)",
                             running)):
            b, r, size = _time_builds(path, args.repeats)
            print(f"  {label}:\n    gather {b:6.2f} s + render {r:6.2f} s = {b + r:6.2f} s "
                  f"(median of {args.repeats}), page {size / 1e6:.2f} MB", flush=True)
        if args.keep:
            print(f"pages: {write_report(str(base / 'finished'))}, "
                  f"{write_report(str(running))}")
    return 0
