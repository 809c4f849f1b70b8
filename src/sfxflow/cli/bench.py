"""``sfxflow bench NAME``: benchmarks that print figures (medians of many runs)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

BENCHMARKS: dict[str, str] = {
    "simulate": "sfxflow.benchmarks.simulate",
    "decode": "sfxflow.benchmarks.decode",
    "spots": "sfxflow.benchmarks.spots",
    "index": "sfxflow.benchmarks.index",
    "integrate": "sfxflow.benchmarks.integrate",
    "process": "sfxflow.benchmarks.process",
    "merge": "sfxflow.benchmarks.merge",
    "report": "sfxflow.benchmarks.report",
    "faults": "sfxflow.benchmarks.faults",
}
#: minutes of real faults, not a speed figure: run on its own, not by 'all'
NOT_IN_ALL = ("faults",)

HELP = ("benchmark a stage (simulate, decode, spots, index, integrate, process, merge, report, or all) "
        "and print figures; 'faults' prints the fault matrix")
DESCRIPTION = HELP + """

'all' runs every benchmark in turn with its default options (what 'make bench' does), except
'faults' (the reliability figures: real kills and storage faults, a few minutes).

Examples:
  sfxflow bench spots --frames 50
  sfxflow bench index
  sfxflow bench all
  sfxflow bench faults
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, module_name in BENCHMARKS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)
        parsers[name] = p
    p_all = sub.add_parser("all", help="every benchmark above with its defaults, in turn")
    p_all.set_defaults(_bench_run=lambda _args: _run_all(parsers))


def _run_all(parsers: dict[str, argparse.ArgumentParser]) -> int:
    worst = 0
    for name, p in parsers.items():
        if name in NOT_IN_ALL:
            continue
        print(f"===== sfxflow bench {name}", flush=True)
        args = p.parse_args([])
        worst = max(worst, int(args._bench_run(args) or 0))
    return worst


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
