"""Fixtures for the pipeline tests: a small simulated data set and its serial reference run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sfxflow.benchmarks.localhost import free_port, stop_processes
from sfxflow.io.results import TIMING_COLUMNS

CELL = "93 93 130.5 90 90 120"
SPACE_GROUP = "P6122"


def base_overrides(geometry: Path | str, frames_per_block: int = 2) -> list[str]:
    """``--set`` strings for a run on the simulated set (indexing against its true cell)."""
    return [
        f"io.geometry='{geometry}'",
        f"io.frames_per_block={frames_per_block}",
        "target.cell=[93, 93, 130.5, 90, 90, 120]",
        f"target.space_group='{SPACE_GROUP}'",
        # the report (tests/pipeline/test_report.py) costs ~2 s per run: not drawn here
        "run.report=false",
    ]


def comparable(table, file_names_only: bool = False):
    """A frames table without timings and block ids, as sorted python rows (NaN -> None);
    ``file_names_only`` compares runs of the same files at different URLs."""
    keep = [c for c in table.column_names if c not in (*TIMING_COLUMNS, "block_id")]
    rows = table.select(keep).to_pylist()
    out = []
    for r in rows:
        r = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        if file_names_only:
            r["source_url"] = r["source_url"].rsplit("/", 1)[-1]
        out.append(r)
    return sorted(out, key=lambda r: (r["source_url"], r["frame_index"]))


def read_frames(run_dir: Path | str):
    return pq.read_table(Path(run_dir) / "frames.parquet")


@pytest.fixture(scope="session")
def sim_set(tmp_path_factory: pytest.TempPathFactory):
    """12 frames of a 1024x1024 single-panel detector in 2 CXI files, half of them hits."""
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset

    out = tmp_path_factory.mktemp("sim")
    info = write_simulated_dataset(out, layouts.simple(distance_mm=100.0, n_px=1024), None,
                                   SimulationParams(hit_fraction=0.5), n_frames=12, n_files=2,
                                   seed=11)
    return info


@pytest.fixture(scope="session")
def serial_run(sim_set, tmp_path_factory: pytest.TempPathFactory):
    """The reference: the simulated set processed serially in-process (no Dask)."""
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.run import run_process

    out = tmp_path_factory.mktemp("serial") / "run"
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous"])
    result = run_process([str(p) for p in sim_set.files], str(out), cfg)
    return out, result


DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture()
def dask_cluster(tmp_path):
    """A real scheduler and two single-threaded workers on 127.0.0.1 (no nanny: a killed worker
    stays dead): ``(address, worker processes, {worker address: pid})``."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1.0)
    workers = [subprocess.Popen([DASK, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                 "--no-nanny", "--host", "127.0.0.1", "--name", name,
                                 "--no-dashboard"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name in ("w1", "w2")]
    procs += workers
    try:
        with Client(address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=60)
            pids = client.run(os.getpid)
        yield address, workers, pids
    finally:
        stop_processes(procs)
