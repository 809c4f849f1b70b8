"""The ``sfxflow`` command line. Thin: each subcommand module parses, validates and calls a library.

Every subcommand module ``sfxflow.cli.<name>`` provides ``HELP`` (one line), ``DESCRIPTION``
(``--help`` text with examples), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from sfxflow import __version__
from sfxflow.cli.options import Parser
from sfxflow.errors import (
    EXIT_RERUN,
    InputError,
    RunDirError,
    StorageUnavailable,
    Terminated,
    clear_pending_interrupt,
    raise_pending_interrupt,
    signal_interrupt,
)

SUBCOMMANDS: dict[str, str] = {
    "demo": "sfxflow.cli.demo",
    "simulate": "sfxflow.cli.simulate",
    "view": "sfxflow.cli.view",
    "find-spots": "sfxflow.cli.find_spots",
    "index": "sfxflow.cli.index",
    "process": "sfxflow.cli.process",
    "merge": "sfxflow.cli.merge",
    "plan": "sfxflow.cli.plan",
    "transfer": "sfxflow.cli.transfer",
    "report": "sfxflow.cli.report",
    "bench": "sfxflow.cli.bench",
}


def _add_verbosity(parser: argparse.ArgumentParser, default: bool) -> None:
    # a subcommand's own -v/-q must not reset what was given before the subcommand
    parser.add_argument("-v", "--verbose", action="count",
                        default=0 if default else argparse.SUPPRESS, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if default else argparse.SUPPRESS,
                        help="only warnings and errors")


def _subcommand_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the program's own
    options, ``-v``, ``-q``, ``--version``, take no value); ``None`` when that is not one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the options of that subcommand alone (the others
    are listed with their one-line help, but their options, whose settings trees import the
    numeric libraries, are not built: ``sfxflow process`` started 0.4 s sooner)."""
    parser = Parser(
        prog="sfxflow",
        description="Serial crystallography processing from a laptop to a cluster to the cloud.",
        epilog="Run 'sfxflow COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"sfxflow {__version__}")
    _add_verbosity(parser, default=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or name == only:
            module.add_arguments(p)
            _add_verbosity(p, default=False)
        p.set_defaults(_run=module.run)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactUrls) for f in handler.filters):
            handler.addFilter(_RedactUrls())
    # distributed sets its own logger levels from dask's config when first imported (here, by
    # the cluster layer or dask-jobqueue; and in every worker process this one starts), which
    # would undo the setLevel below; the environment reaches all of them.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose > 0 else "warning")
    # werkzeug logs every request of a local moto S3 server (benchmarks) unless told otherwise
    for noisy in ("distributed", "botocore", "s3fs", "aiobotocore", "fsspec", "numba", "asyncio",
                  "werkzeug", "moto"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class _RedactUrls(logging.Filter):
    """Replace ``user:password@`` in every URL of a log line (ours or a library's) by ``***@``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from sfxflow.io.storage import redact_urls

        message = record.getMessage()
        clean = redact_urls(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _raise_terminated(signum: int, frame: object) -> None:
    signal_interrupt(Terminated())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit status: 0 success, 1 blocks failed, 2 user error,
    75 (:data:`~sfxflow.errors.EXIT_RERUN`) work left for a rerun (storage unreachable, run
    directory unwritable), 130 interrupted, 143 terminated (SIGTERM)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    clear_pending_interrupt()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    from sfxflow.io.storage import redact_urls

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _subcommand_in(argv)
    if command == "process":  # its local workers' imports begin beside the parsing
        from sfxflow.cli.process import start_workers_early

        start_workers_early(argv)
    parser = build_parser(only=command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad option (one line, status 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _configure_logging(args.verbose, args.quiet)
    for note in getattr(args, "_deprecated", []):
        logging.getLogger("sfxflow.cli").warning(note)
    try:
        status = int(args._run(args) or 0)
        raise_pending_interrupt()  # a SIGTERM swallowed on the way still ends the run as one
        return status
    except (RunDirError, StorageUnavailable) as exc:
        hint = "" if isinstance(exc, RunDirError) else "; run the same command again to resume"
        print(f"sfxflow {args.command}: error: {redact_urls(str(exc))}{hint}", file=sys.stderr)
        return EXIT_RERUN
    except InputError as exc:
        print(f"sfxflow {args.command}: error: {redact_urls(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"sfxflow {args.command}: {how}; run the same command again to resume",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def command() -> int:
    """The ``sfxflow`` program (console script and ``python -m sfxflow``): :func:`main`, then
    the process's objects frozen out of the garbage collector (:func:`gc.freeze`), so that the
    interpreter's exit does not walk them all once more; a run's client holds millions (numba,
    matplotlib, distributed) and its exit took 0.6 s of the command. Not in :func:`main`: tests
    call that in-process and go on."""
    import gc

    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(command())
