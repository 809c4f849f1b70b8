"""A merge's output files: ``merged.mtz``, ``merged.hkl`` with its half-data sets ``.hkl1`` /
``.hkl2``, ``crystals.parquet`` and ``stats.json``, written into the merge folder (any URL)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import pyarrow as pa

from sfxflow.io.hkl import write_half_hkls, write_hkl
from sfxflow.io.mtz import MergedColumns, write_merged_mtz
from sfxflow.io.results import RunDir, parquet_bytes

__all__ = ["crystals_table", "finite_json", "write_merge_outputs"]


def crystals_table(columns: dict[str, Any], metas: list[pa.Table]) -> pa.Table:
    """``crystals.parquet``: each crystal's source columns (``metas``, in shard order) beside its
    fit ``columns`` (``CrystalFits.table_columns()``)."""
    meta = pa.concat_tables(metas) if metas else pa.table({})
    columns = {**columns, "reason": pa.array(columns["reason"], pa.string())}  # typed if empty
    return pa.table({**{k: meta.column(k) for k in meta.column_names}, **columns})


def write_merge_outputs(out: RunDir, hkl: np.ndarray, merged: Any, uc: gemmi.UnitCell,
                        sg: gemmi.SpaceGroup, wavelength_a: float, stats: dict,
                        crystals: pa.Table) -> None:
    """Write the merged reflections ``merged`` (indexed like ``hkl``), the per-crystal table and
    the statistics into the merge folder ``out``."""
    cols = MergedColumns(hkl, merged.imean, merged.sigimean, merged.i_plus, merged.sigi_plus,
                         merged.i_minus, merged.sigi_minus, merged.n)
    with tempfile.TemporaryDirectory() as tmp:
        mtz = Path(tmp) / "merged.mtz"
        write_merged_mtz(mtz, uc, sg, wavelength_a, cols)
        out.write_bytes("merged.mtz", mtz.read_bytes())
        merged_hkl = Path(tmp) / "merged.hkl"
        write_hkl(merged_hkl, sg, cols)
        out.write_bytes("merged.hkl", merged_hkl.read_bytes())
        # the two half-data sets behind CC1/2, named as partialator names them
        for half in write_half_hkls(Path(tmp) / "merged", sg, hkl, merged):
            out.write_bytes(half.name, half.read_bytes())
    out.write_bytes("crystals.parquet", parquet_bytes(crystals))
    out.write_text("stats.json", json.dumps(finite_json(stats), indent=1) + "\n")


def finite_json(x: Any) -> Any:
    """JSON has no NaN: null instead (a round trip through Python's NaN extension of JSON).

    >>> finite_json({"cc": float("nan"), "n": 3})
    {'cc': None, 'n': 3}
    """
    return json.loads(json.dumps(x, default=lambda v: v.item()), parse_constant=lambda c: None)
