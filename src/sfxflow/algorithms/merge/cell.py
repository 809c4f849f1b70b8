"""The unit cell of a merge: the consensus of the inputs' crystals, checked for one crystal form.

Each input (a run directory's shard or a stream) reports the median cell of its crystals. The
merged cell is the one given, or the median of those medians; an input whose median is further
from it than ``MergeParams.cell_tolerance_fraction`` in a length or
``MergeParams.cell_tolerance_deg`` in an angle holds another crystal form (or was indexed in
another setting) and would merge into nonsense, so it is refused naming the input and its cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import gemmi
import numpy as np

from sfxflow.errors import InputError
from sfxflow.models import as_space_group, as_unit_cell

__all__ = ["consensus_cell", "merge_space_group"]


def _fmt(cell: np.ndarray) -> str:
    return " ".join(f"{x:.2f}" for x in cell)


def consensus_cell(medians: Sequence[np.ndarray], labels: Sequence[str],
                   given: gemmi.UnitCell | str | tuple[float, ...] | None,
                   tolerance_fraction: float, tolerance_deg: float) -> gemmi.UnitCell:
    """The merged cell: ``given``, or the median of the inputs' median cells ``medians``
    (a b c in Å, angles in degrees; one per input named in ``labels``).

    Raises
    ------
    InputError
        No input has a crystal, or an input's cell is beyond the tolerances.

    Examples
    --------
    >>> consensus_cell([np.array([40.0, 40, 60, 90, 90, 90]), np.array([40.4, 40.4, 60, 90, 90, 90])],
    ...                ["a", "b"], None, 0.05, 3.0).a
    40.2
    """
    if not medians:
        raise InputError("no crystal with integrated reflections in any input")
    uc = as_unit_cell(given) if given else as_unit_cell(
        tuple(float(x) for x in np.median(np.array(medians), axis=0)))
    ref = np.array(uc.parameters)
    for label, m in zip(labels, medians, strict=True):
        dev = np.abs(m[:3] / ref[:3] - 1.0).max()
        ang = np.abs(m[3:] - ref[3:]).max()
        if dev > tolerance_fraction or ang > tolerance_deg:
            raise InputError(f"{label}: median cell {_fmt(m)} differs from {_fmt(ref)} (more "
                             f"than {tolerance_fraction:.0%} or {tolerance_deg:g} degrees); "
                             "expected crystals of one form")
    return uc


def merge_space_group(given: gemmi.SpaceGroup | str | None, named: Sequence[tuple[str, str]],
                      lattices: Sequence[str]) -> gemmi.SpaceGroup:
    """The space group of a merge: ``given``, or the one the inputs name (``named``: (input
    label, space group) pairs), or where none does, the crystals' lattice (``lattices``).

    Raises
    ------
    InputError
        None is known, or the inputs name different ones.
    """
    if given:
        return as_space_group(given)
    names = {sg for _, sg in named} or set(lattices)
    if not names:
        raise InputError("no space group known for the inputs (value: none); give "
                         "--space-group (e.g. P43212)")
    groups = {as_space_group(n).xhm() for n in names}
    if len(groups) > 1:
        where = {as_space_group(sg).xhm(): label for label, sg in named}
        raise InputError("inputs have different space groups: " + ", ".join(
            f"{g} ({where[g]})" for g in sorted(groups)) + "; expected one (merge them "
            "separately or give --space-group)")
    return as_space_group(next(iter(names)))
