"""CrystFEL unit-cell files and default space groups."""

from __future__ import annotations

from pathlib import Path

import gemmi
import pytest

from sfxflow.io.cellfile import (
    CellFileError,
    LatticeInfo,
    default_space_group,
    format_cell_file,
    lattice_from_space_group,
    parse_cell_file,
    read_cell_file,
)

_HEAD = "CrystFEL unit cell file version 1.0\n"


def test_example_file(shared_data: Path) -> None:
    cell, sg, lattice = read_cell_file(shared_data / "crystfel" / "cell-example.cell")
    assert cell.parameters == pytest.approx((66.2, 66.2, 150.2, 90.0, 90.0, 120.0))
    assert sg is None
    assert lattice == LatticeInfo("hexagonal", "H", "c")
    assert default_space_group(*lattice).xhm() == "R 3:H"


def test_units_and_comments() -> None:
    text = (_HEAD + "; a comment\nlattice_type = monoclinic\ncentering = C\nunique_axis = b\n"
            "a = 6.5 nm  ; in nm\nb = 70 A\nc = 80 A\nal = 1.5707963267948966 rad\n"
            "be = 100 deg\nga = 90 deg\n")
    cf = parse_cell_file(text, "m.cell")
    assert cf.cell.parameters == pytest.approx((65.0, 70.0, 80.0, 90.0, 100.0, 90.0))
    assert cf.lattice == LatticeInfo("monoclinic", "C", "b")
    assert default_space_group(*cf.lattice).hm == "C 1 2 1"


@pytest.mark.parametrize(
    ("lattice", "expected"),
    [
        (("triclinic", "P", "*"), "P 1"),
        (("monoclinic", "P", "c"), "P 1 1 2"),
        (("monoclinic", "I", "a"), "I 2 1 1"),
        (("orthorhombic", "F", "*"), "F 2 2 2"),
        (("orthorhombic", "A", "*"), "A 2 2 2"),
        (("tetragonal", "I", "c"), "I 4"),
        (("rhombohedral", "R", "*"), "R 3:R"),
        (("hexagonal", "P", "c"), "P 3"),
        (("cubic", "F", "*"), "F 2 3"),
    ],
)
def test_default_space_group(lattice: tuple[str, str, str], expected: str) -> None:
    sg = default_space_group(*lattice)
    assert sg.xhm() == expected
    # the chosen group has exactly the lattice's centring
    assert lattice_from_space_group(sg).centering == lattice[1]


def test_default_space_group_rejects_bad_lattices() -> None:
    with pytest.raises(ValueError, match="not allowed for a tetragonal"):
        default_space_group("tetragonal", "C")
    with pytest.raises(ValueError, match="unknown lattice type"):
        default_space_group("quasicrystal", "P")


@pytest.mark.parametrize("hm", ["P 61 2 2", "C 1 2 1", "P 21 21 21", "I 4 2 2", "R 3:H",
                                "R 3 2:R", "F d -3 m", "P -1"])
def test_format_then_parse_round_trip(hm: str) -> None:
    sg = gemmi.SpaceGroup(hm)
    lat = lattice_from_space_group(sg)
    cell = gemmi.UnitCell(93.1, 93.1, 130.5, 90, 90, 120) if lat.lattice_type == "hexagonal" \
        else gemmi.UnitCell(50, 50, 50, 80, 80, 80) if lat.lattice_type == "rhombohedral" \
        else gemmi.UnitCell(40, 50, 60, 90, 95, 90)
    cf = parse_cell_file(format_cell_file(cell, lat), "rt.cell")
    assert cf.cell.parameters == pytest.approx(cell.parameters)
    assert cf.lattice.lattice_type == lat.lattice_type
    assert cf.lattice.centering == lat.centering
    # the default group has the same lattice centring (and no screws)
    assert default_space_group(*cf.lattice).centring_type() == sg.centring_type()


def test_pdb_cryst1() -> None:
    line = "CRYST1   93.000   93.000  130.500  90.00  90.00 120.00 P 61 2 2     12"
    cell, sg, lat = parse_cell_file(line + "\n", "x.pdb")
    assert cell.parameters == pytest.approx((93.0, 93.0, 130.5, 90.0, 90.0, 120.0))
    assert sg is not None and sg.hm == "P 61 2 2"
    assert lat == LatticeInfo("hexagonal", "P", "c")


def test_pdb_cryst1_without_a_space_group_is_not_taken_as_p1() -> None:
    from sfxflow.errors import InputError

    cf = parse_cell_file("CRYST1   93.000   93.000  130.500  90.00  90.00 120.00\n", "x.pdb")
    assert cf.space_group is None
    with pytest.raises(InputError, match=r"^x\.pdb: no space group \(value: none"):
        cf.indexing_space_group(None, "x.pdb")
    assert cf.indexing_space_group("P6122") == "P6122"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("hello\n", r"bad\.cell:1: not a CrystFEL cell file \(value 'hello'"),
        (_HEAD + "a = 10 A\n", r"bad\.cell: cell parameter b is missing"),
        (_HEAD + "a = 10 parsecs\nb = 1 A\nc = 1 A\nal = 90 deg\nbe = 90 deg\nga = 90 deg\n",
         r"bad\.cell:2: bad length \(value '10 parsecs'"),
        (_HEAD + "a = ten A\n", r"bad\.cell:2: bad length \(value 'ten A'"),
        (_HEAD + "colour = red\n", r"bad\.cell:2: unknown key \(value 'colour'"),
        (_HEAD + "lattice_type = hexagonal\ncentering = C\na = 1 A\nb = 1 A\nc = 1 A\n"
         "al = 90 deg\nbe = 90 deg\nga = 120 deg\n",
         r"bad\.cell:3: centering not allowed for hexagonal \(value 'C'"),
        (_HEAD + "a = 1 A\nb = 1 A\nc = 1 A\nal = 190 deg\nbe = 90 deg\nga = 90 deg\n",
         r"bad\.cell:5: bad angle \(value '190 deg'"),
    ],
)
def test_bad_cell_files(text: str, pattern: str) -> None:
    with pytest.raises(CellFileError, match=pattern):
        parse_cell_file(text, "bad.cell")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CellFileError, match="cannot read cell file"):
        read_cell_file(tmp_path / "none.cell")
