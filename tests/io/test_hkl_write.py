"""CrystFEL reflection lists: written values read back, the same data as the MTZ (through
gemmi), and the symmetry line matching gemmi's point group."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest

from sfxflow.errors import InputError
from sfxflow.io.hkl import crystfel_point_group, read_hkl, write_hkl, write_reflections
from sfxflow.io.mtz import MergedColumns, write_merged_mtz


def _merged() -> MergedColumns:
    rng = np.random.default_rng(1)
    hkl = np.array([[h, k, l] for h in range(0, 4) for k in range(0, h + 1) for l in range(1, 4)],
                   dtype=np.int32)
    n = len(hkl)
    i = rng.exponential(500.0, n)
    s = np.sqrt(i) + 1.0
    nobs = rng.integers(0, 6, n)
    nan = np.full(n, np.nan)
    return MergedColumns(hkl, i, s, nan, nan, nan, nan, nobs)


def test_hkl_and_mtz_hold_the_same_reflections(tmp_path):
    sg = gemmi.SpaceGroup("P 41 21 2")
    cell = gemmi.UnitCell(42.37, 42.37, 39.69, 90, 90, 90)
    m = _merged()
    write_hkl(tmp_path / "x.hkl", sg, m)
    write_merged_mtz(tmp_path / "x.mtz", cell, sg, 1.3, m)
    sym, hkl, i, sig, nmeas = read_hkl(tmp_path / "x.hkl")
    assert sym == "4/mmm"
    mtz = gemmi.read_mtz_file(str(tmp_path / "x.mtz"))
    data = np.asarray(mtz.array)
    assert hkl.tolist() == data[:, :3].astype(int).tolist()
    # about 7 significant digits of the largest value in both (MTZ: float32)
    top = float(np.max(data[:, 3]))
    assert np.allclose(i, data[:, 3], rtol=0, atol=1e-6 * top)
    assert np.allclose(sig, data[:, 4], rtol=0, atol=1e-6 * top)
    assert nmeas.tolist() == data[:, 9].astype(int).tolist()
    keep = m.n_obs > 0
    assert nmeas.tolist() == m.n_obs[keep].tolist()
    assert np.allclose(i, m.imean[keep], rtol=0, atol=1e-6 * top)


def test_rows_without_a_value_are_left_out_and_the_file_ends_as_crystfel_expects(tmp_path):
    path = tmp_path / "y.hkl"
    write_reflections(path, gemmi.SpaceGroup("P 1"), np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                      np.array([1.25, np.nan, 3.0]), np.array([0.5, 1.0, np.inf]),
                      np.array([2, 2, 2]))
    lines = path.read_text().splitlines()
    assert lines[0] == "CrystFEL reflection list version 2.0"
    assert lines[1] == "Symmetry: -1"
    assert lines[-2] == "End of reflections"
    _, hkl, i, sig, n = read_hkl(path)
    assert hkl.tolist() == [[1, 0, 0]] and i.tolist() == [1.25] and sig.tolist() == [0.5]
    assert n.tolist() == [2]


@pytest.mark.parametrize(("sg", "want"), [
    ("P 1", "-1"), ("P 21 21 21", "mmm"), ("C 1 2 1", "2/m"), ("P 63", "6/m"), ("I 2 3", "m-3"),
    # trigonal: 2-folds along a (321, and 3m1 whose mirrors are normal to them) or not (312)
    ("P 3 2 1", "-3m1"), ("P 31 2 1", "-3m1"), ("P 3 m 1", "-3m1"), ("P -3 m 1", "-3m1"),
    ("P 3 1 2", "-31m"), ("P 32 1 2", "-31m"), ("P 3 1 m", "-31m"), ("P -3 1 m", "-31m"),
    ("R 3 2:H", "-3m1_H"), ("R 3:H", "-3_H"), ("R 3 2:R", "-3m_R"), ("R 3:R", "-3_R"),
])
def test_symmetry_line_is_the_laue_class_in_crystfel_spelling(sg, want):
    group = gemmi.SpaceGroup(sg)
    assert crystfel_point_group(group) == want
    # the same Laue class as gemmi's, CrystFEL's setting suffixes aside
    assert want.split("_")[0].replace("-3m1", "-3m").replace("-31m", "-3m") == \
        group.laue_str().replace(" ", "")


def test_unreadable_lists_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no reflection table header"):
        (tmp_path / "z.hkl").write_text("nothing here\n")
        read_hkl(tmp_path / "z.hkl")
    with pytest.raises(InputError, match="cannot read reflection list"):
        read_hkl(tmp_path / "missing.hkl")


def test_an_unwritable_list_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="cannot write reflection list"):
        write_reflections(tmp_path / "no" / "dir" / "x.hkl", gemmi.SpaceGroup("P 1"),
                          np.array([[1, 0, 0]]), np.ones(1), np.ones(1), np.ones(1))
