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
    assert manifest.counts() == {"pending": 0, "done": 6, "failed": 0, "unread": 0}
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


def test_frames_without_information_are_failed_at_read(tmp_path):
    # before: all-NaN, all-inf, all-zero and saturated frames, and a 1 eV photon energy, were
    # saved as ordinary misses with no reason
    import h5py

    from sfxflow.algorithms import layouts
    from sfxflow.algorithms.simulate import SimulationParams
    from sfxflow.io.simulated import write_simulated_dataset

    info = write_simulated_dataset(tmp_path / "data", layouts.simple(distance_mm=100.0, n_px=256),
                                   None, SimulationParams(hit_fraction=0.0), n_frames=6,
                                   n_files=1, seed=3)
    with h5py.File(info.files[0], "r+") as f:
        data = f["/entry_1/data_1/data"]
        data[0] = np.nan
        data[1] = 0.0
        data[3] = np.inf
        data[4] = 50000.0
        f["/LCLS/photon_energy_eV"][2] = 1.0
    geom = tmp_path / "saturating.geom"
    geom.write_text(info.geometry_path.read_text() + "p0/max_adu = 50000\n")
    cfg = load_config(overrides=[*base_overrides(geom, 6), "cluster.kind=synchronous"])
    result = run_process([str(info.files[0])], str(tmp_path / "run"), cfg)
    assert result.complete
    rows = {r["frame_index"]: r for r in read_frames(tmp_path / "run").to_pylist()}
    expected = {0: "every pixel is NaN", 1: "every pixel is zero", 2: "photon energy 1 eV",
                3: "every pixel is +inf", 4: "every pixel is saturated (>= max_adu 50000)"}
    for i, reason in expected.items():
        assert (rows[i]["status"], rows[i]["stage"]) == ("failed", "read"), rows[i]
        assert reason in rows[i]["reason"]
    assert "accepted range 620 eV to 6.2 MeV" in rows[2]["reason"]
    assert rows[5]["status"] == "miss"


@pytest.mark.parametrize("energy", ["1 eV", "1e9 eV"])
def test_geometry_with_an_absurd_photon_energy_is_refused(sim_set, tmp_path, capsys, energy):
    from sfxflow.cli import main

    geom = tmp_path / "bad.geom"
    geom.write_text(sim_set.geometry_path.read_text().replace(
        "photon_energy = /LCLS/photon_energy_eV eV", f"photon_energy = {energy}"))
    code = main(["process", str(sim_set.files[0]), "--out", str(tmp_path / "run"),
                 "--geometry", str(geom), "--scheduler", "synchronous"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(geom) in err and "photon energy" in err
    assert "accepted range 620 eV to 6.2 MeV" in err


def test_rerun_keeps_the_measured_figures_and_logs_one_line(sim_set, tmp_path, caplog):
    # before: a rerun with nothing to do wrote core_seconds_per_frame null, workers {} and
    # bytes_read 0 (and `sfxflow plan --summary` refused it); resuming logged one "will be
    # recomputed: missing shard: [Errno 2]" line per block not yet done
    from sfxflow.cost.model import measurement_from_summary

    files = [str(p) for p in sim_set.files]
    out = tmp_path / "run"
    cfg = load_config(overrides=[*base_overrides(sim_set.geometry_path), "cluster.kind=synchronous"])
    run_process(files, str(out), load_config(overrides=[
        *base_overrides(sim_set.geometry_path), "cluster.kind=synchronous", "run.max_blocks=2"]))
    caplog.clear()
    with caplog.at_level("INFO", logger="sfxflow"):
        run_process(files, str(out), cfg)
    assert "will be recomputed" not in caplog.text and "Errno" not in caplog.text
    assert "resuming: 2 block(s) already done, 4 to do" in caplog.text
    measured = json.loads((out / "summary.json").read_text())
    assert measured["frames_processed"] == 8 and measured["core_seconds_per_frame"] > 0

    again = run_process(files, str(out), cfg)
    assert again.blocks_done == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("core_seconds_per_frame", "workers", "bytes_read", "frames_per_s",
                "frames_processed", "measured_by_run_at"):
        assert summary[key] == measured[key], key
    assert summary["blocks_skipped"] == 6 and summary["frames"] == 12
    assert measurement_from_summary(summary, str(out / "summary.json"), 1.0) is not None

    (out / "shards" / os.listdir(out / "shards")[0]).unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="sfxflow"):
        run_process(files, str(out), cfg)
    lines = [r.getMessage() for r in caplog.records if "recomputed" in r.getMessage()]
    assert len(lines) == 1 and "1 block(s) will be recomputed (1 " in lines[0]
