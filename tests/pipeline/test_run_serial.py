"""Whole runs in-process (``cluster.kind = synchronous``) on real simulated CXI files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sfxflow.errors import ConfigError
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.manifest import Manifest
from sfxflow.pipeline.run import run_process

from .conftest import base_overrides, comparable, read_frames


def _cfg(sim_set, *extra: str):
    return load_config(overrides=[*base_overrides(sim_set.geometry_path),
                                  "cluster.kind=synchronous", *extra])


def test_serial_run_directory_and_results(sim_set, serial_run):
    out, _result = serial_run
    names = {p.name for p in out.iterdir()}
    assert {"config.toml", "manifest.json", "header.stream", "frames.parquet", "summary.json",
            "shards"} <= names
    frames = read_frames(out)
    assert frames.num_rows == 12
    keys = list(zip(frames["source_url"].to_pylist(), frames["frame_index"].to_pylist(),
                    strict=True))
    assert len(set(keys)) == 12
    # compare with the simulation's truth: every true hit found and indexed, misses are misses
    truth = pq.read_table(sim_set.truth_frames_path).to_pylist()
    status = {(Path(u).name, i): s for (u, i), s in zip(keys, frames["status"].to_pylist(),
                                                        strict=True)}
    for t in truth:
        got = status[(t["file"], t["frame_index"])]
        assert got == ("indexed" if t["is_hit"] else "miss"), t
    indexed = frames.filter(np.array(frames["status"].to_pylist()) == "indexed")
    assert np.allclose(indexed["a"].to_numpy(), 93.0, rtol=0.02)
    assert np.allclose(indexed["c"].to_numpy(), 130.5, rtol=0.02)
    assert np.all(indexed["rmsd_px"].to_numpy() < 2.0)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("frames", "hits", "indexed", "misses", "failed", "hit_rate", "indexing_rate",
                "wall_s", "n_cores", "frames_per_s", "frames_per_s_per_core",
                "core_seconds_per_frame", "stage_seconds", "bytes_read", "bytes_per_frame",
                "read_mb_per_s", "workers", "finish_spread_s", "failed_reasons", "detector",
                "sfxflow_version"):
        assert key in summary, key
    n_hits = sum(t["is_hit"] for t in truth)
    assert summary["frames"] == 12 and summary["hits"] == n_hits
    assert summary["indexed"] == n_hits and summary["failed"] == 0
    assert summary["bytes_read"] > 12 * 1024 * 1024  # float32 frames, uncompressed
    assert summary["detector"]["n_pixels"] == 1024 * 1024
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.counts() == {"pending": 0, "done": 6, "failed": 0}
    # the stream: one header + chunks of every frame
    stream = (out / "header.stream").read_text() + "".join(
        p.read_text() for p in sorted((out / "shards").glob("*.stream")))
    assert stream.startswith("CrystFEL stream format 2.3")
    assert stream.count("----- Begin chunk -----") == 12
    assert stream.count("--- Begin crystal") == n_hits
    # spots shard: hkl on indexed frames
    spots = pq.read_table(next((out / "shards").glob("*.spots.parquet")))
    assert {"fs_px", "ss_px", "h", "k", "l", "indexed"} <= set(spots.column_names)
    # the config written in full
    text = (out / "config.toml").read_text()
    assert "[spots]" in text and "[index.refine]" in text and "sigma_strong" in text


def test_resume_recomputes_nothing_done(sim_set, serial_run, tmp_path):
    out = tmp_path / "run"
    files = [str(p) for p in sim_set.files]
    first = run_process(files, str(out), _cfg(sim_set, "run.max_blocks=3"))
    assert not first.complete and first.blocks_done == 3
    assert not (out / "frames.parquet").exists()
    done = sorted((out / "shards").glob("*.frames.parquet"))
    assert len(done) == 3
    mtimes = {p.name: os.stat(p).st_mtime_ns for p in (out / "shards").iterdir()}
    second = run_process(files, str(out), _cfg(sim_set))
    assert second.complete
    assert second.blocks_skipped == 3 and second.blocks_done == 3
    for name, t in mtimes.items():  # finished shards untouched
        assert os.stat(out / "shards" / name).st_mtime_ns == t, name
    assert comparable(read_frames(out)) == comparable(read_frames(serial_run[0]))
    third = run_process(files, str(out), _cfg(sim_set))  # all done: nothing recomputed
    assert third.blocks_skipped == 6 and third.blocks_done == 0
    assert third.summary["frames"] == 12
    forced = run_process(files, str(out), _cfg(sim_set), force=True)
    assert forced.blocks_done == 6


def test_resume_recomputes_a_corrupted_shard(sim_set, tmp_path):
    out = tmp_path / "run"
    files = [str(p) for p in sim_set.files]
    run_process(files, str(out), _cfg(sim_set))
    victim = sorted((out / "shards").glob("*.spots.parquet"))[2]
    before = pq.read_table(victim)
    assert before.num_rows > 0
    victim.write_bytes(b"garbage")
    again = run_process(files, str(out), _cfg(sim_set))
    assert again.blocks_done == 1 and again.blocks_skipped == 5
    assert pq.read_table(victim).equals(before)  # rewritten with the same spots


def test_interrupt_leaves_no_partial_shard(sim_set, serial_run, tmp_path):
    out = tmp_path / "run"
    files = [str(p) for p in sim_set.files]
    seen = []

    def stop_after_two(report):
        seen.append(report.block_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_process(files, str(out), _cfg(sim_set), on_block=stop_after_two)
    leftovers = [p.name for p in out.rglob(".tmp-*")]
    assert leftovers == []
    assert len(list((out / "shards").glob("*.frames.parquet"))) == 2
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.counts()["done"] == 2
    resumed = run_process(files, str(out), _cfg(sim_set))
    assert resumed.blocks_skipped == 2 and resumed.complete
    assert comparable(read_frames(out)) == comparable(read_frames(serial_run[0]))


def test_changed_settings_refused_on_resume(sim_set, tmp_path):
    out = tmp_path / "run"
    files = [str(sim_set.files[0])]
    run_process(files, str(out), _cfg(sim_set, "run.max_blocks=1"))
    with pytest.raises(ConfigError, match=r"spots\.sigma_strong"):
        run_process(files, str(out), _cfg(sim_set, "spots.sigma_strong=4"))


def _truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def _wrong_dataset_copy(src: Path, dst: Path) -> Path:
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.move("/entry_1/data_1/data", "/entry_1/data_1/pixels")
    return dst


def _corrupt_one_chunk(src: Path, dst: Path, frame: int) -> Path:
    """A copy whose compressed chunk of ``frame`` is overwritten with garbage."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r") as f:
        info = f["/entry_1/data_1/data"].id.get_chunk_info(frame)
    with open(dst, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\xff" * min(4096, info.size - 32))
    return dst


def test_bad_inputs_fail_only_their_frames(tmp_path):
    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset

    data = tmp_path / "data"
    info = write_simulated_dataset(data, layouts.simple(distance_mm=100.0, n_px=512), None,
                                   SimulationParams(hit_fraction=0.0), n_frames=4, n_files=1,
                                   seed=5, compression="bitshuffle-lz4")
    good = info.files[0]
    truncated = _truncated_copy(good, tmp_path / "truncated.cxi")
    wrong = _wrong_dataset_copy(good, tmp_path / "wrong_path.cxi")
    corrupt = _corrupt_one_chunk(good, tmp_path / "corrupt.cxi", frame=2)
    text = tmp_path / "notes.h5"
    text.write_text("this is not an image\n")
    inputs = [str(good), str(truncated), str(wrong), str(text), str(corrupt)]
    cfg = load_config(overrides=[*base_overrides(info.geometry_path, 2),
                                 "cluster.kind=synchronous"])
    result = run_process(inputs, str(tmp_path / "run"), cfg)
    assert result.complete
    frames = read_frames(tmp_path / "run").to_pylist()
    by_file: dict[str, list[dict]] = {}
    for r in frames:
        by_file.setdefault(Path(r["source_url"]).name, []).append(r)
    assert [r["status"] for r in by_file[good.name]] == ["miss"] * 4
    for name in ("truncated.cxi", "wrong_path.cxi", "notes.h5"):
        rows = by_file[name]
        assert len(rows) == 1 and rows[0]["frame_index"] == -1, name
        assert rows[0]["status"] == "failed" and rows[0]["stage"] == "open"
        assert name in rows[0]["reason"]
    assert "pixels" in by_file["wrong_path.cxi"][0]["reason"] or \
        "/entry_1/data_1/data" in by_file["wrong_path.cxi"][0]["reason"]
    corrupt_rows = {r["frame_index"]: r for r in by_file["corrupt.cxi"]}
    assert sorted(corrupt_rows) == [0, 1, 2, 3]
    assert corrupt_rows[2]["status"] == "failed" and corrupt_rows[2]["stage"] == "read"
    assert [corrupt_rows[i]["status"] for i in (0, 1, 3)] == ["miss"] * 3
    summary = result.summary
    assert summary["failed"] == 4 and summary["misses"] == 7
    assert sum(summary["failed_reasons"].values()) == 4
