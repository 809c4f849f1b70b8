"""Merged intensities from per-reflection sums, and merging statistics per resolution shell.

Shells hold equal numbers of possible reflections (equal volumes of reciprocal space). Per shell:
observations, unique reflections measured, possible, completeness, multiplicity, mean I/σ(I),
CC1/2 between the two random half-sets of crystals, CC* = sqrt(2 CC1/2 / (1 + CC1/2)) (Karplus
and Diederichs 2012), Rsplit = Σ|I_a - I_b| / (√2 · ½ Σ(I_a + I_b)) (White et al. 2012), and the
correlation with the true intensities where they are known. The Wilson B comes from a straight
line through ln<I> against 1/d² in shells beyond 4.5 Å.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.merge.scale import ErrorModel, Reference, ShardSums

__all__ = ["Merged", "cc_star", "merge_sums", "pearson", "shell_statistics", "wilson_b"]


@dataclass(frozen=True)
class Merged:
    """Merged intensities per asymmetric-unit reflection (NaN where unmeasured)."""

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
    observation is an estimate too noisy to publish or to correlate.
    """
    def pair(a: np.ndarray) -> np.ndarray:
        return a[0::2] + a[1::2]

    def mean(swi: np.ndarray, sw: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
        ok = n >= min_measurements
        i = np.where(ok, _ratio(swi, sw), np.nan)
        s = np.where(ok, _ratio(np.ones_like(sw), np.sqrt(sw)), np.nan)
        return i, s, np.where(ok, n, 0).astype(np.int64)

    imean, sigimean, n = mean(pair(sums.swi), pair(sums.sw), pair(sums.n))
    i_plus, sigi_plus, n_plus = mean(sums.swi[0::2], sums.sw[0::2], sums.n[0::2])
    i_minus, sigi_minus, n_minus = mean(sums.swi[1::2], sums.sw[1::2], sums.n[1::2])
    return Merged(
        imean=imean, sigimean=sigimean, n=n, i_plus=i_plus, sigi_plus=sigi_plus, n_plus=n_plus,
        i_minus=i_minus, sigi_minus=sigi_minus, n_minus=n_minus,
        i_half_a=mean(pair(sums.swi_a), pair(sums.sw_a), pair(sums.n_a))[0],
        i_half_b=mean(pair(sums.swi_b), pair(sums.sw_b), pair(sums.n_b))[0],
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


def _r_split(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    den = 0.5 * float(np.sum(a[ok] + b[ok]))
    if not ok.any() or den <= 0:
        return math.nan
    return float(np.sum(np.abs(a[ok] - b[ok])) / (math.sqrt(2.0) * den))


def shell_edges(index: AsuIndex, n_shells: int, d_min_a: float | None = None) -> np.ndarray:
    """1/d² edges of ``n_shells`` shells with equal numbers of possible reflections."""
    inv = 1.0 / index.d_a**2
    if d_min_a:
        inv = inv[inv <= 1.0 / d_min_a**2]
    qs = np.quantile(inv, np.linspace(0, 1, n_shells + 1)) if inv.size else np.zeros(n_shells + 1)
    qs[0], qs[-1] = 0.0, qs[-1] * (1 + 1e-9)
    return qs


def _shell(index_sel: np.ndarray, merged: Merged, truth: np.ndarray | None,
           d_a: np.ndarray) -> dict:
    m = index_sel
    measured = m & (merged.n > 0)
    n_obs = int(merged.n[m].sum())
    n_unique = int(measured.sum())
    n_possible = int(m.sum())
    i, s = merged.imean[measured], merged.sigimean[measured]
    with np.errstate(invalid="ignore", divide="ignore"):
        ios = float(np.nanmean(i / s)) if n_unique else math.nan
    cc = pearson(merged.i_half_a[m], merged.i_half_b[m])
    return {
        "d_max_a": float(d_a[m].max()) if n_possible else math.nan,
        "d_min_a": float(d_a[m].min()) if n_possible else math.nan,
        "n_obs": n_obs, "n_unique": n_unique, "n_possible": n_possible,
        "completeness": n_unique / n_possible if n_possible else math.nan,
        "multiplicity": n_obs / n_unique if n_unique else math.nan,
        "mean_i_over_sigma": ios,
        "cc_half": cc, "cc_star": cc_star(cc),
        "r_split": _r_split(merged.i_half_a[m], merged.i_half_b[m]),
        "cc_truth": pearson(merged.imean[m], truth[m]) if truth is not None else None,
    }


def shell_statistics(index: AsuIndex, merged: Merged, n_shells: int,
                     truth: np.ndarray | None = None, d_min_a: float | None = None
                     ) -> tuple[dict, list[dict]]:
    """(overall, per shell) statistics, as in ``stats.json`` (docs/run-directory.md).

    ``truth`` is the true Friedel-averaged intensity per asymmetric-unit reflection (NaN where
    unknown), or ``None``.
    """
    inv = 1.0 / index.d_a**2
    edges = shell_edges(index, n_shells, d_min_a)
    inside = inv <= edges[-1]
    overall = _shell(inside, merged, truth, index.d_a)
    shells = [_shell(inside & (inv >= lo) & (inv < hi), merged, truth, index.d_a)
              for lo, hi in itertools.pairwise(edges)]
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


def format_table(overall: dict, shells: list[dict]) -> str:
    """The statistics as a text table (shells, then the overall line)."""
    head = (f"{'d_max':>7} {'d_min':>6} {'n_obs':>9} {'uniq':>6} {'compl':>6} {'mult':>6} "
            f"{'I/sig':>6} {'CC1/2':>6} {'CC*':>6} {'Rsplit':>7} {'CCtrue':>7}")

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, spec)

    lines = [head]
    for s in [*shells, overall]:
        lines.append(
            f"{f(s['d_max_a'], '7.2f')} {f(s['d_min_a'], '6.2f')} {s['n_obs']:>9d} "
            f"{s['n_unique']:>6d} {f(100 * s['completeness'], '5.1f'):>5}% "
            f"{f(s['multiplicity'], '6.1f'):>6} {f(s['mean_i_over_sigma'], '6.2f'):>6} "
            f"{f(s['cc_half'], '6.3f'):>6} {f(s['cc_star'], '6.3f'):>6} "
            f"{f(s['r_split'], '7.3f'):>7} {f(s['cc_truth'], '7.3f'):>7}")
    lines.insert(len(lines) - 1, "-" * len(head))
    return "\n".join(lines)
