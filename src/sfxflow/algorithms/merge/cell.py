"""The symmetry and cell a merge is done in: never guessed, always one the space group allows.

* :func:`merge_space_group` turns what the user (or an input) says into the space group the
  merge runs in. A point group (``622``, ``6/mmm``) is enough to merge: it becomes the
  symmorphic space group of that point group on the inputs' lattice (``P 6 2 2`` on a primitive
  hexagonal lattice), so no reflection is dropped as systematically absent, and that group is
  what the MTZ records.
* :func:`consensus_cell` is the mean of the crystals' cells symmetrised to the space group's
  lattice (the metric tensor averaged over the point group's rotations), so gemmi and
  refinement programs accept the cell with the space group.
* :func:`cell_outliers` finds the crystals whose cells disagree with the others.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gemmi
import numpy as np

from sfxflow.algorithms.lattice import lattice_from_space_group
from sfxflow.errors import InputError
from sfxflow.models import as_space_group, as_unit_cell

__all__ = [
    "CELL_ANGLE_TOLERANCE_DEG",
    "CELL_LENGTH_TOLERANCE",
    "MAX_CELL_OUTLIER_FRACTION",
    "InputSymmetry",
    "cell_outliers",
    "consensus_cell",
    "format_cell",
    "merge_space_group",
    "merge_target",
    "symmetrise_cell",
]

#: A crystal's cell disagrees with the others when a length differs by more than this fraction
#: or an angle by more than :data:`CELL_ANGLE_TOLERANCE_DEG` from their median (CrystFEL's
#: default indexing tolerances are 5 % and 1.5 degrees).
CELL_LENGTH_TOLERANCE = 0.05
CELL_ANGLE_TOLERANCE_DEG = 3.0
#: More crystals than this with far cells is a second crystal form, not a few mis-indexed
#: crystals: the merge is refused (fewer are left out of the mean cell only)
MAX_CELL_OUTLIER_FRACTION = 0.1

# Laue class -> the chiral (Sohncke) point group merged in: macromolecular crystals have no
# mirrors or inversion centres, and keeping I(+) and I(-) apart needs the chiral group.
_LAUE_TO_CHIRAL = {"-1": "1", "2/m": "2", "mmm": "222", "4/m": "4", "4/mmm": "422", "-3": "3",
                   "-3m": "32", "-3m1": "321", "-31m": "312", "6/m": "6", "6/mmm": "622", "m-3": "23",
                   "m-3m": "432"}
_CHIRAL = {"1", "2", "222", "4", "422", "3", "32", "321", "312", "6", "622", "23", "432"}
POINT_GROUP_EXPECTED = ("a chiral point group (1 2 222 4 422 3 321 312 32 6 622 23 432) or a "
                        "Laue class (-1 2/m mmm 4/m 4/mmm -3 -3m -3m1 -31m 6/m 6/mmm m-3 m-3m)")


def format_cell(cell: Sequence[float] | gemmi.UnitCell) -> str:
    """``a b c al be ga`` with two decimals (for messages).

    >>> format_cell((61.4, 122.6, 168.0, 90, 90, 90))
    '61.40 122.60 168.00 90.00 90.00 90.00'
    """
    p = cell.parameters if isinstance(cell, gemmi.UnitCell) else cell
    return " ".join(f"{float(x):.2f}" for x in p)


def merge_space_group(point_group: str, centering: str, lattice_type: str = "",
                      unique_axis: str = "*") -> gemmi.SpaceGroup:
    """The symmorphic space group of a point group on a lattice (what a point-group merge
    runs in and writes to the MTZ).

    Parameters
    ----------
    point_group : ``622``, ``6/mmm`` (a Laue class stands for its chiral point group), ...
    centering, lattice_type, unique_axis : the inputs' Bravais lattice as CrystFEL names it
        (``H`` is rhombohedral centring on hexagonal axes, lattice type ``rhombohedral`` the
        rhombohedral axes).

    Raises
    ------
    ValueError
        Not a point group, or one that does not fit the lattice.

    Examples
    --------
    >>> merge_space_group("6/mmm", "P", "hexagonal").hm
    'P 6 2 2'
    >>> merge_space_group("mmm", "C", "orthorhombic").hm
    'C 2 2 2'
    >>> merge_space_group("32", "H", "hexagonal").xhm()
    'R 3 2:H'
    >>> merge_space_group("2", "C", "monoclinic", "b").hm
    'C 1 2 1'
    """
    pg = point_group.replace(" ", "")
    pg = _LAUE_TO_CHIRAL.get(pg, pg)
    if pg not in _CHIRAL:
        raise ValueError(f"point group {point_group!r}: expected {POINT_GROUP_EXPECTED}")
    cen = centering.strip().upper() or "P"
    lt = lattice_type.strip().lower()
    if pg == "32" and cen == "P":
        raise ValueError(f"point group {point_group!r} on a primitive hexagonal lattice is "
                         "ambiguous: expected 321 (-3m1) or 312 (-31m)")
    if cen in ("H", "R"):
        if pg not in ("3", "32"):
            raise ValueError(f"point group {point_group!r} does not fit a rhombohedral lattice "
                             "(expected 3, 32, -3 or -3m)")
        name = "R 3" + (" 2" if pg == "32" else "") + (":R" if lt == "rhombohedral" else ":H")
    elif pg == "2":
        ua = unique_axis.strip().lower() if unique_axis.strip().lower() in "abc" else "b"
        name = {"a": f"{cen} 2 1 1", "b": f"{cen} 1 2 1", "c": f"{cen} 1 1 2"}[ua or "b"]
    else:  # "422" -> "P 4 2 2"
        name = f"{cen} {' '.join(pg)}"
    try:
        sg = gemmi.SpaceGroup(name)
    except ValueError:
        raise ValueError(f"point group {point_group!r} does not fit a {lt or 'lattice'} "
                         f"{cen} lattice (no space group {name!r})") from None
    return sg


def symmetrise_cell(cell: Sequence[float] | gemmi.UnitCell, space_group: gemmi.SpaceGroup
                    ) -> gemmi.UnitCell:
    """The nearest cell the space group allows: the metric tensor averaged over the point
    group's rotations (in the space group's own setting, so unique axis and R/H settings come
    out right).

    >>> symmetrise_cell((61.52, 122.60, 168.81, 90.07, 90.07, 90.34),
    ...                 gemmi.SpaceGroup("C 2 2 21")).parameters
    (61.52, 122.6, 168.81, 90.0, 90.0, 90.0)
    >>> [round(x, 3) for x in symmetrise_cell((92.0, 94.0, 130.0, 90.1, 89.9, 120.3),
    ...                                        gemmi.SpaceGroup("P 61 2 2")).parameters]
    [93.0, 93.0, 130.0, 90.0, 90.0, 120.0]
    """
    p = cell.parameters if isinstance(cell, gemmi.UnitCell) else tuple(float(x) for x in cell)
    a, b, c = p[:3]
    ca, cb, cg = (math.cos(math.radians(x)) for x in p[3:])
    g = np.array([[a * a, a * b * cg, a * c * cb],
                  [a * b * cg, b * b, b * c * ca],
                  [a * c * cb, b * c * ca, c * c]])
    rots = {tuple(np.array(op.rot).ravel()) for op in space_group.operations().sym_ops}
    acc = np.zeros((3, 3))
    for r in rots:
        m = np.array(r, dtype=float).reshape(3, 3) / gemmi.Op.DEN
        acc += m.T @ g @ m
    g = acc / len(rots)
    sym = np.sqrt(np.diag(g))
    angles = [math.degrees(math.acos(np.clip(g[i, j] / math.sqrt(g[i, i] * g[j, j]), -1, 1)))
              for i, j in ((1, 2), (0, 2), (0, 1))]
    # lengths the symmetry makes equal (a = b in a hexagonal cell) become the plain mean of the
    # given ones, which a reader expects; the averaged metric only says which are equal
    lengths = np.array(p[:3], dtype=float)
    out = lengths.copy()
    for i in range(3):
        same = np.abs(sym - sym[i]) <= 1e-9 * sym[i]
        out[i] = lengths[same].mean()
    # round off floating-point dust so 90 is 90 (gemmi's compatibility check is exact-ish)
    vals = [round(float(x), 6) for x in (*out, *angles)]
    return gemmi.UnitCell(*vals)


def consensus_cell(cells: np.ndarray, space_group: gemmi.SpaceGroup) -> gemmi.UnitCell:
    """Mean of the crystals' cells (rows ``a b c al be ga``), symmetrised to the space group.

    >>> cells = np.array([[61.4, 122.5, 168.9, 90.1, 90.0, 90.3],
    ...                   [61.6, 122.7, 168.7, 90.0, 90.1, 90.4]])
    >>> format_cell(consensus_cell(cells, gemmi.SpaceGroup("C 2 2 21")))
    '61.50 122.60 168.80 90.00 90.00 90.00'
    """
    cells = np.asarray(cells, dtype=float).reshape(-1, 6)
    if not len(cells):
        raise ValueError("no crystal cells to average")
    return symmetrise_cell(cells.mean(axis=0), space_group)


def cell_outliers(cells: np.ndarray, reference: Sequence[float] | gemmi.UnitCell | None = None,
                  length_tolerance: float = CELL_LENGTH_TOLERANCE,
                  angle_tolerance_deg: float = CELL_ANGLE_TOLERANCE_DEG) -> np.ndarray:
    """True for each crystal whose cell is far from ``reference`` (default: the median cell):
    a length off by more than ``length_tolerance`` (a fraction) or an angle by more than
    ``angle_tolerance_deg``.

    >>> cell_outliers(np.array([[60, 60, 80, 90, 90, 90], [60.5, 60, 80, 90, 90, 90],
    ...                         [60, 60, 95, 90, 90, 90]])).tolist()
    [False, False, True]
    """
    cells = np.asarray(cells, dtype=float).reshape(-1, 6)
    if reference is None:
        ref = np.median(cells, axis=0) if len(cells) else np.ones(6)
    else:
        ref = np.array(reference.parameters if isinstance(reference, gemmi.UnitCell)
                       else reference, dtype=float)
    length = np.abs(cells[:, :3] / ref[:3] - 1.0).max(axis=1)
    angle = np.abs(cells[:, 3:] - ref[3:]).max(axis=1)
    return ~((length <= length_tolerance) & (angle <= angle_tolerance_deg))


@dataclass(frozen=True)
class InputSymmetry:
    """What one merge input (a run directory or a stream) says about its symmetry.

    ``space_group``: the group it records ("" none); ``lattice``: the Bravais lattice it
    records (CrystFEL's ``lattice_type centering``, "" none); ``crystal_lattices``: crystals
    per lattice (streams record one per crystal); ``cells``: the crystals' cells (n, 6).
    """

    label: str
    space_group: str
    lattice: str
    crystal_lattices: Mapping[str, int]
    cells: np.ndarray


def _lattice_of(sg: gemmi.SpaceGroup) -> str:
    lat = lattice_from_space_group(sg)
    return f"{lat.lattice_type} {lat.centering}"


def _counts(d: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(d.items(), key=lambda kv: -kv[1]))


def _cells_listed(cells: np.ndarray, n_max: int = 3) -> str:
    rounded = Counter(tuple(float(x) for x in np.round(c, 0)) for c in cells)
    out = [f"{n} x ({format_cell(c)})" for c, n in rounded.most_common(n_max)]
    more = len(rounded) - n_max
    return ", ".join(out) + (f" and {more} more" if more > 0 else "")


NO_SPACE_GROUP_HINT = ("give --space-group (e.g. --space-group P6122) or, to merge without "
                       "systematic absences, --point-group (e.g. 622 or 6/mmm)")


def _common_lattice(inputs: Sequence[InputSymmetry]) -> str:
    """The one lattice (e.g. ``"hexagonal P"``) of the inputs' crystals, ``""`` if none records it."""
    # lattices: one per input (crystals agree), and one across inputs
    lattice_of: dict[str, str] = {}
    for x in inputs:
        lats = {k: n for k, n in x.crystal_lattices.items() if n}
        if len(lats) > 1:
            raise InputError(f"{x.label}: crystals disagree on the lattice (value: "
                             f"{_counts(lats)} crystals); expected one lattice (split the input "
                             "and merge each lattice separately)")
        recorded = x.lattice or (_lattice_of(as_space_group(x.space_group)) if x.space_group
                                 else "")
        lat = next(iter(lats), "") or recorded
        if lat:
            lattice_of[x.label] = lat
    if len(set(lattice_of.values())) > 1:
        raise InputError("inputs are on different lattices (value: " + "; ".join(
            f"{lab}: {lat}" for lab, lat in lattice_of.items()) + "); expected one lattice "
            "(merge them separately)")
    return next(iter(lattice_of.values()), "")


def _target_space_group(inputs: Sequence[InputSymmetry], space_group: str | None,
                        point_group: str | None, lattice: str) -> gemmi.SpaceGroup:
    """``space_group``, else ``point_group`` on ``lattice``, else the one every input records."""
    if space_group:
        sg = as_space_group(space_group)
    elif point_group:
        if not lattice:
            raise InputError(f"--point-group {point_group}: no input records its lattice "
                             "(value: none); expected a stream or run directory that does, or "
                             "--space-group (e.g. P6122)")
        lt, cen = lattice.split()
        ua = next((lattice_from_space_group(as_space_group(x.space_group)).unique_axis
                   for x in inputs if x.space_group), "*")
        try:
            sg = merge_space_group(point_group, cen, lt, ua)
        except ValueError as exc:
            raise InputError(f"--point-group {point_group}: {exc}") from None
    else:
        missing = [x.label for x in inputs if not x.space_group]
        if missing:
            raise InputError(f"{missing[0]}: records no space group (value: none); "
                             + NO_SPACE_GROUP_HINT)
        named = {as_space_group(x.space_group).xhm(): x.label for x in inputs}
        if len(named) > 1:
            raise InputError("inputs record different space groups (value: " + ", ".join(
                f"{g} ({lab})" for g, lab in sorted(named.items())) + "); expected one "
                "(merge them separately or give --space-group)")
        sg = as_space_group(next(iter(named)))
    if lattice and _lattice_of(sg) != lattice:
        raise InputError(f"space group {sg.xhm()} is on a {_lattice_of(sg)} lattice but the "
                         f"crystals are on a {lattice} lattice (value: {lattice}); expected "
                         "a space group of their lattice")
    return sg


def _checked_cells(inputs: Sequence[InputSymmetry], length_tolerance: float,
                   angle_tolerance_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """All crystals' cells and which are far from the median, refused if inputs disagree."""
    with_cells = [x for x in inputs if len(x.cells)]
    n_total = sum(len(x.cells) for x in inputs)
    if n_total < 2:
        where = with_cells[0].label if with_cells else ", ".join(x.label for x in inputs)
        raise InputError(f"{where}: {n_total} crystal(s) with integrated reflections (value: "
                         f"{n_total}); expected at least 2 to merge (CC1/2 needs two half-sets)")
    all_cells = np.concatenate([np.asarray(x.cells, dtype=float).reshape(-1, 6)
                                for x in with_cells])
    median = np.median(all_cells, axis=0)
    for x in with_cells:
        m = np.median(np.asarray(x.cells, dtype=float).reshape(-1, 6), axis=0)
        if cell_outliers(m[None, :], median, length_tolerance, angle_tolerance_deg)[0]:
            raise InputError(f"{x.label}: median cell {format_cell(m)} of its {len(x.cells)} "
                             f"crystal(s) differs from {format_cell(median)} (all "
                             f"{n_total}) by more than {length_tolerance:.0%} or "
                             f"{angle_tolerance_deg:g} deg; expected crystals of one form")
    far = cell_outliers(all_cells, median, length_tolerance, angle_tolerance_deg)
    if far.mean() > MAX_CELL_OUTLIER_FRACTION:
        where = with_cells[0].label if len(with_cells) == 1 else f"{len(with_cells)} inputs"
        raise InputError(f"{where}: {int(far.sum())} of {n_total} crystals have cells far from "
                         f"the median {format_cell(median)} (value: {_cells_listed(all_cells[far])});"
                         f" expected at most {MAX_CELL_OUTLIER_FRACTION:.0%} within "
                         f"{length_tolerance:.0%} / {angle_tolerance_deg:g} deg")
    return all_cells, far


def _target_cell(cell: Sequence[float] | None, sg: gemmi.SpaceGroup, all_cells: np.ndarray,
                 far: np.ndarray, length_tolerance: float,
                 angle_tolerance_deg: float) -> gemmi.UnitCell:
    """``cell`` checked against ``sg``, else the consensus of the crystals near the median."""
    if cell is not None:
        given = as_unit_cell(cell)
        uc = symmetrise_cell(given, sg)
        if cell_outliers(np.array([given.parameters]), uc.parameters, length_tolerance,
                         angle_tolerance_deg)[0] or \
                max(abs(u - g) for u, g in zip(uc.parameters, given.parameters, strict=True)) > 0.5:
            raise InputError(f"--cell {format_cell(given)}: does not fit {sg.xhm()} (value: "
                             f"{format_cell(given)}); expected e.g. {format_cell(uc)}")
    else:
        uc = consensus_cell(all_cells[~far], sg)
    return uc


def merge_target(inputs: Sequence[InputSymmetry], *, space_group: str | None = None,
                 point_group: str | None = None, cell: Sequence[float] | None = None,
                 length_tolerance: float = CELL_LENGTH_TOLERANCE,
                 angle_tolerance_deg: float = CELL_ANGLE_TOLERANCE_DEG
                 ) -> tuple[gemmi.UnitCell, gemmi.SpaceGroup]:
    """The cell and space group a merge runs in, checked against every input.

    The space group is ``space_group``, else ``point_group`` on the inputs' lattice
    (:func:`merge_space_group`), else the one every input records; never guessed. The cell is
    ``cell`` or the mean of the crystals' cells, symmetrised to the space group. Crystals whose
    cell is far from the median (``length_tolerance``, ``angle_tolerance_deg``: MergeParams'
    ``cell_tolerance_fraction`` and ``cell_tolerance_deg``) are left out of the mean; more than
    :data:`MAX_CELL_OUTLIER_FRACTION` of them, inputs whose median cells differ, or crystals
    on different lattices, are refused.

    Raises
    ------
    InputError
        With a one-line message naming the input, the value and what was expected.
    """
    lattice = _common_lattice(inputs)
    sg = _target_space_group(inputs, space_group, point_group, lattice)
    all_cells, far = _checked_cells(inputs, length_tolerance, angle_tolerance_deg)
    uc = _target_cell(cell, sg, all_cells, far, length_tolerance, angle_tolerance_deg)
    if not uc.is_compatible_with_spacegroup(sg):  # a bug, not a user error
        raise AssertionError(f"cell {format_cell(uc)} incompatible with {sg.xhm()}")
    return uc, sg

