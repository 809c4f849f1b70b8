"""Scaling and post-refinement of stills against a reference, and the per-reflection sums.

Model of an observation ``I`` of reflection ``h`` on crystal ``c`` (after dividing out the
polarisation factor)::

    I = G_c · exp(-B_c / (2 d²)) · P_c(ε, |q|) · I_ref(h)

* ``--model unity``: ``P = 1``; ``G`` and ``B`` are fitted per crystal.
* ``--model partiality``: ``P = (R / σ) · exp(-ε² / 2σ²)`` with
  ``σ² = R² + (η |q|)² + (β λ |q|² / 2)²``: a Gaussian reciprocal-lattice point of radius ``R``
  (refined per crystal), a mosaic spread ``η`` (refined per crystal) and the beam's bandwidth
  ``β`` (a parameter). ``ε`` is recomputed from the crystal's orientation matrix and wavelength;
  the prefactor ``R/σ`` keeps the integral over ε proportional to ``R`` (what a still records of
  a broadened reflection falls as its profile widens), so ``G`` stays one number per crystal.

Per crystal the fit is a grid over (``R``, ``η``), and for each grid point a few Gauss-Newton
steps on (``G``, ``B``) minimising ``Σ w (I - model)²`` with ``w = 1 / (σ² + (γ·model)²)``; the
best point wins. This is post-refinement (as CrystFEL's xsphere and cctbx.xfel's
postrefinement) of scale, relative B and profile width.

A shard's contribution to the merge is a handful of arrays indexed by ``2 * asu + minus``
(:class:`ShardSums`) that add across shards: the distributed reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from sfxflow.algorithms.diffraction import (
    angular_term,
    bandwidth_term_a,
    excitation_error_inv_a,
)
from sfxflow.algorithms.merge.kernels import fit_kernel, observations_kernel, sums_kernel
from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.models import FWHM_TO_SIGMA
from sfxflow.settings import check_fields, setting

__all__ = [
    "MODELS",
    "CrystalFits",
    "ErrorModel",
    "MergeParams",
    "PreparedShard",
    "ShardSums",
    "accumulate",
    "choose_operators",
    "error_bins",
    "final_merge",
    "fit_crystals",
    "prepare_shard",
    "scale_cycle",
]

MODELS = ("unity", "partiality")

# crystal status codes (kept small: they travel from workers as int8)
ACCEPTED = 0
REJECT_FEW = 1
REJECT_SCALE = 2
REJECT_B = 3
REJECT_CC = 4
REJECT_NO_REFERENCE = 5
REJECT_DELTA_CC_HALF = 6
REASONS = {
    REJECT_FEW: "too few observations",
    REJECT_SCALE: "absurd scale",
    REJECT_B: "relative B at its limit",
    REJECT_CC: "poor correlation with the reference",
    REJECT_NO_REFERENCE: "no reflection in common with the reference",
    REJECT_DELTA_CC_HALF: "delta CC1/2: the merge is better without it",
}


def _angles(values: tuple[float, ...]) -> None:
    if not values or not all(0 <= float(v) <= 10 for v in values):
        raise ValueError(f"{values!r}")


@dataclass(frozen=True)
class MergeParams:
    """Parameters of ``sfxflow merge``.

    Parameters
    ----------
    model : ``unity`` (scale and B only) or ``partiality`` (post-refined profile, see module).
    iterations : scaling cycles (each a map over the shards and a reduce).
    d_min_a : high-resolution limit; 0 takes every observation.
    min_partiality : observations whose modelled partiality (the Gaussian factor) is below this
        are left out of the merged intensities (they still shape the fit): divided by a tiny
        modelled partiality, an observation carries the model's error in the profile's tails
        (real profiles have a shape transform's power-law tails) magnified (measured on
        processed stills: 0.9453 CC to the truth at 0, 0.977 at 0.01, 0.987 at 0.03-0.05,
        0.985 at 0.1-0.2).
    min_observations : crystals with fewer usable observations are rejected.
    min_cc : crystals whose correlation with the reference is below this are rejected.
    max_scale_ratio : crystals whose scale is further than this factor from the median are
        rejected as absurd.
    b_limit_a2 : the relative B is fitted within ±this; a crystal at the limit is rejected.
    unity_b_limit_a2 : the same with ``--model unity``. There a crystal's B also absorbs the
        resolution dependence of its unmodelled partialities; from a few hundred observations
        it ran to -40 Å² for the weakest crystals and multiplied their high-resolution noise
        (processed stills, 150 crystals, two sets: CC to the truth 0.78 / 0.86 with ±60,
        0.90 / 0.87 with ±20, partialator unity 0.86 / 0.85).
    b_sigma_a2 : width of the restraint of the relative B towards 0 (weak crystals cannot
        determine it).
    radius_min_inv_a : smallest profile radius R of the log-spaced grid (Å⁻¹).
    radius_max_inv_a : largest profile radius R of the grid (Å⁻¹).
    n_radius : points of the profile-radius grid.
    mosaicity_grid_deg : values tried for the mosaic spread η (FWHM).
    bandwidth_fwhm : the beam's relative bandwidth assumed by the partiality model.
    model_error : γ, the fractional model error in the fit weights.
    outlier_z : observations further than this many standard deviations from the reference are
        rejected.
    min_measurements : merged values (and half-set values) of fewer observations are left out.
    max_sigma_ratio : observations whose corrected σ exceeds this many times the mean intensity
        at their resolution are left out of the merge (weak crystals' noise at high resolution).
    n_shells : resolution shells of the statistics.
    resolve_ambiguity : resolve an indexing ambiguity where the lattice allows one.
    ambiguity_max_crystals : crystals (at most) used for the Brehm-Diederichs step; the rest
        are assigned against the reference it yields.
    ambiguity_partners : partners per crystal in the Brehm-Diederichs correlation matrix.
    seed : seed of the half-set split and the crystal subsets.
    cc_outlier_sigma : from the second cycle, crystals whose correlation with the reference is
        more than this many robust standard deviations below the median crystal's are
        rejected (0, the default, turns it off; ``min_cc`` is a fixed floor besides). Off by
        default: where every crystal is good the CCs sit close together and a robust cut
        rejects good ones (the demo: 4 of 34 crystals with CC 0.90-0.93 against a median of
        0.95, CC1/2 0.873 -> 0.832), and on three 150-still sets it moved CC to the truth by
        -0.006..+0.009 (unity) and -0.0004..+0.0014 (partiality): noise.
    delta_cc_half_sigma : with ``--model partiality``, after each cycle, crystals whose delta
        CC1/2 (CC1/2 of the merge minus CC1/2 without the crystal) is negative and more than
        this many standard deviations below the mean of all crystals' are rejected for good
        (partialator's deltaCChalf rejection); 0 turns it off. Not with ``unity``: there the
        half-sets disagree mostly through the unmodelled partialities, so a crystal's delta
        CC1/2 measures which reflections it happened to catch in full, not its quality
        (measured: it cost unity 0.016 CC to the truth on two simulated sets).
    cell_tolerance_fraction : an input whose median cell length differs from the merged cell
        by more than this fraction holds another crystal form and is refused.
    cell_tolerance_deg : the same for the cell angles (degrees).
    """

    model: str = setting("partiality", choices=MODELS)
    iterations: int = setting(4, ge=1, le=50)
    d_min_a: float = setting(0.0, ge=0.0, le=100.0)
    min_partiality: float = setting(0.05, ge=0.0, lt=1.0)
    min_observations: int = setting(10, ge=1, le=100_000)
    min_cc: float = setting(0.0, ge=-1.0, lt=1.0)
    max_scale_ratio: float = setting(1.0e3, gt=1.0, le=1.0e12)
    b_limit_a2: float = setting(60.0, gt=0.0, le=1000.0)
    unity_b_limit_a2: float = setting(20.0, gt=0.0, le=1000.0)
    b_sigma_a2: float = setting(10.0, gt=0.0, le=1000.0)
    radius_min_inv_a: float = setting(2.0e-4, gt=0.0, le=0.1)
    radius_max_inv_a: float = setting(5.0e-3, gt=0.0, le=0.1, at_least="radius_min_inv_a")
    n_radius: int = setting(10, ge=1, le=100)
    mosaicity_grid_deg: tuple[float, ...] = setting((0.0, 0.03, 0.06, 0.1), check=_angles,
                                                    expect="one or more angles from 0 to 10")
    bandwidth_fwhm: float = setting(3.0e-3, ge=0.0, lt=0.2)
    model_error: float = setting(0.1, ge=0.0, lt=1.0)
    outlier_z: float = setting(6.0, gt=0.0, le=1000.0)
    min_measurements: int = setting(2, ge=1, le=1000)
    max_sigma_ratio: float = setting(10.0, gt=0.0, le=1e6)
    n_shells: int = setting(10, ge=1, le=100)
    resolve_ambiguity: bool = True
    ambiguity_max_crystals: int = setting(1000, ge=2, le=1_000_000)
    ambiguity_partners: int = setting(200, ge=1, le=100_000)
    seed: int = setting(0, ge=0, le=2**31 - 1)
    cc_outlier_sigma: float = setting(0.0, ge=0.0, le=100.0)
    delta_cc_half_sigma: float = setting(2.0, ge=0.0, le=100.0)
    cell_tolerance_fraction: float = setting(0.05, gt=0.0, le=1.0)
    cell_tolerance_deg: float = setting(3.0, gt=0.0, le=90.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mosaicity_grid_deg",
                           tuple(float(x) for x in self.mosaicity_grid_deg))
        check_fields(self)

    def rejects_on_delta_cc_half(self) -> bool:
        return self.model == "partiality" and self.delta_cc_half_sigma > 0

    def radius_grid(self) -> np.ndarray:
        return np.geomspace(self.radius_min_inv_a, self.radius_max_inv_a, self.n_radius)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PreparedShard:
    """A shard's observations ready for scaling, sorted by crystal.

    ``codes[o]`` holds each observation's ``2 * asu + minus`` when its crystal is re-indexed by
    ambiguity operator ``o`` (-1: outside the merge); ``intensity``/``sigma`` have the
    polarisation divided out; ``inv_d2`` is ``|q|²`` and ``eps`` the excitation error, both from
    the crystal's orientation matrix and wavelength; ``bw`` is ``β λ / 2`` per crystal. The
    shards stay in the workers' memory for every cycle: codes are int32 and what is one number
    per crystal is stored once.
    """

    crystal_ids: np.ndarray
    offsets: np.ndarray
    half: np.ndarray
    hkl: np.ndarray
    codes: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    inv_d2: np.ndarray
    eps: np.ndarray
    bw: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_crystals(self) -> int:
        return int(self.crystal_ids.shape[0])

    def __len__(self) -> int:
        return int(self.intensity.shape[0])

    def crystal_of_obs(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_crystals), np.diff(self.offsets))


def half_of(crystal_ids: np.ndarray, seed: int) -> np.ndarray:
    """Random half-set (0 or 1) of each crystal, a fixed function of its id and the seed."""
    z = (np.asarray(crystal_ids, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(1)).astype(np.int8)


def prepare_shard(
    crystal_ids: np.ndarray,
    a_matrices: np.ndarray,
    wavelengths_a: np.ndarray,
    obs_crystal: np.ndarray,
    hkl: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    polarisation: np.ndarray,
    index: AsuIndex,
    operators: list[np.ndarray],
    params: MergeParams,
    extra: dict[str, np.ndarray] | None = None,
) -> PreparedShard:
    """Map a shard's observations to the merge: asymmetric-unit codes under every ambiguity
    operator, excitation errors, resolution; drops unusable rows (non-finite or ``σ <= 0``).

    Parameters
    ----------
    crystal_ids : (nc,) global crystal ids; ``obs_crystal`` indexes into them.
    a_matrices : (nc, 3, 3) reciprocal bases (columns a*, b*, c*; Å⁻¹, beam along +z).
    wavelengths_a : (nc,) wavelengths.
    obs_crystal, hkl, intensity, sigma, polarisation : per observation.
    extra : more per-observation columns to carry to the scaled output.
    """
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    obs_crystal = np.asarray(obs_crystal, dtype=np.int64)
    pol = np.asarray(polarisation, dtype=float)
    intensity = np.asarray(intensity, dtype=float)
    sigma = np.asarray(sigma, dtype=float)
    ok = np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0) & np.isfinite(pol) & (pol > 0)
    ok &= np.any(hkl != 0, axis=1)
    order = np.argsort(obs_crystal[ok], kind="stable")
    sel = np.flatnonzero(ok)[order]
    hkl, oc = hkl[sel], obs_crystal[sel]
    a = np.asarray(a_matrices, dtype=float)[oc]
    q = np.einsum("nij,nj->ni", a, hkl.astype(float))
    lam = np.asarray(wavelengths_a, dtype=float)[oc]
    s0 = np.zeros_like(q)
    s0[:, 2] = 1.0 / lam
    eps = excitation_error_inv_a(q, s0, lam)
    inv_d2 = np.einsum("ni,ni->n", q, q)
    codes = np.stack([index.lookup(hkl @ r).astype(np.int32) for r in operators]) \
        if len(hkl) else np.zeros((len(operators), 0), dtype=np.int32)
    if params.d_min_a > 0:
        codes[:, inv_d2 > 1.0 / params.d_min_a**2] = -1
    counts = np.bincount(oc, minlength=len(crystal_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ids = np.asarray(crystal_ids, dtype=np.int64)
    return PreparedShard(
        crystal_ids=ids,
        offsets=offsets,
        half=half_of(ids, params.seed),
        hkl=hkl.astype(np.int32),
        codes=codes,
        intensity=intensity[sel] / pol[sel],
        sigma=sigma[sel] / pol[sel],
        inv_d2=inv_d2,
        eps=eps,
        bw=bandwidth_term_a(params.bandwidth_fwhm, np.asarray(wavelengths_a, dtype=float)),
        extra={k: np.asarray(v)[sel] for k, v in (extra or {}).items()},
    )


@dataclass
class CrystalFits:
    """Per-crystal results of one scaling pass over a shard."""

    crystal_ids: np.ndarray
    operator: np.ndarray
    scale: np.ndarray
    b_a2: np.ndarray
    radius_inv_a: np.ndarray
    mosaicity_deg: np.ndarray
    n_used: np.ndarray
    cc: np.ndarray
    status: np.ndarray
    #: CC1/2 of the last cycle's merge minus CC1/2 without this crystal (NaN: not computed, or
    #: the crystal was not in that cycle's sums)
    delta_cc_half: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.delta_cc_half.shape != self.scale.shape:
            self.delta_cc_half = np.full(self.scale.shape, np.nan)

    @classmethod
    def concat(cls, parts: list[CrystalFits]) -> CrystalFits:
        return cls(*[np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)])

    def table_columns(self) -> dict[str, Any]:
        """The columns of ``crystals.parquet``: the fits, ``accepted`` and the rejection
        ``reason`` ("" when accepted) in place of the status code."""
        cols: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                                if f.name != "status"}
        cols["accepted"] = self.status == ACCEPTED
        cols["reason"] = [REASONS.get(int(s), "") for s in self.status]
        return cols


def _crystal_cc(shard: PreparedShard, ref_obs: np.ndarray, inten: np.ndarray) -> np.ndarray:
    c = shard.crystal_of_obs()
    ok = np.isfinite(ref_obs)
    x, y = np.where(ok, ref_obs, 0.0), np.where(ok, inten, 0.0)
    nc = shard.n_crystals

    def s(v: np.ndarray) -> np.ndarray:
        return np.bincount(c, weights=v, minlength=nc)

    n = s(ok.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = s(x * y) - s(x) * s(y) / n
        vx = s(x * x) - s(x) ** 2 / n
        vy = s(y * y) - s(y) ** 2 / n
        cc = cov / np.sqrt(vx * vy)
    return np.where(n > 2, cc, np.nan)


def _ref_per_obs(codes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    out = np.full(codes.shape[0], np.nan)
    ok = codes >= 0
    out[ok] = reference[codes[ok] // 2]
    return out


def choose_operators(shard: PreparedShard, reference: np.ndarray) -> np.ndarray:
    """Per crystal, the ambiguity operator whose re-indexing correlates best with the
    reference."""
    n_ops = shard.codes.shape[0]
    if n_ops == 1:
        return np.zeros(shard.n_crystals, dtype=np.int16)
    ccs = np.stack([_crystal_cc(shard, _ref_per_obs(shard.codes[o], reference), shard.intensity)
                    for o in range(n_ops)])
    return np.argmax(np.nan_to_num(ccs, nan=-2.0), axis=0).astype(np.int16)


def chosen_codes(shard: PreparedShard, operator: np.ndarray) -> np.ndarray:
    """Each observation's code under its crystal's operator."""
    if shard.codes.shape[0] == 1:  # no ambiguity: no copy
        return shard.codes[0]
    op_obs = np.repeat(operator.astype(np.int64), np.diff(shard.offsets))
    return shard.codes[op_obs, np.arange(len(shard))] if len(shard) else \
        np.zeros(0, dtype=np.int32)


def fit_crystals(shard: PreparedShard, reference: np.ndarray, params: MergeParams,
                 operator: np.ndarray, unity_first: bool = False) -> CrystalFits:
    """Fit every crystal of a shard against the reference (``NaN`` where unknown).

    ``unity_first`` forces the unity model (the first cycle, against a Wilson curve, cannot
    constrain a profile). Status is :data:`ACCEPTED` or the local rejection reason (few
    observations, B at its limit, poor correlation); rejections needing every crystal (absurd
    scale) are the caller's.
    """
    codes = chosen_codes(shard, operator)
    ref = _ref_per_obs(codes, reference)
    nc = shard.n_crystals
    g, b, r, eta = (np.empty(nc) for _ in range(4))
    n = np.zeros(nc, dtype=np.int64)
    cc = np.empty(nc)
    use_p = params.model == "partiality" and not unity_first
    b_limit = params.unity_b_limit_a2 if params.model == "unity" else params.b_limit_a2
    fit_kernel(shard.offsets, ref, shard.intensity, shard.sigma, shard.inv_d2, shard.eps,
                shard.bw, use_p, params.radius_grid(),
                angular_term(np.radians(np.asarray(params.mosaicity_grid_deg))),
                params.model_error, b_limit, 1.0 / params.b_sigma_a2**2, g, b, r,
                eta, n, cc)
    status = np.zeros(nc, dtype=np.int8)
    status[~np.isfinite(g)] = REJECT_NO_REFERENCE
    status[(n < params.min_observations)] = REJECT_FEW
    # a crystal whose B runs to the general limit is rejected; unity's tighter bound only
    # clips B (a restraint): real crystals (CrystFEL's test.stream) sit at it against the first
    # cycle's Wilson curve, and rejecting them starved the next reference (15 of 32 merged)
    status[(status == ACCEPTED) & (np.abs(b) >= params.b_limit_a2 * 0.999)] = REJECT_B
    status[(status == ACCEPTED) & ~(np.nan_to_num(cc, nan=-2.0) >= params.min_cc)] = REJECT_CC
    return CrystalFits(shard.crystal_ids, operator.astype(np.int16), g, b, r,
                       np.degrees(eta) / FWHM_TO_SIGMA, n, cc, status)


@dataclass(frozen=True)
class ErrorModel:
    """``σ'² = sdfac² (σ² + (sdadd · I)²)`` (as Aimless/xia2 do), fitted so normalised
    deviations from the reference have unit variance."""

    sdfac: float = 1.0
    sdadd: float = 0.0

    def close_to(self, other: ErrorModel, rtol: float = 0.1) -> bool:
        """Whether the two give σ' within ``rtol`` of each other, for weak (sdfac) and strong
        (sdfac·sdadd) observations alike.

        >>> ErrorModel(1.0, 0.5).close_to(ErrorModel(1.05, 0.5)), ErrorModel().close_to(ErrorModel(2.0))
        (True, False)
        """
        def near(a: float, b: float) -> bool:
            return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-3)

        return near(self.sdfac, other.sdfac) and near(self.sdfac * self.sdadd,
                                                      other.sdfac * other.sdadd)

    @classmethod
    def fit_binned(cls, bins: np.ndarray, min_count: int = 5) -> ErrorModel:
        """From :func:`error_bins` (summed over shards).

        In a bin of r = I²/s², E[v/s²] = c1 + c2·r (``c1 = sdfac²``, ``c2 = (sdfac·sdadd)²``):
        a straight line through the bins' means (those of ``min_count`` observations), each
        bin's relative misfit weighted by √count, then scaled so that the mean squared
        normalised deviation over all of them is 1 (where the form does not fit every bin,
        the low ones would otherwise leave it above 1).

        The per-observation fit (:meth:`fit`, weights 1/Var(v)² from the last cycle) takes
        one reweighting step a cycle: with unity, whose deviations are dominated by
        unmodelled partiality (about proportional to I), it charged them to sdfac, which sat
        at its clip (10) through the four cycles of a merge (x4wide stills, 150 images).
        """
        n, sum_r, sum_vs = (np.asarray(x, dtype=float) for x in bins[:3])
        ok = n >= min_count
        if ok.sum() < 2:
            return cls()
        x, y = sum_r[ok] / n[ok], sum_vs[ok] / n[ok]
        w = np.sqrt(n[ok]) / y
        a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
        (c1, c2), *_ = np.linalg.lstsq(a, y * w, rcond=None)
        if c2 <= 0:
            c1, c2 = float(np.sum(n[ok] * y) / np.sum(n[ok])), 0.0
        elif c1 <= 0:
            c1, c2 = 1e-6, float(np.dot(a[:, 1], y * w) / np.dot(a[:, 1], a[:, 1]))
        scale = float(np.sum(n[ok] * y / (c1 + c2 * x)) / np.sum(n[ok]))
        sdfac = float(np.clip(math.sqrt(max(c1 * scale, 1e-6)), 0.3, 10.0))
        sdadd = float(np.clip(math.sqrt(c2 * scale) / sdfac, 0.0, 1.0))
        return cls(sdfac, sdadd)


#: edges of the bins of log10(I²/s²) of :func:`error_bins` (a reference at or below zero
#: goes to the first bin, past either end to the end bins): narrow, as the fit takes
#: I²/s² to be one value in each
ERROR_BIN_EDGES = np.linspace(-3.0, 5.0, 41)
N_ERROR_BINS = ERROR_BIN_EDGES.size + 1


def error_bins(obs: dict[str, np.ndarray]) -> np.ndarray:
    """The error model's sums per bin of r = I²/s² (``(3, N_ERROR_BINS)``): count, Σ r,
    Σ v/s², with v = (I - I_ref)² and s², I² the (1 - 1/n)-deflated σ² and reference²
    (I - <I> with the observation in <I>), over the used observations with a reference of
    n >= 3."""
    ok = obs["use"] & (obs["ref_n"] >= 3.0) & np.isfinite(obs["reference"])
    f = obs["self_in"][ok]
    s2 = f * obs["sigma_raw"][ok] ** 2
    i2 = f * np.maximum(obs["reference"][ok], 0.0) ** 2
    v = (obs["intensity"][ok] - obs["reference"][ok]) ** 2
    good = (s2 > 0) & np.isfinite(v)
    r, vs = i2[good] / s2[good], v[good] / s2[good]
    with np.errstate(divide="ignore"):
        k = np.searchsorted(ERROR_BIN_EDGES, np.log10(r))
    return np.stack([np.bincount(k, weights=w, minlength=N_ERROR_BINS)
                     for w in (np.ones_like(r), r, vs)])


_SUM_FIELDS = ("n", "sw", "swi", "sw_a", "swi_a", "n_a", "sw_b", "swi_b", "n_b")


@dataclass
class ShardSums:
    """Per-reflection sums (index ``2 * asu + minus``) and scalar sums of a shard; ``+``
    combines shards. ``w`` are inverse variances, ``a``/``b`` the two random half-sets of
    crystals."""

    n: np.ndarray
    sw: np.ndarray
    swi: np.ndarray
    sw_a: np.ndarray
    swi_a: np.ndarray
    n_a: np.ndarray
    sw_b: np.ndarray
    swi_b: np.ndarray
    n_b: np.ndarray
    error_bins: np.ndarray  # the error model's sums per bin of I²/s² (:func:`error_bins`)
    deviation_sums: np.ndarray  # n, Σδ², Σ|δ|>3 of normalised deviations
    n_outliers: int = 0
    n_low_partiality: int = 0

    @classmethod
    def zeros(cls, n_codes: int) -> ShardSums:
        arrays: dict[str, Any] = {f: np.zeros(n_codes) for f in _SUM_FIELDS}
        return cls(**arrays, error_bins=np.zeros((3, N_ERROR_BINS)), deviation_sums=np.zeros(3))

    def __add__(self, other: ShardSums) -> ShardSums:
        return ShardSums(**{f: getattr(self, f) + getattr(other, f) for f in _SUM_FIELDS},
                         error_bins=self.error_bins + other.error_bins,
                         deviation_sums=self.deviation_sums + other.deviation_sums,
                         n_outliers=self.n_outliers + other.n_outliers,
                         n_low_partiality=self.n_low_partiality + other.n_low_partiality)


@dataclass(frozen=True)
class Reference:
    """What the workers scale against: Friedel-averaged intensity per asymmetric-unit
    reflection (NaN unknown), its σ and multiplicity, the error model, and ``level``, the mean
    intensity at each reflection's resolution (NaN: no weak-observation filter)."""

    intensity: np.ndarray
    sigma: np.ndarray
    n: np.ndarray
    error_model: ErrorModel = ErrorModel()
    level: np.ndarray | None = None


def scaled_observations(shard: PreparedShard, fits: CrystalFits, reference: Reference,
                        params: MergeParams, accepted: np.ndarray, reject_outliers: bool = True
                        ) -> dict[str, np.ndarray]:
    """Per observation: code, corrected intensity and σ (error model applied), partiality,
    and whether it enters the merge (accepted crystal, partiality, not an outlier).

    Outliers are judged against the reference; while the reference is still converging that
    would reject the truly strong reflections and keep them low, so callers reject only once
    it has settled (``reject_outliers``)."""
    codes = chosen_codes(shard, fits.operator)
    n = len(shard)
    out = {k: np.empty(n) for k in ("intensity", "sigma", "sigma_raw", "self_in", "partiality",
                                     "z", "reference", "ref_n")}
    flags = {k: np.empty(n, dtype=np.bool_) for k in ("use", "outlier", "low_partiality")}
    em = reference.error_model
    level = np.zeros(0) if reference.level is None else np.asarray(reference.level, float)
    observations_kernel(
        shard.offsets, codes, shard.intensity, shard.sigma, shard.inv_d2, shard.eps, shard.bw,
        np.asarray(fits.scale, float), np.asarray(fits.b_a2, float),
        np.asarray(fits.radius_inv_a, float),
        angular_term(np.radians(np.asarray(fits.mosaicity_deg, float))),
        np.asarray(accepted, np.bool_), params.model == "partiality",
        np.asarray(reference.intensity, float), np.asarray(reference.n, float), level,
        float(em.sdfac), float(em.sdadd), float(params.min_partiality),
        float(params.max_sigma_ratio), float(params.outlier_z), bool(reject_outliers),
        out["intensity"], out["sigma"], out["sigma_raw"], out["partiality"], out["self_in"],
        out["z"], out["reference"], out["ref_n"], flags["use"], flags["outlier"],
        flags["low_partiality"])
    return {"code": codes, **out, **flags}


def scaled_columns(shard: PreparedShard, obs: dict[str, np.ndarray], index: AsuIndex
                   ) -> dict[str, np.ndarray]:
    """The columns of a shard's ``scaled/`` table from :func:`scaled_observations`' output."""
    code = obs["code"]
    asu = np.where(code[:, None] >= 0, index.hkl[np.maximum(code, 0) // 2], 0).astype(np.int32)
    return {
        "crystal_id": np.repeat(shard.crystal_ids, np.diff(shard.offsets)),
        "h": shard.hkl[:, 0], "k": shard.hkl[:, 1], "l": shard.hkl[:, 2],
        "h_asu": asu[:, 0], "k_asu": asu[:, 1], "l_asu": asu[:, 2],
        "minus": (code % 2 == 1) & (code >= 0),
        "d_a": 1.0 / np.sqrt(shard.inv_d2), "excitation_error_inv_a": shard.eps,
        "intensity": obs["intensity"], "sigma": obs["sigma"], "partiality": obs["partiality"],
        "used": obs["use"], "outlier": obs["outlier"],
    }


def accumulate(shard: PreparedShard, fits: CrystalFits, reference: Reference,
               params: MergeParams, accepted: np.ndarray, n_codes: int,
               reject_outliers: bool = True, obs: dict[str, np.ndarray] | None = None
               ) -> ShardSums:
    """The shard's per-reflection sums with the given fits (the map step's output); ``obs``:
    :func:`scaled_observations` of the same arguments, where the caller has them already."""
    if obs is None:
        obs = scaled_observations(shard, fits, reference, params, accepted, reject_outliers)
    table = np.zeros((len(_SUM_FIELDS), n_codes))
    deviation_sums = np.zeros(3)
    sums_kernel(shard.offsets, shard.half, obs["code"], obs["use"], obs["intensity"],
                obs["sigma"], obs["z"], table, deviation_sums)
    # the error model is fitted through bins of I²/s² (:meth:`ErrorModel.fit_binned`)
    return ShardSums(**dict(zip(_SUM_FIELDS, table, strict=True)), error_bins=error_bins(obs),
                     deviation_sums=deviation_sums,
                     n_outliers=int(obs["outlier"].sum()),
                     n_low_partiality=int(obs["low_partiality"].sum()))


def accepted_of(fits: CrystalFits, accepted: np.ndarray | None) -> np.ndarray:
    """Crystals that enter the sums: accepted by their fit and (where given) by the last
    cycle's global rejections."""
    ok = fits.status == ACCEPTED
    return ok if accepted is None else ok & accepted


def scale_cycle(shard: PreparedShard, accepted: np.ndarray | None, reference: Reference,
                params: MergeParams, n_codes: int, unity_first: bool
                ) -> tuple[ShardSums, CrystalFits]:
    """One scaling cycle's map step over a shard: each crystal's operator and fit against the
    reference, and the shard's sums (crystals not ``accepted`` by the last cycle left out)."""
    ops = choose_operators(shard, reference.intensity)
    fits = fit_crystals(shard, reference.intensity, params, ops, unity_first=unity_first)
    # outliers are rejected only in the final merge, against the settled reference
    return accumulate(shard, fits, reference, params, accepted_of(fits, accepted), n_codes,
                      False), fits


def final_merge(shard: PreparedShard, fits: CrystalFits, accepted: np.ndarray | None,
                reference: Reference, params: MergeParams, n_codes: int
                ) -> tuple[ShardSums, dict[str, np.ndarray]]:
    """The merge's map step over a shard with the last cycle's fits and the error model
    fitted on them: the sums, and the scaled observations (:func:`scaled_observations`).
    Outliers are rejected when there was a cycle to settle the reference."""
    ok, reject = accepted_of(fits, accepted), params.iterations > 1
    obs = scaled_observations(shard, fits, reference, params, ok, reject)
    return accumulate(shard, fits, reference, params, ok, n_codes, reject, obs), obs
