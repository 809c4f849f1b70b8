from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from sfxflow.algorithms.layouts import cspad, simple
from sfxflow.algorithms.simulate import SimulationParams, iter_frames
from sfxflow.errors import InputError
from sfxflow.io.simulated import write_simulated_dataset

PARAMS = replace(SimulationParams(), hit_fraction=0.6)

FRAME_COLUMNS = {"file", "frame_index", "is_hit", "cell", *[f"a{i}{j}" for i in (1, 2, 3) for j in (1, 2, 3)]}
REFLECTION_COLUMNS = {"file", "frame_index", "h", "k", "l", "panel", "fs_px", "ss_px",
                      "intensity_photons", "partiality", "d_a", "snr_true"}


@pytest.fixture(scope="module")
def cspad_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    info = write_simulated_dataset(out, cspad(), None, PARAMS, 5, 2, seed=4,
                                   compression="bitshuffle-lz4", detector_name="cspad")
    return info


def test_files_and_layout(cspad_set):
    info = cspad_set
    assert [p.name for p in info.files] == ["run_0000.cxi", "run_0001.cxi"]
    counts = []
    for path in info.files:
        with h5py.File(path, "r") as h5:
            d = h5["/entry_1/data_1/data"]
            assert d.dtype == np.float32 and d.shape[1:] == (1480, 1552)
            assert d.chunks == (1, 1480, 1552)
            plist = d.id.get_create_plist()
            assert plist.get_nfilters() == 1 and plist.get_filter(0)[0] == 32008  # bitshuffle
            counts.append(d.shape[0])
            assert h5["/LCLS/photon_energy_eV"].shape == (d.shape[0],)
            np.testing.assert_allclose(h5["/entry_1/instrument_1/detector_1/distance"][()], 0.13)
    assert counts == [2, 3]
    assert not list(info.out_dir.glob("*.part"))
    meta = json.loads((info.out_dir / "simulation.json").read_text())
    assert meta["seed"] == 4 and meta["detector"] == "cspad" and meta["n_frames"] == 5


def test_truth_tables_match_frames(cspad_set):
    info = cspad_set
    frames = pq.read_table(info.truth_frames_path)
    refl = pq.read_table(info.truth_reflections_path)
    assert FRAME_COLUMNS <= set(frames.column_names)
    assert REFLECTION_COLUMNS <= set(refl.column_names)
    rows = frames.to_pylist()
    assert [(r["file"], r["frame_index"]) for r in rows] == [
        ("run_0000.cxi", 0), ("run_0000.cxi", 1), ("run_0001.cxi", 0), ("run_0001.cxi", 1),
        ("run_0001.cxi", 2)]
    regenerated = list(iter_frames(cspad(), PARAMS, 5, seed=4))
    refl_file = np.asarray(refl.column("file").to_pylist())
    refl_frame = refl.column("frame_index").to_numpy()
    for row, (truth_frame, image, truth) in zip(rows, regenerated, strict=True):
        assert row["is_hit"] == truth_frame.is_hit
        with h5py.File(info.out_dir / row["file"], "r") as h5:
            stored = h5["/entry_1/data_1/data"][row["frame_index"]]
            energy = h5["/LCLS/photon_energy_eV"][row["frame_index"]]
        assert stored.tobytes() == image.tobytes()  # byte-identical to a fresh simulation
        assert energy == pytest.approx(truth_frame.beam.photon_energy_ev)
        assert row["photon_energy_ev"] == pytest.approx(energy)
        sel = (refl_file == row["file"]) & (refl_frame == row["frame_index"])
        assert sel.sum() == len(truth["h"]) == row["n_reflections"]
        np.testing.assert_array_equal(refl.column("fs_px").to_numpy()[sel], truth["fs_px"])
        if truth_frame.is_hit:
            a = np.array([row[f"a{i}{j}"] for i in (1, 2, 3) for j in (1, 2, 3)]).reshape(3, 3)
            np.testing.assert_array_equal(a, truth_frame.crystal.a_matrix)
            assert row["cell"] == "93 93 130.5 90 90 120"
        else:
            assert np.isnan(row["a11"]) and sel.sum() == 0
    assert info.n_hits == sum(r["is_hit"] for r in rows) > 0


def test_split_into_files_does_not_change_frames(tmp_path):
    a = write_simulated_dataset(tmp_path / "a", simple(), None, PARAMS, 4, 1, seed=9)
    b = write_simulated_dataset(tmp_path / "b", simple(), None, PARAMS, 4, 3, seed=9)
    with h5py.File(a.files[0], "r") as h5:
        one = h5["/entry_1/data_1/data"][()]
    parts = []
    for path in b.files:
        with h5py.File(path, "r") as h5:
            parts.append(h5["/entry_1/data_1/data"][()])
            assert h5["/entry_1/data_1/data"].id.get_create_plist().get_nfilters() == 0
    assert np.concatenate(parts).tobytes() == one.tobytes()


def test_geometry_reads_back_to_the_same_panels(cspad_set):
    from sfxflow.io.geometry import read_geom

    geom = read_geom(cspad_set.geometry_path)
    assert geom.data_path == "/entry_1/data_1/data"
    assert geom.frame_dim == 0
    assert geom.references["photon_energy"] == "/LCLS/photon_energy_eV"
    detector, beam = geom.resolve({"photon_energy": 9600.0})
    assert beam.photon_energy_ev == pytest.approx(9600.0)
    ours = cspad()
    assert [p.name for p in detector.panels] == [p.name for p in ours.panels]
    for p, q in zip(detector.panels, ours.panels, strict=True):
        np.testing.assert_allclose(p.origin_mm, q.origin_mm, atol=1e-6)
        np.testing.assert_allclose(p.fast_axis, q.fast_axis, atol=1e-9)
        np.testing.assert_allclose(p.slow_axis, q.slow_axis, atol=1e-9)
        assert p.pixel_size_mm == pytest.approx(q.pixel_size_mm)
        assert p.shape == q.shape and p.data_origin == q.data_origin
        assert p.adu_per_photon == pytest.approx(PARAMS.adu_per_photon)


def test_image_source_reads_frames_with_per_frame_energy(cspad_set):
    from sfxflow.io.geometry import read_geom
    from sfxflow.io.sources import open_source

    geom = read_geom(cspad_set.geometry_path)
    rows = pq.read_table(cspad_set.truth_frames_path).to_pylist()
    with open_source(str(cspad_set.files[1]), geom) as src:
        assert src.n_frames == 3
        frame = src.read_frame(2)
    assert frame.beam.photon_energy_ev == pytest.approx(rows[4]["photon_energy_ev"])
    with h5py.File(cspad_set.files[1], "r") as h5:
        np.testing.assert_array_equal(frame.data, h5["/entry_1/data_1/data"][2])


def test_bad_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="number of files 5"):
        write_simulated_dataset(tmp_path, simple(), None, PARAMS, 3, 5)
    with pytest.raises(InputError, match="number of frames 0"):
        write_simulated_dataset(tmp_path, simple(), None, PARAMS, 0, 1)
    with pytest.raises(InputError, match="compression 'gzip9'"):
        write_simulated_dataset(tmp_path, simple(), None, PARAMS, 2, 1, compression="gzip9")
