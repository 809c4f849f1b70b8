"""``sfxflow bench process``: end-to-end throughput per core and the effect of prefetching.

1. Simulated CSPAD data (hit fraction 0.3) processed by ``run_process`` on a LocalCluster of 1
   and then 2 single-threaded workers: median frames/s, frames/s per core and the parallel
   efficiency (per-core rate with 2 workers / with 1).
2. The same files served by a local S3 server (``moto.server.ThreadedMotoServer`` on 127.0.0.1,
   started here) and read by the workers with prefetching on (1 block ahead) and off: median
   wall time, fetch time, the part of it the workers waited for, and the time hidden.

Wall times count execution only (cluster start-up excluded); each figure is the median of
``--repeats`` runs into fresh run directories.

0. First, frames we did not simulate: the 16 independent lysozyme stills in
   ``../shared/data/independent-stills-lysozyme`` (when present), read + spots + index +
   integrate in CPU ms per frame per stage (medians), indexing rate and misorientation to the
   truth, and CrystFEL 0.12 ``indexamajig`` on the same frames (when present) for the ratio.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from sfxflow.options import number

HELP = "end-to-end frames/s per core (1 and 2 workers) and prefetching on/off from local S3"
DESCRIPTION = HELP + """

Examples:
  sfxflow bench process
  sfxflow bench process --frames 80 --repeats 3 --frames-per-block 5
"""

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    number(parser, "--frames", kind=int, default=60, ge=1, le=100_000,
           help="CSPAD frames (default 60)")
    number(parser, "--files", kind=int, default=4, ge=1, le=10_000, help="CXI files (default 4)")
    number(parser, "--frames-per-block", kind=int, default=5, ge=1, le=100_000,
           help="frames per block (default 5)")
    number(parser, "--repeats", kind=int, default=3, ge=1, le=1000,
           help="runs per setting (default 3)")
    number(parser, "--workers", kind=int, nargs="+", default=[1, 2], ge=1, le=1024,
           help="worker counts to compare (default 1 2)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 prefetch comparison")
    parser.add_argument("--stills-only", action="store_true",
                        help="only the independent stills (no simulated run on Dask)")
    parser.add_argument("--no-crystfel", action="store_true",
                        help="do not run CrystFEL's indexamajig for the ratio")


def _config(geometry: str, fpb: int, n_workers: int, prefetch: int) -> Any:
    from sfxflow.pipeline.config import load_config

    return load_config(overrides=[
        f"io.geometry='{geometry}'", f"io.frames_per_block={fpb}", f"io.prefetch_depth={prefetch}",
        "target.cell=[93, 93, 130.5, 90, 90, 120]", "target.space_group='P6122'",
        f"cluster.n_workers={n_workers}", "run.manifest_interval_s=30",
    ])


def _runs(inputs: list[str], geometry: str, work: Path, tag: str, args: argparse.Namespace,
          n_workers: int, prefetch: int, storage_options: dict | None = None) -> list[dict]:
    from sfxflow.pipeline.run import run_process
    from sfxflow.report.page import LiveReport

    out = []
    for i in range(args.repeats):
        res = run_process(inputs, str(work / f"{tag}-{i}"),
                          _config(geometry, args.frames_per_block, n_workers, prefetch),
                          storage_options=storage_options, force=True, reporter=LiveReport)
        out.append(res.summary)
    return out


def whole_command(inputs: list[str], options: list[str], out: Path) -> tuple[float, float]:
    """``(whole, processing)`` seconds of one ``sfxflow process`` as a user runs it: a new
    Python process (this checkout of sfxflow), its wall time to exit, against the summary's
    ``wall_s`` (from the cluster being up to the last block)."""
    import json
    import os
    import subprocess
    import time

    import sfxflow

    src = str(Path(sfxflow.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sfxflow", "-q", "process", *inputs, *options,
                           "--out", str(out), "--json", "--no-progress"],
                          env=env, capture_output=True, text=True, check=False)
    whole_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sfxflow process exited {proc.returncode}: {proc.stderr[-2000:]}")
    return whole_s, float(json.loads(proc.stdout)["wall_s"])


def print_whole_command(repeats: int) -> None:
    """The whole command against its processing time on the independent stills (issue 20:
    start-up, cluster close and the report, which do not scale with the frames)."""
    from sfxflow.benchmarks.stills import SPACE_GROUP, stills_dir

    d = stills_dir()
    if d is None:
        return
    inputs = [str(p) for p in sorted(d.glob("sim-*.h5"))]
    options = ["-g", str(d / "sim.geom"), "--cell-file", str(d / "cell.cell"),
               "--space-group", SPACE_GROUP]
    with tempfile.TemporaryDirectory(prefix="sfxflow-bench-whole-") as tmp:
        runs = [whole_command(inputs, options, Path(tmp) / f"r{i}") for i in range(repeats)]
    whole = statistics.median(w for w, _ in runs)
    busy = statistics.median(p for _, p in runs)
    print(f"  whole command `sfxflow process` on the {len(inputs)} stills (local cluster, "
          f"report on), median of {repeats}: {whole:.2f} s, processing {busy:.2f} s -> "
          f"{statistics.median(w / p for w, p in runs):.2f}x its processing time")


def _med(summaries: list[dict], key: str) -> float:
    return statistics.median(float(s[key]) for s in summaries)


def run(args: argparse.Namespace) -> int:
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.errors import InputError
    from sfxflow.io.simulated import write_simulated_dataset

    if args.frames < 2 or args.repeats < 1 or args.files < 1 or args.files > args.frames:
        raise InputError("--frames >= 2, 1 <= --files <= --frames and --repeats >= 1 expected")
    from sfxflow.benchmarks.stills import print_stills

    print_stills(max(args.repeats, 5), crystfel=not args.no_crystfel)
    print_whole_command(args.repeats)
    if args.stills_only:
        return 0
    with tempfile.TemporaryDirectory(prefix="sfxflow-bench-process-") as tmp:
        work = Path(tmp)
        print(f"simulating {args.frames} CSPAD frames (hit fraction 0.3) ...", file=sys.stderr,
              flush=True)
        info = write_simulated_dataset(work / "data", layouts.cspad(), None,
                                       SimulationParams(hit_fraction=0.3), n_frames=args.frames,
                                       n_files=args.files, seed=7)
        inputs = [str(p) for p in info.files]
        geometry = str(info.geometry_path)
        print(f"end to end, local files, {args.frames} frames in blocks of "
              f"{args.frames_per_block}, median of {args.repeats}:")
        per_core: dict[int, float] = {}
        for n in args.workers:
            s = _runs(inputs, geometry, work, f"w{n}", args, n, 1)
            per_core[n] = _med(s, "frames_per_s_per_core")
            print(f"  {n} worker(s): {_med(s, 'frames_per_s'):7.2f} frames/s  "
                  f"{per_core[n]:6.2f} frames/s per core  "
                  f"{_med(s, 'core_seconds_per_frame'):.3f} core-s/frame  "
                  f"(busy {_med(s, 'busy_core_seconds_per_frame'):.3f})  "
                  f"finish spread {_med(s, 'finish_spread_s'):.2f} s", flush=True)
        base = min(per_core)
        for n in sorted(per_core):
            if n != base:
                print(f"  parallel efficiency {n} vs {base} worker(s): "
                      f"{per_core[n] / per_core[base]:.2f}")
        if not args.no_s3:
            _s3_prefetch(inputs, info.geometry_path, work, args)
    return 0


def _s3_prefetch(inputs: list[str], geometry_path: Path, work: Path,
                 args: argparse.Namespace) -> None:
    import s3fs

    from sfxflow.benchmarks.local_s3 import local_s3

    with local_s3("bench") as so:
        if so is None:
            return
        endpoint = so["client_kwargs"]["endpoint_url"]
        fs = s3fs.S3FileSystem(**so)
        for p in [*inputs, str(geometry_path)]:
            fs.put_file(p, f"bench/in/{Path(p).name}")
        s3_inputs = [f"s3://bench/in/{Path(p).name}" for p in inputs]
        geometry = f"s3://bench/in/{geometry_path.name}"
        n = max(args.workers)
        print(f"reading from a local S3 server ({endpoint}), {n} worker(s), "
              f"median of {args.repeats}:")
        results = {}
        for prefetch in (1, 0):
            s = _runs(s3_inputs, geometry, work, f"s3p{prefetch}", args, n, prefetch, so)
            results[prefetch] = s
            print(f"  prefetch {'on ' if prefetch else 'off'}: wall {_med(s, 'wall_s'):6.2f} s  "
                  f"fetch {_med(s, 'fetch_s'):6.2f} s  waited {_med(s, 'fetch_wait_s'):6.2f} s  "
                  f"hidden {_med(s, 'fetch_hidden_s'):6.2f} s  "
                  f"{_med(s, 'read_mb_per_s'):7.1f} MB/s", flush=True)
        saved = _med(results[0], "wall_s") - _med(results[1], "wall_s")
        print(f"  wall time saved by prefetching: {saved:.2f} s "
              f"({100 * saved / _med(results[0], 'wall_s'):.0f}% of the run without it)")
