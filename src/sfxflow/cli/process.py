"""``sfxflow process``: find spots, find hits and index every frame, on a Dask cluster."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from sfxflow.errors import InputError
from sfxflow.models import as_unit_cell

HELP = "process a run: spots -> hits -> indexing on every frame, locally or on a cluster"
DESCRIPTION = HELP + """

Every frame of the inputs gets one record (indexed, hit, miss or failed with its stage and
reason) in RUN/frames.parquet; spots with Miller indices in RUN/shards/*.spots.parquet; a
CrystFEL stream as `cat RUN/header.stream RUN/shards/*.stream`; counts, rates and throughput in
RUN/summary.json; the run report (one HTML page with plots, refreshed while the run goes) in
RUN/report.html. Running the same command again resumes (finished blocks are skipped).
A file that cannot be opened at all (missing, truncated, not an image, wrong dataset) has an
unknown frame count: it is recorded as ONE failed record with frame_index -1 and its reason.
A corrupt frame inside a readable file fails only itself (stage "read").

Examples:
  sfxflow process data/run_*.cxi --geometry data/geometry.geom \\
      --cell "93 93 130.5 90 90 120" --space-group P6122 --out results/run1
  sfxflow process s3://bucket/run7/ --endpoint-url http://127.0.0.1:9000 \\
      --geometry s3://bucket/run7/geometry.geom --cell-file thermolysin.cell --out s3://bucket/out7
  sfxflow process data/ --cell-file t.cell --geometry g.geom --out r1 --scheduler tcp://node1:8786
  sfxflow process data/ --cell-file t.cell --geometry g.geom --out r1 \\
      --cluster slurm --queue normal --cores 32 --memory 64GB --jobs 4 --walltime 02:00:00 \\
      --container-image sfxflow.sif --dry-run
  sfxflow process data/ --cell-file t.cell --geometry g.geom --out r1 \\
      --config process.toml --set spots.sigma_strong=4 --set io.frames_per_block=20
"""

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, globs, folders or s3:// prefixes (CXI/HDF5, CBF)")
    parser.add_argument("--out", "-o", metavar="RUN", help="run directory (path or s3:// URL)")
    parser.add_argument("--geometry", "-g", metavar="GEOM",
                        help="CrystFEL geometry file for HDF5/CXI inputs")
    target = parser.add_argument_group("target cell (needed for indexing)")
    target.add_argument("--cell", metavar='"a b c al be ga"',
                        help="unit cell in Å and degrees")
    target.add_argument("--space-group", metavar="SG", help="space group symbol or number")
    target.add_argument("--cell-file", metavar="FILE", help="CrystFEL .cell file (or PDB CRYST1)")
    cfg = parser.add_argument_group("configuration")
    cfg.add_argument("--config", metavar="FILE", help="TOML or YAML configuration file")
    cfg.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    cfg.add_argument("--frames-per-block", type=int, metavar="N", help="frames per task")
    cfg.add_argument("--prefetch", type=int, metavar="N",
                     help="blocks each worker reads ahead while computing (0 = off)")
    cfg.add_argument("--max-blocks", type=int, metavar="N",
                     help="stop after N blocks (run again to continue)")
    cfg.add_argument("--force", action="store_true", help="recompute blocks already done")
    st = parser.add_argument_group("storage")
    st.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, Ceph)")
    st.add_argument("--profile", metavar="NAME", help="AWS profile")
    cl = parser.add_argument_group("where to run")
    cl.add_argument("--scheduler", metavar="ADDRESS",
                    help="join a running Dask scheduler (tcp://host:8786), or 'synchronous' "
                         "to run serially in this process without Dask")
    cl.add_argument("--workers", type=int, metavar="N",
                    help="local worker processes (default: one per core)")
    cl.add_argument("--cluster", choices=("local", "slurm", "sge", "pbs"),
                    help="start workers through a batch system (dask-jobqueue)")
    cl.add_argument("--queue", help="batch queue / partition")
    cl.add_argument("--account", help="batch account / project")
    cl.add_argument("--walltime", help="batch job wall time (HH:MM:SS)")
    cl.add_argument("--cores", type=int, help="cores per batch job (one worker each)")
    cl.add_argument("--memory", help="memory per batch job (e.g. 64GB)")
    cl.add_argument("--jobs", type=int, help="batch jobs to submit")
    cl.add_argument("--interface", help="network interface for workers (e.g. ib0)")
    cl.add_argument("--container-image", metavar="IMAGE",
                    help="run batch workers in this Apptainer/Shifter image")
    cl.add_argument("--container-runtime", choices=("apptainer", "singularity", "shifter"))
    cl.add_argument("--dry-run", action="store_true",
                    help="print the batch job script that would be submitted, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")


def _parse_cell(text: str) -> list[float]:
    try:
        return list(as_unit_cell(text).parameters)
    except ValueError as exc:
        raise InputError(f"--cell {text!r}: {exc}") from None


def cli_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The command-line options as a nested mapping of configuration values."""
    base: dict[str, dict[str, Any]] = {"target": {}, "io": {}, "run": {}, "cluster": {}}
    if args.cell and args.cell_file:
        raise InputError("give either --cell (with --space-group) or --cell-file, not both")
    if args.cell:
        base["target"]["cell"] = _parse_cell(args.cell)
        if not args.space_group:
            raise InputError("--cell needs --space-group (e.g. --space-group P6122)")
    if args.space_group:
        base["target"]["space_group"] = args.space_group
    if args.cell_file:
        base["target"]["cell_file"] = args.cell_file
    if args.geometry:
        base["io"]["geometry"] = args.geometry
    if args.frames_per_block is not None:
        base["io"]["frames_per_block"] = args.frames_per_block
    if args.prefetch is not None:
        base["io"]["prefetch_depth"] = args.prefetch
    if args.endpoint_url:
        base["io"]["endpoint_url"] = args.endpoint_url
    if args.profile:
        base["io"]["profile"] = args.profile
    if args.max_blocks is not None:
        base["run"]["max_blocks"] = args.max_blocks
    c = base["cluster"]
    if args.scheduler:
        if args.scheduler == "synchronous":
            c["kind"] = "synchronous"
        elif "://" in args.scheduler or ":" in args.scheduler:
            c["scheduler"] = args.scheduler
        else:
            raise InputError(f"--scheduler {args.scheduler!r}: expected tcp://host:port or "
                             "'synchronous'")
    if args.cluster:
        if args.scheduler:
            raise InputError("give either --scheduler or --cluster, not both")
        c["kind"] = args.cluster
    for opt, key in (("workers", "n_workers"), ("queue", "queue"), ("account", "account"),
                     ("walltime", "walltime"), ("cores", "cores"), ("memory", "memory"),
                     ("jobs", "jobs"), ("interface", "interface"),
                     ("container_image", "container_image"),
                     ("container_runtime", "container_runtime")):
        value = getattr(args, opt)
        if value is not None:
            c[key] = value
    return {k: v for k, v in base.items() if v}


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.storage import storage_options_from
    from sfxflow.pipeline.cluster import job_script
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.progress import Progress
    from sfxflow.pipeline.run import run_process
    from sfxflow.pipeline.summary import format_summary

    config = load_config(args.config, args.overrides, base=cli_settings(args))
    if args.dry_run:
        if config.cluster.kind not in ("slurm", "sge", "pbs"):
            raise InputError("--dry-run needs --cluster slurm, sge or pbs")
        print(job_script(config.cluster))
        return 0
    if not args.inputs:
        raise InputError("no INPUT given: name image files, globs, folders or s3:// prefixes")
    if not args.out:
        raise InputError("--out RUN is required (a folder or s3:// URL for the results)")
    storage_options = storage_options_from(config.io.endpoint_url or None,
                                           config.io.profile or None)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        progress = Progress(0, stream=sys.stderr, tty=True)

    def show_cluster(info: Any) -> None:
        if info.scheduler_address:
            print(f"scheduler {info.scheduler_address} ({info.n_workers} workers, "
                  f"{info.n_threads} threads)"
                  + (f", dashboard {info.dashboard_link}" if info.dashboard_link else ""),
                  file=sys.stderr, flush=True)

    result = run_process(args.inputs, args.out, config, storage_options=storage_options,
                         force=args.force, progress=progress, on_cluster=show_cluster)
    if args.json:
        print(json.dumps(result.summary, indent=1))
    else:
        print(format_summary(result.summary))
        print(f"results in {result.run_url}"
              + (f", report {result.run_url}/report.html" if config.run.report else ""))
    if not result.complete:
        left = result.blocks_total - result.blocks_skipped - result.blocks_done - \
            result.blocks_failed
        print(f"{left} block(s) left: run the same command again to continue", file=sys.stderr)
    if result.blocks_failed:
        print(f"{result.blocks_failed} block(s) failed; their frames are recorded as failed "
              "(run again to retry them)", file=sys.stderr)
        return 1
    frames, failed = result.summary.get("frames", 0), result.summary.get("failed", 0)
    if result.complete and frames and failed == frames:
        # a run that produced nothing usable must not look like success to a batch script
        print(f"every input failed ({failed} record(s)); see failed_reasons in the summary",
              file=sys.stderr)
        return 1
    return 0
