"""The batch-queue path on Grid Engine (SGE, the 2017 AWS cluster's scheduler) for real:
``sfxflow process --cluster sge`` through qsub jobs on a one-node cluster on this host.

``make sge-up`` (scripts/sge-up.sh) starts one from Debian's gridengine; ``.ci/run`` does that
before ``make test``. Without one the test skips, saying so.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import uuid

import dask.config

# dask_jobqueue's defaults must be in dask's config before a test sets ``jobqueue.*``: a
# dask.config.set that creates the section removes all of it on exit, and later tests that read
# the site's jobqueue settings then fail with KeyError 'jobqueue'
import dask_jobqueue  # noqa: F401
import pytest

from sfxflow.cli import main

from .conftest import CELL, SPACE_GROUP, comparable, read_frames

pytestmark = [pytest.mark.dask, pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def _sge_problem() -> str:
    if shutil.which("qsub") is None or shutil.which("qstat") is None:
        return "no qsub/qstat on PATH"
    try:
        out = subprocess.run(["qstat", "-f"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "qstat did not answer within 15 s"
    queues = [line.split() for line in out.stdout.splitlines() if line.startswith("all.q@")]
    if out.returncode or not queues:
        return f"qstat -f failed or shows no all.q: {(out.stderr or out.stdout).strip()[:200]}"
    if all(len(q) > 5 for q in queues):  # a sixth column is a state such as E (error), u, d
        return f"queue all.q is not usable: {' '.join(queues[0])}"
    return ""


def test_sge_run_equals_the_local_run(sim_set, serial_run, tmp_path):
    problem = _sge_problem()
    if problem:
        pytest.skip(f"no Grid Engine running here ({problem}); start one with `make sge-up`")
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "run"
    # -V: the jobs get this environment (an uninstalled checkout's PYTHONPATH, as in development)
    argv = ["process", *map(str, sim_set.files), "--geometry", str(sim_set.geometry_path),
            "--cell", CELL, "--space-group", SPACE_GROUP, "--frames-per-block", "2",
            "--out", str(out), "--no-progress", "--cluster", "sge", "--jobs", "2",
            "--queue", "all.q", "--interface", "lo", "--memory", "1G", "--job-extra=-V",
            "--worker-timeout", "240"]
    name = f"sfxtest-{uuid.uuid4().hex[:8]}"
    err = io.StringIO()
    with dask.config.set({"jobqueue.sge.name": name, "jobqueue.sge.log-directory": str(logs)}), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    assert rc == 0, err.getvalue()
    line = next(x for x in err.getvalue().splitlines() if x.startswith("scheduler "))
    assert line.startswith("scheduler tcp://127.0.0.1:")
    jobs = re.search(r"batch jobs ([\d, ]+)", line)
    job_ids = re.findall(r"\d+", jobs[1]) if jobs else []
    assert len(job_ids) == 2
    assert comparable(read_frames(out)) == comparable(read_frames(serial_run[0]))
    # the jobs ran under the site's job name and wrote their output where it said
    assert {p.name for p in logs.iterdir()} >= {f"{name}.o{j}" for j in job_ids}
