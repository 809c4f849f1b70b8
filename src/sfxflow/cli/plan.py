"""``sfxflow plan``: predicted wall time, spread, TB/h and cost for instance types x node counts."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sfxflow.cli.options import deprecated, number
from sfxflow.cost.catalogue import Catalogue, Instance, load_catalogue
from sfxflow.cost.model import (
    GB,
    TB,
    TIB,
    Measurement,
    PlanParams,
    PlanRow,
    measurement_from_summary,
    plan_run,
    split_units,
    storage_cost_per_month,
    transfer_time_s,
)
from sfxflow.errors import ConfigError, InputError

log = logging.getLogger(__name__)

HELP = "predict wall time, TB/h and cost for instance types and node counts (cost planner)"
DESCRIPTION = HELP + """

Per-frame cost comes from a run's summary.json (measured on the machine that ran it) or is
given; data size in TB (10^12 bytes), TiB, or frames. Units of work (files of --file-gb, --files
equal files, or blocks of --frames-per-block) are scheduled onto the nodes by a simulator: static
(largest first from per-unit estimates, as Poon et al. 2017 did) or dynamic (pull). Costs are
node-hours x price (+ EBS root volume); S3 storage is shown per month separately.
Instance prices of current types in the shipped catalogue are PLACEHOLDERS (marked *): check them
and pass --price-usd-per-hour NAME=USD or --catalogue my.toml.

Examples:
  # Poon et al. 2017, Table 2: 15.5 TiB in 3,303 files, per-byte cost from the c3 16-node row
  sfxflow plan --tib 15.5 --files 3303 --core-seconds-per-gb 5691 --measured-on c3.8xlarge \\
      --instances c3.8xlarge,c4.8xlarge,m4.10xlarge --nodes 16,32,64 --spread-cv 0.2 \\
      --bandwidth-gbit 1.33 --upload-gbit 2.0 --s3-usd-per-gib-month 0.03
  # from a measured run on this machine, 2 million frames, 1000-frame blocks, pull schedule
  sfxflow plan --summary run1/summary.json --frames 2000000 --frames-per-block 1000 \\
      --schedule dynamic --instances c7i.8xlarge --price-usd-per-hour c7i.8xlarge=0.55
  # scaling: TB/h vs node count up to 2048 nodes
  sfxflow plan --tb 100 --core-seconds-per-frame 0.8 --bytes-per-frame 4.6e6 --scaling
  sfxflow plan --list
"""

DEFAULT_NODES = "16,32,64"
SCALING_NODES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _price(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        price = float(value)
    except ValueError:
        price = -1.0
    if not sep or not name or price < 0 or not math.isfinite(price):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=USD_PER_HOUR, e.g. "
                                         "c7i.8xlarge=0.55")
    return name, price


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    size = data.add_mutually_exclusive_group()
    number(size, "--tb", gt=0, le=1e9, help="data size in TB (10^12 bytes)")
    number(size, "--tib", gt=0, le=1e9, help="data size in TiB (2^40 bytes); rates in TiB/h")
    number(size, "--frames", kind=int, ge=1, le=10**13,
           help="number of frames (needs bytes per frame)")
    number(data, "--bytes-per-frame", gt=0, le=1e12,
           help="stored bytes per frame (default: from --summary)")
    units = data.add_mutually_exclusive_group()
    number(units, "--file-gb", gt=0, le=1e6, help="work unit = a file of this many GB (default 5)")
    number(units, "--files", kind=int, ge=1, le=10_000_000,
           help="work units = this many equal files")
    block = number(units, "--frames-per-block", kind=int, ge=1, le=10**9,
                   help="work unit = a block of this many frames (as process --frames-per-block)")
    deprecated(parser, "--block-frames", block.dest, "--frames-per-block", kind=block.type)

    cost = parser.add_argument_group("per-frame cost")
    how = cost.add_mutually_exclusive_group()
    how.add_argument("--summary", help="a run's summary.json (local path or URL)")
    number(how, "--core-seconds-per-frame", gt=0, le=1e6,
           help="CPU-seconds per frame on the measuring machine")
    number(how, "--core-seconds-per-gb", gt=0, le=1e9,
           help="CPU-seconds per GB (10^9 bytes) on the measuring machine")
    number(cost, "--hit-fraction", ge=0, le=1,
           help="expected hit fraction (scales hit-only stages; default: measured)")
    speed = cost.add_mutually_exclusive_group()
    speed.add_argument("--measured-on", metavar="INSTANCE",
                       help="catalogue instance type the cost was measured on")
    number(speed, "--measured-speed", default=1.0, gt=0, le=100,
           help="vCPU speed of the measuring machine relative to the catalogue reference "
                "(default 1.0)")

    run = parser.add_argument_group("cluster and schedule")
    run.add_argument("--instances", help="comma-separated instance types (default: all)")
    run.add_argument("--nodes", type=_int_list, default=None,
                     help=f"comma-separated node counts (default {DEFAULT_NODES})")
    run.add_argument("--scaling", action="store_true",
                     help=f"print TB/h vs node count ({SCALING_NODES[0]}..{SCALING_NODES[-1]} "
                          "unless --nodes)")
    run.add_argument("--schedule", choices=["static", "dynamic"], default="static")
    spread = number(run, "--spread-cv", default=0.0, ge=0, le=10,
                    help="coefficient of variation of per-unit time (e.g. 0.2)")
    deprecated(parser, "--spread", spread.dest, "--spread-cv", kind=spread.type)
    error = number(run, "--estimate-error-cv", default=0.0, ge=0, le=10,
                   help="error (CV) of the static schedule's per-unit estimates")
    deprecated(parser, "--estimate-error", error.dest, "--estimate-error-cv", kind=error.type)
    where = run.add_mutually_exclusive_group()
    number(where, "--bandwidth-gbit", gt=0, le=1e5,
           help="per-node download bandwidth from object storage, Gbit/s (default: each "
                "instance's network_gbit from the catalogue; Poon et al. 2017 measured 1.33 per "
                "node: 5 GB in 30 s)")
    where.add_argument("--data-local", action="store_true",
                       help="the data is already on the nodes (e.g. an HPC parallel file "
                            "system): no download time")
    run.add_argument("--no-prefetch", action="store_true",
                     help="do not overlap downloading the next unit with computing")
    number(run, "--startup-s", default=0.0, ge=0, le=86_400, help="node boot time, billed")
    number(run, "--seed", kind=int, default=0, ge=0, le=2**32 - 1,
           help="seed of the per-unit variation")

    money = parser.add_argument_group("prices")
    money.add_argument("--catalogue", help="TOML file overriding/extending the instance catalogue")
    money.add_argument("--price-usd-per-hour", dest="price", type=_price, action="append",
                       default=[], metavar="NAME=USD",
                       help="node price per hour (e.g. today's spot price)")
    deprecated(parser, "--price", "price", "--price-usd-per-hour NAME=USD", kind=_price,
               append=True)
    s3 = number(money, "--s3-usd-per-gib-month", ge=0, le=1000,
                help="S3 storage price, US$ per GiB-month (default: the catalogue's)")
    deprecated(parser, "--s3-price", s3.dest, "--s3-usd-per-gib-month", kind=s3.type)
    number(money, "--upload-gbit", default=10.0, gt=0, le=1e5,
           help="bandwidth for moving the data into object storage (default 10)")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")


def _catalogue(args: argparse.Namespace) -> Catalogue:
    if args.catalogue is None:
        return load_catalogue()
    path = Path(args.catalogue)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalogue ({exc.strerror}); expected a "
                          "TOML file") from None
    return load_catalogue(text, str(path))


def _read_summary(url: str) -> dict[str, Any]:
    from sfxflow.io.storage import read_bytes

    raw = read_bytes(url)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{url}: not a JSON summary ({exc}); expected summary.json from "
                          "'sfxflow process'") from None


def _measurement(args: argparse.Namespace, cat: Catalogue) -> Measurement:
    speed = cat[args.measured_on].vcpu_speed if args.measured_on else args.measured_speed
    if not speed > 0:
        raise InputError(f"--measured-speed {speed}; expected > 0")
    if args.summary:
        m = measurement_from_summary(_read_summary(args.summary), args.summary, speed)
        if args.bytes_per_frame:
            m = replace(m, bytes_per_frame=args.bytes_per_frame)
        return m
    if args.core_seconds_per_frame is not None:
        return Measurement(args.core_seconds_per_frame, bytes_per_frame=args.bytes_per_frame,
                           vcpu_speed=speed, source="--core-seconds-per-frame")
    if args.core_seconds_per_gb is not None:
        if not args.core_seconds_per_gb > 0:
            raise InputError(f"--core-seconds-per-gb {args.core_seconds_per_gb}; expected > 0")
        bpf = args.bytes_per_frame or GB  # frames are irrelevant here: cost is per byte
        return Measurement(args.core_seconds_per_gb * bpf / GB, bytes_per_frame=bpf,
                           vcpu_speed=speed, source="--core-seconds-per-gb")
    raise InputError("no per-frame cost: give --summary RUN/summary.json, "
                     "--core-seconds-per-frame or --core-seconds-per-gb")


def _data(args: argparse.Namespace, m: Measurement) -> tuple[float, float, str]:
    """(total bytes, bytes of one TB for display, unit name)."""
    if args.tib is not None:
        total, tb_bytes, unit = args.tib * TIB, TIB, "TiB"
    elif args.tb is not None:
        total, tb_bytes, unit = args.tb * TB, TB, "TB"
    elif args.frames is not None:
        if m.bytes_per_frame is None:
            raise InputError("--frames needs bytes per frame: give --bytes-per-frame or a "
                             "--summary with bytes_per_frame")
        if args.frames < 1:
            raise InputError(f"--frames {args.frames}; expected >= 1")
        total, tb_bytes, unit = args.frames * m.bytes_per_frame, TB, "TB"
    else:
        raise InputError("no data size: give --tb, --tib or --frames")
    if not total > 0:
        raise InputError(f"data size {total} bytes; expected > 0")
    return total, tb_bytes, unit


#: more units of work than this would take the simulator minutes and gigabytes of memory
MAX_UNITS = 10_000_000


def _units(args: argparse.Namespace, total: float, m: Measurement) -> Any:
    if args.files is not None:
        return split_units(total, n_units=args.files)
    if args.frames_per_block is not None:
        if m.bytes_per_frame is None:
            raise InputError("--frames-per-block needs bytes per frame (--bytes-per-frame or "
                             "--summary)")
        unit, option = args.frames_per_block * m.bytes_per_frame, "--frames-per-block"
    else:
        unit, option = (5.0 if args.file_gb is None else args.file_gb) * GB, "--file-gb"
    if total / unit > MAX_UNITS:
        raise InputError(f"{total / unit:.3g} units of work ({total:.3g} bytes in units of "
                         f"{unit:.3g} bytes); expected at most {MAX_UNITS:,}: give a larger "
                         f"{option} or a smaller data size")
    return split_units(total, unit_bytes=unit)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:,.0f}"


def _print_table(rows: list[PlanRow], tb_bytes: float, unit: str, scaling: bool) -> None:
    if scaling:
        head = (f"{'instance':<16}{'nodes':>7}{'units/node':>11}{'wall (s)':>12}"
                f"{f'{unit}/h':>11}{'efficiency':>11}{'cost ($)':>12}")
    else:
        head = (f"{'instance':<16}{'nodes':>7}{'mean (s)':>12}{'sigma (s)':>10}"
                f"{'spread (s)':>11}{'wall (s)':>12}{f'{unit}/h':>11}{'node-h':>10}"
                f"{'cost ($)':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        name = r.instance + ("*" if r.placeholder else "")
        if scaling:
            print(f"{name:<16}{r.n_nodes:>7}{r.n_units / r.n_nodes:>11.1f}"
                  f"{_fmt_s(r.makespan_s):>12}{r.rate_tb_per_h(tb_bytes):>11,.3f}"
                  f"{r.efficiency:>11.3f}{r.cost_usd:>12,.2f}")
        else:
            print(f"{name:<16}{r.n_nodes:>7}{_fmt_s(r.mean_s):>12}{_fmt_s(r.sigma_s):>10}"
                  f"{_fmt_s(r.spread_s):>11}{_fmt_s(r.makespan_s):>12}"
                  f"{r.rate_tb_per_h(tb_bytes):>11,.3f}{r.node_hours:>10,.1f}{r.cost_usd:>12,.2f}")


def _list(cat: Catalogue) -> int:
    print(f"catalogue: {' + '.join(cat.sources)}; reference vCPU: {cat.reference}; "
          f"S3 ${cat.s3_price_per_gb_month}/GB-month, EBS ${cat.ebs_price_per_gb_month}/GB-month")
    print(f"{'instance':<16}{'vCPU':>5}{'speed':>7}{'$/h':>8}{'root GB':>8}  cpu / price source")
    for name in cat.names():
        i = cat[name]
        mark = "*" if i.placeholder else " "
        print(f"{name + mark:<16}{i.vcpus:>5}{i.vcpu_speed:>7.3f}{i.price_per_hour:>8.3f}"
              f"{i.root_volume_gb:>8.0f}  {i.cpu}; {i.price_source}")
    print("* placeholder price and/or speed: check before use")
    return 0


def _with_bandwidth(params: PlanParams, inst: Instance, args: argparse.Namespace) -> PlanParams:
    """Per-node download bandwidth: the option, none for local data, else the instance's NIC."""
    if args.data_local or args.bandwidth_gbit is not None or inst.network_gbit is None:
        return params
    return replace(params, bandwidth_gbit=float(inst.network_gbit))


def _bandwidth_text(args: argparse.Namespace) -> str:
    if args.data_local:
        return "none (data local to the nodes)"
    if args.bandwidth_gbit is not None:
        return f"{args.bandwidth_gbit:g} Gbit/s per node"
    return "at each instance's catalogue network_gbit per node"


def run(args: argparse.Namespace) -> int:
    cat = _catalogue(args)
    if args.list:
        return _list(cat)
    prices = dict(args.price)
    for name in prices:
        _ = cat[name]  # raises ConfigError naming the choices
    names = [n.strip() for n in args.instances.split(",")] if args.instances else cat.names()
    instances = [cat[n] for n in names if n]
    m = _measurement(args, cat)
    total, tb_bytes, unit = _data(args, m)
    units = _units(args, total, m)
    params = PlanParams(
        core_seconds_per_byte=m.reference_core_seconds_per_byte(args.hit_fraction),
        bandwidth_gbit=args.bandwidth_gbit,
        prefetch=not args.no_prefetch,
        policy=args.schedule,
        spread_cv=args.spread_cv,
        estimate_cv=args.estimate_error_cv,
        startup_s=args.startup_s,
        seed=args.seed,
        prices=prices,
    )
    nodes = args.nodes or (SCALING_NODES if args.scaling else _int_list(DEFAULT_NODES))
    t0 = time.perf_counter()
    rows = [plan_run(inst, n, units, _with_bandwidth(params, inst, args), cat)[0]
            for inst in instances for n in nodes]
    sim_s = time.perf_counter() - t0
    s3_price = cat.s3_price_per_gb_month if args.s3_usd_per_gib_month is None else args.s3_usd_per_gib_month
    if args.json:
        for r in rows:
            d = asdict(r)
            d[f"rate_{unit.lower()}_per_h"] = r.rate_tb_per_h(tb_bytes)
            print(json.dumps(d, default=str))
        return 0
    per_gb = params.core_seconds_per_byte * GB / m.vcpu_speed
    per_frame = (f" = {m.core_seconds_per_frame_at(args.hit_fraction):.4g} core-s/frame"
                 if m.source != "--core-seconds-per-gb" else "")
    print(f"data: {total / tb_bytes:,.3f} {unit} in {units.size:,} units of "
          f"{units.max() / GB:,.2f} GB; {per_gb:.4g} core-s/GB{per_frame} from {m.source} "
          f"(measuring vCPU speed {m.vcpu_speed:.3g} x {cat.reference}); "
          f"schedule {params.policy.value}, prefetch {'on' if params.prefetch else 'off'}; "
          f"download {_bandwidth_text(args)}")
    _print_table(rows, tb_bytes, unit, args.scaling)
    if any(r.placeholder for r in rows):
        print("* placeholder price/speed from the catalogue: check it, then "
              "--price-usd-per-hour NAME=USD")
    print(f"moving the data into object storage at {args.upload_gbit:g} Gbit/s: "
          f"{transfer_time_s(total, args.upload_gbit) / 3600:,.1f} h; "
          f"S3 storage at ${s3_price:g}/GB-month: "
          f"${storage_cost_per_month(total, s3_price):,.2f} per month (not in the costs above)")
    print(f"simulated {len(rows)} runs of {units.size:,} units in {sim_s:.2f} s",
          file=sys.stderr)
    return 0
