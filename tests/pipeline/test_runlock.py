"""One run per run directory, and a run directory bound to its inputs (issue 10, item 4)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sfxflow.errors import ConfigError
from sfxflow.io.results import RunDir
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
from sfxflow.pipeline.runlock import LOCK_NAME, RunLock, RunLocked

from .conftest import base_overrides, read_frames


def _cfg(sim_set, *more):
    return load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous",
                                  *more])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, **fields):
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other",
            "started_at": now, "updated_at": now, "in_flight": ""}
    info.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(info))


def test_a_second_live_run_is_refused(sim_set, tmp_path):
    # before: both ran, deleting each other's temporary files and overwriting the manifest
    out = tmp_path / "run"
    _write_lock(out)  # this test process: alive
    with pytest.raises(RunLocked) as info:
        run_process([str(p) for p in sim_set.files], str(out), _cfg(sim_set))
    text = str(info.value)
    assert f"process {os.getpid()} on host {socket.gethostname()}" in text
    assert LOCK_NAME in text
    assert not (out / "manifest.json").exists()


def test_two_lock_holders_exclude_each_other(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.makedirs()
    with RunLock(run):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked):
            RunLock(run).acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(run):  # released: free again
        pass


def test_stale_locks_are_taken_over(sim_set, tmp_path, caplog):
    out = tmp_path / "run"
    _write_lock(out, pid=_dead_pid())  # same host, process gone
    result = run_process([str(p) for p in sim_set.files[:1]], str(out), _cfg(sim_set))
    assert result.complete
    assert "no longer alive" in caplog.text
    assert not (out / LOCK_NAME).exists()
    # another host: its processes cannot be asked; a silent heartbeat means dead
    _write_lock(out, host="elsewhere.example", pid=1, updated_at=time.time() - 3600)
    assert run_process([str(p) for p in sim_set.files[:1]], str(out), _cfg(sim_set)).complete
    _write_lock(out, host="elsewhere.example", pid=1)
    with pytest.raises(RunLocked, match=r"host elsewhere\.example"):
        run_process([str(p) for p in sim_set.files[:1]], str(out), _cfg(sim_set))


def test_fewer_or_changed_inputs_are_refused_unless_forced(sim_set, tmp_path):
    # before: a later run with fewer inputs silently shrank a finished run's frames.parquet
    files = [str(p) for p in sim_set.files]
    out = tmp_path / "run"
    run_process(files, str(out), _cfg(sim_set))
    assert read_frames(out).num_rows == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["url"] for f in manifest["files"]] == files
    assert all(f["size"] > 0 and f["version"].startswith("mtime_ns:") for f in manifest["files"])
    with pytest.raises(ConfigError, match=r"no longer among the inputs.*--force"):
        run_process(files[:1], str(out), _cfg(sim_set))
    assert read_frames(out).num_rows == 12  # untouched
    # changed content under the same name (size or mtime)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in sim_set.files:
        (copy / p.name).write_bytes(p.read_bytes())
    copies = [str(copy / p.name) for p in sim_set.files]
    out2 = tmp_path / "run2"
    run_process(copies, str(out2), _cfg(sim_set))
    st = os.stat(copies[1])
    os.utime(copies[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=r"run_0001.cxi changed \(size"):
        run_process(copies, str(out2), _cfg(sim_set))
    # --force: recompute with the new set, and no shard of the old set stays behind
    result = run_process(files[:1], str(out), _cfg(sim_set), force=True)
    assert result.complete and read_frames(out).num_rows == 6
    names = os.listdir(out / "shards")
    assert names and not any(sim_set.files[1].name in n for n in names)


def test_new_input_files_are_processed_too(sim_set, tmp_path):
    files = [str(p) for p in sim_set.files]
    out = tmp_path / "run"
    run_process(files[:1], str(out), _cfg(sim_set))
    result = run_process(files, str(out), _cfg(sim_set))
    assert result.blocks_skipped == 3 and result.blocks_done == 3
    assert read_frames(out).num_rows == 12
