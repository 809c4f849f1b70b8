"""MTZ files: true intensities in (for simulation and CC to the truth), merged data out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from sfxflow.errors import InputError

__all__ = ["MergedColumns", "read_intensity_columns", "read_mtz_summary", "write_merged_mtz"]


@dataclass(frozen=True)
class MergedColumns:
    """Merged reflections in the asymmetric unit, Friedel mates apart (NaN = not measured)."""

    hkl: np.ndarray
    imean: np.ndarray
    sigimean: np.ndarray
    i_plus: np.ndarray
    sigi_plus: np.ndarray
    i_minus: np.ndarray
    sigi_minus: np.ndarray
    n_obs: np.ndarray


def _open(path: str | Path) -> gemmi.Mtz:
    try:
        return gemmi.read_mtz_file(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read as MTZ ({exc})") from None


def read_intensity_columns(path: str | Path) -> tuple[gemmi.UnitCell, gemmi.SpaceGroup,
                                                      np.ndarray, np.ndarray, np.ndarray]:
    """Cell, space group, Miller indices, I(+) and I(-) of an MTZ.

    Intensities come from ``I(+)``/``I(-)`` when present (``I(-)`` NaN where missing), else
    ``IMEAN`` or ``I``, else the square of ``FC`` or ``F`` (a model's or observed amplitudes).
    Rows without a value are dropped.
    """
    mtz = _open(path)
    if mtz.spacegroup is None:
        raise InputError(f"{path}: the MTZ has no space group")
    labels = [c.label for c in mtz.columns]
    data = np.asarray(mtz.array, dtype=float)
    hkl = data[:, :3].astype(np.int32)

    def col(name: str) -> np.ndarray:
        return data[:, labels.index(name)]

    if "I(+)" in labels:
        i_plus, i_minus = col("I(+)"), col("I(-)") if "I(-)" in labels else None
        if "IMEAN" in labels:
            i_plus = np.where(np.isfinite(i_plus), i_plus, col("IMEAN"))
    elif "IMEAN" in labels or "I" in labels:
        i_plus, i_minus = col("IMEAN" if "IMEAN" in labels else "I"), None
    else:
        amp = next((n for n in ("FC", "F", "FP") if n in labels), None)
        if amp is None:
            raise InputError(f"{path}: no intensity column (I(+), IMEAN, I) or amplitude column "
                             f"(FC, F, FP); found {', '.join(labels)}")
        i_plus, i_minus = col(amp) ** 2, None
    keep = np.isfinite(i_plus)
    if not keep.any():
        raise InputError(f"{path}: no reflection has an intensity")
    if i_minus is None:
        i_minus = np.full(len(i_plus), np.nan)
    return mtz.cell, mtz.spacegroup, hkl[keep], i_plus[keep], i_minus[keep]


def read_mtz_summary(path: str | Path) -> dict:
    """Cell, space group, column labels and wavelength of an MTZ (for checks and tests)."""
    mtz = _open(path)
    wl = [d.wavelength for d in mtz.datasets if d.wavelength > 0]
    return {"cell": list(mtz.cell.parameters), "space_group": mtz.spacegroup.hm,
            "columns": [c.label for c in mtz.columns], "n_reflections": mtz.nreflections,
            "wavelength_a": wl[-1] if wl else None}


def write_merged_mtz(path: str | Path, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup,
                     wavelength_a: float, merged: MergedColumns) -> None:
    """Write IMEAN SIGIMEAN I(+) SIGI(+) I(-) SIGI(-) N with cell, space group and wavelength.

    Reflections with no observation at all are left out.
    """
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = space_group
    mtz.set_cell_for_all(cell)
    mtz.add_dataset("sfxflow")
    ds = mtz.datasets[-1]
    ds.project_name, ds.crystal_name, ds.wavelength = "sfxflow", "crystal", float(wavelength_a)
    ds.cell = cell
    for label, kind in (("IMEAN", "J"), ("SIGIMEAN", "Q"), ("I(+)", "K"), ("SIGI(+)", "M"),
                        ("I(-)", "K"), ("SIGI(-)", "M"), ("N", "I")):
        mtz.add_column(label, kind)
    keep = merged.n_obs > 0
    table = np.column_stack([
        merged.hkl[keep].astype(np.float32), merged.imean[keep], merged.sigimean[keep],
        merged.i_plus[keep], merged.sigi_plus[keep], merged.i_minus[keep],
        merged.sigi_minus[keep], merged.n_obs[keep],
    ]).astype(np.float32)
    mtz.set_data(table)
    mtz.history = ["sfxflow merge"]
    try:
        mtz.write_to_file(str(path))
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{path}: cannot write MTZ ({exc})") from None
