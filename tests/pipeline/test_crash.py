"""A block that crashes the process (segmentation fault) in serial mode (issue 10, item 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sfxflow.pipeline.runlock import LOCK_NAME

from .conftest import base_overrides, comparable, read_frames
from .crashing import CRASH_FILE, CRASH_FRAME

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.run import run_process
from crashing import crash_on_one_frame
files, out, overrides = json.loads(sys.argv[1])
r = run_process(files, out, load_config(overrides=overrides), frame_fn=crash_on_one_frame)
print(json.dumps({"failed": r.blocks_failed, "done": r.blocks_done, "complete": r.complete}))
"""


def _run(files, out, overrides):
    # crashing.py as a top-level module (the spawned child imports it by name): a package named
    # `tests` installed by another project (reciprocalspaceship ships one) would shadow ours
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        str(ROOT / "tests" / "pipeline")])}
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([files, out, overrides])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_crashing_block_is_isolated_then_recorded_failed(sim_set, serial_run, tmp_path):
    # before: `--scheduler synchronous` crashed at the same block on every rerun
    files = [str(p) for p in sim_set.files]
    out = str(tmp_path / "run")
    overrides = [*base_overrides(sim_set.geometry_path, frames_per_block=2),
                 "cluster.kind=synchronous"]
    first = _run(files, out, overrides)
    assert first.returncode == -signal.SIGSEGV, first.stderr
    lock = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert "000002-000004" in lock["in_flight"]  # recorded before the block started

    for _ in range(2):  # the rerun, and a rerun of that: neither crashes
        again = _run(files, out, overrides)
        assert again.returncode == 0, again.stderr
        outcome = json.loads(again.stdout.strip().splitlines()[-1])
        assert outcome["complete"] and outcome["failed"] == 1
        assert "decoder crashed" in again.stderr
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    frames = read_frames(out)
    bad = [r for r in frames.to_pylist() if r["status"] == "failed"]
    assert [(Path(r["source_url"]).name, r["frame_index"]) for r in bad] == [
        (CRASH_FILE, CRASH_FRAME), (CRASH_FILE, CRASH_FRAME + 1)]
    assert all(r["reason"].startswith("decoder crashed") and "SIGSEGV" in r["reason"] for r in bad)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    crashed = [b for b in manifest["blocks"] if b["crashes"]]
    assert any(b["state"] == "failed" and b["crashes"] >= 2 for b in crashed)
    # every other frame is as in the reference run
    good = [r for r in comparable(frames) if r["status"] != "failed"]
    reference = [r for r in comparable(read_frames(serial_run[0]))
                 if not (r["source_url"].endswith(CRASH_FILE)
                         and r["frame_index"] in (CRASH_FRAME, CRASH_FRAME + 1))]
    assert good == reference
