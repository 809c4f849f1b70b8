"""The observation reader (:func:`sfxflow.io.observations.read_shard`) on tiny inputs built here:
which crystals and reflections a merge gets from a run directory and from a stream."""

from __future__ import annotations

import gemmi
import numpy as np
import pyarrow as pa
import pytest

from sfxflow.algorithms.integrate import Flag
from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.simulate_physical import PhysicalParams, TrueIntensities
from sfxflow.errors import InputError
from sfxflow.io.observations import (
    crystal_ids_of,
    discover_shards,
    read_shard,
    write_observation_run,
    write_simulated_observations,
)
from sfxflow.models import A_MATRIX_COLUMNS, a_matrix_columns

CELL = (40.0, 50.0, 60.0, 90.0, 90.0, 90.0)


def _crystal(url: str, frame: int, crystal: int, **extra: object) -> dict:
    row = {"source_url": url, "frame_index": frame, "crystal": crystal,
           **dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), CELL, strict=True)),
           **a_matrix_columns(np.diag([1 / 40, 1 / 50, 1 / 60])), "wavelength_a": 1.3,
           "status": "integrated"}
    row.update(extra)
    return row


def _reflections(n: int, **extra: np.ndarray) -> dict[str, np.ndarray]:
    cols = {"h": np.arange(1, n + 1), "k": np.zeros(n, int), "l": np.ones(n, int),
            "intensity": np.linspace(10.0, 20.0, n), "sigma": np.ones(n),
            "polarisation": np.full(n, 0.9), "flags": np.zeros(n, np.int32)}
    cols.update(extra)
    return cols


def _run(tmp_path, rows: list[dict], refls: list[dict[str, np.ndarray]]):
    url = str(tmp_path / "run")
    write_observation_run(url, gemmi.UnitCell(*CELL), gemmi.SpaceGroup("P 21 21 21"),
                          [(rows, refls)])
    (spec,) = discover_shards([url])
    return read_shard(spec)


def test_run_directory_crystals_and_observations_as_the_merge_reads_them(tmp_path):
    saturated = np.zeros(4, np.int32)
    saturated[1] = int(Flag.SATURATED)
    nan_a = _crystal("r.cxi", 2, 0, **{A_MATRIX_COLUMNS[4]: float("nan")})
    data = _run(tmp_path, [
        _crystal("r.cxi", 0, 0),
        _crystal("r.cxi", 0, 1, status="failed"),
        nan_a,
        _crystal("q.cxi", 0, 0, status=None),
        _crystal("r.cxi", 5, 0),
    ], [
        _reflections(4, flags=saturated, sigma=np.array([1.0, 1.0, 0.0, np.nan])),
        _reflections(2),
        _reflections(3),
        _reflections(5, flags=np.full(5, int(Flag.OVERLAP), np.int32)),  # overlap: kept
        _reflections(1, intensity=np.array([np.nan])),
    ])
    # crystals: the failed one and the one without an orientation are left out and counted;
    # one without usable reflections stays (nothing to merge) and is counted as such
    assert data.source_url == ["r.cxi", "q.cxi", "r.cxi"]
    assert data.frame_index.tolist() == [0, 0, 5] and data.crystal.tolist() == [0, 0, 0]
    assert data.rejected == {"integration failed": 1, "no orientation or wavelength": 1,
                             "no integrated reflections": 1}
    np.testing.assert_array_equal(data.crystal_ids,
                                  crystal_ids_of(["r.cxi", "q.cxi", "r.cxi"], [0, 0, 5], [0, 0, 0]))
    assert data.a_matrices.shape == (3, 3, 3) and data.cells.tolist() == [list(CELL)] * 3
    assert data.wavelengths_a.tolist() == [1.3] * 3
    # observations: the saturated one, sigma 0 and NaN sigma are left out
    assert data.obs_crystal.tolist() == [0, 1, 1, 1, 1, 1]
    assert data.hkl[:, 0].tolist() == [1, 1, 2, 3, 4, 5]
    assert data.hkl.dtype == np.int32 and data.obs_crystal.dtype == np.int64
    assert data.polarisation.tolist() == [0.9] * 6


def test_reflections_of_no_listed_crystal_are_an_error(tmp_path):
    from sfxflow.io.results import parquet_bytes

    url = str(tmp_path / "run")
    write_observation_run(url, gemmi.UnitCell(*CELL), gemmi.SpaceGroup("P 21 21 21"),
                          [([_crystal("r.cxi", 0, 0)], [_reflections(3)])])
    # a crystals shard of another block: no reflection names one of its crystals
    (tmp_path / "run" / "shards" / "sim-00000.crystals.parquet").write_bytes(
        parquet_bytes(pa.Table.from_pylist([_crystal("x.cxi", 1, 0)])))
    with pytest.raises(InputError, match="no reflection belongs to a crystal"):
        read_shard(discover_shards([url])[0])


def test_a_run_directory_and_its_own_stream_read_the_same(tmp_path):
    uc, group = gemmi.UnitCell(42.0, 42.0, 40.0, 90, 90, 90), gemmi.SpaceGroup("P 41 21 2")
    hkl = np.asarray(gemmi.make_miller_array(uc, group, 4.0, 0, True))
    i = np.random.default_rng(0).exponential(1000.0, len(hkl))
    truth = TrueIntensities.from_arrays(uc, group, hkl, i, i)
    write_simulated_observations(str(tmp_path / "run"), truth, simple(80.0, 0.1, 3000),
                                 PhysicalParams(d_min_a=4.0, scale_photons=0.2), 3, 1,
                                 stream_path=str(tmp_path / "run.stream"))
    run, stream = (read_shard(discover_shards([str(tmp_path / x)])[0])
                   for x in ("run", "run.stream"))
    assert run.n_crystals == stream.n_crystals == 3
    np.testing.assert_array_equal(run.crystal_ids, stream.crystal_ids)
    assert run.source_url == stream.source_url
    np.testing.assert_array_equal(run.obs_crystal, stream.obs_crystal)
    np.testing.assert_array_equal(run.hkl, stream.hkl)
    np.testing.assert_allclose(run.intensity, stream.intensity, rtol=1e-3, atol=0.01)
    assert sum(stream.lattices.values()) == 3 and not run.lattices


def test_a_shard_without_a_needed_column_is_named(tmp_path):
    from sfxflow.io.results import parquet_bytes

    url = str(tmp_path / "run")
    write_observation_run(url, gemmi.UnitCell(*CELL), gemmi.SpaceGroup("P 21 21 21"),
                          [([_crystal("r.cxi", 0, 0)], [_reflections(3)])])
    refl = {"source_url": ["r.cxi"] * 3, "frame_index": [0] * 3, "crystal": [0] * 3,
            **{k: v for k, v in _reflections(3).items() if k != "sigma"}}
    (tmp_path / "run" / "shards" / "sim-00000.reflections.parquet").write_bytes(
        parquet_bytes(pa.table(refl)))
    with pytest.raises(InputError, match=r"lacks column\(s\) sigma"):
        read_shard(discover_shards([url])[0])


def test_observations_join_the_crystal_of_their_own_file_frame_and_lattice(tmp_path):
    # the same frame number in two files and two lattices on one frame: each observation goes
    # to the crystal its three key columns name, whatever the order of the rows
    rows = [_crystal("b.cxi", 7, 0), _crystal("a.cxi", 7, 1), _crystal("a.cxi", 7, 0)]
    data = _run(tmp_path, rows, [_reflections(1, intensity=np.array([1.0])),
                                 _reflections(2, intensity=np.array([2.0, 2.5])),
                                 _reflections(3, intensity=np.array([3.0, 3.5, 4.0]))])
    assert data.source_url == ["b.cxi", "a.cxi", "a.cxi"]
    assert data.crystal.tolist() == [0, 1, 0]
    assert [data.intensity[data.obs_crystal == c].tolist() for c in range(3)] == [
        [1.0], [2.0, 2.5], [3.0, 3.5, 4.0]]
