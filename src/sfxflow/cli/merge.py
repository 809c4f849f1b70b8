"""``sfxflow merge``: scale, post-refine and merge integrated stills into an MTZ with statistics."""

from __future__ import annotations

import argparse
import sys

from sfxflow.errors import InputError

HELP = "merge integrated stills (run directories, CrystFEL streams) into an MTZ with statistics"
DESCRIPTION = HELP + """

INPUT is an sfxflow run directory (local or s3://, its shards/*.reflections.parquet) or a
CrystFEL stream with integrated reflections. Writes OUT/merged.mtz (IMEAN SIGIMEAN I(+) SIGI(+)
I(-) SIGI(-) N), OUT/merged.hkl (CrystFEL reflection list) with its two half-data sets
OUT/merged.hkl1 and OUT/merged.hkl2 (for compare_hkl), OUT/scaled/*.parquet (scaled
observations), OUT/crystals.parquet (per-crystal scale, B, profile, rejections) and
OUT/stats.json, and prints the statistics per resolution shell (with the number of half-set
pairs behind each CC1/2; '-' where fewer than 20) and a resolution estimate: where CC1/2 falls
to 0.3 (tanh fit, as dials.estimate_resolution) and <I/sigma> to 1. --d-min-a cuts the merged
data and the statistics at a resolution.

The space group is never guessed: --space-group, else the one every input records (a run
directory's config.toml, the unit cell block of a stream sfxflow wrote); CrystFEL's own
streams record none. --point-group is enough to merge: the merge then runs, and the MTZ is
written, in the symmorphic space group of that point group on the inputs' lattice (e.g.
622 on a primitive hexagonal lattice: P 6 2 2), so no reflection is taken as absent. The
merged cell is the mean of the crystals' cells made to fit the space group.

Runs on Dask like `process`: a local cluster by default, --scheduler to join one (or
'synchronous' to run in this process), --cluster slurm|sge|pbs for a batch system.

Examples:
  sfxflow merge results/run1 --out results/run1/merge
  sfxflow merge run.stream --out merged        # a stream sfxflow wrote records its group
  sfxflow merge test.stream --space-group C2221 --out merged --model unity
  sfxflow merge test.stream --point-group mmm --out merged   # merged in C 2 2 2
  sfxflow merge s3://bucket/run7 --endpoint-url http://127.0.0.1:9000 --out s3://bucket/merge7
  sfxflow merge sim-run --truth reference.mtz --out m --iterations 6 --set merge.min_cc=0.1
  sfxflow merge results/run1 --out results/run1/merge-2.7A --d-min-a 2.7
  sfxflow merge run1 --out m --scheduler tcp://node1:8786 --print-config
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sfxflow.cli.options import add_settings
    from sfxflow.pipeline.config import MergeConfig

    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="sfxflow run directories (local or s3://) and CrystFEL .stream files")
    parser.add_argument("--out", "-o", metavar="DIR",
                        help="folder (or s3:// URL) for the merged data and statistics")
    m = parser.add_argument_group("the merged data")
    m.add_argument("--space-group", metavar="SG",
                   help="space group (default: the one the inputs record; never guessed)")
    m.add_argument("--point-group", metavar="PG",
                   help="merge in a point group instead (622, 6/mmm: no systematic absences; "
                        "the MTZ records its symmorphic group on the inputs' lattice, P 6 2 2)")
    m.add_argument("--cell", metavar='"a b c al be ga"',
                   help="unit cell of the merged data (default: mean of the crystals' cells, "
                        "made to fit the space group)")
    m.add_argument("--truth", metavar="MTZ",
                   help="true intensities (simulated data): adds CC to the truth")
    st = parser.add_argument_group("storage")
    st.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, Ceph)")
    st.add_argument("--profile", metavar="NAME", help="AWS profile")
    add_settings(parser, MergeConfig, short={"--highres": "merge.d_min_a"},
                 aliases={"--worker-timeout": "cluster.worker_timeout_s"},  # as in process
                 essential=("merge.model", "merge.iterations", "merge.d_min_a", "cluster.kind",
                            "cluster.n_workers", "cluster.scheduler"))
    parser.add_argument("--json", action="store_true", help="print stats.json to stdout")


def run(args: argparse.Namespace) -> int:
    from sfxflow.cli.options import print_config, settings_from
    from sfxflow.io.storage import storage_options_from
    from sfxflow.pipeline.config import MergeConfig
    from sfxflow.pipeline.merge import run_merge

    config = settings_from(args, MergeConfig)
    if args.print_config:
        return print_config(config)
    if not args.inputs:
        raise InputError("no INPUT given: name sfxflow run directories or CrystFEL streams")
    if not args.out:
        raise InputError("--out DIR is required (a folder or s3:// URL for the merged data)")
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
    if args.space_group and args.point_group:
        raise InputError(f"give --space-group ({args.space_group}) or --point-group "
                         f"({args.point_group}), not both")
    if args.space_group:
        from sfxflow.models import as_space_group

        try:
            as_space_group(args.space_group)
        except ValueError:
            raise InputError(f"--space-group {args.space_group!r}: not a known space group "
                             "(expected e.g. P43212, 'P 41 21 2' or 96; a point group such "
                             "as 422 goes to --point-group)") from None
    if args.point_group:
        from sfxflow.algorithms.merge.cell import merge_space_group

        try:  # the lattice comes from the inputs; this checks the symbol only
            merge_space_group(args.point_group, "P", "triclinic")
        except ValueError as exc:
            if "expected a chiral" in str(exc):
                raise InputError(f"--point-group {args.point_group!r}: {exc}") from None
    storage_options = storage_options_from(args.endpoint_url, args.profile)
    result = run_merge(args.inputs, args.out, config.merge, config.cluster, cell=args.cell,
                       space_group=args.space_group, point_group=args.point_group, truth=truth,
                       storage_options=storage_options,
                       echo=lambda s: print(s, file=sys.stderr, flush=True))
    from sfxflow.report.page import write_merge_report

    result.reports = write_merge_report(result.out_url, args.inputs,
                                        storage_options=storage_options)
    for page in result.reports:
        print(f"report: {page}", file=sys.stderr)
    if args.json:
        # the file as written: valid JSON (null, not NaN, for what cannot be computed)
        from sfxflow.io.results import RunDir

        print(RunDir(result.out_url, storage_options).read_text("stats.json"), end="")
        return 0
    s = result.stats
    print(f"{s['n_crystals_merged']} of {s['n_crystals_input']} crystals merged ({s['model']}); "
          f"{s['space_group']}, Wilson B {s['wilson']['b_a2']:.1f} A^2; rejected: "
          + (", ".join(f"{k} {v}" for k, v in s["rejected"].items() if v) or "none"))
    print(result.table)
    print(f"merged data in {result.out_url}/merged.mtz, statistics in {result.out_url}/stats.json")
    return 0
