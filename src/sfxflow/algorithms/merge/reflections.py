"""The reflections a merge can produce: the asymmetric unit of a space group to a resolution,
with Friedel mates kept apart, and the re-indexing operators of an indexing ambiguity.

Every observation is mapped to one integer, ``2 * asu_index + minus``, into the sorted list of
asymmetric-unit reflections that :func:`gemmi.make_miller_array` enumerates; ``minus`` is 1 when
the observation is a Friedel mate (``I(-)``) of the asymmetric-unit reflection. Per-reflection
sums are then plain ``numpy.bincount`` calls, and a shard's sums add to any other shard's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gemmi
import numpy as np

from sfxflow.models import as_space_group, as_unit_cell

__all__ = ["AsuIndex", "ambiguity_operators", "d_spacing_a", "max_inv_d2"]


def _encode(hkl: np.ndarray, m: int) -> np.ndarray:
    w = 2 * m + 1
    f = np.asarray(hkl, dtype=np.int64) + m
    return (f[..., 0] * w + f[..., 1]) * w + f[..., 2]


def d_spacing_a(cell: gemmi.UnitCell, hkl: np.ndarray) -> np.ndarray:
    """Resolution ``d`` (Å) of Miller indices in a cell (inf for 0 0 0).

    >>> d_spacing_a(gemmi.UnitCell(10, 20, 30, 90, 90, 90), np.array([[1, 0, 0], [0, 0, 3]]))
    array([10., 10.])
    """
    frac = np.asarray(cell.frac.mat, dtype=float)  # orthogonal -> fractional
    q = np.asarray(hkl, dtype=float) @ frac  # rows: reciprocal vectors (Å⁻¹)
    with np.errstate(divide="ignore"):
        return 1.0 / np.linalg.norm(q, axis=-1)


def max_inv_d2(a_matrices: np.ndarray, obs_crystal: np.ndarray, hkl: np.ndarray) -> float:
    """The largest ``1/d²`` (Å⁻²) of observations ``hkl`` of crystals with reciprocal bases
    ``a_matrices[obs_crystal]`` (columns a*, b*, c*); 0 without observations."""
    if not len(hkl):
        return 0.0
    q = np.einsum("nij,nj->ni", np.asarray(a_matrices)[obs_crystal], np.asarray(hkl, float))
    return float(np.max(np.einsum("ni,ni->n", q, q)))


@dataclass(frozen=True)
class AsuIndex:
    """Asymmetric-unit reflections of ``space_group`` in ``cell`` to ``d_min_a``.

    Attributes
    ----------
    hkl : (n, 3) int32, the asymmetric-unit Miller indices (gemmi's convention), sorted by key.
    d_a : (n,) resolution of each.
    centric : (n,) bool.

    Examples
    --------
    >>> idx = AsuIndex.build("42.37 42.37 39.69 90 90 90", "P 41 21 2", 3.0)
    >>> code = idx.lookup(np.array([[1, 2, 3], [-1, -2, -3], [9, 9, 9]]))
    >>> bool(code[0] // 2 == code[1] // 2), int(code[0] % 2 + code[1] % 2), int(code[2])
    (True, 1, -1)
    """

    cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup
    d_min_a: float
    hkl: np.ndarray
    d_a: np.ndarray
    centric: np.ndarray
    _keys: np.ndarray
    _m: int

    @classmethod
    def build(cls, cell: gemmi.UnitCell | str | tuple[float, ...],
              space_group: gemmi.SpaceGroup | str, d_min_a: float) -> AsuIndex:
        uc, sg = as_unit_cell(cell), as_space_group(space_group)
        if not d_min_a > 0:
            raise ValueError(f"d_min_a = {d_min_a!r}: expected a positive resolution")
        hkl = np.asarray(gemmi.make_miller_array(uc, sg, d_min_a, 0, True), dtype=np.int32)
        # any index within d_min obeys |h| <= |a| / d_min (h = a . q), whatever the setting
        m = math.ceil(max(uc.a, uc.b, uc.c) / d_min_a) + 2
        keys = _encode(hkl, m)
        order = np.argsort(keys)
        hkl, keys = hkl[order], keys[order]
        ops = sg.operations()
        centric = np.array([ops.is_reflection_centric(list(map(int, h))) for h in hkl], dtype=bool)
        return cls(uc, sg, float(d_min_a), hkl, d_spacing_a(uc, hkl), centric, keys, m)

    def __len__(self) -> int:
        return int(self.hkl.shape[0])

    def lookup(self, hkl: np.ndarray) -> np.ndarray:
        """``2 * asu_index + minus`` for each row of ``hkl`` (-1: absent, beyond ``d_min_a``
        or the 0 0 0 term)."""
        hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
        table = self._table()
        if table is None:
            return self._lookup(hkl)
        inside = np.all(np.abs(hkl) < self._m - 1, axis=1)
        return np.where(inside, table[_encode(np.where(inside[:, None], hkl, 0), self._m)],
                        -1).astype(np.int64)

    def _table(self) -> np.ndarray | None:
        """The code of every index in the box ``|h|, |k|, |l| <= m`` (built once per process
        and index: a shard's lookup is then one gather instead of a binary search per
        symmetry operator and Friedel sign); None where the box exceeds 64 MB."""
        w = 2 * self._m + 1
        if w**3 > _MAX_TABLE:
            return None
        # by content: every task of a merge gets its own copy of the index
        key = (tuple(self.cell.parameters), self.space_group.xhm(), self.d_min_a, self._m,
               len(self))
        table = _TABLES.get(key)
        if table is None:  # (threads of one worker may both build it: the same table)
            r = np.arange(-self._m, self._m + 1)
            box = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
            table = self._lookup(box).astype(np.int32)
            _TABLES.clear()  # one index per merge: keep the latest only
            _TABLES[key] = table
        return table

    def _lookup(self, hkl: np.ndarray) -> np.ndarray:
        out = np.full(hkl.shape[0], -1, dtype=np.int64)
        inside = np.all(np.abs(hkl) < self._m - 1, axis=1)
        if not len(self):
            return out
        for sign in (1, -1):  # proper operations first, so centrics count as I(+)
            for op in self.space_group.operations().sym_ops:
                r = np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN
                e = sign * (hkl @ r)
                key = _encode(np.clip(e, -self._m, self._m), self._m)
                pos = np.clip(np.searchsorted(self._keys, key), 0, len(self._keys) - 1)
                hit = inside & (out < 0) & (self._keys[pos] == key)
                out[hit] = 2 * pos[hit] + (1 if sign < 0 else 0)
        return out


#: the lookup table of the last index used in this process
_TABLES: dict[tuple, np.ndarray] = {}
_MAX_TABLE = 16_000_000  # entries (int32)


def ambiguity_operators(cell: gemmi.UnitCell | str | tuple[float, ...],
                        space_group: gemmi.SpaceGroup | str,
                        max_obliquity_deg: float = 3.0) -> list[np.ndarray]:
    """Re-indexing matrices of the indexing ambiguity: the identity, then one operator per
    coset of the lattice's holohedry that the point group lacks (as ``hkl @ R``).

    >>> ops = ambiguity_operators("50 50 80 90 90 120", "P 63")
    >>> len(ops), ops[1].tolist()
    (2, [[-1, 0, 0], [-1, 1, 0], [0, 0, -1]])
    >>> len(ambiguity_operators("42 42 39 90 90 90", "P 41 21 2"))
    1
    """
    uc, sg = as_unit_cell(cell), as_space_group(space_group)
    ops = [np.eye(3, dtype=np.int64)]
    for op in gemmi.find_twin_laws(uc, sg, max_obliquity_deg, False):
        ops.append(np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN)
    return ops


def operator_products(index: AsuIndex, operators: list[np.ndarray]) -> np.ndarray:
    """``table[m, n]``: which operator ``R_m R_n⁻¹`` is, up to the point group's symmetry
    (what relates a crystal in setting ``m`` to one in setting ``n``).

    >>> idx = AsuIndex.build("50 50 80 90 90 120", "P 63", 4.0)
    >>> operator_products(idx, ambiguity_operators(idx.cell, idx.space_group)).tolist()
    [[0, 1], [1, 0]]
    """
    n = len(operators)
    # a spread of reflections: the first ones in key order lie on a few special planes
    test = index.hkl[np.unique(np.linspace(0, len(index) - 1, 500).astype(int))].astype(np.int64)
    own = [index.lookup(test @ r) // 2 for r in operators]
    table = np.zeros((n, n), dtype=np.int64)
    for m in range(n):
        for k in range(n):
            prod = operators[m].astype(float) @ np.linalg.inv(operators[k].astype(float))
            codes = index.lookup(test @ np.rint(prod).astype(np.int64)) // 2
            match = [j for j in range(n) if np.array_equal(codes, own[j])]
            if not match:
                raise ValueError("ambiguity operators do not form a group")
            table[m, k] = match[0]
    return table
