"""Runs on a real Dask cluster: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process

from .conftest import base_overrides, comparable, read_frames

pytestmark = [pytest.mark.dask, pytest.mark.slow]

def _wait_for_workers(address: str, n: int, timeout_s: float = 60.0) -> dict[str, int]:
    """Wait for ``n`` workers; their addresses -> process ids."""
    from distributed import Client

    with Client(address, timeout="20s") as client:
        client.wait_for_workers(n, timeout=timeout_s)
        return client.run(os.getpid)


def test_worker_killed_mid_run_loses_nothing(sim_set, serial_run, dask_cluster, tmp_path):
    address, workers, _ = dask_cluster
    by_pid = {p.pid: p for p in workers}
    pid_of = _wait_for_workers(address, 2)
    killed: list[str] = []

    def kill_the_other_worker(report):
        if killed:
            return
        victim = next(a for a in pid_of if a != report.worker)
        by_pid[pid_of[victim]].send_signal(signal.SIGKILL)
        killed.append(victim)

    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path, frames_per_block=1),
                                 f"cluster.scheduler='{address}'"])
    out = tmp_path / "run"
    result = run_process([str(p) for p in sim_set.files], str(out), cfg,
                         on_block=kill_the_other_worker)
    assert killed and by_pid[pid_of[killed[0]]].wait(timeout=10) == -signal.SIGKILL
    assert result.complete and result.blocks_failed == 0
    assert result.blocks_done == 12
    frames = read_frames(out)
    keys = list(zip(frames["source_url"].to_pylist(), frames["frame_index"].to_pylist(),
                    strict=True))
    assert len(keys) == 12 and len(set(keys)) == 12
    assert comparable(frames) == comparable(read_frames(serial_run[0]))
    survivor = next(a for a in pid_of if a != killed[0])
    # the survivor finished the run, including blocks the killed worker held
    assert result.summary["workers"][survivor]["frames"] >= 6
    assert result.summary["failed"] == 0


def test_blocks_run_on_both_workers_with_prefetch(sim_set, serial_run, dask_cluster, tmp_path):
    address, _, _ = dask_cluster
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path, frames_per_block=1),
                                 f"cluster.scheduler='{address}'"])
    result = run_process([str(p) for p in sim_set.files], str(tmp_path / "run"), cfg)
    assert result.complete
    s = result.summary
    assert len(s["workers"]) == 2 and s["n_cores"] == 2
    assert sum(w["frames"] for w in s["workers"].values()) == 12
    # queued blocks were read ahead on the workers while the previous block computed
    assert sum(r.prefetched for r in result.reports) >= 6
    assert s["fetch_hidden_s"] > 0
    assert comparable(read_frames(tmp_path / "run")) == comparable(read_frames(serial_run[0]))


def _run_plugins(address: str) -> tuple[dict, list]:
    """sfxflow plugins left on each worker, and on the scheduler."""
    from distributed import Client

    def on_worker(dask_worker=None):
        return sorted(n for n in dask_worker.plugins if str(n).startswith("sfxflow-run"))

    def on_scheduler(dask_scheduler=None):
        return sorted(n for n in dask_scheduler.plugins if str(n).startswith("sfxflow-run"))

    with Client(address, timeout="20s") as client:
        return client.run(on_worker), client.run_on_scheduler(on_scheduler)


KILLED_CLIENT = """
import json, os, signal, sys
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
files, out, overrides = json.loads(sys.argv[1])
run_process(files, out, load_config(overrides=overrides),
            on_block=lambda report: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_worker_plugin_goes_when_the_run_ends_or_its_client_dies(sim_set, dask_cluster, tmp_path):
    # before: a killed client left its worker plugin (the run's context and prefetcher) on a
    # long-lived scheduler and its workers
    address, _, _ = dask_cluster
    overrides = [*base_overrides(sim_set.geometry_path, frames_per_block=1),
                 f"cluster.scheduler='{address}'"]
    files = [str(p) for p in sim_set.files]
    assert run_process(files[:1], str(tmp_path / "run"), load_config(overrides=overrides)).complete
    workers, scheduler = _run_plugins(address)
    assert all(not names for names in workers.values()) and not scheduler

    proc = subprocess.run([sys.executable, "-c", KILLED_CLIENT,
                           json.dumps([files, str(tmp_path / "killed"), overrides])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers, scheduler = _run_plugins(address)
        if all(not names for names in workers.values()) and not scheduler:
            break
        time.sleep(0.5)
    assert all(not names for names in workers.values()), workers
    assert not scheduler
