"""``sfxflow transfer``: verified, resumable, parallel copy between local storage and S3."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from sfxflow.cli.options import Parser, deprecated, number
from sfxflow.errors import InputError
from sfxflow.io.storage import filesystem, is_local, local_path, storage_options_from
from sfxflow.io.transfer import DEFAULT_PART_SIZE, TransferReport, transfer
from sfxflow.pipeline.progress import LiveLine

log = logging.getLogger(__name__)

HELP = "copy files to/from S3 in parallel, verifying checksums and resuming (like aws s3 cp)"
DESCRIPTION = HELP + """

Uploads: SRC are local files or folders (a folder's contents keep their relative names), DST is
s3://BUCKET/PREFIX. Downloads: SRC are s3:// objects or prefixes, DST a local folder. Every
object is verified (per-part MD5 / ETag, SHA-256 in x-amz-meta-sha256 and in the manifest
_sfxflow_transfer.json written under the prefix); objects already present and verified are
skipped, so re-running an interrupted transfer only sends what is missing or wrong. The endpoint
comes from --endpoint-url or the AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, instance role);
credentials are never printed. Exit status 1 when any file failed.

Examples:
  sfxflow transfer run_data/ s3://my-bucket/lcls/cxid9114/ --streams 16
  sfxflow transfer run_data/ s3://my-bucket/lcls/ --hash-prefix      # spread keys over partitions
  sfxflow transfer s3://my-bucket/lcls/cxid9114/ ./restore/ --verify etag
  sfxflow transfer run_data/ s3://my-bucket/scratch/ --compare-awscli --repeat 3

--compare-awscli uploads SRC with this command and with 'aws s3 cp --recursive', each run as a
separate process timed from start to exit (so both pay their start-up), alternating which goes
first, --repeat times; the scratch copies are deleted after each round. It prints every round
and the medians.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="one or more sources (SRC...), then the destination (DST)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS settings)")
    parser.add_argument("--profile", help="AWS profile name")
    number(parser, "--streams", kind=int, default=10, ge=1, le=1024,
           help="concurrent requests (default 10, as aws s3 cp)")
    part = number(parser, "--part-size-mib", default=DEFAULT_PART_SIZE / 2**20, ge=5, le=5120,
                  help=f"multipart part size in MiB (default {DEFAULT_PART_SIZE // 2**20}; S3 "
                       "takes 5 MiB to 5 GiB)")
    deprecated(parser, "--part-size-mb", part.dest, "--part-size-mib", kind=part.type)
    parser.add_argument("--hash-prefix", action="store_true",
                        help="upload to PREFIX/<hash of name>/name (names kept in the manifest)")
    parser.add_argument("--verify", choices=["etag", "reread"], default="etag",
                        help="etag: check ETag + SHA-256 metadata; reread: also read uploads back")
    parser.add_argument("--no-crc32", action="store_true",
                        help="do not send S3's additional CRC-32 checksums (Content-MD5 and "
                             "ETags are checked either way)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--compare-awscli", action="store_true",
                        help="upload SRC to two fresh scratch prefixes under DST, with sfxflow and "
                             "with 'aws s3 cp', print both Gbit/s and delete the copies")
    number(parser, "--repeat", kind=int, default=3, ge=1, le=1000,
           help="rounds of --compare-awscli (default 3; medians are printed)")


class ProgressBar(LiveLine):
    """A one-line progress bar on a terminal (stderr), redrawn at most every 0.2 s."""

    def __init__(self, stream: TextIO, label: str) -> None:
        super().__init__(stream, tty=True, min_redraw_s=0.2)
        self.label = label
        self.total = 0
        self.files = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    def start(self, n_files: int, total_bytes: int) -> None:
        self.files, self.total = n_files, total_bytes
        self.t0 = time.perf_counter()
        self.draw(force=True)

    def add(self, n_bytes: int) -> None:
        with self._lock:
            self.done += n_bytes
        self.draw()

    def draw(self, force: bool = False) -> None:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done * 8 / max(time.perf_counter() - self.t0, 1e-9) / 1e9
        self.show(f"{self.label} [{bar}] {frac:6.1%} {self.done / 1e9:8.3f}/"
                  f"{self.total / 1e9:.3f} GB {rate:6.2f} Gbit/s {self.files} files", force)

    def close(self) -> None:
        self.draw(force=True)
        super().close()


def _report_lines(report: TransferReport) -> list[str]:
    lines = [f"{report.n_sent} file(s) sent ({report.n_resent} re-sent because the destination "
             f"did not verify), {report.n_skipped} already present and verified "
             f"({report.bytes_skipped / 1e9:.3f} GB not moved), {report.n_failed} failed"]
    lines.append(f"moved {report.bytes_sent / 1e9:.3f} GB in {report.wall_s:.2f} s = "
                 f"{report.gbit_per_s:.3f} Gbit/s")
    if report.n_unverified:
        lines.append(f"WARNING: {report.n_unverified} file(s) downloaded without any checksum "
                     "to verify against")
    return lines


def _aws_binary() -> str:
    sibling = Path(sys.executable).with_name("aws")
    if sibling.exists():
        return str(sibling)
    found = shutil.which("aws")
    if not found:
        raise InputError("--compare-awscli: the 'aws' command was not found; expected awscli "
                         "installed (pip install awscli)")
    return found


def _timed(cmd: Sequence[str], what: str) -> tuple[float, str]:
    """Run ``cmd``; (wall seconds from start to exit, stdout). A failure is a user error."""
    t0 = time.perf_counter()
    done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise InputError(f"--compare-awscli: {what} failed (exit {done.returncode}): {last}")
    return wall_s, done.stdout


def _compare_awscli(sources: Sequence[str], dest: str, args: argparse.Namespace,
                    options: dict[str, Any]) -> int:
    if not dest.startswith("s3://") or not all(is_local(s) for s in sources):
        raise InputError("--compare-awscli: expected local SRC and an s3:// DST")
    aws = _aws_binary()
    paths = [local_path(s) for s in sources]
    n_bytes = 0
    for path in paths:
        if path.is_dir():
            n_bytes += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            n_bytes += path.stat().st_size
        else:
            raise InputError(f"{path}: no such file or folder; expected local files or folders")
    extra = ["--endpoint-url", args.endpoint_url] if args.endpoint_url else []
    extra += ["--profile", args.profile] if args.profile else []
    base = dest.rstrip("/")
    fs = filesystem(dest, options)
    ours_s: list[float] = []
    ours_transfer_s: list[float] = []
    aws_s: list[float] = []
    for rnd in range(1, args.repeat + 1):
        scratch = f"{base}/_compare-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        ours_cmd = [sys.executable, "-m", "sfxflow.cli.transfer", *map(str, paths),
                    f"{scratch}/sfxflow", "--json", "--no-progress", "--streams",
                    str(args.streams), "--part-size-mib", f"{args.part_size_mib:g}", "--verify",
                    args.verify, *(["--no-crc32"] if args.no_crc32 else []), *extra]
        aws_cmds = []
        for path in paths:
            target = f"{scratch}/awscli/" if path.is_dir() else f"{scratch}/awscli/{path.name}"
            aws_cmds.append((path, [aws, "s3", "cp", *(["--recursive"] if path.is_dir() else []),
                                    str(path), target, "--only-show-errors", *extra]))
        try:
            for who in (("sfxflow", "awscli") if rnd % 2 else ("awscli", "sfxflow")):
                if who == "sfxflow":
                    wall_s, out = _timed(ours_cmd, "sfxflow transfer")
                    report = json.loads(out.strip().splitlines()[-1])
                    if report["n_failed"] or report["bytes_sent"] != n_bytes:
                        raise InputError(f"--compare-awscli: sfxflow transfer sent "
                                         f"{report['bytes_sent']} of {n_bytes} bytes, "
                                         f"{report['n_failed']} file(s) failed")
                    ours_s.append(wall_s)
                    ours_transfer_s.append(float(report["wall_s"]))
                else:
                    aws_s.append(sum(_timed(cmd, f"aws s3 cp {path}")[0]
                                     for path, cmd in aws_cmds))
        finally:
            try:
                fs.rm(scratch.split("://", 1)[1], recursive=True)
            except FileNotFoundError:
                pass
            except Exception as exc:  # a dead endpoint or no credentials: the cause is reported above
                log.warning("could not delete the scratch copies under %s (%s)", scratch,
                            type(exc).__name__)
        print(f"round {rnd}: sfxflow {ours_s[-1]:.2f} s = {_gbit(n_bytes, ours_s[-1]):.3f} "
              f"Gbit/s (transfer itself {ours_transfer_s[-1]:.2f} s), aws s3 cp {aws_s[-1]:.2f} "
              f"s = {_gbit(n_bytes, aws_s[-1]):.3f} Gbit/s")
    ours_med, aws_med = statistics.median(ours_s), statistics.median(aws_s)
    n_files = sum(1 for p in paths if p.is_file()) + sum(
        1 for p in paths if p.is_dir() for q in p.rglob("*") if q.is_file())
    print(f"data: {n_files} file(s), {n_bytes / 1e9:.3f} GB; endpoint "
          f"{args.endpoint_url or os.environ.get('AWS_ENDPOINT_URL', 'AWS')}; "
          f"medians of {args.repeat} round(s), each command timed from start to exit")
    print(f"sfxflow transfer ({args.streams} streams, {args.part_size_mib:g} MiB parts, "
          f"verified): {ours_med:.2f} s = {_gbit(n_bytes, ours_med):.3f} Gbit/s "
          f"(transfer itself {statistics.median(ours_transfer_s):.2f} s)")
    print(f"aws s3 cp --recursive (awscli settings, by default 10 requests, 8 MB parts): "
          f"{aws_med:.2f} s = {_gbit(n_bytes, aws_med):.3f} Gbit/s")
    print(f"ratio sfxflow / awscli: {aws_med / ours_med:.2f}")
    return 0


def _gbit(n_bytes: int, seconds: float) -> float:
    return n_bytes * 8 / seconds / 1e9 if seconds > 0 else 0.0


def run(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise InputError(f"got {len(args.paths)} path(s); expected SRC... DST")
    *sources, dest = args.paths
    options = storage_options_from(args.endpoint_url, args.profile)
    if args.compare_awscli:
        return _compare_awscli(sources, dest, args, options)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        bar = ProgressBar(sys.stderr, "upload" if dest.startswith("s3://") else "download")
    report = transfer(sources, dest, storage_options=options, streams=args.streams,
                      part_size=int(args.part_size_mib * 2**20), hash_prefix=args.hash_prefix,
                      verify=args.verify, crc32=not args.no_crc32,
                      progress=bar.add if bar else None,
                      on_start=bar.start if bar else None)
    if bar:
        bar.close()
    if args.json:
        print(json.dumps({
            "n_objects": report.n_objects, "n_sent": report.n_sent,
            "n_resent": report.n_resent, "n_skipped": report.n_skipped,
            "n_failed": report.n_failed, "n_unverified": report.n_unverified,
            "bytes_sent": report.bytes_sent, "bytes_skipped": report.bytes_skipped,
            "wall_s": report.wall_s, "gbit_per_s": report.gbit_per_s,
            "failures": report.failures}))
    else:
        for line in _report_lines(report):
            print(line)
    for line in report.failures:
        print(f"sfxflow transfer: failed: {line}", file=sys.stderr)
    return 1 if report.n_failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sfxflow.cli.transfer``: this subcommand alone, without importing the other
    subcommands (what ``--compare-awscli`` times). Same options and exit codes."""
    parser = Parser(prog="sfxflow transfer", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except InputError as exc:
        print(f"sfxflow transfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
