"""Crystal rejections that need every crystal's fit: what no shard can decide alone.

* **Absurd scale**: a crystal whose scale is further than ``MergeParams.max_scale_ratio`` from
  the median of the accepted ones (a failed fit, or a crystal that is not one).
* **Low correlation**: from the second cycle (the first scales against a Wilson curve), a
  crystal whose correlation with the reference is an outlier below the others' (below the
  median by more than ``MergeParams.cc_outlier_sigma`` robust standard deviations, from the
  interquartile range). Its observations do not follow the reference, so its scale and B are
  not determined by them, and dividing by them spreads its noise over every reflection it
  measured.
* **delta CC1/2** (as partialator; Assmann, Brehm and Diederichs, J. Appl. Cryst. 49, 1021
  (2016)): CC1/2 of the merge minus CC1/2 with one crystal left out. A crystal that is not
  isomorphous, badly scaled or mis-indexed makes the two half-sets disagree, and the merge is
  better without it. Each shard computes it for its own crystals from the reduced half-set
  sums (:func:`delta_cc_half`, exact for the sums of the cycle); the client rejects the
  outliers (:func:`reject_delta_cc_half`). The correlation is over asymmetric-unit
  reflections measured in both half-sets (Friedel mates together), weighted means as merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sfxflow.algorithms.merge.kernels import delta_cc_half_kernel
from sfxflow.algorithms.merge.scale import (
    ACCEPTED,
    REASONS,
    REJECT_CC,
    REJECT_DELTA_CC_HALF,
    REJECT_SCALE,
    CrystalFits,
    MergeParams,
    PreparedShard,
    Reference,
    ShardSums,
    accepted_of,
    scaled_observations,
)

__all__ = [
    "HalfSums",
    "delta_cc_half",
    "reasons_counted",
    "reject_absurd_scales",
    "reject_delta_cc_half",
    "reject_globally",
    "reject_low_cc",
    "with_delta_cc_half",
]


def reject_absurd_scales(fits: list[CrystalFits], max_scale_ratio: float) -> None:
    """Mark (in place) accepted crystals whose scale is more than ``max_scale_ratio`` times
    from the median scale of all accepted crystals of all shards.

    >>> f = CrystalFits(*(np.zeros(3) for _ in range(9)))
    >>> f.scale[:] = [1.0, 1.2, 5e4]
    >>> reject_absurd_scales([f], 1e3)
    >>> f.status.tolist()
    [0.0, 0.0, 2.0]
    """
    scales = np.concatenate([f.scale[f.status == ACCEPTED] for f in fits] or [np.zeros(0)])
    med = float(np.median(scales)) if scales.size else math.nan
    for f in fits:
        with np.errstate(invalid="ignore", divide="ignore"):
            absurd = (f.status == ACCEPTED) & ~(np.abs(np.log(f.scale / med))
                                                <= math.log(max_scale_ratio))
        f.status[absurd] = REJECT_SCALE


def reasons_counted(status: np.ndarray) -> dict[str, int]:
    """How many crystals each rejection reason took (reasons that took none left out)."""
    counts = {reason: int(np.sum(status == code)) for code, reason in REASONS.items()}
    return {reason: n for reason, n in counts.items() if n}


@dataclass(frozen=True)
class HalfSums:
    """Σw and Σw·I of each random half-set per asymmetric-unit reflection (Friedel mates
    together), from a cycle's reduced :class:`ShardSums`."""

    sw_a: np.ndarray
    swi_a: np.ndarray
    sw_b: np.ndarray
    swi_b: np.ndarray

    @classmethod
    def of(cls, sums: ShardSums) -> HalfSums:
        def asu(v: np.ndarray) -> np.ndarray:
            return v.reshape(-1, 2).sum(axis=1)

        return cls(asu(sums.sw_a), asu(sums.swi_a), asu(sums.sw_b), asu(sums.swi_b))


def _moments(x: np.ndarray, y: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(n, Σx, Σy, Σx², Σy², Σxy) terms of each element (zero where not ``present``)."""
    x, y = np.where(present, x, 0.0), np.where(present, y, 0.0)
    return np.stack([present.astype(float), x, y, x * x, y * y, x * y])


def _pearson(m: np.ndarray) -> np.ndarray:
    n, sx, sy, sxx, syy, sxy = m
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        return cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


def _half_means(sw: np.ndarray, swi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    present = sw > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, swi / np.where(present, sw, 1.0), 0.0), present


def delta_cc_half(shard: PreparedShard, fits: CrystalFits, accepted: np.ndarray | None,
                  reference: Reference, params: MergeParams, halves: HalfSums) -> np.ndarray:
    """Per crystal of the shard: CC1/2 of the merge minus CC1/2 without the crystal (NaN for
    crystals that did not enter it). ``fits``, ``accepted`` and ``reference`` must be those
    the cycle's sums (``halves``) were accumulated with, so that taking a crystal out is exact.

    Only the reflections a crystal measured change when it leaves, so each crystal costs its
    own observations: the correlation's six moment sums are corrected per crystal.
    """
    obs = scaled_observations(shard, fits, reference, params, accepted_of(fits, accepted),
                              False)
    delta = np.empty(shard.n_crystals)
    delta_cc_half_kernel(shard.offsets, shard.half, obs["code"], obs["use"], obs["intensity"],
                         obs["sigma"], halves.sw_a, halves.swi_a, halves.sw_b, halves.swi_b,
                         delta)
    return delta


def with_delta_cc_half(shard: PreparedShard, fits: CrystalFits, accepted: np.ndarray | None,
                       reference: Reference, params: MergeParams, halves: HalfSums
                       ) -> CrystalFits:
    """``fits`` with :func:`delta_cc_half` filled in (a map step)."""
    fits.delta_cc_half = delta_cc_half(shard, fits, accepted, reference, params, halves)
    return fits


def _reject_below(fits: list[CrystalFits], column: str, cut_of: Callable[[np.ndarray], float],
                  code: int, nan_is_below: bool) -> int:
    """Mark accepted crystals whose ``column`` is below ``cut_of(values of all accepted
    crystals)`` with ``code``; returns how many (none from < 5 values)."""
    vals = np.concatenate([getattr(f, column)[f.status == ACCEPTED] for f in fits] or
                          [np.zeros(0)])
    vals = vals[np.isfinite(vals)]
    if vals.size < 5:
        return 0
    cut, n = cut_of(vals), 0
    for f in fits:
        v = getattr(f, column)
        bad = (f.status == ACCEPTED) & (~(v >= cut) if nan_is_below else (v < cut))
        f.status[bad] = code
        n += int(bad.sum())
    return n


def reject_low_cc(fits: list[CrystalFits], n_sigma: float) -> int:
    """Mark (in place) accepted crystals whose ``cc`` is below the median of all accepted
    crystals' by more than ``n_sigma`` robust standard deviations (IQR / 1.349); returns how
    many.

    >>> f = CrystalFits(*(np.zeros(8) for _ in range(9)))
    >>> f.cc[:] = [0.6, 0.62, 0.58, 0.61, 0.59, 0.6, 0.63, 0.05]
    >>> reject_low_cc([f], 3.0), int(f.status[-1])
    (1, 4)
    """
    def cut(v: np.ndarray) -> float:
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return float(med - n_sigma * (q3 - q1) / 1.349)

    return _reject_below(fits, "cc", cut, REJECT_CC, True) if n_sigma > 0 else 0


def reject_delta_cc_half(fits: list[CrystalFits], n_sigma: float) -> int:
    """Mark (in place) accepted crystals whose ``delta_cc_half`` is negative and more than
    ``n_sigma`` standard deviations below the mean of all accepted crystals'; returns how many.
    (A crystal without a value is left alone: it was not in the sums.)

    >>> f = CrystalFits(*(np.zeros(12) for _ in range(9)))
    >>> f.delta_cc_half = np.r_[np.full(11, 0.001), -0.05]
    >>> reject_delta_cc_half([f], 2.0), int(f.status[-1])
    (1, 6)
    """
    def cut(v: np.ndarray) -> float:
        return min(float(np.mean(v) - n_sigma * np.std(v)), 0.0)

    if n_sigma <= 0:
        return 0
    return _reject_below(fits, "delta_cc_half", cut, REJECT_DELTA_CC_HALF, False)


def reject_globally(fits: list[CrystalFits], dropped: list[np.ndarray] | None,
                    params: MergeParams, against_merge: bool = True
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """After a cycle: the rejections no shard can decide (absurd scale, delta CC1/2), marked
    in ``fits``. A crystal ``dropped`` by delta CC1/2 in an earlier cycle stays rejected, as
    in partialator; an absurd scale or a low correlation (only ``against_merge``: not against
    the first cycle's Wilson curve) is judged again each cycle. Returns, per shard, the
    crystals that enter the next cycle and the cumulative ``dropped``."""
    for f, d in zip(fits, dropped or [np.zeros(len(f.status), bool) for f in fits], strict=True):
        f.status[d] = REJECT_DELTA_CC_HALF
    reject_absurd_scales(fits, params.max_scale_ratio)
    if against_merge:
        reject_low_cc(fits, params.cc_outlier_sigma)
    if params.rejects_on_delta_cc_half():
        reject_delta_cc_half(fits, params.delta_cc_half_sigma)
    return ([f.status == ACCEPTED for f in fits],
            [f.status == REJECT_DELTA_CC_HALF for f in fits])
