"""The integrate stage in the per-frame pipeline: several lattices on a frame, real CSPAD frames,
bad crystals kept with a reason, and streams that CrystFEL 0.12's partialator merges."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sfxflow.algorithms import layouts
from sfxflow.algorithms.index import misorientation_deg
from sfxflow.algorithms.simulate import SimulationParams, random_crystal, simulate_frame
from sfxflow.models import Detector, Frame, FrameStatus
from sfxflow.pipeline.config import load_config
from sfxflow.pipeline.frame import process_frame

THERMOLYSIN = ["target.cell=[93, 93, 130.5, 90, 90, 120]", "target.space_group='P6122'"]


def _config(*extra: str):
    return load_config(overrides=[*THERMOLYSIN, *extra])


def test_two_crystals_on_one_frame_are_both_indexed_and_integrated():
    params = SimulationParams(crystal_scale_photons=400.0)
    det = Detector(tuple(replace(p, adu_per_photon=params.adu_per_photon)
                         for p in layouts.simple(distance_mm=100.0, n_px=1024).panels))
    beam = params.beam()
    rng = np.random.default_rng(11)
    first = random_crystal(params.cell, params.space_group, rng)
    second = random_crystal(params.cell, params.space_group, rng)
    image_a, _ = simulate_frame(det, beam, first, params, rng)
    # the second crystal's photons only (no second background), Poisson noise of its own
    spots_only = replace(params, background_photons=0.0, water_ring_photons=0.0,
                         readout_noise_photons=0.0, hot_fraction=0.0)
    image_b, _ = simulate_frame(det, beam, second, spots_only, rng)
    frame = Frame(image_a + image_b, det, beam, "two.cxi", 0)
    result = process_frame(frame, _config())
    assert result.status == FrameStatus.INDEXED
    assert len(result.crystals) == 2
    found = [c.crystal for c in result.crystals]
    for truth in (first, second):
        assert min(misorientation_deg(c, truth) for c in found) < 0.05
    for c in result.crystals:
        assert c.status == "integrated" and c.n_integrated > 100
        assert np.isfinite(c.profile_radius_inv_a) and np.isfinite(c.resolution_limit_a)
    # each spot carries the indices of the lattice that explains it
    assert result.miller_indices is not None
    assert np.any(result.miller_indices != 0, axis=1).sum() >= sum(
        c.n_indexed for c in result.crystals) - 5


def test_crystal_predicted_off_the_detector_is_kept_with_a_reason():
    from sfxflow.algorithms.index import IndexResult
    from sfxflow.pipeline.frame import integrate_lattices

    params = SimulationParams()
    det = layouts.simple(distance_mm=100.0, n_px=1024)
    beam = params.beam()
    crystal = random_crystal(params.cell, params.space_group, np.random.default_rng(1))
    image, _ = simulate_frame(det, beam, crystal, params, np.random.default_rng(2))
    masked = Detector(tuple(p.with_mask(np.zeros(p.shape, bool)) for p in det.panels))
    lattice = IndexResult(success=True, crystal=crystal,
                          miller_indices=np.zeros((0, 3), np.int32),
                          indexed_mask=np.zeros(0, bool))
    # every peak masked: integrated nothing, recorded as failed with the reason
    (rec,) = integrate_lattices(Frame(image, masked, beam), [lattice], _config())
    assert rec.status == "failed" and "could be integrated" in rec.reason
    # a crystal whose reflections all miss the detector, next to a good one
    far = Detector(tuple(replace(p, origin_mm=(4000.0, 4000.0, 100.0)) for p in det.panels))
    recs = integrate_lattices(Frame(image, far, beam), [lattice], _config())
    assert recs[0].status == "failed" and "detector" in recs[0].reason
    good, = integrate_lattices(Frame(image, det, beam), [lattice], _config())
    assert good.status == "integrated"


@pytest.mark.parametrize(("name", "n_crystals"), [("idx-20130301060858401.cbf", 1),
                                                  ("idx-20130301060858601.cbf", 2)])
def test_real_cspad_frames_strong_reflections_sit_on_found_spots(shared_data, name, n_crystals):
    pytest.importorskip("sfxflow.io.cbf")
    from sfxflow.io.sources import open_source

    with open_source(str(shared_data / "lcls-cspad-thermolysin" / name)) as src:
        frame = src.read_frame(0)
    result = process_frame(frame, _config("detector.gain_adu_per_photon=9", "spots.min_snr=6"))
    assert result.status == FrameStatus.INDEXED, result.reason
    assert len(result.crystals) == n_crystals
    spots = result.spots
    assert spots is not None
    for c in result.crystals:
        refl = c.reflections
        assert c.status == "integrated" and refl is not None
        strong = (refl["intensity"] / refl["sigma"] >= 5) & ((refl["flags"] & 5) == 0)
        dist = []
        for i in np.flatnonzero(strong):
            on = spots.panel == refl["panel"][i]
            dist.append(np.min(np.hypot(spots.fs_px[on] - refl["fs_px"][i],
                                        spots.ss_px[on] - refl["ss_px"][i]), initial=np.inf))
        assert strong.sum() >= 30
        assert np.median(dist) <= 1.0
        assert 1.5 < c.resolution_limit_a < 4.0
        assert 5e-5 <= c.profile_radius_inv_a <= 2e-3


@pytest.fixture(scope="module")
def process_run(tmp_path_factory):
    from sfxflow.cli import main
    from sfxflow.io.simulated import write_simulated_dataset

    tmp = tmp_path_factory.mktemp("integrate_run")
    data = write_simulated_dataset(tmp / "sim", layouts.simple(distance_mm=100.0, n_px=1024),
                                   None, SimulationParams(hit_fraction=1.0), n_frames=4, seed=3)
    run = tmp / "run"
    assert main(["-q", "process", str(data.files[0]), "--geometry", str(data.geometry_path),
                 "--cell", "93 93 130.5 90 90 120", "--space-group", "P6122", "--out", str(run),
                 "--scheduler", "synchronous"]) == 0
    shutil.rmtree(tmp / "sim")
    return run


def test_process_writes_crystals_and_reflections(process_run):
    import pyarrow.parquet as pq

    frames = pq.read_table(process_run / "frames.parquet").to_pylist()
    crystals = pq.read_table(process_run / "crystals.parquet").to_pylist()
    assert sum(f["n_crystals"] for f in frames) == len(crystals) >= 3
    for f in frames:
        if f["status"] == "indexed":
            assert f["n_integrated"] > 50 and f["t_integrate_s"] > 0
            assert f["profile_radius_inv_a"] > 0 and 1.0 < f["resolution_limit_a"] < 5.0
    for c in crystals:
        assert c["status"] == "integrated" and c["reason"] == ""
        assert c["n_integrated"] <= c["n_predicted"] and c["wavelength_a"] > 0
    refl = pq.read_table(sorted((process_run / "shards").glob("*.reflections.parquet"))[0])
    assert refl.num_rows > 0
    assert set(refl.column_names) >= {"h", "k", "l", "intensity", "sigma", "partiality", "flags",
                                      "lorentz", "polarisation", "peak_pixels", "d_a"}


def test_partialator_merges_every_crystal_of_a_process_stream(tmp_path, shared_data: Path, process_run):
    partialator = shared_data.parent / "peers" / "crystfel-0.12" / "bin" / "partialator"
    if not partialator.exists():
        pytest.skip(f"CrystFEL 0.12 partialator not found at {partialator}")
    probe = subprocess.run([str(partialator), "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"partialator does not run here (missing libraries?): {probe.stderr[:200]}")
    from sfxflow.io.stream import read_stream

    run = process_run
    stream = tmp_path / "all.stream"
    with stream.open("w") as out:
        out.write((run / "header.stream").read_text())
        for shard in sorted((run / "shards").glob("*.stream")):
            out.write(shard.read_text())
    ours = read_stream(stream)
    n_crystals = sum(len(c.crystals) for c in ours)
    assert n_crystals >= 3
    for chunk in ours:
        for x in chunk.crystals:
            assert len(x.reflections) > 50 and np.isfinite(x.reflections.peak).all()
            assert float(x.info["profile_radius"].split()[0]) > 0
    # our reader gives back what the reflections shards hold (to the stream's precision)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(
        (run / "shards").glob("*.reflections.parquet"))]).to_pydict()
    for chunk in ours:
        for k, x in enumerate(chunk.crystals):
            rows = [i for i, (f, c, fl) in enumerate(zip(table["frame_index"], table["crystal"],
                                                         table["flags"], strict=True))
                    if f == chunk.frame_index and c == k and (fl & 7) == 0]
            assert len(rows) == len(x.reflections)
            np.testing.assert_array_equal(x.reflections.hkl[:, 0], [table["h"][i] for i in rows])
            np.testing.assert_allclose(x.reflections.intensity,
                                       [table["intensity"][i] for i in rows], atol=0.0051)
            np.testing.assert_allclose(x.reflections.fs_px, [table["fs_px"][i] for i in rows],
                                       atol=0.051)
    unmerged = tmp_path / "unmerged.txt"
    proc = subprocess.run([str(partialator), "-i", str(stream), "-o", str(tmp_path / "m.hkl"),
                           "-y", "622", "--model=unity", "--iterations=1",
                           "--min-measurements=1", "--no-scale", "--no-deltacchalf",
                           "--no-logs", f"--unmerged-output={unmerged}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every crystal is taken and none flagged (rejected) ...
    lines = unmerged.read_text().splitlines()
    assert sum(line.startswith("Crystal ") for line in lines) == n_crystals
    assert sum(line.strip() == "Flagged: no" for line in lines) == n_crystals
    # ... and every reflection of our stream is merged
    merged = (tmp_path / "m.hkl").read_text().splitlines()
    n_meas = sum(int(line.split()[-1]) for line in merged[3:]
                 if len(line.split()) == 7 and line.split()[0].lstrip("-").isdigit())
    n_ours = sum(len(x.reflections) for c in ours for x in c.crystals)
    assert n_meas == n_ours


def test_a_process_run_and_its_own_stream_merge_to_one_answer(tmp_path, process_run):
    # were 4,683 vs 4,380 unique reflections and CC1/2 0.889 vs 0.861 on the demo run
    from sfxflow.algorithms.merge.scale import MergeParams
    from sfxflow.pipeline.config import ClusterConfig
    from sfxflow.pipeline.merge import run_merge

    header = (process_run / "header.stream").read_text()
    assert "; sfxflow space_group = P 61 2 2" in header  # read back: no --space-group below
    stream = tmp_path / "run.stream"
    stream.write_text(header + "".join(p.read_text() for p in sorted(
        (process_run / "shards").glob("*.stream"))))
    params, serial = MergeParams(model="unity", iterations=1), ClusterConfig(kind="synchronous")
    run = run_merge([str(process_run)], str(tmp_path / "r"), params, serial).stats
    own = run_merge([str(stream)], str(tmp_path / "s"), params, serial).stats
    assert run["space_group"] == own["space_group"] == "P 61 2 2"
    for key in ("n_obs", "n_unique"):
        assert run["overall"][key] == own["overall"][key]
    assert run["cell"] == pytest.approx(own["cell"], abs=1e-3)
    # the same merged intensities, to the stream's rounding (0.01 photons, 5 decimals of A)
    import gemmi

    a, b = (np.asarray(gemmi.read_mtz_file(str(tmp_path / d / "merged.mtz")).array)
            for d in ("r", "s"))
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    imean = 3
    np.testing.assert_allclose(a[:, imean], b[:, imean], rtol=1e-3,
                               atol=1e-3 * np.nanmax(np.abs(a[:, imean])))
