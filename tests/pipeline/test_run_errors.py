"""What a user sees when a run cannot go on: an unwritable run directory, Ctrl-C, and passwords
inside URLs (issue 10, items 2, 7 and 15)."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfxflow.cli import main
from sfxflow.errors import EXIT_RERUN

from .conftest import CELL, SPACE_GROUP

SRC = Path(__file__).resolve().parents[2] / "src"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _process_argv(sim_set, out, *more: str) -> list[str]:
    return ["process", *(str(p) for p in sim_set.files), "--out", str(out),
            "--geometry", str(sim_set.geometry_path), "--cell", CELL, "--space-group",
            SPACE_GROUP, "--no-progress", *more]


def _limit_file_size() -> None:
    # what a full disk does to a write (EFBIG instead of ENOSPC; the same OSError path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))


def test_full_disk_is_one_line_naming_the_run_directory(sim_set, tmp_path):
    # before: 70-230 lines of chained tracebacks
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sfxflow", "-q",
                           *_process_argv(sim_set, out, "--scheduler", "synchronous")],
                          env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == EXIT_RERUN, proc.stderr
    assert "Traceback" not in proc.stderr
    # one error line (the live report, refreshed in the background, may warn once before it)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sfxflow process: error:")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0]), proc.stderr
    assert f"cannot write to the run directory {out}" in lines[0]
    assert "File too large" in lines[0] and "run the same command again to resume" in lines[0]
    # the disk has room again: the same command resumes and finishes
    proc = subprocess.run([sys.executable, "-m", "sfxflow", "-q",
                           *_process_argv(sim_set, out, "--scheduler", "synchronous")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "frames.parquet").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # aiohttp's __del__
def test_dead_object_storage_run_directory_is_one_line(sim_set, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t0 = time.monotonic()
    code = main(_process_argv(sim_set, "s3://bucket/run", "--scheduler", "synchronous",
                              "--endpoint-url", f"http://127.0.0.1:{_closed_port()}",
                              "--set", "run.storage_retry_s=1"))
    err = capsys.readouterr().err
    assert code == EXIT_RERUN, err
    # the run's retry period from the first storage call on (the checks before the run took
    # the default 60 s here: 55.8 s in CI); each operation ends by 1 s + a connect timeout
    assert time.monotonic() - t0 < 30, err
    assert "Traceback" not in err
    assert "s3://bucket/run" in err and "run the same command again" in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # aiohttp's __del__
def test_checks_before_a_run_retry_for_the_runs_own_period(sim_set, capsys, monkeypatch):
    """A run in this process left the retry period at 0 (a test of run_process with
    ``storage_retry_s=0``): the next run's checks retried nothing, a single hiccup of the store
    at start was exit 2 (the likely failure of a CI run under load). They use the run's own."""
    import re

    from sfxflow.io import storage

    monkeypatch.setattr(storage, "_retry", storage.RetryPolicy(total_s=0.0))
    monkeypatch.setattr(storage, "_gave_up_at", 0.0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    code = main(_process_argv(sim_set, "s3://bucket/run", "--scheduler", "synchronous",
                              "--endpoint-url", f"http://127.0.0.1:{_closed_port()}",
                              "--set", "run.storage_retry_s=1"))
    err = capsys.readouterr().err
    assert code == EXIT_RERUN, err
    attempts = [int(n) for n in re.findall(r"after ([0-9]+) attempt", err)]
    assert attempts and min(attempts) >= 2, err  # 1 s with a first wait of 0.5 s: 2 attempts


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # fsspec's __del__
def test_passwords_in_urls_never_leave_the_process(sim_set, tmp_path, caplog, capsys):
    # before: user:password@ of an input URL ended up in frames.parquet, the shards,
    # manifest.json, summary.json, the log and error messages
    secret = "hunter2-secret"
    bad = f"ftp://me:{secret}@127.0.0.1:{_closed_port()}/data/run_9.cxi"
    out = tmp_path / "run"
    argv = _process_argv(sim_set, out, "--scheduler", "synchronous", "--set",
                         "run.storage_retry_s=0")
    argv.insert(1, bad)
    proc = subprocess.run([sys.executable, "-m", "sfxflow", "-v", *argv],
                          env=_env(), capture_output=True, text=True, timeout=300)
    # an input that names nothing usable is refused before the run starts (issue 22)
    assert proc.returncode == 2, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert "sfxflow process: error: ftp://***@127.0.0.1" in proc.stderr
    assert not out.exists()
    # the library (no checks before) records it as failed, the other inputs processed
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.run import run_process

    caplog.set_level(logging.DEBUG)
    cfg = load_config(overrides=[f"io.geometry={sim_set.geometry_path}",
                                 "target.cell=[93, 93, 130.5, 90, 90, 120]",
                                 f"target.space_group={SPACE_GROUP}",
                                 "cluster.kind=synchronous", "run.storage_retry_s=0"])
    run_process([bad, *(str(p) for p in sim_set.files)], str(out), cfg)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + caplog.text
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"frames.parquet", "manifest.json", "summary.json"} <= {p.name for p in written}
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert b"ftp://***@127.0.0.1" in (out / "frames.parquet").read_bytes()
    # a password in the geometry URL: refused in one line, without the password
    proc = subprocess.run([sys.executable, "-m", "sfxflow",
                           *_process_argv(sim_set, tmp_path / "run2", "--scheduler", "synchronous",
                                          "--set", "run.storage_retry_s=0"),
                           "--geometry", f"ftp://me:{secret}@127.0.0.1:{_closed_port()}/g.geom"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode in (2, EXIT_RERUN)
    assert secret not in proc.stdout + proc.stderr, [ln for ln in (proc.stdout + proc.stderr).splitlines() if secret in ln]
    # (fsspec's own FTPFileSystem.__del__ may print an ignored exception before it)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sfxflow process: error: ftp://***@127.0.0.1"), proc.stderr


@pytest.mark.dask
@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_rerun_resumes(sim_set, tmp_path):
    # before: about 60 lines of worker tracebacks
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "sfxflow", "-q",
            *_process_argv(sim_set, out, "--workers", "2", "--frames-per-block", "1")]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("*.frames.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("scheduler ")]
    assert lines == ["sfxflow process: interrupted; run the same command again to resume"], err
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "frames.parquet").exists()
