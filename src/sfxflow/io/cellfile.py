"""Read and write CrystFEL unit-cell files (``*.cell``), and default space groups for lattices.

A CrystFEL cell file looks like::

    CrystFEL unit cell file version 1.0

    lattice_type = hexagonal
    centering = H
    unique_axis = c
    a = 66.2 A
    ...
    ga = 120.0 deg

Lengths may be in ``A`` or ``nm``, angles in ``deg`` or ``rad``. Cell files carry no space
group, only the Bravais lattice (``lattice_type`` + ``centering`` + ``unique_axis``), so the
user gives the space group with ``--space-group``: it is never guessed from the lattice
(:meth:`CellFile.indexing_space_group` refuses). A PDB file with a ``CRYST1`` record is also
accepted (CrystFEL takes both); it does carry a space group. :func:`default_space_group` (the
lowest-symmetry group of a lattice) remains for describing a crystal's lattice only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import gemmi

from sfxflow.algorithms.lattice import LatticeInfo, lattice_from_space_group
from sfxflow.errors import InputError
from sfxflow.models import as_space_group

__all__ = [
    "CellFile",
    "CellFileError",
    "LatticeInfo",
    "default_space_group",
    "format_cell_file",
    "lattice_from_space_group",
    "parse_cell_file",
    "read_cell_file",
]

log = logging.getLogger(__name__)

CELL_FILE_HEADER = "CrystFEL unit cell file version 1.0"

LATTICE_TYPES = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "rhombohedral",
                 "hexagonal", "cubic")
#: Centrings CrystFEL allows for each lattice type (unique axis aside).
_CENTERINGS = {
    "triclinic": "P",
    "monoclinic": "PABCI",
    "orthorhombic": "PABCIF",
    "tetragonal": "PI",
    "rhombohedral": "R",
    "hexagonal": "PH",
    "cubic": "PIF",
}


class CellFileError(InputError):
    """A unit-cell file that cannot be read."""


class CellFile(NamedTuple):
    """What a cell file says. Unpacks as ``cell, space_group, lattice``."""

    cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup | None
    lattice: LatticeInfo

    def indexing_space_group(self, given: str | None = None, source: str = "the cell file"
                             ) -> str:
        """The space group to index in: ``given`` (the user's), else the file's (a PDB
        ``CRYST1`` record, a stream written by sfxflow); the extended Hermann-Mauguin symbol
        keeps the setting (``R 3:R`` vs ``R 3:H``).

        Raises
        ------
        InputError
            Neither says one: the space group is never guessed from the lattice (a hexagonal
            cell could be any of P 3 .. P 65 2 2, and the wrong one merges wrongly).

        >>> CellFile(gemmi.UnitCell(60, 70, 80, 90, 90, 90), None,
        ...          LatticeInfo("orthorhombic", "C", "*")).indexing_space_group("C2221")
        'C2221'
        >>> CellFile(gemmi.UnitCell(60, 70, 80, 90, 90, 90), gemmi.SpaceGroup("C 2 2 21"),
        ...          LatticeInfo("orthorhombic", "C", "*")).indexing_space_group()
        'C 2 2 21'
        """
        if given:
            return given
        if self.space_group is None:
            lt, cen = self.lattice.lattice_type, self.lattice.centering
            raise InputError(f"{source}: no space group (value: none; the file gives only the "
                             f"lattice, {lt} {cen}); expected --space-group with the crystals' "
                             "space group (e.g. --space-group P6122)")
        return self.space_group.xhm()


def default_space_group(lattice_type: str, centering: str, unique_axis: str = "*"
                        ) -> gemmi.SpaceGroup:
    """Lowest-symmetry space group of a Bravais lattice (rotations only, no screws/glides).

    Used when the user gives a cell file but no ``--space-group``: reflections are then only
    absent through lattice centring. Trigonal/hexagonal ``P`` maps to ``P 3``; ``hexagonal H``
    (rhombohedral centring on hexagonal axes) to ``R 3:H``; ``rhombohedral R`` to ``R 3:R``.

    Examples
    --------
    >>> default_space_group("orthorhombic", "C").hm
    'C 2 2 2'
    >>> default_space_group("hexagonal", "H").xhm()
    'R 3:H'
    >>> default_space_group("monoclinic", "C", "b").hm
    'C 1 2 1'
    """
    lt = lattice_type.strip().lower()
    cen = centering.strip().upper()
    ua = (unique_axis or "*").strip().lower()
    if lt not in _CENTERINGS:
        raise ValueError(f"unknown lattice type {lattice_type!r}; expected one of "
                         f"{', '.join(LATTICE_TYPES)}")
    if cen not in _CENTERINGS[lt]:
        raise ValueError(f"centering {centering!r} is not allowed for a {lt} lattice "
                         f"(expected one of {', '.join(_CENTERINGS[lt])})")
    if lt == "triclinic":
        name = "P 1"
    elif lt == "monoclinic":
        ua = ua if ua in ("a", "b", "c") else "b"
        name = {"a": f"{cen} 2 1 1", "b": f"{cen} 1 2 1", "c": f"{cen} 1 1 2"}[ua]
    elif lt == "orthorhombic":
        name = f"{cen} 2 2 2"
    elif lt == "tetragonal":
        name = f"{cen} 4"
    elif lt == "rhombohedral":
        name = "R 3:R"
    elif lt == "hexagonal":
        name = "R 3:H" if cen == "H" else "P 3"
    else:
        name = f"{cen} 2 3"
    try:
        return gemmi.SpaceGroup(name)
    except ValueError as exc:
        raise ValueError(f"centering {cen} with unique axis {ua} does not give a standard "
                         f"{lt} space group ({name})") from exc


def _number_and_unit(value: str, where: str, what: str, units: tuple[str, str],
                     example: str) -> tuple[float, str | None]:
    """The number and unit (``None`` when absent) of a value such as ``66.2 A``."""
    parts = value.split()
    unit = parts[1] if len(parts) == 2 else None
    if len(parts) not in (1, 2) or unit not in (None, *units):
        raise CellFileError(f"{where}: bad {what} (value {value!r}, expected e.g. {example})")
    try:
        return float(parts[0]), unit
    except ValueError:
        raise CellFileError(f"{where}: bad {what} (value {value!r}, expected a number with "
                            f"unit {units[0]} or {units[1]})") from None


def _parse_length_a(value: str, where: str) -> float:
    v, unit = _number_and_unit(value, where, "length", ("A", "nm"), "'66.2 A' or '6.62 nm'")
    if unit is None:
        log.warning("%s: length %r has no unit; assuming Å", where, value)
    v = v * 10.0 if unit == "nm" else v
    if not (v > 0 and math.isfinite(v)):
        raise CellFileError(f"{where}: bad length (value {value!r}, expected > 0)")
    return v


def _parse_angle_deg(value: str, where: str) -> float:
    v, unit = _number_and_unit(value, where, "angle", ("deg", "rad"), "'90.0 deg'")
    v = math.degrees(v) if unit == "rad" else v
    if not 0 < v < 180:
        raise CellFileError(f"{where}: bad angle (value {value!r}, expected 0 < angle < 180 "
                            f"deg)")
    return v


def parse_cell_file(text: str, source: str = "<cell>") -> CellFile:
    """Parse a CrystFEL unit-cell file (or a PDB ``CRYST1`` record).

    Examples
    --------
    >>> c = parse_cell_file("CrystFEL unit cell file version 1.0\\nlattice_type = cubic\\n"
    ...                     "centering = F\\na = 5 nm\\nb = 5 nm\\nc = 5 nm\\n"
    ...                     "al = 90 deg\\nbe = 90 deg\\nga = 90 deg\\n")
    >>> c.cell.a, c.lattice.centering, c.space_group
    (50.0, 'F', None)
    """
    lines = text.replace("\r\n", "\n").split("\n")
    for ln, line in enumerate(lines, start=1):
        if line.startswith("CRYST1"):
            return _parse_cryst1(line, f"{source}:{ln}")
    first = next(((i, s.strip()) for i, s in enumerate(lines, start=1) if s.strip()), None)
    if first is None or not first[1].startswith("CrystFEL unit cell file version"):
        got = "" if first is None else first[1][:60]
        raise CellFileError(f"{source}:{1 if first is None else first[0]}: not a CrystFEL cell "
                            f"file (value {got!r}, expected '{CELL_FILE_HEADER}')")
    version = first[1].rsplit(" ", 1)[-1]
    if not version.startswith("1."):
        raise CellFileError(f"{source}:{first[0]}: unsupported cell file version (value "
                            f"{version!r}, expected 1.x)")
    kv: dict[str, tuple[str, int]] = {}
    for ln, raw in enumerate(lines[first[0]:], start=first[0] + 1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise CellFileError(f"{source}:{ln}: line is not 'key = value' (value {line!r}, "
                                f"expected e.g. 'a = 66.2 A')")
        key, val = (s.strip() for s in line.split("=", 1))
        if key not in ("lattice_type", "centering", "unique_axis", "a", "b", "c", "al", "be",
                       "ga"):
            raise CellFileError(f"{source}:{ln}: unknown key (value {key!r}, expected "
                                f"lattice_type, centering, unique_axis, a, b, c, al, be, ga)")
        kv[key] = (val, ln)

    def where(k: str) -> str:
        return f"{source}:{kv[k][1]}"

    params = {k: (_parse_length_a if k in "abc" else _parse_angle_deg)(kv[k][0], where(k))
              for k in ("a", "b", "c", "al", "be", "ga") if k in kv}
    missing = [k for k in ("a", "b", "c", "al", "be", "ga") if k not in params]
    if missing:
        raise CellFileError(f"{source}: cell parameter {missing[0]} is missing (value None, "
                            f"expected all of a, b, c, al, be, ga)")
    lengths = [params[k] for k in ("a", "b", "c")]
    angles = [params[k] for k in ("al", "be", "ga")]
    lt = kv.get("lattice_type", ("triclinic", 0))[0].lower()
    if lt not in _CENTERINGS:
        raise CellFileError(f"{where('lattice_type')}: unknown lattice_type (value {lt!r}, "
                            f"expected one of {', '.join(LATTICE_TYPES)})")
    cen = kv.get("centering", ("P" if lt != "rhombohedral" else "R", 0))[0].upper()
    if cen not in _CENTERINGS[lt]:
        raise CellFileError(f"{where('centering') if 'centering' in kv else source}: centering "
                            f"not allowed for {lt} (value {cen!r}, expected one of "
                            f"{', '.join(_CENTERINGS[lt])})")
    ua = kv.get("unique_axis", ("*", 0))[0].lower()
    if ua not in ("a", "b", "c", "*", "?"):
        raise CellFileError(f"{where('unique_axis')}: bad unique_axis (value {ua!r}, expected "
                            f"a, b, c or *)")
    cell = gemmi.UnitCell(*lengths, *angles)
    if cell.volume <= 0 or not math.isfinite(cell.volume):
        raise CellFileError(f"{source}: impossible cell (value {lengths + angles}, expected "
                            f"angles that make a positive volume)")
    _warn_metric(cell, lt, ua, source)
    return CellFile(cell, None, LatticeInfo(lt, cen, ua))


def _warn_metric(cell: gemmi.UnitCell, lt: str, ua: str, source: str) -> None:
    a, b, c, al, be, ga = cell.parameters
    eq = lambda x, y: abs(x - y) <= 1e-3 * max(abs(x), abs(y))  # noqa: E731
    ok = True
    if lt in ("tetragonal", "hexagonal"):
        ok = eq(a, b) and eq(al, 90) and eq(be, 90) and eq(ga, 90 if lt == "tetragonal" else 120)
    elif lt == "cubic":
        ok = eq(a, b) and eq(b, c) and eq(al, 90) and eq(be, 90) and eq(ga, 90)
    elif lt == "orthorhombic":
        ok = eq(al, 90) and eq(be, 90) and eq(ga, 90)
    elif lt == "rhombohedral":
        ok = eq(a, b) and eq(b, c) and eq(al, be) and eq(be, ga)
    if not ok:
        log.warning("%s: cell %s does not look %s (unique axis %s)", source,
                    [round(x, 3) for x in cell.parameters], lt, ua)


def _parse_cryst1(line: str, where: str) -> CellFile:
    try:
        vals = [float(line[6 + 9 * i: 15 + 9 * i]) if i < 3 else
                float(line[33 + 7 * (i - 3): 40 + 7 * (i - 3)]) for i in range(6)]
    except ValueError:
        raise CellFileError(f"{where}: cannot read CRYST1 record (value {line.strip()!r}, "
                            f"expected PDB CRYST1 columns)") from None
    sg_text = line[55:66].strip()
    sg = None
    if sg_text:
        try:
            sg = as_space_group(sg_text)
        except ValueError:
            raise CellFileError(f"{where}: unknown space group in CRYST1 (value {sg_text!r}, "
                                f"expected a Hermann-Mauguin symbol)") from None
    if sg is None:  # a blank space group is not P 1: the user must say (never guessed)
        return CellFile(gemmi.UnitCell(*vals), None, LatticeInfo("triclinic", "P", "*"))
    return CellFile(gemmi.UnitCell(*vals), sg, lattice_from_space_group(sg))


def read_cell_file(path: str | Path) -> CellFile:
    """Read a CrystFEL cell file (or PDB ``CRYST1``): ``(cell, space_group | None, lattice)``.

    ``space_group`` is ``None`` for CrystFEL cell files; use :func:`default_space_group`
    (``default_space_group(*cf.lattice)``) when the user gives none.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CellFileError(f"{path}: cannot read cell file ({exc})") from exc
    return parse_cell_file(text, str(path))


def format_cell_file(cell: gemmi.UnitCell, lattice: LatticeInfo | None = None,
                     comment: str = "") -> str:
    """Text of a CrystFEL cell file (lengths in Å, angles in degrees).

    >>> print(format_cell_file(gemmi.UnitCell(93, 93, 130.5, 90, 90, 120),
    ...                        LatticeInfo("hexagonal", "P", "c")).splitlines()[4])
    unique_axis = c
    """
    lat = lattice or LatticeInfo("triclinic", "P", "*")
    out = [CELL_FILE_HEADER, "", f"lattice_type = {lat.lattice_type}",
           f"centering = {lat.centering}"]
    if lat.unique_axis in ("a", "b", "c"):
        out.append(f"unique_axis = {lat.unique_axis}")
    p = cell.parameters
    out += [f"a = {p[0]:.4f} A", f"b = {p[1]:.4f} A", f"c = {p[2]:.4f} A",
            f"al = {p[3]:.4f} deg", f"be = {p[4]:.4f} deg", f"ga = {p[5]:.4f} deg"]
    out += [f"; {c}" for c in comment.splitlines()]
    return "\n".join(out) + "\n"
