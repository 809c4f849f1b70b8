"""``sfxflow process --cluster slurm`` through a real Slurm cluster (sbatch jobs on localhost).

Needs a running Slurm whose node accepts jobs: ``make slurm-up`` (scripts/slurm-up.sh) starts a
one-node cluster on localhost from the repository's config; ``.ci/run`` does that before
``make test``. Without one the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
import uuid

import dask.config

# dask_jobqueue's defaults must be in dask's config before a test sets ``jobqueue.*``: a
# dask.config.set that creates the section removes all of it on exit, and later tests that read
# the site's jobqueue settings then fail with KeyError 'jobqueue'
import dask_jobqueue  # noqa: F401
import pytest

from sfxflow.cli import main
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process

from .conftest import CELL, SPACE_GROUP, base_overrides, comparable, read_frames

pytestmark = [pytest.mark.dask, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

WORKER_TIMEOUT_S = 240  # a first worker job normally starts within seconds on the test cluster


def _slurm_node_state() -> str:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no sbatch/sinfo on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    states = out.stdout.split()
    if out.returncode or not states:
        return f"sinfo failed: {(out.stderr or out.stdout).strip()[:200]}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no Slurm node accepts jobs (states: {', '.join(states)})"
    return ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A Slurm cluster that runs jobs; the jobqueue settings of a test site (unique job name,
    job output in a temporary folder) are applied through Dask's configuration."""
    problem = _slurm_node_state()
    if problem:
        pytest.skip(f"no Slurm cluster running here ({problem}); start one with `make slurm-up`")
    name = f"sfxtest-{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("slurm-logs")
    with dask.config.set({"jobqueue.slurm.name": name, "jobqueue.slurm.log-directory": str(logs)}):
        yield name, logs


def _squeue(job_ids: list[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=15)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _frame_keys(run_dir) -> list[tuple[str, int]]:
    frames = read_frames(run_dir)
    return list(zip(frames["source_url"].to_pylist(), frames["frame_index"].to_pylist(),
                    strict=True))


@pytest.fixture(scope="module")
def undisturbed(slurm, sim_set, tmp_path_factory):
    """``sfxflow process --cluster slurm --jobs 2 --interface lo`` through the CLI."""
    out = tmp_path_factory.mktemp("slurm-run") / "run"
    argv = ["process", *map(str, sim_set.files), "--geometry", str(sim_set.geometry_path),
            "--cell", CELL, "--space-group", SPACE_GROUP, "--frames-per-block", "1",
            "--out", str(out), "--no-progress", "--cluster", "slurm", "--jobs", "2",
            "--interface", "lo", "--cores", "1", "--memory", "1GB", "--walltime", "00:10:00",
            "--worker-timeout", str(WORKER_TIMEOUT_S),
            "--scheduler-file", str(out.parent / "scheduler.json")]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, out, time.perf_counter() - t0, err.getvalue()


def test_slurm_run_equals_the_local_run(undisturbed, serial_run, slurm):
    rc, out, _, err = undisturbed
    assert rc == 0, err
    # the CLI names the batch jobs it ran on, and the scheduler listened on the loopback only
    line = next(x for x in err.splitlines() if x.startswith("scheduler "))
    assert line.startswith("scheduler tcp://127.0.0.1:")
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/status", line)
    jobs = re.search(r"batch jobs ([\d, ]+)", line)
    job_ids = re.findall(r"\d+", jobs[1]) if jobs else []
    assert len(job_ids) == 2
    assert comparable(read_frames(out)) == comparable(read_frames(serial_run[0]))
    keys = _frame_keys(out)
    assert len(keys) == len(set(keys)) == 12
    # --scheduler-file with --cluster: the scheduler wrote where hand-started workers find it
    written = json.loads((out.parent / "scheduler.json").read_text())
    assert line.startswith(f"scheduler {written['address']} ")
    # the jobs were real, ran under the site's job name, wrote their output where the site's
    # jobqueue configuration said, and are gone once the run has finished
    name, logs = slurm
    written_logs = {p.name for p in logs.iterdir()}
    assert {f"{name}-{j}.{ext}" for j in job_ids for ext in ("err", "out")} <= written_logs
    deadline = time.monotonic() + 30
    while _squeue(job_ids) and time.monotonic() < deadline:
        time.sleep(1)
    assert _squeue(job_ids) == []


def test_scancelled_worker_job_loses_no_frame(undisturbed, serial_run, sim_set, slurm, tmp_path,
                                             record_property):
    """The batch-queue twin of a reclaimed spot instance: a worker's job is cancelled mid-run."""
    from distributed import Client

    cancelled: list[str] = []
    scheduler: list[str] = []

    def remember(info):
        scheduler.append(info.scheduler_address)

    def cancel_the_job_of(report):
        if cancelled:
            return
        with Client(scheduler[0], timeout="20s") as client:
            job_of = client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID", ""))
        job = job_of.get(report.worker)
        if not job:
            return
        # this worker holds the next block already (the scheduler queues one per worker)
        subprocess.run(["scancel", job], check=True, timeout=15)
        cancelled.append(job)

    cfg = load_config(overrides=[
        *base_overrides(sim_set.geometry_path, frames_per_block=1), "cluster.kind='slurm'",
        "cluster.jobs=2", "cluster.interface='lo'", "cluster.cores=1", "cluster.memory='1GB'",
        "cluster.walltime='00:10:00'", f"cluster.worker_timeout_s={WORKER_TIMEOUT_S}"])
    out = tmp_path / "run"
    t0 = time.perf_counter()
    result = run_process([str(p) for p in sim_set.files], str(out), cfg,
                         on_block=cancel_the_job_of, on_cluster=remember)
    wall_s = time.perf_counter() - t0
    assert cancelled, "no worker job was cancelled"
    keys = _frame_keys(out)
    duplicates = len(keys) - len(set(keys))
    lost = 12 - len(set(keys))
    calm = json.loads((undisturbed[1] / "summary.json").read_text())
    figures = (f"scancel of Slurm job {cancelled[0]} mid-run: frames {len(keys)}, duplicates "
               f"{duplicates}, lost {lost}, blocks {result.blocks_done} done / "
               f"{result.blocks_failed} failed; processing wall {result.summary['wall_s']:.1f} s "
               f"vs {calm['wall_s']:.1f} s undisturbed (whole command {wall_s:.1f} s vs "
               f"{undisturbed[2]:.1f} s, with job start-up)")
    record_property("figures", figures)
    print(figures)
    assert result.complete and result.blocks_failed == 0 and result.blocks_done == 12
    assert (len(keys), duplicates, lost) == (12, 0, 0)
    assert comparable(read_frames(out)) == comparable(read_frames(serial_run[0]))
    # the cancelled job really ended
    deadline = time.monotonic() + 30
    while any(line.split()[0] == cancelled[0] for line in _squeue(cancelled)) and \
            time.monotonic() < deadline:
        time.sleep(1)
    assert not _squeue(cancelled)


def test_no_worker_in_time_names_the_queue_and_jobs(slurm, sim_set, tmp_path):
    """A job the batch system holds never starts: the run gives up, naming queue and job."""
    argv = ["process", str(sim_set.files[0]), "--geometry", str(sim_set.geometry_path),
            "--out", str(tmp_path / "run"), "--no-progress", "--cluster", "slurm",
            "--queue", "debug", "--job-extra=--hold", "--interface", "lo", "--cores", "1",
            "--memory", "1GB", "--worker-timeout", "4"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    message = err.getvalue().strip().splitlines()[-1]
    assert rc == 2, err.getvalue()
    assert "no worker joined within 4.00 s in debug: job(s) " in message
    job = re.search(r"job\(s\) (\d+) still waiting", message)
    assert job, message
    # the held job was cancelled when the cluster closed
    deadline = time.monotonic() + 30
    while _squeue([job[1]]) and time.monotonic() < deadline:
        time.sleep(1)
    assert _squeue([job[1]]) == []


def test_tls_run_through_slurm(slurm, sim_set, serial_run, tmp_path):
    """Scheduler and workers talk TLS, configured only through Dask's security settings."""
    pytest.importorskip("cryptography", reason="TLS certificates need the cryptography package")
    from distributed.security import Security

    temporary = Security.temporary()  # a CA and a certificate, as PEM text
    pem = tmp_path / "tls.pem"
    pem.write_text(temporary.tls_ca_file)  # the one self-signed certificate is CA and cert
    key = tmp_path / "tls.key"
    key.write_text(temporary.tls_scheduler_key)
    key.chmod(0o600)
    tls = {"distributed.comm.require-encryption": True,
           "distributed.comm.tls.ca-file": str(pem)}
    for role in ("scheduler", "worker", "client"):
        tls[f"distributed.comm.tls.{role}.cert"] = str(pem)
        tls[f"distributed.comm.tls.{role}.key"] = str(key)
    addresses: list[str] = []
    cfg = load_config(overrides=[
        *base_overrides(sim_set.geometry_path, frames_per_block=3), "cluster.kind='slurm'",
        "cluster.jobs=1", "cluster.interface='lo'", "cluster.cores=1", "cluster.memory='1GB'",
        f"cluster.worker_timeout_s={WORKER_TIMEOUT_S}"])
    with dask.config.set(tls):
        result = run_process([str(p) for p in sim_set.files], str(tmp_path / "run"), cfg,
                             on_cluster=lambda info: addresses.append(info.scheduler_address))
    assert addresses[0].startswith("tls://127.0.0.1:")
    assert result.complete and result.blocks_failed == 0
    assert comparable(read_frames(tmp_path / "run")) == comparable(read_frames(serial_run[0]))
