"""The merge's symmetry: point groups, the symmetrised mean cell, inputs that disagree, and
MTZ files of every crystal system that gemmi and reciprocalspaceship accept."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.merge.cell import (
    InputSymmetry,
    cell_outliers,
    consensus_cell,
    merge_space_group,
    merge_target,
    symmetrise_cell,
)
from sfxflow.errors import InputError
from sfxflow.io.mtz import MergedColumns, read_mtz_summary, write_merged_mtz

# one space group per crystal system and setting, with its ideal cell
SYSTEMS = {
    "P 1": (31.0, 42.0, 53.0, 81.0, 97.0, 103.0),
    "C 1 2 1": (70.0, 40.0, 50.0, 90.0, 104.0, 90.0),
    "P 1 1 21": (30.0, 40.0, 50.0, 90.0, 90.0, 95.0),
    "P 21 21 21": (40.0, 50.0, 60.0, 90.0, 90.0, 90.0),
    "C 2 2 21": (61.4, 122.6, 168.0, 90.0, 90.0, 90.0),
    "I 41": (55.0, 55.0, 70.0, 90.0, 90.0, 90.0),
    "P 32 2 1": (60.0, 60.0, 90.0, 90.0, 90.0, 120.0),
    "R 3:H": (80.0, 80.0, 100.0, 90.0, 90.0, 120.0),
    "R 3 2:R": (60.0, 60.0, 60.0, 80.0, 80.0, 80.0),
    "P 61 2 2": (93.0, 93.0, 130.5, 90.0, 90.0, 120.0),
    "I 2 3": (78.0, 78.0, 78.0, 90.0, 90.0, 90.0),
}


def noisy_cells(ideal: tuple[float, ...], n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = np.array(ideal) * (1 + rng.normal(0, 0.004, (n, 6)) * np.r_[1, 1, 1, 0, 0, 0])
    cells[:, 3:] += rng.normal(0, 0.2, (n, 3))
    return cells


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_mean_cell_of_noisy_crystals_fits_the_space_group(name):
    sg = gemmi.SpaceGroup(name)
    cells = noisy_cells(SYSTEMS[name], 50)
    if name != "P 1":  # the plain mean does not fit: what the merge wrote before
        assert not gemmi.UnitCell(*cells.mean(axis=0)).is_compatible_with_spacegroup(sg)
    uc = consensus_cell(cells, sg)
    assert uc.is_compatible_with_spacegroup(sg)
    np.testing.assert_allclose(uc.parameters, SYSTEMS[name], rtol=0.01, atol=0.3)


def test_the_crystfel_test_stream_cell_is_made_orthorhombic():
    # today's merge wrote this cell with C 2 2 21 and gemmi called it incompatible
    sg = gemmi.SpaceGroup("C 2 2 21")
    bad = gemmi.UnitCell(61.52, 122.60, 168.81, 90.07, 90.07, 90.34)
    assert not bad.is_compatible_with_spacegroup(sg)
    good = symmetrise_cell(bad, sg)
    assert good.is_compatible_with_spacegroup(sg)
    assert good.parameters == pytest.approx((61.52, 122.60, 168.81, 90, 90, 90))


@pytest.mark.parametrize("pg, lattice, expected", [
    ("622", ("P", "hexagonal", "c"), "P 6 2 2"),
    ("6/mmm", ("P", "hexagonal", "c"), "P 6 2 2"),
    ("mmm", ("C", "orthorhombic", "*"), "C 2 2 2"),
    ("4/mmm", ("I", "tetragonal", "c"), "I 4 2 2"),
    ("2/m", ("C", "monoclinic", "c"), "C 1 1 2"),
    ("-3m1", ("P", "hexagonal", "c"), "P 3 2 1"),
    ("312", ("P", "hexagonal", "c"), "P 3 1 2"),
    ("-3m", ("H", "hexagonal", "c"), "R 3 2:H"),
    ("32", ("R", "rhombohedral", "*"), "R 3 2:R"),
    ("m-3m", ("F", "cubic", "*"), "F 4 3 2"),
    ("-1", ("P", "triclinic", "*"), "P 1"),
])
def test_point_group_becomes_its_symmorphic_space_group(pg, lattice, expected):
    sg = merge_space_group(pg, *lattice)
    assert sg.xhm() == expected and sg.is_symmorphic()


@pytest.mark.parametrize("pg, lattice, match", [
    ("6mm", ("P", "hexagonal"), "expected a chiral point group"),
    ("P6122", ("P", "hexagonal"), "expected a chiral point group"),
    ("32", ("P", "hexagonal"), "ambiguous: expected 321"),
    ("622", ("H", "hexagonal"), "does not fit a rhombohedral lattice"),
])
def test_bad_point_groups_are_refused(pg, lattice, match):
    with pytest.raises(ValueError, match=match):
        merge_space_group(pg, *lattice)


def _input(label, sg="", lattice="", crystal_lattices=None, cells=None):
    cells = noisy_cells(SYSTEMS["C 2 2 21"], 20) if cells is None else cells
    return InputSymmetry(label, sg, lattice, crystal_lattices or {}, cells)


def test_no_space_group_anywhere_is_refused_with_a_hint():
    with pytest.raises(InputError, match=r"^x\.stream: records no space group \(value: none\); "
                                         r"give --space-group .* --point-group"):
        merge_target([_input("x.stream", lattice="orthorhombic C")])


def test_point_group_on_the_recorded_lattice():
    uc, sg = merge_target([_input("x.stream", crystal_lattices={"orthorhombic C": 20})],
                          point_group="mmm")
    assert sg.hm == "C 2 2 2" and uc.is_compatible_with_spacegroup(sg)


def test_crystals_on_two_lattices_are_named_with_their_counts():
    with pytest.raises(InputError, match=r"^x\.stream: crystals disagree on the lattice "
                                         r"\(value: 12 orthorhombic C, 3 monoclinic P crystals\)"):
        merge_target([_input("x.stream", crystal_lattices={"orthorhombic C": 12,
                                                           "monoclinic P": 3})],
                     space_group="C2221")


def test_two_inputs_on_different_lattices_are_named():
    # was KeyError: 'P 3' from two streams without a space group
    with pytest.raises(InputError, match=r"inputs are on different lattices \(value: "
                                         r"a\.stream: orthorhombic C; b\.stream: hexagonal P\)"):
        merge_target([_input("a.stream", crystal_lattices={"orthorhombic C": 20}),
                      _input("b.stream", crystal_lattices={"hexagonal P": 20},
                             cells=noisy_cells(SYSTEMS["P 61 2 2"], 20))],
                     space_group="C2221")


def test_space_group_of_another_lattice_is_refused():
    with pytest.raises(InputError, match="P 61 2 2 is on a hexagonal P lattice but the crystals "
                                         "are on a orthorhombic C lattice"):
        merge_target([_input("a.stream", crystal_lattices={"orthorhombic C": 20})],
                     space_group="P6122")


def test_a_second_crystal_form_is_refused_naming_how_many_and_which_cells():
    cells = np.vstack([noisy_cells(SYSTEMS["C 2 2 21"], 20),
                       noisy_cells((61.4, 122.6, 140.0, 90, 90, 90), 5, seed=1)])
    with pytest.raises(InputError, match=r"^run: 5 of 25 crystals have cells far from the "
                                         r"median .* \(value: .*x \(61\.00 123\.00 140\.00"):
        merge_target([_input("run", "C 2 2 21", cells=cells)])


def test_a_few_odd_crystals_are_left_out_of_the_mean_cell():
    cells = np.vstack([noisy_cells(SYSTEMS["C 2 2 21"], 40), [[80, 122.6, 168, 90, 90, 90]]])
    uc, _ = merge_target([_input("run", "C 2 2 21", cells=cells)])
    assert uc.a == pytest.approx(61.4, abs=0.2)
    assert cell_outliers(cells).sum() == 1


def test_one_crystal_is_refused():
    with pytest.raises(InputError, match=r"^one\.stream: 1 crystal\(s\) with integrated "
                                         r"reflections \(value: 1\); expected at least 2"):
        merge_target([_input("one.stream", "C 2 2 21", cells=noisy_cells(SYSTEMS["C 2 2 21"], 1))])


def test_given_cell_is_symmetrised_or_refused():
    uc, _ = merge_target([_input("run", "C 2 2 21")], cell=(61.4, 122.6, 168, 90.05, 90, 90))
    assert uc.parameters[3] == 90
    with pytest.raises(InputError, match="does not fit C 2 2 21"):
        merge_target([_input("run", "C 2 2 21")], cell=(61.4, 122.6, 168, 95, 90, 90))


def _merged(uc: gemmi.UnitCell, sg: gemmi.SpaceGroup) -> MergedColumns:
    hkl = np.asarray(gemmi.make_miller_array(uc, sg, 4.0, 0, True), dtype=np.int32)
    n = len(hkl)
    rng = np.random.default_rng(1)
    i = rng.exponential(100.0, n)
    return MergedColumns(hkl, i, np.sqrt(i), i, np.sqrt(i), np.full(n, np.nan),
                         np.full(n, np.nan), np.full(n, 2))


@pytest.mark.parametrize("name", sorted(SYSTEMS))
# the MTZ base dataset has wavelength 0 by convention (CCP4); reciprocalspaceship notes it
@pytest.mark.filterwarnings("ignore:Mtz contains multiple datasets:UserWarning")
def test_merged_mtz_of_every_crystal_system_passes_gemmi_and_reciprocalspaceship(tmp_path, name):
    rs = pytest.importorskip("reciprocalspaceship", reason="the dev extra pins it (pip install "
                                                           "-e '.[dev]')")
    sg = gemmi.SpaceGroup(name)
    uc = consensus_cell(noisy_cells(SYSTEMS[name], 30), sg)  # what the merge writes
    merged = _merged(uc, sg)
    path = tmp_path / "merged.mtz"
    write_merged_mtz(path, uc, sg, 1.3, merged)
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.spacegroup.xhm() == sg.xhm()
    assert mtz.cell.is_compatible_with_spacegroup(mtz.spacegroup)
    for ds in mtz.datasets:
        assert ds.cell.is_compatible_with_spacegroup(mtz.spacegroup)
    assert read_mtz_summary(path)["n_reflections"] == len(merged.hkl)
    data = rs.read_mtz(str(path))
    assert data.spacegroup.xhm() == sg.xhm()
    np.testing.assert_allclose(data.cell.parameters, uc.parameters, rtol=1e-5)
    assert len(data) == len(merged.hkl)
    np.testing.assert_allclose(data["IMEAN"].to_numpy(), merged.imean, rtol=1e-5)
    # reciprocalspaceship agrees the indices are in the asymmetric unit of that group
    assert (data.hkl_to_asu().get_hkls() == data.get_hkls()).all()
