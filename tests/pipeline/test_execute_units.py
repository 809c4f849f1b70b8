"""Shards, manifest, summary, progress and the executors with an injected reader and frame
function (no image files)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from sfxflow.io.prefetch import Prefetcher
from sfxflow.io.results import RunDir, read_parquet_bytes, shard_names
from sfxflow.models import Beam, Detector, Frame, FrameStatus, ImageResult, Panel
from sfxflow.pipeline.blocks import BlockContext, BlockRef, fetch_block, run_block
from sfxflow.pipeline.execute import execute_dask, execute_serial
from sfxflow.pipeline.manifest import BlockEntry, Manifest
from sfxflow.pipeline.progress import Progress
from sfxflow.pipeline.summary import build_summary

DET = Detector((Panel("p", (0.0, 0.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (4, 4)),))
READ_S = 0.15
_live = {"now": 0, "max": 0}
_live_lock = threading.Lock()


def slow_reader(block, ctx):
    time.sleep(READ_S)
    if "bad" in block.url:
        raise OSError(f"{block.url}: cannot read")
    return [Frame(_pixels(i), DET, Beam(1.0), block.url, i) for i in range(block.start, block.stop)]


def _pixels(i):
    data = np.full((4, 4), i, np.float32)
    data[3, 3] = i + 1  # never all zero: that frame would be recorded as failed
    return data


def counting_frame_fn(frame, config):
    time.sleep(0.05)
    if frame.index == 13:
        raise RuntimeError("bug in the frame function")
    status = FrameStatus.HIT if frame.index % 3 == 0 else FrameStatus.MISS
    return ImageResult(frame.source_url, frame.index, status, n_spots=int(frame.data[0, 0]),
                       timings_s={"spots": 0.05})


def _blocks(n, per=3, url="f.h5"):
    return [BlockRef(f"{url}-{i:03d}", url, i * per, (i + 1) * per) for i in range(n)]


def _ctx(tmp_path, frame_fn=counting_frame_fn):
    return BlockContext(config=None, run=RunDir(str(tmp_path / "run")), frame_fn=frame_fn,
                        read_fn=slow_reader)


def test_run_block_writes_verifiable_shards(tmp_path):
    ctx = _ctx(tmp_path)
    block = BlockRef("b-000", "f.h5", 0, 3)
    report = run_block(block, ctx)
    assert report.n_frames == 3 and report.counts == {"hit": 1, "miss": 2}
    run = ctx.run
    assert run.verify_shards("b-000", 3) == ""
    assert run.verify_shards("b-000", 3, report.checksums) == ""
    assert "rows, expected 4" in run.verify_shards("b-000", 4)
    (tmp_path / "run" / shard_names("b-000")["stream"]).write_text("changed")
    assert "checksum differs" in run.verify_shards("b-000", 3, report.checksums)
    table = read_parquet_bytes(run.read_bytes(shard_names("b-000")["frames"]))
    assert table["frame_index"].to_pylist() == [0, 1, 2]
    assert table["t_read_s"].to_pylist()[0] == pytest.approx(READ_S / 3, rel=0.5)


def test_unreadable_block_and_file_records(tmp_path):
    ctx = _ctx(tmp_path)
    r = run_block(BlockRef("bad-1", "bad.h5", 0, 2), ctx)
    assert r.counts == {"failed": 2} and "OSError: bad.h5: cannot read" in r.failed_reasons
    r = run_block(BlockRef("gone", "gone.h5", -1, 0), ctx, file_error="gone.h5: no such file")
    assert r.n_frames == 1 and r.failed_reasons == {"gone.h5: no such file": 1}
    assert ctx.run.verify_shards("gone", 1) == ""


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "run"))
    run.makedirs()

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        run.write_bytes("shards/x.frames.parquet", b"data")
    assert list((tmp_path / "run" / "shards").iterdir()) == []
    (tmp_path / "run" / "shards" / ".tmp-abc-x").write_bytes(b"partial")
    assert run.remove_temporaries() == 1


def test_prefetcher_holds_at_most_depth_blocks(tmp_path):
    ctx = _ctx(tmp_path)
    pf = Prefetcher(lambda block: fetch_block(block, ctx), depth=1)
    blocks = _blocks(4)
    for b in blocks:
        pf.want(b.block_id, b)
    assert pf.held() == 1  # only one read ahead, the others wait
    got, _, ahead = pf.take(blocks[0].block_id, blocks[0])
    assert ahead and len(got.frames) == 3
    assert pf.held() == 1  # the next one started as soon as the first was taken
    pf.drop(blocks[1].block_id)
    time.sleep(READ_S * 2)
    got, waited_s, ahead = pf.take(blocks[2].block_id, blocks[2])
    assert ahead and waited_s < READ_S
    pf.close()


def test_serial_executor_hides_reading_and_survives_a_bug(tmp_path):
    ctx = _ctx(tmp_path)
    reports, failures = [], []
    blocks = _blocks(6)  # block 4 holds frame 13: its frame function raises
    execute_serial(blocks, ctx, reports.append, failures.append, prefetch_depth=1, attempts=2)
    assert [r.block_id for r in reports] == [b.block_id for b in blocks if b.start != 12]
    assert len(failures) == 1 and failures[0].block.start == 12
    assert "RuntimeError: bug in the frame function" in failures[0].reason
    # the failed block's frames are recorded, and it is not taken for done on resume
    assert "failed as a whole" in ctx.run.verify_shards(failures[0].block.block_id, 3)
    waited = sum(r.fetch_wait_s for r in reports[1:])
    fetched = sum(r.fetch_s for r in reports[1:])
    assert waited < 0.5 * fetched  # reading overlapped computing


def test_dask_executor_in_process_cluster(tmp_path):
    from distributed import Client, LocalCluster

    ctx = _ctx(tmp_path)
    blocks = _blocks(8)
    reports, failures = [], []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        execute_dask(client, blocks, ctx, reports.append, failures.append, prefetch_depth=1,
                     task_retries=1)
    assert sorted(r.block_id for r in reports) == sorted(b.block_id for b in blocks
                                                         if b.start != 12)
    assert [f.block.start for f in failures] == [12]
    assert len({r.worker for r in reports}) == 2
    assert sum(r.prefetched for r in reports) >= 4


def test_manifest_and_summary_and_progress(tmp_path):
    m = Manifest.from_plan(["in"], [BlockEntry("a", "u", 0, 2), BlockEntry("b", "u", -1, 0)])
    m.blocks["a"].state = "done"
    back = Manifest.from_json(m.to_json())
    assert back.counts() == {"pending": 1, "done": 1, "failed": 0, "unread": 0}
    assert back.blocks["b"].expected_rows == 1
    ctx = _ctx(tmp_path)
    reports = [run_block(b, ctx) for b in _blocks(2)]
    for i, r in enumerate(reports):
        r.received_at = 1.0 + i
    frames = ctx.run.read_frames_shards([b.block_id for b in _blocks(2)])
    s = build_summary(frames, reports, wall_s=2.0, n_cores=1, detector={"n_pixels": 16})
    assert (s["frames"], s["hits"], s["misses"], s["failed"]) == (6, 2, 4, 0)
    assert s["hit_rate"] == pytest.approx(2 / 6) and s["frames_per_s"] == 3.0
    assert s["core_seconds_per_frame"] == pytest.approx(2.0 / 6)
    assert s["workers"]["serial"]["finish_s"] == 2.0 and s["workers"]["serial"]["frames"] == 6
    assert s["stage_seconds"]["spots"] == pytest.approx(0.3)
    out = io.StringIO()
    p = Progress(6, stream=out, tty=True)
    p.update(3, hits=1, indexed=1)
    p.update(3, hits=1)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "6/6 frames" in text and text.endswith("\n")
    assert "hits 33.3%" in text and "indexed 50.0% of hits" in text
