"""``sfxflow demo``: simulate a small CSPAD data set, process it on a local Dask cluster, show it."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from sfxflow.cli.options import number
from sfxflow.errors import InputError

HELP = ("simulate a small CSPAD data set, process it locally, print the summary, draw a frame, "
        "merge it")
DESCRIPTION = HELP + """

Writes into DIR (default ./sfxflow-demo):
  data/     simulated CXI files (thermolysin-like crystals, P 61 2 2), geometry.geom, truth
  run/      the run directory of `sfxflow process` (frames.parquet, summary.json, stream shards)
  run/merge/ the merged data: merged.mtz, merged.hkl, stats.json (its table is printed)
  frame.png one indexed frame with its found spots circled
then checks the indexed frames against the simulation's truth and merges the integrated
reflections. Takes a few minutes on 2 cores.

Examples:
  sfxflow demo
  sfxflow demo /tmp/demo --frames 200 --workers 2
  sfxflow demo --scheduler synchronous
"""

logger = logging.getLogger(__name__)

CELL = (93.0, 93.0, 130.5, 90.0, 90.0, 120.0)
SPACE_GROUP = "P6122"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default="sfxflow-demo", metavar="DIR",
                        help="folder for the data, results and picture (default ./sfxflow-demo)")
    number(parser, "--frames", kind=int, default=120, ge=1, le=100_000,
           help="frames to simulate (default 120)")
    number(parser, "--files", kind=int, default=4, ge=1, le=10_000, help="CXI files (default 4)")
    number(parser, "--hit-fraction", default=0.3, ge=0, le=1,
           help="fraction of frames with a crystal (default 0.3)")
    number(parser, "--seed", kind=int, default=1, ge=0, le=2**63 - 1,
           help="random seed (default 1)")
    number(parser, "--workers", kind=int, ge=0, le=1024,
           help="local worker processes (default: cores)")
    parser.add_argument("--scheduler", help="'synchronous' (no Dask) or tcp://host:port")


def _truth_check(run_dir: Path, data_dir: Path) -> str:
    """How the indexed frames compare with the simulated truth (orientation error)."""
    import numpy as np
    import pyarrow.parquet as pq

    from sfxflow.algorithms.index import misorientation_deg
    from sfxflow.models import A_MATRIX_COLUMNS, Crystal, as_space_group, as_unit_cell

    frames = pq.read_table(run_dir / "frames.parquet").to_pylist()
    truth = {(r["file"], r["frame_index"]): r
             for r in pq.read_table(data_dir / "truth_frames.parquet").to_pylist()}
    cols = A_MATRIX_COLUMNS
    sg = as_space_group(SPACE_GROUP)
    found = missed = false_hits = 0
    errors = []
    for r in frames:
        t = truth.get((Path(r["source_url"]).name, r["frame_index"]))
        if t is None:
            continue
        if t["is_hit"] and r["status"] == "indexed":
            found += 1
            got = Crystal(as_unit_cell(CELL), sg, np.array([r[c] for c in cols]).reshape(3, 3))
            ref = Crystal(as_unit_cell(CELL), sg, np.array([t[c] for c in cols]).reshape(3, 3))
            errors.append(misorientation_deg(got, ref, sg))
        elif t["is_hit"]:
            missed += 1
        elif r["status"] in ("hit", "indexed"):
            false_hits += 1
    n_true = found + missed
    med = float(np.median(errors)) if errors else math.nan
    return (f"truth check: {found}/{n_true} simulated crystals indexed, median orientation "
            f"error {med:.3f} deg, {false_hits} blank frame(s) taken for hits")


def _picture(run_dir: Path, geometry_path: Path, out_png: Path) -> Path | None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sfxflow.io.geometry import read_geom
    from sfxflow.io.sources import open_source
    from sfxflow.report.picture import render_frame_png

    frames = pq.read_table(run_dir / "frames.parquet")
    indexed = frames.filter(pc.equal(frames.column("status"), "indexed"))
    pick = indexed if indexed.num_rows else frames
    if not pick.num_rows:
        return None
    best = pick.sort_by([("n_spots", "descending")]).slice(0, 1).to_pylist()[0]
    url, index = best["source_url"], int(best["frame_index"])
    spots = pq.read_table(run_dir / "shards" / f"{best['block_id']}.spots.parquet")
    spots = spots.filter(pc.equal(spots.column("frame_index"), index))
    with open_source(url, read_geom(geometry_path)) as src:
        frame = src.read_frame(index)
    return render_frame_png(frame, out_png, spots={"found spots": spots},
                            title=f"{Path(url).name} frame {index}: {best['status']}, "
                                  f"{best['n_spots']} spots")


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.run import run_process
    from sfxflow.pipeline.summary import format_summary
    from sfxflow.report.page import LiveReport

    if args.files > args.frames:
        raise InputError(f"--files {args.files}: expected 1 to --frames ({args.frames})")
    root = Path(args.dir)
    data_dir, run_dir = root / "data", root / "run"
    print(f"simulating {args.frames} CSPAD frames in {args.files} files "
          f"(hit fraction {args.hit_fraction}, seed {args.seed}) into {data_dir} ...",
          file=sys.stderr, flush=True)
    info = write_simulated_dataset(data_dir, layouts.cspad(), None,
                                   SimulationParams(hit_fraction=args.hit_fraction),
                                   n_frames=args.frames, n_files=args.files, seed=args.seed,
                                   detector_name="cspad")
    overrides = [f"io.geometry='{info.geometry_path}'",
                 f"target.cell={list(CELL)}", f"target.space_group='{SPACE_GROUP}'"]
    if args.workers is not None:
        overrides.append(f"cluster.n_workers={args.workers}")
    if args.scheduler == "synchronous":
        overrides.append("cluster.kind=synchronous")
    elif args.scheduler:
        overrides.append(f"cluster.scheduler='{args.scheduler}'")
    config = load_config(overrides=overrides)
    print(f"processing into {run_dir} ...", file=sys.stderr, flush=True)

    def show_cluster(c) -> None:
        if c.scheduler_address:
            print(f"scheduler {c.scheduler_address} ({c.n_workers} workers)"
                  + (f", dashboard {c.dashboard_link}" if c.dashboard_link else ""),
                  file=sys.stderr, flush=True)

    result = run_process([str(p) for p in info.files], str(run_dir), config, force=True,
                         on_cluster=show_cluster, reporter=LiveReport)
    print(format_summary(result.summary))
    print(_truth_check(run_dir, data_dir))
    png = _picture(run_dir, info.geometry_path, root / "frame.png")
    if png is not None:
        print(f"picture of one frame with its spots: {png}")
    print(f"report (open in a browser): {run_dir}/report.html")
    print(f"results: {run_dir}/frames.parquet, {run_dir}/summary.json; stream: "
          f"cat {run_dir}/header.stream {run_dir}/shards/*.stream")
    from sfxflow.cli.process import merge_run

    try:
        merge_run(str(run_dir), config.cluster)
    except InputError as exc:  # e.g. too few frames for any integrated crystal
        print(f"not merged: {exc}")
    return 0
