"""Indexing-ambiguity resolution (Brehm and Diederichs, Acta Cryst. D70, 101 (2014)).

When the lattice has more symmetry than the point group (P6_3, P3, P4, ...), an indexer cannot
tell the settings related by the missing operators apart; each crystal comes out in one of them
at random. Every crystal is compared with a random set of partners: ``c[i, j, m]`` is the
correlation of crystal ``i`` re-indexed by operator ``m`` with crystal ``j`` as indexed. Then,
starting from random settings, each crystal in turn takes the setting that agrees best with
its partners' current settings, until nothing changes (their "algorithm 2"; CrystFEL's
ambigator does the same).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["resolve_ambiguity"]


@numba.njit(cache=True)
def _sparse_cc(ia, va, ib, vb):  # pragma: no cover - numba
    # both index arrays sorted ascending; Pearson over common indices
    i = 0
    j = 0
    n = 0
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    while i < ia.shape[0] and j < ib.shape[0]:
        if ia[i] < ib[j]:
            i += 1
        elif ia[i] > ib[j]:
            j += 1
        else:
            x = va[i]
            y = vb[j]
            sx += x
            sy += y
            sxx += x * x
            syy += y * y
            sxy += x * y
            n += 1
            i += 1
            j += 1
    if n < 3:
        return np.nan, 0
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    if vx <= 0 or vy <= 0:
        return np.nan, n
    return (sxy - sx * sy / n) / np.sqrt(vx * vy), n


@numba.njit(cache=True)
def _pair_ccs(offsets, idx, val, partners, n_ops):  # pragma: no cover - numba
    # offsets: (n_crystals * n_ops + 1); crystal c under op m occupies slot c * n_ops + m
    n_c, n_p = partners.shape
    out = np.full((n_c, n_p, n_ops), np.nan)
    for c in range(n_c):
        for k in range(n_p):
            j = partners[c, k]
            if j < 0:
                continue
            jb = j * n_ops
            for m in range(n_ops):
                s = c * n_ops + m
                cc, _n = _sparse_cc(idx[offsets[s]:offsets[s + 1]], val[offsets[s]:offsets[s + 1]],
                                   idx[offsets[jb]:offsets[jb + 1]],
                                   val[offsets[jb]:offsets[jb + 1]])
                out[c, k, m] = cc
    return out


def resolve_ambiguity(
    vectors: list[list[tuple[np.ndarray, np.ndarray]]],
    products: np.ndarray,
    rng: np.random.Generator,
    n_partners: int = 200,
    max_cycles: int = 100,
) -> np.ndarray:
    """The setting (operator index) of each crystal, consistent across crystals.

    Parameters
    ----------
    vectors : ``vectors[c][m]`` = (sorted Friedel-merged asymmetric-unit indices, normalised
        intensities) of crystal ``c`` re-indexed by operator ``m`` (0 = as indexed).
    products : ``products[m, n]`` = the operator ``R_m R_n⁻¹`` (see :func:`sfxflow.algorithms.merge.reflections.operator_products`).
    rng : partner choice and starting settings.
    n_partners : partners per crystal.

    Returns
    -------
    ``(n_crystals,)`` operator per crystal; the overall setting is arbitrary (the first crystal
    with partners keeps its own).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.normal(size=200)
    >>> p = rng.permutation(200)
    >>> twin = np.empty(200, dtype=int)
    >>> twin[p[0::2]], twin[p[1::2]] = p[1::2], p[0::2]  # operator 1 swaps reflection pairs
    >>> def crystal(flip):
    ...     idx = rng.choice(200, 60, replace=False)
    ...     v = truth[idx] + 0.3 * rng.normal(size=60)
    ...     seen = twin[idx] if flip else idx
    ...     o0, o1 = np.argsort(seen), np.argsort(twin[seen])
    ...     return [(seen[o0], v[o0]), (twin[seen][o1], v[o1])]
    >>> flips = rng.random(40) < 0.5
    >>> ops = resolve_ambiguity([crystal(f) for f in flips], np.array([[0, 1], [1, 0]]), rng)
    >>> float((ops == flips.astype(int)).mean()) in (0.0, 1.0)
    True
    """
    n_c = len(vectors)
    n_ops = products.shape[0]
    if n_c == 0 or n_ops == 1:
        return np.zeros(n_c, dtype=np.int64)
    lengths = [len(v[m][0]) for v in vectors for m in range(n_ops)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    idx = np.concatenate([v[m][0] for v in vectors for m in range(n_ops)]).astype(np.int64)
    val = np.concatenate([v[m][1] for v in vectors for m in range(n_ops)]).astype(float)
    n_p = min(n_partners, n_c - 1)
    partners = np.full((n_c, max(n_p, 1)), -1, dtype=np.int64)
    for c in range(n_c):
        others = rng.choice(n_c - 1, size=n_p, replace=False) if n_p else np.zeros(0, int)
        partners[c, :n_p] = others + (others >= c)
    ccs = np.nan_to_num(_pair_ccs(offsets, idx, val, partners, n_ops), nan=0.0)
    ops = rng.integers(0, n_ops, n_c)
    for _ in range(max_cycles):
        changed = 0
        for c in rng.permutation(n_c):
            score = np.zeros(n_ops)
            for k in range(n_p):
                j = partners[c, k]
                # c under op m vs j under its op a_j  ==  c under R_m R_aj⁻¹ vs j as indexed
                for m in range(n_ops):
                    score[m] += ccs[c, k, products[m, ops[j]]]
            best = int(np.argmax(score))
            if best != ops[c]:
                ops[c] = best
                changed += 1
        if changed == 0:
            break
    return ops
