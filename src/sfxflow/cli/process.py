"""``sfxflow process``: find spots, find hits and index every frame, on a Dask cluster."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from sfxflow.errors import EXIT_RERUN, InputError

HELP = "process a run: spots -> hits -> indexing on every frame, locally or on a cluster"
DESCRIPTION = HELP + """

Every frame gets one record (indexed, hit, miss or failed with its stage and reason) in
RUN/frames.parquet; spots in RUN/shards/*.spots.parquet; a CrystFEL stream as `cat
RUN/header.stream RUN/shards/*.stream`; counts and rates in RUN/summary.json; the report in
RUN/report.html. Running the same command again resumes. Inputs, geometry, credentials and the
cell are checked before anything starts (a mistake: one line, exit status 2); a file that
exists but does not open, among others that do, is recorded as one failed record.

Examples:
  sfxflow process data/run_*.cxi --geometry data/geometry.geom \\
      --cell "93 93 130.5 90 90 120" --space-group P6122 --out results/run1
  sfxflow process files.lst --geometry g.geom --cell-file t.cell --out r1 --workers 8
  sfxflow process s3://bucket/run7/ --endpoint-url http://127.0.0.1:9000 \\
      --geometry s3://bucket/run7/geometry.geom --cell-file t.cell --out s3://bucket/out7
  sfxflow process data/ --cell-file t.cell --geometry g.geom --out r1 \\
      --cluster slurm --queue normal --cores 32 --jobs 4 --walltime 02:00:00 --dry-run
  sfxflow process ../shared/data/lcls-cspad-thermolysin/*.cbf --preset cspad-cbf \\
      --cell "93 93 130.5 90 90 120" --space-group P6122 --out run1

Every setting (--help-all, --print-config, docs/config.md) is a flag: spots.* as --spots-*,
hit.* as --hit-*, index.* as --index-*, ... Precedence: defaults < --preset < --config FILE <
flags < --set SECTION.KEY=VALUE.
"""

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfxflow.cli.options import add_settings, number
    from sfxflow.pipeline.config import ProcessConfig

    parser.usage = ("%(prog)s INPUT... --out RUN [--geometry G] [--cell C --space-group SG | "
                    "--cell-file F]\n       [--preset NAME] [--config FILE] [--set KEY=VALUE] "
                    "[--workers N | --cluster KIND] [options]")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, globs, folders, s3:// prefixes (CXI/HDF5, CBF) or "
                             "lists (files.lst, @FILE: one file per line, optional //N event; "
                             "relative paths from the current folder, as in CrystFEL; "
                             "-i LIST as for indexamajig)")
    parser.add_argument("-i", "--input", dest="more_inputs", action="append", default=[],
                        metavar="LIST", help=argparse.SUPPRESS)  # indexamajig's habit
    parser.add_argument("--out", "-o", metavar="RUN", help="run directory (path or s3:// URL)")
    parser.add_argument("--force", action="store_true", help="recompute blocks already done")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the batch job script that would be submitted, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")
    parser.add_argument("--merge", action="store_true",
                        help="merge the integrated reflections at the end into RUN/merge "
                             "(default merge settings; see `sfxflow merge` for more)")
    parser.add_argument("--stream", metavar="ENDPOINT",
                        help="process a live karabo-bridge stream (tcp://host:port) instead")
    live = [
        parser.add_argument("--stream-socket", choices=("REQ", "PULL", "SUB"), default="REQ",
                            help="ZeroMQ socket of --stream: REQ for a REP server (the bridge's "
                                 "default), PULL for PUSH, SUB for PUB (which drops what a slow "
                                 "reader misses)"),
        number(parser, "--stream-idle-s", default=30.0, gt=0, le=86_400,
               help="end the stream after this many seconds without a train (default 30)"),
        number(parser, "--stream-update-s", default=5.0, gt=0, le=3600,
               help="least seconds between processing rounds over the received frames "
                    "(default 5)"),
        number(parser, "--stream-max-frames", kind=int, default=0, ge=0, le=10**12,
               help="stop after this many frames (default 0: until the stream is idle)"),
    ]
    for action in live:  # shown by --help-all
        action.full_help = action.help  # type: ignore[attr-defined]
        action.help = argparse.SUPPRESS
    # every setting of the tree is a flag: --cell, --frames-per-block, --scheduler, --workers,
    # --cluster, --spots-sigma-strong, --hit-min-spots, --index-min-indexed, --refine-cell ...
    # --help shows these; --help-all every setting (issue 21: a dozen options a user needs)
    add_settings(parser, ProcessConfig, short={"-g": "io.geometry"},
                 aliases={"--prefetch": "io.prefetch_depth", "--cspad": "preset:cspad-cbf",
                          "--worker-timeout": "cluster.worker_timeout_s"},
                 essential=("io.geometry", "target.cell", "target.space_group",
                            "target.cell_file", "cluster.kind", "cluster.n_workers",
                            "cluster.scheduler", "io.endpoint_url"))


def settings(args: argparse.Namespace) -> Any:
    """The resolved :class:`~sfxflow.pipeline.config.ProcessConfig` of the parsed options."""
    from sfxflow.cli.options import settings_from
    from sfxflow.pipeline.config import ProcessConfig

    if hasattr(args, "target.cell") and hasattr(args, "target.cell_file"):
        raise InputError("give either --cell (with --space-group) or --cell-file, not both")
    if hasattr(args, "target.cell") and not hasattr(args, "target.space_group"):
        raise InputError("--cell needs --space-group (e.g. --space-group P6122)")
    if hasattr(args, "cluster.scheduler") and hasattr(args, "cluster.kind"):
        raise InputError("give either --scheduler or --cluster, not both")
    return settings_from(args, ProcessConfig)


#: options after which ``process`` starts no local cluster, or only prints
_NO_EARLY_WORKERS = ("-h", "--help", "--help-all", "--version", "--dry-run", "--print-config",
                     "--stream", "--scheduler", "--scheduler-file", "--cluster")


def start_workers_early(argv: Sequence[str]) -> None:
    """Before the options are parsed: start the process that local workers are forked from
    (:func:`sfxflow.pipeline.forkserver.start`), unless the command line names another
    cluster, or an option that only prints.

    Parsing takes 0.45 CPU-s (the settings tree imports numba and the algorithms) and the
    server's imports 0.65: begun after parsing, the cluster waited for them. A guess where the
    settings (a ``--config`` file, a ``--preset``) name another cluster after all: that server
    only imports, and exits with the command.
    """
    for arg in argv:
        if arg.split("=", 1)[0] in _NO_EARLY_WORKERS or "cluster." in arg:
            return
    from sfxflow.pipeline import forkserver

    forkserver.start()


def _with_geometry_beside(config: Any, inputs: list[str]) -> Any:
    """``config`` with the geometry file found beside the inputs, if there is one."""
    from dataclasses import replace

    from sfxflow.io.nearby import geometry_beside

    found = geometry_beside(inputs)
    if found:
        return replace(config, io=replace(config.io, geometry=found))
    return config


def _show_cluster(info: Any) -> None:
    """Say where the Dask scheduler (and its dashboard, batch jobs) can be found."""
    if info.scheduler_address:
        print(f"scheduler {info.scheduler_address} ({info.n_workers} workers, "
              f"{info.n_threads} threads)"
              + (f", batch jobs {', '.join(info.job_ids)}" if info.job_ids else "")
              + (f", dashboard {info.dashboard_link}" if info.dashboard_link else ""),
              file=sys.stderr, flush=True)


def _exit_status(result: Any) -> int:
    """Say what is left to do or failed; 0, 1 (blocks or every frame failed) or EXIT_RERUN."""
    left = result.blocks_total - result.blocks_skipped - result.blocks_done - result.blocks_failed
    if not result.complete and left > 0:  # unread blocks are done, for now: said below
        print(f"{left} block(s) left: run the same command again to continue", file=sys.stderr)
    if result.blocks_unread:
        reason = next(iter(result.unread_reasons), "storage unreachable")
        print(f"{result.blocks_unread} block(s) could not be read from storage ({reason}); "
              "run the same command again to read them", file=sys.stderr)
        return EXIT_RERUN
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


def run(args: argparse.Namespace) -> int:
    from sfxflow.cli.options import print_config
    from sfxflow.io.arrow import pyarrow_without_pandas
    from sfxflow.io.storage import storage_options_from
    from sfxflow.pipeline.cluster import start_worker_forkserver
    from sfxflow.pipeline.preflight import preflight

    config = settings(args)
    if args.print_config:
        return print_config(config)
    if args.dry_run:
        from sfxflow.pipeline.cluster import job_script

        if config.cluster.kind not in ("slurm", "sge", "pbs"):
            raise InputError("--dry-run needs --cluster slurm, sge or pbs")
        print(job_script(config.cluster))
        return 0
    args.inputs = [*args.inputs, *args.more_inputs]
    if args.stream:
        return _run_stream(args, config)
    if not args.inputs:
        raise InputError("no INPUT given: name image files, globs, folders or s3:// prefixes")
    if not config.io.geometry:
        config = _with_geometry_beside(config, args.inputs)
    if not args.out:
        raise InputError("--out RUN is required (a folder or s3:// URL for the results)")
    # a local cluster's workers are forked from a process that imports what they need, on the
    # core the client's own start-up leaves idle (most often started before parsing already)
    start_worker_forkserver(config.cluster)
    storage_options = storage_options_from(config.io.endpoint_url or None,
                                           config.io.profile or None)
    pyarrow_without_pandas()  # before the first Arrow array: this process needs no pandas
    # every user error here, in one line with status 2, before any cluster or run directory
    config = preflight(args.inputs, args.out, config, storage_options).config
    # what a run needs past the checks (distributed, the report's page) is imported now
    from sfxflow.pipeline.cluster import closing_in_background
    from sfxflow.pipeline.progress import Progress
    from sfxflow.pipeline.run import run_process
    from sfxflow.pipeline.summary import format_summary
    from sfxflow.report.page import LiveReport

    progress = None
    if not args.no_progress and sys.stderr.isatty():
        progress = Progress(0, stream=sys.stderr, tty=True)

    # the local cluster closes while the summary and the report are written (the report then
    # starts 0.3-0.5 s earlier); the closes are waited for on leaving
    with closing_in_background():
        result = run_process(args.inputs, args.out, config, storage_options=storage_options,
                             force=args.force, progress=progress, on_cluster=_show_cluster,
                             reporter=LiveReport)
    if args.json:
        print(json.dumps(result.summary, indent=1))
    else:
        print(format_summary(result.summary))
        print(f"results in {result.run_url}"
              + (f", report {result.run_url}/report.html" if config.run.report else ""))
    if args.merge and result.complete:
        merge_run(result.run_url, config.cluster, storage_options)
    return _exit_status(result)


def _run_stream(args: argparse.Namespace, config: Any) -> int:
    from sfxflow.pipeline.live import run_live
    from sfxflow.pipeline.summary import format_summary

    if args.inputs:
        raise InputError("give either INPUT files or --stream, not both")
    if not args.out:
        raise InputError("--out RUN is required (a local folder for the spool and results)")

    def show(result: Any) -> None:
        summary = result.last.summary if result.last is not None else {}
        print(f"live: {result.frames_received} frames received, {summary.get('frames', 0)} "
              f"processed, {summary.get('hits', 0)} hits, {summary.get('indexed', 0)} indexed",
              file=sys.stderr, flush=True)

    from sfxflow.report.page import LiveReport

    result = run_live(args.stream, args.out, config, socket_type=args.stream_socket,
                      idle_s=args.stream_idle_s, update_s=args.stream_update_s,
                      max_frames=args.stream_max_frames, on_cycle=show,
                      reporter=LiveReport)
    print(format_summary(result.last.summary))
    print(f"stream {args.stream}: {result.trains_received} trains, {result.frames_received} "
          f"frames received ({result.trains_skipped} trains already spooled), "
          f"{result.frames_spooled} spooled in {result.spool_files} files; results in {args.out}")
    return 0 if result.last.complete else EXIT_RERUN


def merge_run(run_url: str, cluster: Any, storage_options: Any = None) -> Any:
    """``--merge``: merge a finished run into ``RUN/merge`` and print its statistics."""
    from sfxflow.algorithms.merge.scale import MergeParams
    from sfxflow.pipeline.merge import run_merge
    from sfxflow.report.page import write_merge_report

    print(f"merging into {run_url}/merge ...", file=sys.stderr, flush=True)
    merged = run_merge([run_url], f"{run_url}/merge", MergeParams(), cluster,
                       storage_options=storage_options,
                       echo=lambda s: print(s, file=sys.stderr, flush=True))
    merged.reports = write_merge_report(merged.out_url, [run_url],
                                        storage_options=storage_options)
    s = merged.stats
    print(f"merged {s['n_crystals_merged']} of {s['n_crystals_input']} crystals "
          f"({s['space_group']}): {merged.out_url}/merged.mtz")
    print(merged.table)
    for page in merged.reports:  # the run's own page now shows the merged data too
        print(f"report: {page}", file=sys.stderr)
    return merged
