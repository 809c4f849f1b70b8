"""What a run says and keeps in the smaller cases of issue 19 item 8: worker failure dumps,
oversized blocks, a no-op rerun's summary, unread blocks, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sfxflow.benchmarks.localhost import free_port
from sfxflow.cli import main
from sfxflow.errors import EXIT_RERUN, RunDirError
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
from sfxflow.pipeline.runlock import LOCK_NAME

from .conftest import CELL, SPACE_GROUP, base_overrides


def _cfg(sim_set, *more):
    return load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous",
                                  *more])


def _argv(sim_set, out, *more):
    return ["process", *map(str, sim_set.files), "--out", str(out), "--geometry",
            str(sim_set.geometry_path), "--cell", CELL, "--space-group", SPACE_GROUP,
            "--no-progress", "--no-report", *more]


@pytest.mark.parametrize(("value", "said"), [
    ("1000000", "expected an integer from 1 to 1000"),
    # 1 Mpx frames: 4 MiB each, 256 in a block of 1 GiB
    ("500", "holds 2.1 GB of pixels in a worker's memory; expected at most 256"),
])
def test_a_block_too_large_for_memory_is_refused(sim_set, tmp_path, capsys, value, said):
    # before: accepted (worker peak 2.09 GB at 1000000 vs 0.59 GB at 10)
    code = main(_argv(sim_set, tmp_path / "run", "--frames-per-block", value))
    err = capsys.readouterr().err
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_no_op_rerun_keeps_the_detector_size(sim_set, tmp_path):
    out = tmp_path / "run"
    assert run_process([str(p) for p in sim_set.files[:1]], str(out), _cfg(sim_set)).complete
    first = json.loads((out / "summary.json").read_text())["detector"]["n_pixels"]
    assert first == 1024 * 1024
    again = run_process([str(p) for p in sim_set.files[:1]], str(out), _cfg(sim_set))
    assert again.blocks_done == 0  # nothing to do
    # before: 0
    assert json.loads((out / "summary.json").read_text())["detector"]["n_pixels"] == first


def test_unread_blocks_are_not_also_blocks_left(sim_set, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: storage unreachable
    code = main(["process", "s3://bucket/run_0000.cxi", sim_set.files[1].as_posix(),
                 "--out", str(tmp_path / "run"), "--endpoint-url", dead,
                 "--geometry", str(sim_set.geometry_path), "--cell", CELL,
                 "--space-group", SPACE_GROUP, "--no-progress", "--no-report",
                 "--scheduler", "synchronous", "--set", "run.storage_retry_s=0"])
    err = capsys.readouterr().err
    assert code == EXIT_RERUN
    assert "1 block(s) could not be read from storage" in err
    assert "block(s) left" not in err  # before: "0 block(s) left" beside it


def test_sigterm_says_so_and_leaves_the_run_resumable(sim_set, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "sfxflow", *_argv(sim_set, out, "--frames-per-block", "1",
                                                     "--scheduler", "synchronous")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            shards = out / "shards"
            if shards.is_dir() and any(n.endswith(".frames.parquet") for n in os.listdir(shards)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # before: exit 143 and nothing said
    assert proc.returncode == 143
    assert "terminated (SIGTERM); run the same command again to resume" in err
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists()
    done = [b for b in json.loads((out / "manifest.json").read_text())["blocks"]
            if b["state"] == "done"]
    assert done
    again = subprocess.run([*argv], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["frames"] == 12
    assert summary["blocks_skipped"] >= len(done)


@pytest.mark.dask
def test_a_run_directory_failing_on_dask_is_one_line(sim_set, tmp_path, capfd):
    out = tmp_path / "run"
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path, frames_per_block=1),
                                 "cluster.kind=local", "cluster.n_workers=2",
                                 "cluster.threads_per_worker=1"])

    def break_shards(report):
        if (out / "shards").is_dir():  # renamed at once: workers may be writing into it
            (out / "shards").rename(out / "shards-aside")
            (out / "shards").write_text("not a folder")

    with pytest.raises(RunDirError):
        run_process([str(p) for p in sim_set.files], str(out), cfg, on_block=break_shards)
    err = capfd.readouterr().err
    # before: five "Compute Failed" dumps with the task, exception and traceback text
    assert "Compute Failed" not in err and "Traceback" not in err


def test_a_signal_inside_a_numba_kernel_stops_the_run_not_the_frame(monkeypatch):
    # a SIGTERM handled while a numba kernel ran came back as "SystemError: CPUDispatcher(...)
    # returned a result with an exception set" (the interruption its cause): recorded as the
    # frame's failure, the run went on and exited 0 (the SIGTERM test above, 1 run in 4)
    import numpy as np

    from sfxflow.errors import Terminated
    from sfxflow.models import Beam, Detector, Frame, Panel
    from sfxflow.pipeline import frame as frame_mod

    def interrupted(*_args, **_kwargs):
        try:
            raise Terminated()
        except Terminated as exc:
            raise SystemError("CPUDispatcher(<function _noise_floor>) returned a result with "
                              "an exception set") from exc

    monkeypatch.setattr(frame_mod, "find_spots", interrupted)
    panel = Panel("p0", (-10.0, -10.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (100, 100))
    frame = Frame(np.ones((100, 100), np.float32), Detector((panel,)), Beam(1.0), "x.h5", 0)
    with pytest.raises(Terminated):
        frame_mod.process_frame(frame, frame_mod.ProcessConfig())
    monkeypatch.setattr(frame_mod, "find_spots", lambda *a, **k: 1 / 0)
    assert frame_mod.process_frame(frame, frame_mod.ProcessConfig()).status.value == "failed"


def test_a_swallowed_sigterm_still_ends_the_run_with_143(sim_set, tmp_path, monkeypatch, capsys):
    # a signal's exception caught where it lands (a library's except clause, a kernel's
    # SystemError no one unwraps) used to let the run go on and exit 0
    import sfxflow.pipeline.frame as frame_mod
    from sfxflow.cli import main

    real = frame_mod.process_frame
    calls = []

    def swallowing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here, in the main thread
            except BaseException:  # what the test is about: a handler swallowing it
                pass
        return real(*args, **kwargs)

    monkeypatch.setattr(frame_mod, "process_frame", swallowing)
    out = tmp_path / "run"
    rc = main(_argv(sim_set, out, "--frames-per-block", "1", "--scheduler", "synchronous"))
    assert rc == 143
    assert "terminated (SIGTERM); run the same command again to resume" in capsys.readouterr().err
    assert len(calls) < 12  # it stopped at the next block, not at the end
    monkeypatch.setattr(frame_mod, "process_frame", real)
    assert main(_argv(sim_set, out, "--frames-per-block", "1", "--scheduler", "synchronous")) == 0
    assert json.loads((out / "summary.json").read_text())["frames"] == 12
