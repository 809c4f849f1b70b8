"""``sfxflow transfer``: verified, resumable, parallel copy between local storage and S3."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from sfxflow.errors import InputError
from sfxflow.io.storage import filesystem, is_local, local_path, storage_options_from
from sfxflow.io.transfer import DEFAULT_PART_SIZE, TransferReport, transfer

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
  sfxflow transfer run_data/ s3://my-bucket/scratch/ --compare-awscli  # Gbit/s vs aws s3 cp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="one or more sources (SRC...), then the destination (DST)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS settings)")
    parser.add_argument("--profile", help="AWS profile name")
    parser.add_argument("--streams", type=int, default=10,
                        help="concurrent requests (default 10, as aws s3 cp)")
    parser.add_argument("--part-size-mb", type=float, default=DEFAULT_PART_SIZE / 2**20,
                        help=f"multipart part size in MiB (default {DEFAULT_PART_SIZE // 2**20}, "
                             "minimum 5)")
    parser.add_argument("--hash-prefix", action="store_true",
                        help="upload to PREFIX/<hash of name>/name (names kept in the manifest)")
    parser.add_argument("--verify", choices=["etag", "reread"], default="etag",
                        help="etag: check ETag + SHA-256 metadata; reread: also read uploads back")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--compare-awscli", action="store_true",
                        help="upload SRC to two fresh scratch prefixes under DST, with sfxflow and "
                             "with 'aws s3 cp', print both Gbit/s and delete the copies")


class ProgressBar:
    """A one-line progress bar on a terminal (stderr), redrawn at most every 0.2 s."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.total = 0
        self.files = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
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
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done * 8 / max(now - self.t0, 1e-9) / 1e9
        self.stream.write(f"\r{self.label} [{bar}] {frac:6.1%} {self.done / 1e9:8.3f}/"
                          f"{self.total / 1e9:.3f} GB {rate:6.2f} Gbit/s {self.files} files")
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        self.stream.write("\n")
        self.stream.flush()


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


def _compare_awscli(sources: Sequence[str], dest: str, args: argparse.Namespace,
                    options: dict[str, Any]) -> int:
    if not dest.startswith("s3://") or not all(is_local(s) for s in sources):
        raise InputError("--compare-awscli: expected local SRC and an s3:// DST")
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    base = dest.rstrip("/")
    ours, theirs = f"{base}/_compare-{tag}/sfxflow", f"{base}/_compare-{tag}/awscli"
    fs = filesystem(dest, options)
    try:
        report = transfer(list(sources), ours, storage_options=options, streams=args.streams,
                          part_size=int(args.part_size_mb * 2**20), verify=args.verify)
        if report.n_failed:
            for line in report.failures:
                print(line, file=sys.stderr)
            return 1
        aws = _aws_binary()
        extra = ["--endpoint-url", args.endpoint_url] if args.endpoint_url else []
        extra += ["--profile", args.profile] if args.profile else []
        t0 = time.perf_counter()
        for src in sources:
            path = local_path(src)
            target = f"{theirs}/" if path.is_dir() else f"{theirs}/{path.name}"
            cmd = [aws, "s3", "cp", str(path), target, "--only-show-errors", *extra]
            if path.is_dir():
                cmd.insert(3, "--recursive")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise InputError(f"aws s3 cp {path} failed (exit {done.returncode}): "
                                 f"{done.stderr.strip().splitlines()[-1:]}")
        aws_s = time.perf_counter() - t0
        aws_gbit = report.bytes_sent * 8 / aws_s / 1e9
        print(f"data: {report.n_sent} file(s), {report.bytes_sent / 1e9:.3f} GB; "
              f"endpoint {args.endpoint_url or os.environ.get('AWS_ENDPOINT_URL', 'AWS')}")
        print(f"sfxflow transfer ({args.streams} streams, {args.part_size_mb:g} MiB parts, "
              f"verified): {report.wall_s:.2f} s = {report.gbit_per_s:.3f} Gbit/s")
        print(f"aws s3 cp --recursive (awscli settings, by default 10 requests, 8 MB parts): "
              f"{aws_s:.2f} s = {aws_gbit:.3f} Gbit/s")
        print(f"ratio sfxflow / awscli: {report.gbit_per_s / aws_gbit:.2f}")
        return 0
    finally:
        try:
            fs.rm(f"{base}/_compare-{tag}".split("://", 1)[1], recursive=True)
        except FileNotFoundError:
            pass


def run(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise InputError(f"got {len(args.paths)} path(s); expected SRC... DST")
    *sources, dest = args.paths
    if args.part_size_mb <= 0:
        raise InputError(f"--part-size-mb {args.part_size_mb}; expected >= 5")
    options = storage_options_from(args.endpoint_url, args.profile)
    if args.compare_awscli:
        return _compare_awscli(sources, dest, args, options)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        bar = ProgressBar(sys.stderr, "upload" if dest.startswith("s3://") else "download")
    report = transfer(sources, dest, storage_options=options, streams=args.streams,
                      part_size=int(args.part_size_mb * 2**20), hash_prefix=args.hash_prefix,
                      verify=args.verify, progress=bar.add if bar else None,
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
