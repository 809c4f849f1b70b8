"""Bravais lattices as CrystFEL names them (``lattice_type``, ``centering``, ``unique_axis``)
and the lattice of a space group: shared by the cell-file and stream readers/writers and by the
merge's symmetry checks."""

from __future__ import annotations

from typing import NamedTuple

import gemmi

__all__ = ["LatticeInfo", "lattice_from_space_group"]


class LatticeInfo(NamedTuple):
    """Bravais lattice as CrystFEL names it: ``lattice_type``, ``centering``, ``unique_axis``
    (``a``/``b``/``c``, or ``*`` when the lattice has none / it is not given)."""

    lattice_type: str
    centering: str
    unique_axis: str


def lattice_from_space_group(sg: gemmi.SpaceGroup) -> LatticeInfo:
    """CrystFEL lattice description of a space group (for writing cell files and streams).

    >>> lattice_from_space_group(gemmi.SpaceGroup("P 61 2 2"))
    LatticeInfo(lattice_type='hexagonal', centering='P', unique_axis='c')
    >>> lattice_from_space_group(gemmi.SpaceGroup("C 1 2 1"))
    LatticeInfo(lattice_type='monoclinic', centering='C', unique_axis='b')
    """
    system = sg.crystal_system_str()
    cen = sg.centring_type()
    if system == "trigonal":
        if sg.hm.startswith("R") and sg.ext == "R":
            return LatticeInfo("rhombohedral", "R", "*")
        if cen == "R":
            return LatticeInfo("hexagonal", "H", "c")
        return LatticeInfo("hexagonal", "P", "c")
    if system == "hexagonal":
        return LatticeInfo("hexagonal", "P", "c")
    if system == "tetragonal":
        return LatticeInfo("tetragonal", cen, "c")
    if system == "monoclinic":
        parts = sg.hm.split()
        ua = "b"
        if len(parts) == 4:
            ua = "abc"[next(i for i in (1, 2, 3) if parts[i] != "1") - 1]
        return LatticeInfo("monoclinic", cen, ua)
    return LatticeInfo(system, cen, "*")
