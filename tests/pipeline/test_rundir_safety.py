"""A rerun deletes nothing it did not write, and a dead run's lock is handled wherever the run
directory is (issue 19, items 2 and 3)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from sfxflow.errors import ConfigError
from sfxflow.io.results import shard_names
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
from sfxflow.pipeline.runlock import LOCK_NAME

from .conftest import base_overrides, read_frames


def _cfg(sim_set, *more):
    return load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous",
                                  *more])


def _copies(sim_set, folder):
    folder.mkdir()
    out = []
    for path in sim_set.files:
        shutil.copy2(path, folder / path.name)
        out.append(folder / path.name)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_text(**fields) -> str:
    now = time.time()
    info = {"host": socket.gethostname(), "pid": _dead_pid(), "token": "dead-run",
            "started_at": now, "updated_at": now, "in_flight": ""}
    info.update(fields)
    return json.dumps(info)


def _statuses(run):
    t = read_frames(run)
    return sorted(zip(t["source_url"].to_pylist(), t["frame_index"].to_pylist(),
                      t["status"].to_pylist(), strict=True))


def _check_unopenable_keeps_blocks(sim_set, tmp_path, make_unopenable):
    files = _copies(sim_set, tmp_path / "in")
    out = tmp_path / "run"
    first = run_process([str(p) for p in files], str(out), _cfg(sim_set))
    assert first.complete
    before = _statuses(out)
    shards_before = sorted(os.listdir(out / "shards"))
    make_unopenable(files[0])
    again = run_process([str(p) for p in files], str(out), _cfg(sim_set))
    # before: the file's 3 finished blocks were deleted and its 6 frames became 1 failed record
    assert sorted(os.listdir(out / "shards")) == shards_before
    assert _statuses(out) == before
    assert again.complete and again.blocks_skipped == first.blocks_total
    assert again.summary["frames"] == first.summary["frames"] == 12


def test_an_input_turned_broken_link_keeps_its_finished_blocks(sim_set, tmp_path, caplog):
    def broken_link(path):
        path.rename(path.with_suffix(".moved"))
        path.symlink_to(path.with_name("gone.cxi"))

    _check_unopenable_keeps_blocks(sim_set, tmp_path, broken_link)
    assert "keeping its 3 block(s) from the previous run" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; the "
                    "broken-link test above covers the same path as root")
def test_an_input_without_read_permission_keeps_its_finished_blocks(sim_set, tmp_path):
    _check_unopenable_keeps_blocks(sim_set, tmp_path, lambda p: p.chmod(0))


def test_other_files_in_shards_are_never_deleted(sim_set, tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "notes.txt").write_text("keep")
    assert run_process([str(sim_set.files[0])], str(out), _cfg(sim_set)).complete
    assert (out / "shards" / "notes.txt").read_text() == "keep"
    # through a symlinked shards folder, and with --force
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "shards").symlink_to(elsewhere)
    assert run_process([str(sim_set.files[0])], str(linked), _cfg(sim_set)).complete
    assert run_process([str(sim_set.files[0])], str(linked), _cfg(sim_set), force=True).complete
    assert (elsewhere / "mine.txt").read_text() == "keep"


def test_shards_of_other_blocks_are_refused_unless_forced(sim_set, serial_run, tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "notes.txt").write_text("keep")
    other = sorted(p for p in os.listdir(serial_run[0] / "shards")
                   if sim_set.files[1].name in p)
    for name in other:
        shutil.copy2(serial_run[0] / "shards" / name, out / "shards" / name)
    with pytest.raises(ConfigError, match=r"shard file\(s\) of blocks that are not part of"):
        run_process([str(sim_set.files[0])], str(out), _cfg(sim_set))
    assert sorted(os.listdir(out / "shards")) == sorted([*other, "notes.txt"])
    assert run_process([str(sim_set.files[0])], str(out), _cfg(sim_set), force=True).complete
    left = os.listdir(out / "shards")
    assert "notes.txt" in left and not any(sim_set.files[1].name in n for n in left)


def test_a_file_readable_again_replaces_its_failed_record(sim_set, tmp_path):
    files = _copies(sim_set, tmp_path / "in")
    hidden = files[0].with_suffix(".moved")
    files[0].rename(hidden)
    files[0].symlink_to(tmp_path / "in" / "gone.cxi")
    out = tmp_path / "run"
    run_process([str(p) for p in files], str(out), _cfg(sim_set))
    assert (-1, "failed") in {(i, s) for _, i, s in _statuses(out)}
    files[0].unlink()
    hidden.rename(files[0])
    assert run_process([str(p) for p in files], str(out), _cfg(sim_set)).complete
    assert len(_statuses(out)) == 12 and "failed" not in {s for *_, s in _statuses(out)}
    assert not any(n.endswith("-unreadable.frames.parquet") for n in os.listdir(out / "shards"))


def test_a_rerun_naming_the_inputs_another_way_resumes(sim_set, tmp_path, monkeypatch):
    files = _copies(sim_set, tmp_path / "in")
    monkeypatch.chdir(tmp_path / "in")
    out = tmp_path / "run"
    first = run_process([p.name for p in files], str(out), _cfg(sim_set))
    # before: "the input files differ ... segv.cxi no longer among the inputs"
    again = run_process([str(p.resolve()) for p in files], str(out), _cfg(sim_set))
    assert again.complete and again.blocks_skipped == first.blocks_total
    assert len(os.listdir(out / "shards")) == first.blocks_total * len(shard_names("x"))


def test_a_refused_run_keeps_the_dead_runs_lock(sim_set, tmp_path):
    out = tmp_path / "run"
    assert run_process([str(sim_set.files[0])], str(out), _cfg(sim_set)).complete
    dead = _lock_text(in_flight="run_0001.cxi-x-000000-000002")
    (out / LOCK_NAME).write_text(dead)
    with pytest.raises(ConfigError):  # another block size: refused
        run_process([str(sim_set.files[0])], str(out), _cfg(sim_set, "io.frames_per_block=3"))
    # before: the refused run took the lock over and deleted it, losing the crash record
    assert json.loads((out / LOCK_NAME).read_text()) == json.loads(dead)
    assert run_process([str(sim_set.files[0])], str(out), _cfg(sim_set)).complete
    assert not (out / LOCK_NAME).exists()


@pytest.mark.s3
def test_a_dead_runs_lock_on_s3_is_stale_at_once(sim_set, s3_bucket, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    out = f"s3://{s3_bucket}/out/run"
    # the run died while the endpoint was down: its lock stayed, with a fresh heartbeat
    fs.pipe_file(f"{s3_bucket}/out/run/{LOCK_NAME}", _lock_text().encode())
    t0 = time.monotonic()
    # before: refused for 10 minutes ("in use by another run")
    result = run_process([str(sim_set.files[0])], out, _cfg(sim_set),
                         storage_options=s3_storage_options)
    assert result.complete and time.monotonic() - t0 < 120
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/out/run/{LOCK_NAME}")


@pytest.mark.s3
def test_a_prefix_unlisted_then_listed_resumes_and_drops_its_placeholder(
        sim_set, s3_server, s3_bucket, s3_storage_options, tmp_path):
    import s3fs

    from sfxflow.benchmarks.tcp_proxy import TcpProxy

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for path in sim_set.files:
        fs.put_file(str(path), f"{s3_bucket}/in/{path.name}")
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))  # not started: connections refused
    options = {**s3_storage_options, "client_kwargs": {"endpoint_url": proxy.url}}
    out = tmp_path / "run"
    cfg = _cfg(sim_set, "run.storage_retry_s=0")
    first = run_process([f"s3://{s3_bucket}/in/"], str(out), cfg, storage_options=options)
    assert first.blocks_unread == 1 and not first.complete
    with proxy:
        again = run_process([f"s3://{s3_bucket}/in/"], str(out), cfg, storage_options=options)
    # the one-record shards of the unlisted prefix were this run directory's own: not refused
    # as another run's, and gone once every block of the run is done
    assert again.complete and again.summary["frames"] == 12
    assert not any(n.endswith("-unreadable.frames.parquet") for n in os.listdir(out / "shards"))
