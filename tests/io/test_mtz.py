"""MTZ writing and reading: merged columns round trip through gemmi."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest

from sfxflow.errors import InputError
from sfxflow.io.mtz import (
    MergedColumns,
    read_intensity_columns,
    read_mtz_summary,
    write_merged_mtz,
)

CELL = gemmi.UnitCell(42.37, 42.37, 39.69, 90, 90, 90)
SG = gemmi.SpaceGroup("P 41 21 2")


def _merged() -> MergedColumns:
    hkl = np.array([[1, 2, 3], [2, 3, 4], [0, 0, 4], [5, 1, 2]], dtype=np.int32)
    return MergedColumns(
        hkl=hkl,
        imean=np.array([10.5, -2.25, 300.0, 7.0]),
        sigimean=np.array([1.5, 0.75, 12.0, 1.0]),
        i_plus=np.array([11.0, -2.0, 300.0, np.nan]),
        sigi_plus=np.array([2.0, 1.0, 12.0, np.nan]),
        i_minus=np.array([10.0, np.nan, 300.0, np.nan]),
        sigi_minus=np.array([2.0, np.nan, 12.0, np.nan]),
        n_obs=np.array([4, 1, 9, 0]),
    )


def test_merged_mtz_round_trips_through_gemmi(tmp_path):
    path = tmp_path / "merged.mtz"
    write_merged_mtz(path, CELL, SG, 1.3051, _merged())
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.spacegroup.hm == SG.hm
    assert mtz.cell.approx(CELL, 1e-4)
    labels = [(c.label, c.type) for c in mtz.columns]
    assert labels == [("H", "H"), ("K", "H"), ("L", "H"), ("IMEAN", "J"), ("SIGIMEAN", "Q"),
                      ("I(+)", "K"), ("SIGI(+)", "M"), ("I(-)", "K"), ("SIGI(-)", "M"),
                      ("N", "I")]
    assert mtz.datasets[-1].wavelength == pytest.approx(1.3051)
    data = np.asarray(mtz.array)
    assert data.shape == (3, 10)  # the unobserved reflection is left out
    assert data[:, :3].astype(int).tolist() == [[1, 2, 3], [2, 3, 4], [0, 0, 4]]
    m = _merged()
    assert np.allclose(data[:, 3], m.imean[:3]) and np.allclose(data[:, 4], m.sigimean[:3])
    assert np.isnan(data[1, 7]) and data[2, 7] == pytest.approx(300.0)  # missing I(-) stays NaN
    assert data[:, 9].tolist() == [4, 1, 9]
    summary = read_mtz_summary(path)
    assert summary["n_reflections"] == 3 and summary["wavelength_a"] == pytest.approx(1.3051)
    assert summary["space_group"] == SG.hm


def test_intensity_columns_read_back_what_was_written(tmp_path):
    path = tmp_path / "merged.mtz"
    write_merged_mtz(path, CELL, SG, 1.0, _merged())
    cell, sg, hkl, i_plus, i_minus = read_intensity_columns(path)
    assert sg.hm == SG.hm and cell.approx(CELL, 1e-4)
    assert hkl.tolist() == [[1, 2, 3], [2, 3, 4], [0, 0, 4]]
    assert np.allclose(i_plus, [11.0, -2.0, 300.0])
    assert np.allclose(i_minus[[0, 2]], [10.0, 300.0]) and np.isnan(i_minus[1])


def test_amplitudes_are_squared_and_bad_files_are_one_line_errors(tmp_path):
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = SG
    mtz.set_cell_for_all(CELL)
    mtz.add_dataset("x")
    mtz.add_column("FC", "F")
    mtz.set_data(np.array([[1, 2, 3, 4.0], [2, 2, 2, 0.5]], dtype=np.float32))
    path = tmp_path / "fc.mtz"
    mtz.write_to_file(str(path))
    _, _, hkl, i_plus, _ = read_intensity_columns(path)
    assert hkl.tolist() == [[1, 2, 3], [2, 2, 2]] and i_plus.tolist() == [16.0, 0.25]
    bad = tmp_path / "bad.mtz"
    bad.write_text("not an mtz")
    with pytest.raises(InputError, match="cannot read as MTZ"):
        read_intensity_columns(bad)
    with pytest.raises(InputError, match="cannot write MTZ"):
        write_merged_mtz(tmp_path / "no" / "such" / "dir.mtz", CELL, SG, 1.0, _merged())


def _mtz_with(tmp_path, columns: list[tuple[str, str]], rows: list[list[float]]):
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = SG
    mtz.set_cell_for_all(CELL)
    mtz.add_dataset("x")
    for label, kind in columns:
        mtz.add_column(label, kind)
    mtz.set_data(np.array(rows, dtype=np.float32))
    path = tmp_path / "in.mtz"
    mtz.write_to_file(str(path))
    return path


def test_missing_i_plus_falls_back_to_imean_and_rows_without_a_value_are_dropped(tmp_path):
    nan = float("nan")
    path = _mtz_with(tmp_path, [("IMEAN", "J"), ("I(+)", "K"), ("I(-)", "K")],
                     [[1, 2, 3, 5.0, nan, nan], [2, 2, 2, 7.0, 8.0, 6.0], [3, 1, 1, nan, nan, nan]])
    _, _, hkl, i_plus, i_minus = read_intensity_columns(path)
    assert hkl.tolist() == [[1, 2, 3], [2, 2, 2]]
    assert i_plus.tolist() == [5.0, 8.0]
    assert np.isnan(i_minus[0]) and i_minus[1] == 6.0


def test_an_mtz_without_intensities_or_amplitudes_names_its_columns(tmp_path):
    path = _mtz_with(tmp_path, [("PHIC", "P")], [[1, 2, 3, 90.0]])
    with pytest.raises(InputError, match=r"no intensity column .* found H, K, L, PHIC"):
        read_intensity_columns(path)
