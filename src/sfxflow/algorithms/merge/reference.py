"""The first reference of a merge: a Wilson curve, and where the lattice allows an indexing
ambiguity, a reference built from a resolved subset of crystals.

Nothing is known of the intensities before the first scaling cycle, so every crystal is first
scaled against the mean intensity at its reflections' resolution (the Wilson curve: one number
per ``1/d²`` bin, summed over the shards). With an ambiguity that is not enough to choose each
crystal's setting, so a bounded random subset of crystals sends its intensities, normalised by
the curve and averaged per asymmetric-unit reflection under every operator
(:func:`ambiguity_vectors`), to the Brehm-Diederichs step; the settings it finds give the
first reference (:func:`first_reference`).

Each function here is one side of a map/reduce: :meth:`WilsonCurve.sums` and
:func:`ambiguity_vectors` run per shard, the rest on the reduced values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.merge.scale import ErrorModel, PreparedShard, Reference, ShardSums
from sfxflow.algorithms.merge.statistics import Merged, merge_sums, pearson

if TYPE_CHECKING:  # simulate_physical imports this package: no import cycle at run time
    from sfxflow.algorithms.simulate_physical import TrueIntensities

__all__ = ["WilsonCurve", "ambiguity_vectors", "first_reference", "next_reference",
           "truth_in_best_setting", "truth_on"]

N_WILSON_BINS = 40

#: per crystal: its id and, per ambiguity operator, (asymmetric-unit indices, mean normalised
#: intensity at each)
CrystalVectors = tuple[int, list[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class WilsonCurve:
    """Mean intensity in equal-width ``1/d²`` bins (``edges``, Å⁻²; NaN where empty).

    >>> edges = WilsonCurve.edges_to(2.0, n_bins=2)
    >>> curve = WilsonCurve.from_sums(edges, np.array([[10.0, 2.0], [2.0, 1.0]]))
    >>> curve.mean
    array([5., 2.])
    """

    edges: np.ndarray
    mean: np.ndarray

    @staticmethod
    def edges_to(d_min_a: float, n_bins: int = N_WILSON_BINS) -> np.ndarray:
        return np.linspace(0.0, 1.0 / d_min_a**2 * 1.0001, n_bins + 1)

    @staticmethod
    def sums(shard: PreparedShard, edges: np.ndarray) -> np.ndarray:
        """A shard's (intensity sum, count) per bin: the map step; shards' sums add."""
        ok = shard.codes[0] >= 0
        n_bins = len(edges) - 1
        b = np.clip(np.searchsorted(edges, shard.inv_d2[ok]) - 1, 0, n_bins - 1)
        return np.stack([np.bincount(b, weights=shard.intensity[ok], minlength=n_bins),
                         np.bincount(b, minlength=n_bins).astype(float)])

    @classmethod
    def from_sums(cls, edges: np.ndarray, sums: np.ndarray) -> WilsonCurve:
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(edges, sums[0] / sums[1])

    def at(self, inv_d2: np.ndarray) -> np.ndarray:
        """The curve at ``inv_d2`` (log-linear between bin centres; 1 where nothing is known)."""
        centres = 0.5 * (self.edges[:-1] + self.edges[1:])
        good = np.isfinite(self.mean) & (self.mean > 0)
        if not good.any():
            return np.ones_like(inv_d2)
        return np.exp(np.interp(inv_d2, centres[good], np.log(self.mean[good])))


def ambiguity_vectors(shard: PreparedShard, wilson: WilsonCurve, fraction: float, seed: int
                      ) -> list[CrystalVectors]:
    """A random ``fraction`` of the shard's crystals (a fixed function of the seed and the
    shard's first crystal id): per crystal and operator, the mean Wilson-normalised intensity
    per asymmetric-unit reflection (sorted indices), for :func:`resolve_ambiguity`."""
    first = int(shard.crystal_ids[0]) if shard.n_crystals else 0
    pick = np.random.default_rng([seed, first]).random(shard.n_crystals) < fraction
    norm = shard.intensity / wilson.at(shard.inv_d2)
    out = []
    for c in np.flatnonzero(pick):
        lo, hi = shard.offsets[c], shard.offsets[c + 1]
        per_op = []
        for o in range(shard.codes.shape[0]):
            code = shard.codes[o, lo:hi]
            ok = code >= 0
            idx, inv = np.unique(code[ok] // 2, return_inverse=True)
            val = np.bincount(inv, weights=norm[lo:hi][ok]) / np.bincount(inv)
            per_op.append((idx, val))
        out.append((int(shard.crystal_ids[c]), per_op))
    return out


def first_reference(index: AsuIndex, wilson: WilsonCurve,
                    picked: list[CrystalVectors] | None = None,
                    settings: np.ndarray | None = None) -> Reference:
    """The reference of the first cycle: the Wilson curve at every reflection, or with
    resolved crystals (``picked`` in ``settings``, one operator each) their mean normalised
    intensity times the curve (NaN where none of them measured the reflection)."""
    level = wilson.at(1.0 / index.d_a**2)
    ref_i = level
    if picked is not None and settings is not None:
        s_val = np.zeros(len(index))
        s_n = np.zeros(len(index))
        for (_, vecs), o in zip(picked, settings, strict=True):
            idx, val = vecs[int(o)]
            s_val[idx] += val
            s_n[idx] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            ref_i = np.where(s_n > 0, s_val / s_n * level, np.nan)
    return Reference(ref_i, np.full(len(index), np.nan), np.zeros(len(index), np.int64),
                     level=level)


def truth_on(index: AsuIndex, truth: TrueIntensities,
             reindex: np.ndarray | None = None) -> np.ndarray:
    """True intensities per asymmetric-unit reflection (Friedel mates averaged), optionally in
    the setting re-indexed by ``reindex``."""
    hkl = index.hkl.astype(np.int64)
    if reindex is not None:
        hkl = hkl @ np.asarray(reindex, dtype=np.int64)
    plus = truth.at(hkl)
    minus = truth.at(-hkl)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(minus), 0.5 * (plus + minus), plus)


def next_reference(sums: ShardSums, min_measurements: int, d_a: np.ndarray
                   ) -> tuple[Merged, Reference, float]:
    """After a cycle's reduce: the merged values, the next reference (with the error model
    fitted on this cycle's deviations) and the rms of the normalised deviations."""
    merged = merge_sums(sums, min_measurements)
    reference = merged.reference(ErrorModel.fit_binned(sums.error_bins), d_a)
    dev = sums.deviation_sums
    return merged, reference, float(np.sqrt(dev[1] / dev[0])) if dev[0] else float("nan")


def truth_in_best_setting(index: AsuIndex, truth: TrueIntensities, operators: list[np.ndarray],
                          imean: np.ndarray) -> tuple[np.ndarray, list[float], int]:
    """With an ambiguity the merged setting is arbitrary: the truth in the setting (operator)
    that correlates best with ``imean``, the correlation in every setting, and that operator."""
    by_op = [truth_on(index, truth, r) for r in operators]
    ccs = [pearson(imean, t) for t in by_op]
    best = int(np.nanargmax(ccs)) if np.isfinite(ccs).any() else 0
    return by_op[best], ccs, best
