"""A storage outage in the middle of a run, played for real: a TCP proxy between sfxflow and the
local S3 server (moto) is cut while blocks are being read (issue 10, item 1)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sfxflow.cli import main
from sfxflow.errors import EXIT_RERUN

from .conftest import CELL, SPACE_GROUP, comparable, read_frames
from .tcp_proxy import TcpProxy

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@pytest.fixture()
def proxied_inputs(sim_set, s3_server, s3_bucket):
    """The simulated set on the local S3 server, and a proxy in front of that server."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in (*sim_set.files, sim_set.geometry_path):
        client.upload_file(str(path), s3_bucket, f"in/{path.name}")
    with TcpProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        yield proxy, f"s3://{s3_bucket}/in/"


def _cut_after(proxy: TcpProxy, run: Path, n_shards: int, outage_s: float | None) -> threading.Thread:
    """Cut the proxy once ``n_shards`` blocks are written; restore it ``outage_s`` later."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(list((run / "shards").glob("*.frames.parquet"))) >= n_shards:
                proxy.cut()
                if outage_s is not None:
                    time.sleep(outage_s)
                    proxy.restore()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _argv(prefix: str, run: Path, proxy: TcpProxy, retry_s: float) -> list[str]:
    return ["process", prefix, "--out", str(run), "--endpoint-url", proxy.url,
            "--geometry", f"{prefix}geometry.geom", "--cell", CELL, "--space-group", SPACE_GROUP,
            "--scheduler", "synchronous", "--frames-per-block", "2", "--no-progress", "--prefetch", "0",
            "--set", f"run.storage_retry_s={retry_s}"]


def test_short_outage_is_retried_and_loses_nothing(proxied_inputs, serial_run, tmp_path):
    # before: frames read during the outage were saved as failed ("storage endpoint
    # unreachable") for ever, exit 0
    proxy, prefix = proxied_inputs
    run = tmp_path / "run"
    watcher = _cut_after(proxy, run, 1, outage_s=8.0)
    code = main(_argv(prefix, run, proxy, retry_s=30))
    watcher.join()
    assert proxy.cuts == 1
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["complete"]
    assert comparable(read_frames(run), file_names_only=True) == comparable(
        read_frames(serial_run[0]), file_names_only=True)


def test_long_outage_leaves_blocks_for_a_rerun(proxied_inputs, serial_run, tmp_path, capsys):
    # before: 'exit 0', and the rerun said "N block(s) already done, 0 to do"
    proxy, prefix = proxied_inputs
    run = tmp_path / "run"
    watcher = _cut_after(proxy, run, 2, outage_s=None)
    code = main(_argv(prefix, run, proxy, retry_s=2))
    watcher.join()
    err = capsys.readouterr().err
    assert code == EXIT_RERUN
    assert "could not be read from storage" in err and "run the same command again" in err
    manifest = json.loads((run / "manifest.json").read_text())
    unread = [b for b in manifest["blocks"] if b["state"] == "unread"]
    assert unread and all("unreachable" in b["reason"] for b in unread)
    assert manifest["counts"]["done"] >= 2
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["complete"] and summary["blocks_unread"] == len(unread)

    proxy.restore()
    code = main(_argv(prefix, run, proxy, retry_s=2))
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["failed"] == 0
    assert summary["blocks_processed"] == len(unread)
    assert comparable(read_frames(run), file_names_only=True) == comparable(
        read_frames(serial_run[0]), file_names_only=True)
