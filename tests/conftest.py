"""Shared fixtures: the real reference data in ../shared/data, and a real local S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfxflow.benchmarks.localhost import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SFXFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real LCLS CBFs, CrystFEL geometry and stream files)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA} (clone without ../shared)")
    return SHARED_DATA




@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto in server mode) on 127.0.0.1; yields its endpoint URL.

    Credentials are dummy values set in the environment only for the test session.
    """
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the local S3 server; yields its name."""
    import uuid

    boto3 = pytest.importorskip("boto3")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture()
def s3_storage_options(s3_server: str) -> dict:
    """fsspec/s3fs storage options pointing at the local S3 server."""
    return {"client_kwargs": {"endpoint_url": s3_server}, "anon": False}


#: the longest a busy loop runs (it stops by itself even if the test process is killed)
BUSY_LOOP_MAX_S = 300


@pytest.fixture()
def busy_cores() -> Iterator[int]:
    """A busy loop on every core (separate processes) while the test runs, as on a shared
    machine under load; yields how many."""
    n = os.cpu_count() or 1
    code = f"import time\nend = time.monotonic() + {BUSY_LOOP_MAX_S}\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the figures tests recorded (``record_property("figures", ...)``) at the end of the
    run, so that a CI log shows them even for tests that passed (and under pytest-xdist)."""
    lines = [f"{report.nodeid}: {value}"
             for report in terminalreporter.stats.get("passed", [])
             if report.when == "call"
             for key, value in report.user_properties if key == "figures"]
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
