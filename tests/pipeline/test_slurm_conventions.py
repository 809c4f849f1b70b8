"""Dask's conventions for batch clusters, checked without a batch system: what reaches the job
script (a site's jobqueue.yaml, the user's options, TLS), that ``--dry-run`` starts no
scheduler, and that a shared scheduler is left as it was found."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import dask_jobqueue  # registers jobqueue's defaults before tests set values
import pytest

from sfxflow.benchmarks.localhost import free_port, stop_processes
from sfxflow.cli import main
from sfxflow.errors import ConfigError
from sfxflow.pipeline.cluster import job_script
from sfxflow.pipeline.config import ClusterConfig, load_config
from sfxflow.pipeline.run import run_process

from .conftest import base_overrides, comparable, read_frames

SITE_JOBQUEUE_YAML = """\
jobqueue:
  slurm:
    account: site-default-acct
    walltime: '03:00:00'
    job-extra-directives: ['--constraint=cpu']
"""


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_site_jobqueue_yaml_reaches_the_job_script(tmp_path):
    # a site's Dask configuration folder, found the way Dask finds it (DASK_CONFIG)
    (tmp_path / "jobqueue.yaml").write_text(SITE_JOBQUEUE_YAML)
    env = {**os.environ, "DASK_CONFIG": str(tmp_path)}
    cmd = [sys.executable, "-m", "sfxflow", "process", "--cluster", "slurm", "--cores", "2",
           "--job-extra=--qos=debug", "--dry-run"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    lines = _sbatch_lines(out.stdout)
    assert "#SBATCH -A site-default-acct" in lines  # the site's default account
    assert "#SBATCH -t 03:00:00" in lines  # the site's wall time, not one forced by sfxflow
    assert "#SBATCH --cpus-per-task=2" in lines  # the user's option
    # the user's extra directive is added to the site's, not instead of them
    assert lines[-2:] == ["#SBATCH --constraint=cpu", "#SBATCH --qos=debug"]
    # an option given on the command line wins over the site's setting
    out = subprocess.run([*cmd, "--account", "m1234"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert "#SBATCH -A m1234" in _sbatch_lines(out.stdout)
    assert "site-default-acct" not in out.stdout


def test_only_what_was_set_is_passed(monkeypatch):
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "30GB",
                          "jobqueue.slurm.processes": 2}):
        lines = _sbatch_lines(job_script(ClusterConfig(kind="slurm")))
        assert "#SBATCH --cpus-per-task=8" in lines and "#SBATCH --mem=28G" in lines
        worker = job_script(ClusterConfig(kind="slurm")).splitlines()[-1]
        assert "--nworkers 2" in worker and "--nthreads 4" in worker
    # where neither the user nor the site says: one single-threaded worker per core
    worker = job_script(ClusterConfig(kind="slurm", cores=4)).splitlines()[-1]
    assert "--nworkers 4" in worker and "--nthreads 1" in worker
    with pytest.raises(ConfigError, match=r"cluster\.processes = 3 must divide"):
        job_script(ClusterConfig(kind="slurm", cores=4, processes=3))


def test_dry_run_starts_no_scheduler(monkeypatch, capsys):
    import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run started a scheduler")

    monkeypatch.setattr(distributed.Scheduler, "__init__", refuse)
    monkeypatch.setattr(dask_jobqueue.SLURMCluster, "__init__", refuse)
    assert main(["process", "--cluster", "slurm", "--dry-run"]) == 0
    assert "<scheduler-address>" in capsys.readouterr().out


def test_tls_from_dask_security_settings_reaches_the_workers():
    tls = {"distributed.comm.require-encryption": True,
           "distributed.comm.tls.ca-file": "/site/ca.pem",
           "distributed.comm.tls.worker.cert": "/site/worker.pem",
           "distributed.comm.tls.worker.key": "/site/worker.key"}
    with dask.config.set(tls):
        worker = job_script(ClusterConfig(kind="slurm")).splitlines()[-1]
    assert "dask_worker tls://" in worker
    assert "--tls-ca-file /site/ca.pem --tls-cert /site/worker.pem --tls-key /site/worker.key" \
        in worker


@pytest.mark.parametrize("bad", ["0:4", "5:2", "3", "a:b"])
def test_adapt_needs_min_max(bad, capsys):
    assert main(["process", "--cluster", "slurm", "--adapt", bad, "--dry-run"]) == 2
    assert f"--adapt {bad!r}: expected MIN:MAX jobs" in capsys.readouterr().err
    assert ClusterConfig(kind="slurm", adapt="1:20").adapt_range() == (1, 20)


def test_job_timeout_setting_is_checked():
    with pytest.raises(ConfigError, match="worker_timeout_s"):
        ClusterConfig(worker_timeout_s=0)


def test_missing_scheduler_file_is_a_user_error(tmp_path, capsys):
    rc = main(["process", "x.cxi", "--out", str(tmp_path / "r"), "--scheduler-file",
               str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "none.json: no such file" in err


@pytest.mark.dask
@pytest.mark.slow
def test_shared_scheduler_is_left_as_found(sim_set, serial_run, tmp_path):
    """Joined through a scheduler file: the run changes no scheduler setting (allowed-failures)
    and takes its worker plugin away when it ends."""
    from distributed import Client

    dask_cli = str(Path(sys.executable).with_name("dask"))
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port",
                               str(free_port()), "--dashboard-address", "127.0.0.1:0",
                               "--scheduler-file", str(sched_file)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        procs.append(subprocess.Popen(
            [dask_cli, "worker", "--scheduler-file", str(sched_file), "--nworkers", "1",
             "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(sched_file), timeout="20s") as client:
            client.wait_for_workers(1, timeout=60)

            def allowed(dask_scheduler=None):
                return dask_scheduler.allowed_failures

            before = client.run_on_scheduler(allowed)
            cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path),
                                         f"cluster.scheduler_file='{sched_file}'",
                                         f"run.allowed_failures={before + 4}"])
            result = run_process([str(p) for p in sim_set.files], str(tmp_path / "run"), cfg)
            assert result.complete and result.cluster and result.cluster.kind == "scheduler"
            assert comparable(read_frames(tmp_path / "run")) == \
                comparable(read_frames(serial_run[0]))
            assert client.run_on_scheduler(allowed) == before
            plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
            assert plugins and not any(name.startswith("sfxflow-run-")
                                       for names in plugins.values() for name in names)
    finally:
        stop_processes(procs)
