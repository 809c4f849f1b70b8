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
}

HELP = "benchmark a stage (simulate, decode, spots, index, integrate, process) and print figures"
DESCRIPTION = HELP + """

Examples:
  sfxflow bench spots --frames 50
  sfxflow bench index
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
