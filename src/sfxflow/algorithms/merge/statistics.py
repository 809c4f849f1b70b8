"""Merged intensities from per-reflection sums, merging statistics per resolution shell, and a
resolution estimate.

Shells: ``n_shells`` shells of equal reciprocal-space volume (equal steps of 1/d³, as CrystFEL's
compare_hkl makes them) between the lowest- and the highest-resolution reflection actually
merged, so the first shell starts where the data start, not at the cell's longest axis, and no
shell holds only reflections seen too few times to merge. Per
shell and overall:

- observations, unique reflections measured, possible, completeness, multiplicity, and the mean
  I/σ(I) of the merged reflections;
- CC1/2 between two random, balanced half-sets of crystals, twice: ``cc_half`` as CrystFEL
  (partialator, compare_hkl) counts it, on reflections with at least ``min_measurements``
  observations in each half (the rule of the merged values), and ``cc_half_aimless`` as aimless
  and DIALS count it, on reflections with at least one observation in each half; each with its
  number of pairs (``n_pairs``, ``n_pairs_aimless``);
- CC* = sqrt(2 CC1/2 / (1 + CC1/2)) (Karplus and Diederichs 2012) for both, and
  Rsplit = Σ|I_a - I_b| / (√2 · ½ Σ(I_a + I_b)) (White et al. 2012) on the CrystFEL pairs;
- CC_ano: the correlation of the half-sets' anomalous differences I(+) - I(-) over acentric
  reflections with at least one observation of each sign in each half; the anomalous
  completeness (acentric reflections whose merged I(+) and I(-) both exist, over the acentric
  ones possible) and anomalous multiplicity (observations per merged I(+) or I(-) of those);
  and ``cc_ano_sigma``, CC_ano's standard error where there is no anomalous signal
  (:func:`null_sigma`): the noise of I(+) - I(-) grows with the intensity (with unity
  scaling, unmodelled partiality makes it about proportional), so a few strong reflections
  carry the correlation and it scatters two or three times 1/√(n - 3) about zero (seeded
  simulations with I(+) = I(-), 250 crystals, unity: CC_ano/(1/√(n - 3)) has sd 2.2 over 6
  seeds, CC_ano/``cc_ano_sigma`` 0.9); CrystFEL's compare_hkl ``--fom=ccano`` gives the same
  CC_ano on the same half-sets;
- the correlation with the true intensities where they are known.

A correlation from a handful of pairs is noise: its standard error is about 1/√(n - 3) (Fisher's
z), 0.24 at 20 pairs. A figure from fewer than :data:`MIN_PAIRS` pairs (CC1/2, CC*, Rsplit,
CC_ano), and a mean I/σ(I) over fewer than :data:`MIN_PAIRS` reflections, is NaN (printed ``-``,
written ``null``) rather than a number nobody should read: the table cannot invite a resolution
cut that six pairs "support", and the I/σ(I) curve cannot turn on one reflection.

The Wilson B comes from a straight line through ln<I> against 1/d² in shells beyond 4.5 Å.

The resolution estimate follows dials.estimate_resolution: CC1/2(s) = ½ (1 - tanh((s - s₀) / r))
with s = 1/d² at each shell's high-resolution edge, fitted to the aimless CC1/2 with each shell
weighted by the standard error 1/√(n - 3) of its pairs, solved for CC1/2 = 0.3; and a low-order
polynomial through ln <I/σ(I)> (merged) against s, solved for <I/σ(I)> = 1.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.merge.scale import ErrorModel, Reference, ShardSums

__all__ = ["MIN_PAIRS", "Merged", "balanced_halves", "cc_star", "estimate_resolution",
           "format_estimate", "format_table", "halves_of_accepted", "merge_sums", "null_sigma",
           "pearson", "shell_edges", "shell_of", "shell_statistics", "wilson_b"]

#: fewer pairs than this (or merged reflections, for <I/σ(I)>) and a shell shows ``-``
MIN_PAIRS = 20
#: the resolution estimate's criteria (dials.estimate_resolution's default for CC1/2)
CC_HALF_LIMIT = 0.3
I_OVER_SIGMA_LIMIT = 1.0


@dataclass(frozen=True)
class Merged:
    """Merged intensities per asymmetric-unit reflection (NaN where unmeasured).

    ``imean``/``i_plus``/``i_minus`` and the half-set means ``i_half_a``/``i_half_b`` (with
    their σ and counts) are left out below ``min_measurements`` observations, as partialator
    does. The ``*_any`` half-set means and the half-set Friedel means (``i_plus_a`` ...)
    take one observation (the aimless/DIALS convention).
    """

    imean: np.ndarray
    sigimean: np.ndarray
    n: np.ndarray
    i_plus: np.ndarray
    sigi_plus: np.ndarray
    n_plus: np.ndarray
    i_minus: np.ndarray
    sigi_minus: np.ndarray
    n_minus: np.ndarray
    i_half_a: np.ndarray
    i_half_b: np.ndarray
    sigi_half_a: np.ndarray
    sigi_half_b: np.ndarray
    n_half_a: np.ndarray
    n_half_b: np.ndarray
    i_half_a_any: np.ndarray
    i_half_b_any: np.ndarray
    i_plus_a: np.ndarray
    i_minus_a: np.ndarray
    i_plus_b: np.ndarray
    i_minus_b: np.ndarray

    def reference(self, error_model: ErrorModel, d_a: np.ndarray | None = None) -> Reference:
        """The next cycle's reference; with ``d_a`` (per reflection) also the mean intensity
        at each reflection's resolution (20 shells)."""
        level = None
        if d_a is not None:
            level = resolution_level(d_a, self.imean)
        return Reference(self.imean, self.sigimean, self.n, error_model, level)


def resolution_level(d_a: np.ndarray, intensity: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Mean intensity in equal-count resolution shells, spread back to every reflection.

    >>> resolution_level(np.array([4.0, 3.0, 2.0, 1.0]), np.array([8.0, 6.0, 2.0, np.nan]), 2)
    array([7., 7., 2., 2.])
    """
    inv = 1.0 / np.asarray(d_a, float) ** 2
    edges = np.quantile(inv, np.linspace(0, 1, n_bins + 1))
    b = np.clip(np.searchsorted(edges, inv, side="right") - 1, 0, n_bins - 1)
    ok = np.isfinite(intensity)
    total = np.bincount(b[ok], weights=intensity[ok], minlength=n_bins)
    count = np.bincount(b[ok], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return np.abs(mean[b])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def merge_sums(sums: ShardSums, min_measurements: int = 2) -> Merged:
    """Weighted means (inverse-variance) from the reduced sums.

    A mean of fewer than ``min_measurements`` observations is left out (NaN, ``n`` 0), for the
    merged values and each half-set alike (as partialator and compare_hkl do): one weak
    observation is an estimate too noisy to publish or to correlate. The aimless-convention
    half-set means (``*_any``, ``i_plus_a`` ...) take a single observation.
    """
    def pair(a: np.ndarray) -> np.ndarray:
        return a[0::2] + a[1::2]

    def mean(swi: np.ndarray, sw: np.ndarray, n: np.ndarray, least: int = min_measurements
             ) -> tuple[np.ndarray, ...]:
        ok = n >= least
        i = np.where(ok, _ratio(swi, sw), np.nan)
        s = np.where(ok, _ratio(np.ones_like(sw), np.sqrt(sw)), np.nan)
        return i, s, np.where(ok, n, 0).astype(np.int64)

    imean, sigimean, n = mean(pair(sums.swi), pair(sums.sw), pair(sums.n))
    i_plus, sigi_plus, n_plus = mean(sums.swi[0::2], sums.sw[0::2], sums.n[0::2])
    i_minus, sigi_minus, n_minus = mean(sums.swi[1::2], sums.sw[1::2], sums.n[1::2])
    i_a, s_a, n_a = mean(pair(sums.swi_a), pair(sums.sw_a), pair(sums.n_a))
    i_b, s_b, n_b = mean(pair(sums.swi_b), pair(sums.sw_b), pair(sums.n_b))
    return Merged(
        imean=imean, sigimean=sigimean, n=n, i_plus=i_plus, sigi_plus=sigi_plus, n_plus=n_plus,
        i_minus=i_minus, sigi_minus=sigi_minus, n_minus=n_minus,
        i_half_a=i_a, i_half_b=i_b, sigi_half_a=s_a, sigi_half_b=s_b, n_half_a=n_a,
        n_half_b=n_b,
        i_half_a_any=mean(pair(sums.swi_a), pair(sums.sw_a), pair(sums.n_a), 1)[0],
        i_half_b_any=mean(pair(sums.swi_b), pair(sums.sw_b), pair(sums.n_b), 1)[0],
        i_plus_a=mean(sums.swi_a[0::2], sums.sw_a[0::2], sums.n_a[0::2], 1)[0],
        i_minus_a=mean(sums.swi_a[1::2], sums.sw_a[1::2], sums.n_a[1::2], 1)[0],
        i_plus_b=mean(sums.swi_b[0::2], sums.sw_b[0::2], sums.n_b[0::2], 1)[0],
        i_minus_b=mean(sums.swi_b[1::2], sums.sw_b[1::2], sums.n_b[1::2], 1)[0],
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both are finite (NaN with fewer than 3).

    >>> round(pearson(np.array([1.0, 2, 3, np.nan]), np.array([2.0, 4, 7, 1])), 4)
    0.9934
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    a, b = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else math.nan


def cc_star(cc_half: float) -> float:
    """CC* from CC1/2 (NaN where CC1/2 <= 0).

    >>> round(cc_star(0.5), 4)
    0.8165
    """
    if not (cc_half > 0):
        return math.nan
    return math.sqrt(2.0 * cc_half / (1.0 + cc_half))


def balanced_halves(counts: list[int] | np.ndarray, seed: int) -> list[np.ndarray]:
    """A random half-set (0 or 1) for every crystal, balanced: of ``N`` crystals in all,
    ``N // 2`` go to half 0 and the rest to half 1, whatever their numbers or shards.

    ``counts`` are the crystals per shard (in a fixed order); the result has one array per
    shard. An independent coin per crystal would split 34 crystals 21/13 as often as not, and
    an unequal split weakens the smaller half-set and biases CC1/2 low.

    >>> a, b = balanced_halves([3, 4], seed=0)
    >>> len(a), len(b), int(a.sum() + b.sum())
    (3, 4, 4)
    """
    counts = [int(c) for c in counts]
    total = sum(counts)
    order = np.random.default_rng([seed, total]).permutation(total)
    half = np.zeros(total, dtype=np.int8)
    half[order[total // 2:]] = 1
    return list(np.split(half, np.cumsum(counts)[:-1])) if counts else []


def halves_of_accepted(accepted: list[np.ndarray | None], seed: int
                       ) -> tuple[list[np.ndarray], list[int]]:
    """Half-sets (one array per shard) that split the accepted crystals of every shard evenly
    (:func:`balanced_halves`), and the two halves' sizes; rejected crystals, merged into
    neither, are put in half 0.

    >>> halves, n = halves_of_accepted([np.array([True, False, True]), np.array([True, True])], 0)
    >>> n, [h.size for h in halves]
    ([2, 2], [3, 2])
    """
    ok = [np.asarray(a, dtype=bool) for a in accepted]
    halves = []
    for a, h in zip(ok, balanced_halves([int(a.sum()) for a in ok], seed), strict=True):
        half = np.zeros(a.shape[0], dtype=np.int8)
        half[a] = h
        halves.append(half)
    n_b = int(sum(int(h[a].sum()) for h, a in zip(halves, ok, strict=True)))
    return halves, [int(sum(a.sum() for a in ok)) - n_b, n_b]


def _r_split(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    den = 0.5 * float(np.sum(a[ok] + b[ok]))
    if not ok.any() or den <= 0:
        return math.nan
    return float(np.sum(np.abs(a[ok] - b[ok])) / (math.sqrt(2.0) * den))


def shell_edges(index: AsuIndex, n_shells: int, d_min_a: float | None = None,
                measured: np.ndarray | None = None) -> np.ndarray:
    """1/d² edges of ``n_shells`` shells of equal reciprocal-space volume (equal steps of
    1/d³, as compare_hkl makes them) from the lowest- to the highest-resolution reflection of
    ``measured`` (a mask over ``index``; default every possible reflection), to ``d_min_a``.

    >>> idx = AsuIndex.build("40 50 60 90 90 90", "P 1", 2.0)
    >>> e = shell_edges(idx, 4, measured=idx.d_a < 10.0)
    >>> round(1 / math.sqrt(e[0]), 2) < 10.0, round(1 / math.sqrt(e[-1]), 2)
    (True, 2.0)
    """
    inv = 1.0 / index.d_a**2
    sel = np.ones(len(index), dtype=bool) if measured is None else np.asarray(measured, bool)
    if d_min_a:
        sel &= inv <= 1.0 / d_min_a**2
    if not sel.any():
        return np.zeros(n_shells + 1)
    lo, hi = float(inv[sel].min()), float(inv[sel].max())
    r3 = np.linspace(lo**1.5, hi**1.5, n_shells + 1)  # (1/d)³
    edges = np.cbrt(r3) ** 2
    edges[0], edges[-1] = lo, hi  # exactly the measured extremes, not a rounding of them
    return edges


def shell_of(inv_d2: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shell of each 1/d² (``edges[j] < s <= edges[j + 1]``, the first shell also holding
    ``edges[0]``, as compare_hkl bins); -1 outside.

    >>> shell_of(np.array([1.0, 1.5, 2.0, 3.0, 0.5]), np.array([1.0, 2.0, 3.0])).tolist()
    [0, 0, 0, 1, -1]
    """
    inv = np.asarray(inv_d2, dtype=float)
    b = np.searchsorted(edges, inv, side="left") - 1
    b[inv == edges[0]] = 0
    b[(inv < edges[0]) | (inv > edges[-1])] = -1
    return b


def null_sigma(x: np.ndarray, y: np.ndarray) -> float:
    """Standard error of the correlation of ``x`` and ``y`` (pairs where both are finite) if
    they are independent: √(Σ x²y² / (Σ x² Σ y²)) of the centred values.

    It is 1/√n where the noise is alike in every pair; where some pairs are much noisier in
    both (strong reflections' anomalous differences), those few carry the correlation and it
    is larger. NaN with fewer than 3 pairs.

    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=10000), rng.normal(size=10000)
    >>> round(null_sigma(x, y) * 100, 1)
    1.0
    >>> scale = rng.exponential(size=10000) ** 2  # the same noise level in both, per pair
    >>> round(null_sigma(x * scale, y * scale) * 100, 1) > 2.0
    True
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    a, b = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = float(np.dot(a, a)) * float(np.dot(b, b))
    return math.sqrt(float(np.dot(a * a, b * b)) / den) if den > 0 else math.nan


def _pairs_cc(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    return n, pearson(a, b) if n >= MIN_PAIRS else math.nan


def _shell(sel: np.ndarray, merged: Merged, index: AsuIndex, truth: np.ndarray | None,
           d_range_a: tuple[float, float]) -> dict:
    measured = sel & (merged.n > 0)
    n_obs = int(merged.n[sel].sum())
    n_unique = int(measured.sum())
    n_possible = int(sel.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        ios = merged.imean[measured] / merged.sigimean[measured]
    mean_ios = float(np.mean(ios)) if n_unique >= MIN_PAIRS else math.nan
    n_pairs, cc = _pairs_cc(merged.i_half_a[sel], merged.i_half_b[sel])
    r_split = _r_split(merged.i_half_a[sel], merged.i_half_b[sel]) if n_pairs >= MIN_PAIRS \
        else math.nan
    n_pairs_any, cc_any = _pairs_cc(merged.i_half_a_any[sel], merged.i_half_b_any[sel])
    acentric = sel & ~index.centric
    ano_a = (merged.i_plus_a - merged.i_minus_a)[acentric]
    ano_b = (merged.i_plus_b - merged.i_minus_b)[acentric]
    n_pairs_ano, cc_ano = _pairs_cc(ano_a, ano_b)
    both = acentric & (merged.n_plus > 0) & (merged.n_minus > 0)
    n_acentric, n_both = int(acentric.sum()), int(both.sum())
    return {
        "d_max_a": d_range_a[0], "d_min_a": d_range_a[1],
        "n_obs": n_obs, "n_unique": n_unique, "n_possible": n_possible,
        "completeness": n_unique / n_possible if n_possible else math.nan,
        "multiplicity": n_obs / n_unique if n_unique else math.nan,
        "mean_i_over_sigma": mean_ios,
        "n_pairs": n_pairs, "cc_half": cc, "cc_star": cc_star(cc), "r_split": r_split,
        "n_pairs_aimless": n_pairs_any, "cc_half_aimless": cc_any,
        "cc_star_aimless": cc_star(cc_any),
        "n_pairs_ano": n_pairs_ano, "cc_ano": cc_ano,
        "cc_ano_sigma": null_sigma(ano_a, ano_b) if math.isfinite(cc_ano) else math.nan,
        "n_possible_acentric": n_acentric,
        "anomalous_completeness": n_both / n_acentric if n_acentric else math.nan,
        "anomalous_multiplicity": (float(np.sum(merged.n_plus[both] + merged.n_minus[both]))
                                   / (2 * n_both) if n_both else math.nan),
        "cc_truth": pearson(merged.imean[sel], truth[sel]) if truth is not None else None,
    }


def shell_statistics(index: AsuIndex, merged: Merged, n_shells: int,
                     truth: np.ndarray | None = None, d_min_a: float | None = None
                     ) -> tuple[dict, list[dict]]:
    """(overall, per shell) statistics, as in ``stats.json`` (docs/run-directory.md).

    Shells span the merged reflections and half-set pairs, from the lowest- to the
    highest-resolution one (to ``d_min_a`` where given). ``truth`` is the true
    Friedel-averaged intensity per asymmetric-unit reflection (NaN where unknown), or
    ``None``. Figures from fewer than :data:`MIN_PAIRS` pairs (or reflections) are NaN.
    """
    inv = 1.0 / index.d_a**2
    # and every half-set pair (one observation in each half makes a merged value only where
    # min_measurements is 2 or less)
    measured = (merged.n > 0) | (np.isfinite(merged.i_half_a_any)
                                 & np.isfinite(merged.i_half_b_any))
    edges = shell_edges(index, n_shells, d_min_a, measured=measured)
    shell = shell_of(inv, edges)
    with np.errstate(divide="ignore"):
        d_edges = [float(x) for x in 1.0 / np.sqrt(edges)]
    overall = _shell(shell >= 0, merged, index, truth, (d_edges[0], d_edges[-1]))
    shells = [_shell(shell == j, merged, index, truth, (d_edges[j], d_edges[j + 1]))
              for j in range(n_shells)]
    return overall, shells


def wilson_b(index: AsuIndex, imean: np.ndarray, n_bins: int = 12, d_max_fit_a: float = 4.5
             ) -> dict:
    """Wilson B (Å²) from ln<I> = ln k - B / (2 d²), fitted beyond ``d_max_fit_a``."""
    ok = np.isfinite(imean)
    inv = 1.0 / index.d_a[ok] ** 2
    i = imean[ok]
    sel = inv >= 1.0 / d_max_fit_a**2
    if sel.sum() < 2 * n_bins:
        return {"b_a2": math.nan, "inv_d2": [], "ln_mean_i": []}
    edges = np.quantile(inv[sel], np.linspace(0, 1, n_bins + 1))
    x, y = [], []
    for lo, hi in itertools.pairwise(edges):
        m = sel & (inv >= lo) & (inv <= hi)
        mean_i = float(np.mean(i[m])) if m.any() else math.nan
        if mean_i > 0:
            x.append(float(np.mean(inv[m])))
            y.append(math.log(mean_i))
    if len(x) < 3:
        return {"b_a2": math.nan, "inv_d2": x, "ln_mean_i": y}
    slope = float(np.polyfit(x, y, 1)[0])
    return {"b_a2": -2.0 * slope, "inv_d2": x, "ln_mean_i": y}


def _tanh_cc(s: np.ndarray, s0: float, width: float) -> np.ndarray:
    return 0.5 * (1.0 - np.tanh((s - s0) / width))


def fit_cc_half(inv_d2: np.ndarray, cc: np.ndarray, n_pairs: np.ndarray
                ) -> tuple[float, float] | None:
    """(s₀, r) of CC1/2(s) = ½ (1 - tanh((s - s₀) / r)) fitted to shells' CC1/2 at 1/d² = s,
    each weighted by the standard error 1/√(n - 3) of its ``n_pairs`` (the Fisher-z error, as
    dials.estimate_resolution weights it); ``None`` with fewer than 3 usable shells or a
    curve that does not fall with resolution.

    >>> s = np.linspace(0.02, 0.3, 10)
    >>> s0, r = fit_cc_half(s, _tanh_cc(s, 0.2, 0.05), np.full(10, 500))
    >>> round(s0, 4), round(r, 4)
    (0.2, 0.05)
    """
    s, y, n = (np.asarray(v, dtype=float) for v in (inv_d2, cc, n_pairs))
    ok = np.isfinite(s) & np.isfinite(y) & (n > 3)
    if ok.sum() < 3:
        return None
    s, y, n = s[ok], y[ok], n[ok]
    sigma = np.where(n > 4, 1.0 / np.sqrt(np.maximum(n - 3.0, 1.0)), 100.0)
    # start in the data's own range (DIALS starts at fixed s0 = 0.4, r = 0.2 Å⁻²)
    below = y < 0.5
    s0_start = float(s[below][0]) if below.any() else float(s[-1])
    p0 = (s0_start, max(float(s[-1] - s[0]) / 4.0, 1e-4))
    import scipy.optimize  # here: every `process` imports this module, few reach the fit (0.4 s)

    try:
        with warnings.catch_warnings():
            # an undetermined covariance is no reason to drop the curve itself
            warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)
            (s0, width), _ = scipy.optimize.curve_fit(_tanh_cc, s, y, p0=p0, sigma=sigma,
                                                      maxfev=5000)
    except (RuntimeError, ValueError):
        return None
    if not (np.isfinite(s0) and np.isfinite(width) and width > 0):
        return None
    return float(s0), float(width)


def _i_over_sigma_fit(s: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    ok = np.isfinite(s) & np.isfinite(y) & (y > 0)
    if ok.sum() < 3:
        return None
    # ln<I/σ> is smooth in 1/d² (a Wilson fall-off over a noise floor): a low-order polynomial
    # follows it without chasing each shell's noise
    degree = min(3, int(ok.sum()) - 2)
    return np.polyfit(s[ok], np.log(y[ok]), degree)


def _first_crossing(s: np.ndarray, y: np.ndarray, limit: float) -> float | None:
    below = np.flatnonzero(y < limit)
    if not below.size:
        return None
    j = int(below[0])
    if j == 0:
        return float(s[0])
    s0, s1, y0, y1 = s[j - 1], s[j], y[j - 1], y[j]
    return float(s0 + (limit - y0) * (s1 - s0) / (y1 - y0))


def estimate_resolution(shells: list[dict], cc_limit: float = CC_HALF_LIMIT,
                        i_over_sigma_limit: float = I_OVER_SIGMA_LIMIT) -> dict:
    """Where the aimless CC1/2 (tanh fit) falls to ``cc_limit`` and the merged <I/σ(I)>
    (fit of its logarithm) to ``i_over_sigma_limit``, as in ``stats.json``.

    Each criterion gives ``d_min_a`` (NaN where it cannot be told), ``limit``, ``reached``
    (False: the data end before the criterion falls to its limit, and ``d_min_a`` is the
    data's own limit), ``fitted`` (the fitted curve at each shell's high-resolution edge, for
    plots) and the fit's parameters.

    >>> s = np.linspace(0.02, 0.3, 10)
    >>> shells = [{"d_min_a": 1 / math.sqrt(x), "cc_half_aimless": float(_tanh_cc(x, 0.2, 0.05)),
    ...            "n_pairs_aimless": 500, "mean_i_over_sigma": 20 * math.exp(-15 * x)}
    ...           for x in s]
    >>> est = estimate_resolution(shells)
    >>> round(est["cc_half"]["d_min_a"], 3), round(est["i_over_sigma"]["d_min_a"], 3)
    (2.126, 2.238)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.array([1.0 / (x["d_min_a"] or math.nan) ** 2 for x in shells], dtype=float)
    cc = np.array([_nan(x.get("cc_half_aimless")) for x in shells])
    n = np.array([x.get("n_pairs_aimless") or 0 for x in shells], dtype=float)
    ios = np.array([_nan(x.get("mean_i_over_sigma")) for x in shells])
    s_data = float(np.nanmax(s)) if np.isfinite(s).any() else math.nan
    d_data = 1.0 / math.sqrt(s_data) if s_data > 0 else math.nan

    cc_est: dict = {"limit": cc_limit, "d_min_a": math.nan, "reached": False,
                    "fit_s0_inv_a2": math.nan, "fit_width_inv_a2": math.nan,
                    "fitted": [math.nan] * len(shells),
                    "method": "0.5 (1 - tanh((1/d^2 - s0) / width)) fitted to cc_half_aimless"}
    fit = fit_cc_half(s, cc, n)
    if fit is not None:
        s0, width = fit
        cc_est.update(fit_s0_inv_a2=s0, fit_width_inv_a2=width,
                      fitted=[float(v) for v in _tanh_cc(s, s0, width)])
        good = np.isfinite(cc)
        if np.all(cc[good] > cc_limit):
            cc_est["d_min_a"] = d_data
        else:
            cross = s0 + width * math.atanh(1.0 - 2.0 * cc_limit)
            if cross > 0:
                cc_est["reached"] = True
                cc_est["d_min_a"] = max(1.0 / math.sqrt(cross), d_data)

    ios_est: dict = {"limit": i_over_sigma_limit, "d_min_a": math.nan, "reached": False,
                     "fitted": [math.nan] * len(shells),
                     "method": "polynomial in 1/d^2 fitted to ln mean_i_over_sigma"}
    coef = _i_over_sigma_fit(s, ios)
    if coef is not None:
        ios_est["fitted"] = [float(v) for v in np.exp(np.polyval(coef, s))]
        good = np.isfinite(ios) & np.isfinite(s)
        if np.all(ios[good] > i_over_sigma_limit):
            ios_est["d_min_a"] = d_data
        else:
            grid = np.linspace(float(np.nanmin(s[good])), s_data, 400)
            at = _first_crossing(grid, np.exp(np.polyval(coef, grid)), i_over_sigma_limit)
            if at is None:  # the smooth curve stays above where a shell dips below
                at = _first_crossing(s[good], ios[good], i_over_sigma_limit)
            if at is not None and at > 0:
                ios_est["reached"] = True
                ios_est["d_min_a"] = 1.0 / math.sqrt(at)
    return {"cc_half": cc_est, "i_over_sigma": ios_est}


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def format_table(overall: dict, shells: list[dict]) -> str:
    """The statistics as a text table (shells, then the overall line, then a legend)."""
    head = (f"{'d_max':>6} {'d_min':>5} {'n_obs':>8} {'uniq':>6} {'compl':>6} {'mult':>5} "
            f"{'I/sig':>6} {'pairs':>6} {'CC1/2':>6} {'CC*':>5} {'Rsplit':>6} "
            f"{'pairs1':>6} {'CC1/2_1':>7} {'CCano':>6} {'+-':>5} {'CCtrue':>6}")

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, spec)

    lines = [head]
    for s in [*shells, overall]:
        lines.append(
            f"{f(s['d_max_a'], '6.2f'):>6} {f(s['d_min_a'], '5.2f'):>5} {s['n_obs']:>8d} "
            f"{s['n_unique']:>6d} {f(100 * s['completeness'], '5.1f'):>5}% "
            f"{f(s['multiplicity'], '5.1f'):>5} {f(s['mean_i_over_sigma'], '6.2f'):>6} "
            f"{s['n_pairs']:>6d} {f(s['cc_half'], '6.3f'):>6} {f(s['cc_star'], '5.3f'):>5} "
            f"{f(s['r_split'], '6.3f'):>6} {s['n_pairs_aimless']:>6d} "
            f"{f(s['cc_half_aimless'], '7.3f'):>7} {f(s['cc_ano'], '6.3f'):>6} "
            f"{f(s['cc_ano_sigma'], '5.3f'):>5} "
            f"{f(s['cc_truth'], '6.3f'):>6}")
    lines.insert(len(lines) - 1, "-" * len(head))
    lines.append(f"pairs, CC1/2, CC*, Rsplit: reflections with >= 2 observations in each half-set "
                 f"(CrystFEL);\npairs1, CC1/2_1: >= 1 in each (aimless/DIALS); '-': fewer than "
                 f"{MIN_PAIRS} pairs (or reflections, for I/sig);\n+-: CCano's standard error with no "
                 f"anomalous signal (a CCano within 3 times it is no evidence of one)")
    return "\n".join(lines)


def format_estimate(estimate: dict) -> str:
    """The resolution estimate as one line.

    >>> format_estimate({"cc_half": {"limit": 0.3, "d_min_a": 2.71, "reached": True},
    ...                  "i_over_sigma": {"limit": 1.0, "d_min_a": 2.2, "reached": False}})
    'resolution estimate: CC1/2 = 0.3 at 2.71 A (tanh fit), <I/sigma> = 1 beyond the data (2.20 A)'
    """
    def one(name: str, e: dict, how: str) -> str:
        d = e.get("d_min_a")
        label = f"{name} = {e['limit']:g}"
        if d is None or not math.isfinite(d):
            return f"{label}: not determined"
        if not e.get("reached"):
            return f"{label} beyond the data ({d:.2f} A)"
        return f"{label} at {d:.2f} A{how}"

    return ("resolution estimate: " + one("CC1/2", estimate["cc_half"], " (tanh fit)") + ", "
            + one("<I/sigma>", estimate["i_over_sigma"], ""))
