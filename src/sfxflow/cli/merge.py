"""``sfxflow merge``: scale, post-refine and merge integrated stills into an MTZ with statistics."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

from sfxflow.errors import InputError

HELP = "merge integrated stills (run directories, CrystFEL streams) into an MTZ with statistics"
DESCRIPTION = HELP + """

INPUT is an sfxflow run directory (local or s3://, its shards/*.reflections.parquet) or a
CrystFEL stream with integrated reflections. Writes OUT/merged.mtz (IMEAN SIGIMEAN I(+) SIGI(+)
I(-) SIGI(-) N), OUT/merged.hkl (CrystFEL reflection list), OUT/scaled/*.parquet (scaled
observations), OUT/crystals.parquet (per-crystal scale, B, profile, rejections) and
OUT/stats.json, and prints the statistics per resolution shell.

Runs on Dask like `process`: a local cluster by default, --scheduler to join one (or
'synchronous' to run in this process), --cluster slurm|sge|pbs for a batch system.

Examples:
  sfxflow merge results/run1 --out results/run1/merge
  sfxflow merge run.stream --space-group C222 --out merged --model unity
  sfxflow merge s3://bucket/run7 --endpoint-url http://127.0.0.1:9000 --out s3://bucket/merge7
  sfxflow merge sim-run --truth reference.mtz --out m --set iterations=6 --set min_cc=0.1
"""


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Where to run: the same options as ``sfxflow process``."""
    cl = parser.add_argument_group("where to run")
    cl.add_argument("--scheduler", metavar="ADDRESS",
                    help="join a running Dask scheduler (tcp://host:8786), or 'synchronous' "
                         "to run serially in this process without Dask")
    cl.add_argument("--workers", type=int, metavar="N",
                    help="local worker processes (default: one per core)")
    cl.add_argument("--cluster", choices=("local", "slurm", "sge", "pbs"),
                    help="start workers through a batch system (dask-jobqueue)")
    for opt, text in (("--queue", "batch queue / partition"), ("--account", "batch account"),
                      ("--walltime", "batch job wall time (HH:MM:SS)"),
                      ("--memory", "memory per batch job (e.g. 64GB)"),
                      ("--interface", "network interface for workers (e.g. ib0)"),
                      ("--container-image", "run batch workers in this Apptainer/Shifter image")):
        cl.add_argument(opt, help=text)
    cl.add_argument("--cores", type=int, help="cores per batch job")
    cl.add_argument("--jobs", type=int, help="batch jobs to submit")
    cl.add_argument("--container-runtime", choices=("apptainer", "singularity", "shifter"))


def cluster_config(args: argparse.Namespace) -> Any:
    """The :class:`~sfxflow.pipeline.config.ClusterConfig` of the options."""
    from sfxflow.pipeline.config import ClusterConfig

    values: dict[str, Any] = {}
    if args.scheduler:
        if args.cluster:
            raise InputError("give either --scheduler or --cluster, not both")
        if args.scheduler == "synchronous":
            values["kind"] = "synchronous"
        elif ":" in args.scheduler:
            values["scheduler"] = args.scheduler
        else:
            raise InputError(f"--scheduler {args.scheduler!r}: expected tcp://host:port or "
                             "'synchronous'")
    if args.cluster:
        values["kind"] = args.cluster
    for opt, key in (("workers", "n_workers"), ("queue", "queue"), ("account", "account"),
                     ("walltime", "walltime"), ("cores", "cores"), ("memory", "memory"),
                     ("jobs", "jobs"), ("interface", "interface"),
                     ("container_image", "container_image"),
                     ("container_runtime", "container_runtime")):
        if getattr(args, opt, None) is not None:
            values[key] = getattr(args, opt)
    return ClusterConfig(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="sfxflow run directories (local or s3://) and CrystFEL .stream files")
    parser.add_argument("--out", "-o", required=True, metavar="DIR",
                        help="folder (or s3:// URL) for the merged data and statistics")
    m = parser.add_argument_group("merging")
    m.add_argument("--model", choices=("unity", "partiality"),
                   help="partiality model: unity (scale and B only) or partiality "
                        "(post-refined profile radius and mosaicity; the default)")
    m.add_argument("--iterations", type=int, metavar="N", help="scaling cycles (default 4)")
    m.add_argument("--d-min-a", "--highres", type=float, dest="d_min_a", metavar="D",
                   help="high-resolution limit in A (default: all observations)")
    m.add_argument("--space-group", metavar="SG", help="space group (default: from the inputs)")
    m.add_argument("--cell", metavar='"a b c al be ga"',
                   help="unit cell of the merged data (default: median of the crystals)")
    m.add_argument("--no-ambiguity", action="store_true",
                   help="do not resolve an indexing ambiguity")
    m.add_argument("--truth", metavar="MTZ",
                   help="true intensities (simulated data): adds CC to the truth")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any merge parameter (see MergeParams), repeatable")
    st = parser.add_argument_group("storage")
    st.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, Ceph)")
    st.add_argument("--profile", metavar="NAME", help="AWS profile")
    add_cluster_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print stats.json to stdout")


def _convert(name: str, kind: Any, text: str) -> Any:
    try:
        if kind is bool or kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
        if "tuple" in str(kind):
            return tuple(float(x) for x in text.replace(",", " ").split())
        return text
    except ValueError:
        raise InputError(f"--set {name}={text!r}: expected a {getattr(kind, '__name__', kind)}"
                         ) from None


def build_params(args: argparse.Namespace) -> Any:
    """MergeParams from the options (user errors raise InputError)."""
    from sfxflow.algorithms.merge.scale import MergeParams

    hints = typing.get_type_hints(MergeParams)
    values: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("merge.")
        if not sep or key not in hints:
            raise InputError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(hints)}")
        values[key] = _convert(key, hints[key], text.strip())
    for opt in ("model", "iterations", "d_min_a"):
        if getattr(args, opt) is not None:
            values[opt] = getattr(args, opt)
    if args.no_ambiguity:
        values["resolve_ambiguity"] = False
    try:
        return dataclasses.replace(MergeParams(), **values)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from sfxflow.io.storage import storage_options_from
    from sfxflow.pipeline.merge import run_merge

    params = build_params(args)
    cluster = cluster_config(args)
    truth = None
    if args.truth:
        from sfxflow.algorithms.simulate_physical import TrueIntensities
        from sfxflow.io.mtz import read_intensity_columns

        truth = TrueIntensities.from_arrays(*read_intensity_columns(args.truth))
    if args.cell:
        from sfxflow.models import as_unit_cell

        try:
            as_unit_cell(args.cell)
        except ValueError as exc:
            raise InputError(f"--cell {args.cell!r}: {exc}") from None
    if args.space_group:
        from sfxflow.models import as_space_group

        try:
            as_space_group(args.space_group)
        except ValueError:
            raise InputError(f"--space-group {args.space_group!r}: not a known space group "
                             "(expected e.g. P43212, 'P 41 21 2' or 96)") from None
    storage_options = storage_options_from(args.endpoint_url, args.profile)
    result = run_merge(args.inputs, args.out, params, cluster, cell=args.cell,
                       space_group=args.space_group, truth=truth,
                       storage_options=storage_options,
                       echo=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.stats, indent=1, default=str))
        return 0
    s = result.stats
    print(f"{s['n_crystals_merged']} of {s['n_crystals_input']} crystals merged ({s['model']}); "
          f"{s['space_group']}, Wilson B {s['wilson']['b_a2']:.1f} A^2; rejected: "
          + (", ".join(f"{k} {v}" for k, v in s["rejected"].items() if v) or "none"))
    print(result.table)
    print(f"merged data in {result.out_url}/merged.mtz, statistics in {result.out_url}/stats.json")
    return 0
