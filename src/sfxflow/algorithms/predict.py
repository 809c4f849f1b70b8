"""Prediction of a still's reflections from a crystal's own reflection-profile model.

A still records each reflection only partly: its reciprocal-lattice point is smeared over a
small volume (crystal size, mosaic spread) and the Ewald sphere is a shell of some thickness
(bandwidth, divergence), so a point at excitation error ``ε = |A h + s0| - 1/λ`` from the sphere
still diffracts if ``|ε|`` is small compared with the combined width. The model here (as DIALS'
stills models and CrystFEL's refined ``profile_radius``) describes that width per crystal:

* ``σ(q)² = R² + (w_bw q²)² + (w_div q)²`` (Å⁻¹), with ``R`` the crystal's own profile radius,
  refined from the excitation errors of the spots it indexed (:func:`refine_profile`), and
  the beam's contributions known from its relative bandwidth ``Δλ/λ`` (``w_bw = Δλ/λ · λ/2``)
  and divergence (``w_div``), both FWHM converted to Gaussian σ;
* partiality estimate ``exp(-ε² / 2σ(q)²)`` (1 on the sphere);
* reflections are predicted where ``|ε| <= cutoff · σ(q)`` (:class:`PredictParams`).

``R`` is found so that the median of ``|ε_i| / σ_i`` over the indexed spots is the median of a
half-normal (0.6745): the width that makes the crystal's observed spots typical of its model.
Observed spots favour reflections near the sphere (they are brighter), which narrows the
estimate, while the refined orientation's own error widens it; on simulated stills whose true
widths are known (crystals of 100 nm, 300 nm and 2 µm, four each) the true width over the
refined one was 0.74-1.06 (median 0.95), so ``detection_bias``, the factor applied to ``R``,
defaults to 1.

The search over Miller indices never enumerates the whole sphere of radius ``1/d_min``: for each
``(h, k)`` the ``l`` range where the lattice line crosses the shell ``1/λ ± ε_max`` is solved
analytically (a quadratic), so the cost grows with the number of reflections near the sphere.

Positions: the diffracted ray is ``A h + s0`` (the point of the sphere nearest the lattice point,
as :func:`predict_spots` and the refinement use), intersected with
every panel; rays that hit no panel (gaps, beyond the edges) give no reflection.

Pure numpy/numba; no I/O.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import gemmi
import numpy as np
from numba import njit

from sfxflow.algorithms.detector_tables import detector_tables
from sfxflow.algorithms.diffraction import (
    ProfileModel,
    excitation_error_inv_a,
    lorentz_factor,
    polarisation_factor,
)
from sfxflow.algorithms.geometry import PanelMatrices, rays_to_pixels
from sfxflow.algorithms.robust import median_in_place
from sfxflow.models import Beam, Crystal, Detector
from sfxflow.settings import check_fields, setting

__all__ = [
    "PredictParams",
    "Prediction",
    "ProfileModel",
    "detector_max_q_inv_a",
    "excitation_errors",
    "predict_reflections",
    "predict_spots",
    "refine_profile",
]

_HALF_NORMAL_MEDIAN = 0.6744897501960817


@dataclass(frozen=True)
class PredictParams:
    """Options of :func:`refine_profile` and :func:`predict_reflections`.

    Parameters
    ----------
    cutoff : predict reflections whose excitation error is within this many profile widths
        ``σ(q)`` of the Ewald sphere (2.5: partiality down to about 0.04).
    d_min_a : highest resolution predicted (Å); 0 predicts to the detector's corners.
    min_profile_radius_inv_a, max_profile_radius_inv_a : bounds of the refined profile radius
        ``R`` (Å⁻¹); ``R`` of a real SFX crystal is typically 1e-4 to 1e-3.
    detection_bias : the refined ``R`` is multiplied by this (see the module notes: indexed
        spots are the brighter, nearer-the-sphere part of the profile, but orientation errors
        widen their excitation errors; on simulated stills the two cancel to within ~10 %).
    min_spots : fewer indexed spots than this: ``R`` is not refined and
        ``default_profile_radius_inv_a`` is used.
    default_profile_radius_inv_a : ``R`` when too few spots are indexed.
    polarisation_fraction : fraction of the beam polarised along lab ``x`` (horizontal at XFELs:
        1.0, as CrystFEL's default); the rest along ``y``.
    """

    cutoff: float = setting(2.5, gt=0, le=100)
    d_min_a: float = setting(0.0, ge=0, le=100)
    min_profile_radius_inv_a: float = setting(5e-5, gt=0, le=1)
    max_profile_radius_inv_a: float = setting(5e-3, gt=0, le=1, above="min_profile_radius_inv_a")
    detection_bias: float = setting(1.0, gt=0, le=100)
    min_spots: int = setting(5, ge=1, le=100_000)
    default_profile_radius_inv_a: float = setting(3e-4, gt=0, le=1)
    polarisation_fraction: float = setting(1.0, ge=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self)


def excitation_errors(crystal: Crystal, hkl: np.ndarray, beam: Beam
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(ε, |q|)`` of Miller indices ``hkl`` (n, 3): ``ε = |A h + s0| - 1/λ`` (Å⁻¹)."""
    q = np.asarray(hkl, dtype=float).reshape(-1, 3) @ np.asarray(crystal.a_matrix).T
    return (excitation_error_inv_a(q, beam.s0_inv_a, beam.wavelength_a),
            np.linalg.norm(q, axis=1))


def refine_profile(excitation_inv_a: np.ndarray, q_inv_a: np.ndarray, beam: Beam,
                   params: PredictParams | None = None) -> ProfileModel:
    """The profile model of a crystal from the excitation errors of the spots it indexed.

    Parameters
    ----------
    excitation_inv_a : ``|A h + s0| - 1/λ`` of each indexed spot's lattice point (Å⁻¹).
    q_inv_a : ``|A h|`` of the same spots.
    beam : gives the bandwidth and divergence terms.
    params : :class:`PredictParams`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> exc = rng.normal(0, 4e-4, 400)
    >>> m = refine_profile(exc, np.full(400, 0.3), Beam(1.3), PredictParams(detection_bias=1.0))
    >>> 3.5e-4 < m.radius_inv_a < 4.5e-4
    True
    """
    params = params or PredictParams()
    exc = np.abs(np.asarray(excitation_inv_a, dtype=float))
    q = np.asarray(q_inv_a, dtype=float)
    ok = np.isfinite(exc) & np.isfinite(q)
    exc, q = exc[ok], q[ok]
    if exc.size < params.min_spots:
        return ProfileModel.for_beam(params.default_profile_radius_inv_a, beam)
    lo, hi = params.min_profile_radius_inv_a, params.max_profile_radius_inv_a
    # median of |ε|/σ(R) on a log grid of R, then interpolated where it crosses the half-normal
    # median (:func:`_median_crossing`)
    grid = _profile_grid(lo, hi)
    beam_terms = (ProfileModel.for_beam(0.0, beam).width_inv_a(q)) ** 2
    k, t0, t1 = _median_crossing(exc, beam_terms, grid, _HALF_NORMAL_MEDIAN)
    if k == 0:
        r = lo  # the beam alone explains the spread
    elif k == grid.size:
        r = hi
    else:
        frac = (t0 - _HALF_NORMAL_MEDIAN) / (t0 - t1) if t0 != t1 else 0.0
        r = float(np.exp(np.log(grid[k - 1]) + frac * np.log(grid[k] / grid[k - 1])))
    r = min(max(r * params.detection_bias, params.min_profile_radius_inv_a),
            params.max_profile_radius_inv_a)
    return ProfileModel.for_beam(r, beam)


@njit(cache=True, nogil=True)
def _median_crossing(exc, beam_terms, grid, level):  # pragma: no cover - compiled
    """The first grid radius ``R`` at which the median of ``|ε| / sqrt(R² + beam_terms)``
    falls below ``level``, and the medians at it and the point before: ``(k, t[k-1], t[k])``
    (``k`` 0: already at the first; ``grid.size``: never). The median falls as ``R`` grows
    (every term does), so bisection finds it from 8 medians instead of all 97 (numpy's
    median over the whole grid at once cost 0.1 ms, in each solution's significance test
    and each crystal integrated); each median as numpy takes it
    (:func:`~sfxflow.algorithms.robust.median_in_place`), so the values are the same."""
    n = exc.size
    values = np.empty(n)

    def typical(i):
        for j in range(n):
            values[j] = exc[j] / math.sqrt(grid[i] ** 2 + beam_terms[j])
        return median_in_place(values)

    first = typical(0)
    if first <= level:
        return 0, first, first
    last = typical(grid.size - 1)
    if last >= level:
        return grid.size, last, last
    above, below = 0, grid.size - 1  # typical(above) >= level > typical(below)
    t0, t1 = first, last
    while below - above > 1:
        mid = (above + below) // 2
        t_mid = typical(mid)
        if t_mid < level:
            below, t1 = mid, t_mid
        else:
            above, t0 = mid, t_mid
    return below, t0, t1


@functools.lru_cache(maxsize=8)
def _profile_grid(lo: float, hi: float) -> np.ndarray:
    """The 97-point log grid of profile radii :func:`refine_profile` searches."""
    grid = np.geomspace(lo, hi, 97)
    grid.setflags(write=False)
    return grid


@dataclass(frozen=True)
class Prediction:
    """Reflections predicted on the detector (one row each): from a crystal's profile model
    (:func:`predict_reflections`) or from given Miller indices and a reach
    (:func:`predict_spots`, whose ``partiality`` is NaN: no profile model was given)."""

    hkl: np.ndarray  # (n, 3) int32
    panel: np.ndarray  # (n,) int32
    fs_px: np.ndarray
    ss_px: np.ndarray
    d_a: np.ndarray
    excitation_error_inv_a: np.ndarray  # signed distance of q from the Ewald sphere
    partiality: np.ndarray
    lorentz: np.ndarray
    polarisation: np.ndarray
    n_off_detector: int = 0

    def __len__(self) -> int:
        return int(self.hkl.shape[0])


@functools.lru_cache(maxsize=32)
def _group_ops(xhm: str) -> gemmi.GroupOps:
    return gemmi.SpaceGroup(xhm).operations()


def detector_max_q_inv_a(detector: Detector, beam: Beam) -> float:
    """Largest ``|q|`` (Å⁻¹) any pixel corner of the detector records."""
    s1 = detector_tables(detector).corner_dirs / beam.wavelength_a
    return float(np.max(np.linalg.norm(s1 - np.asarray(beam.s0_inv_a), axis=1)))


@njit(cache=True)
def _near_sphere(a, s0, k0, q_max, exc_max, hmax, kmax, out_hkl, out_exc):  # pragma: no cover
    """Lattice points ``A h`` with ``|A h| <= q_max`` in the shell ``k0 ± exc_max`` of the
    sphere centred at ``-s0``; returns how many were found (only the first ``len(out)`` are
    stored)."""
    cap = out_hkl.shape[0]
    cx, cy, cz = a[0, 2], a[1, 2], a[2, 2]
    cc = cx * cx + cy * cy + cz * cz
    ro2 = (k0 + exc_max) ** 2
    ri2 = (k0 - exc_max) ** 2
    q2max = q_max * q_max
    n = 0
    for h in range(-hmax, hmax + 1):
        for k in range(-kmax, kmax + 1):
            px = a[0, 0] * h + a[0, 1] * k + s0[0]
            py = a[1, 0] * h + a[1, 1] * k + s0[1]
            pz = a[2, 0] * h + a[2, 1] * k + s0[2]
            pc = px * cx + py * cy + pz * cz
            pp = px * px + py * py + pz * pz
            disc_o = pc * pc - cc * (pp - ro2)
            if disc_o < 0.0:
                continue
            so = math.sqrt(disc_o)
            lo = math.ceil((-pc - so) / cc)
            hi = math.floor((-pc + so) / cc)
            disc_i = pc * pc - cc * (pp - ri2)
            gap_lo = hi + 1
            gap_hi = hi
            if disc_i > 0.0:  # skip the inside of the inner sphere
                si = math.sqrt(disc_i)
                gap_lo = math.floor((-pc - si) / cc) + 1
                gap_hi = math.ceil((-pc + si) / cc) - 1
            for j in range(lo, hi + 1 - max(0, gap_hi - gap_lo + 1)):
                l = j if j < gap_lo else j + (gap_hi - gap_lo + 1)
                if h == 0 and k == 0 and l == 0:
                    continue
                qx = px - s0[0] + cx * l
                qy = py - s0[1] + cy * l
                qz = pz - s0[2] + cz * l
                if qx * qx + qy * qy + qz * qz > q2max:
                    continue
                vx = px + cx * l
                vy = py + cy * l
                vz = pz + cz * l
                e = math.sqrt(vx * vx + vy * vy + vz * vz) - k0
                if abs(e) > exc_max:
                    continue
                if n < cap:
                    out_hkl[n, 0] = h
                    out_hkl[n, 1] = k
                    out_hkl[n, 2] = l
                    out_exc[n] = e
                n += 1
    return n


def _rays_on_panels(detector: Detector, k_vecs: np.ndarray,
                    detector_shift_mm: tuple[float, float] = (0.0, 0.0)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~sfxflow.algorithms.geometry.rays_to_pixels` on the detector's cached matrices,
    shifted laterally by ``detector_shift_mm``."""
    m = detector_tables(detector).matrices
    if detector_shift_mm != (0.0, 0.0):
        d = m.d.copy()
        d[:, 0, 2] += detector_shift_mm[0]
        d[:, 1, 2] += detector_shift_mm[1]
        m = PanelMatrices(d, np.linalg.inv(d), m.shape)
    return rays_to_pixels(detector, k_vecs, m)


@njit(cache=True)
def _rows_near_sphere(hkl, a, s0, k0, exc_max):  # pragma: no cover - numba
    """Rows of ``hkl`` whose ``A h`` is within ``exc_max`` of the sphere: a cheap pre-selection
    of a long index list, with no (n, 3) temporaries, before the exact test."""
    n = hkl.shape[0]
    out = np.empty(n, dtype=np.int64)
    cnt = 0
    for i in range(n):
        h = float(hkl[i, 0])
        k = float(hkl[i, 1])
        l = float(hkl[i, 2])
        x = a[0, 0] * h + a[0, 1] * k + a[0, 2] * l + s0[0]
        y = a[1, 0] * h + a[1, 1] * k + a[1, 2] * l + s0[1]
        z = a[2, 0] * h + a[2, 1] * k + a[2, 2] * l + s0[2]
        if abs(math.sqrt(x * x + y * y + z * z) - k0) <= exc_max:
            out[cnt] = i
            cnt += 1
    return out[:cnt]


def _on_detector(hkl: np.ndarray, q: np.ndarray, exc: np.ndarray, beam: Beam,
                 detector: Detector, profile: ProfileModel | None, polarisation_fraction: float,
                 detector_shift_mm: tuple[float, float] = (0.0, 0.0), by_panel: bool = False
                 ) -> Prediction:
    """The :class:`Prediction` of the reflections ``hkl`` (scattering vectors ``q``, excitation
    errors ``exc``) whose ray ``q + s0`` meets a panel: in input order, or sorted by panel
    then ``ss`` (``by_panel``)."""
    k_vecs = np.ascontiguousarray(q + np.asarray(beam.s0_inv_a, dtype=float))
    panel, fs, ss = _rays_on_panels(detector, k_vecs, detector_shift_mm)
    sel = np.flatnonzero(panel >= 0)
    if by_panel:
        sel = sel[np.argsort(panel[sel] * 1e5 + ss[sel], kind="stable")]
    q_len = np.linalg.norm(q[sel], axis=1)
    return Prediction(
        hkl=hkl[sel].astype(np.int32),
        panel=panel[sel].astype(np.int32),
        fs_px=fs[sel],
        ss_px=ss[sel],
        d_a=1.0 / q_len,
        excitation_error_inv_a=exc[sel],
        partiality=(np.full(sel.size, np.nan) if profile is None
                    else profile.partiality(exc[sel], q_len)),
        lorentz=lorentz_factor(sel.size),
        polarisation=polarisation_factor(k_vecs[sel], polarisation_fraction),
        n_off_detector=int(k_vecs.shape[0] - sel.size),
    )


def predict_spots(
    crystal: Crystal,
    beam: Beam,
    detector: Detector,
    hkl: np.ndarray,
    max_excitation_inv_a: float,
    polarisation_fraction: float = 1.0,
) -> Prediction:
    """Where the given reflections near the Ewald sphere land on a still (input order kept).

    A reflection is kept when ``| |q + s0| - 1/λ | <= max_excitation_inv_a``; its ray is
    ``s1 ∝ q + s0`` (the point of the sphere nearest q, as for stills in DIALS). The same
    excitation error and ray-to-panel intersection as :func:`predict_reflections`, for callers
    that choose the Miller indices and the reach themselves and model the partiality their own
    way (simulators, tests): ``partiality`` is NaN.
    """
    hkl = np.asarray(hkl)
    s0 = np.asarray(beam.s0_inv_a)
    hkl = hkl[_rows_near_sphere(hkl, crystal.a_matrix, s0, 1.0 / beam.wavelength_a,
                                max_excitation_inv_a)]
    q = hkl @ crystal.a_matrix.T
    exc = excitation_error_inv_a(q, beam.s0_inv_a, beam.wavelength_a)
    keep = np.abs(exc) <= max_excitation_inv_a
    return _on_detector(hkl[keep], q[keep], exc[keep], beam, detector, None,
                        polarisation_fraction)


def _lattice_near_sphere(a: np.ndarray, s0: np.ndarray, k0: float, q_max: float,
                         exc_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices (n, 3) and excitation errors of the lattice points of ``A`` within
    ``q_max`` and within ``exc_max`` of the Ewald sphere (the search kernel fills buffers: a
    full buffer is grown to the count it reports and the search run again)."""
    real = np.linalg.inv(a)  # rows: real-space a, b, c (Å); h = a_vec . q
    hmax = int(np.linalg.norm(real[0]) * q_max) + 1
    kmax = int(np.linalg.norm(real[1]) * q_max) + 1
    cap = 4096
    while True:
        hkl = np.empty((cap, 3), dtype=np.int64)
        exc = np.empty(cap)
        n = _near_sphere(a, s0, k0, q_max, exc_max, hmax, kmax, hkl, exc)
        if n <= cap:
            return hkl[:n], exc[:n]
        cap = n


def predict_reflections(
    crystal: Crystal,
    beam: Beam,
    detector: Detector,
    profile: ProfileModel,
    params: PredictParams | None = None,
    detector_shift_mm: tuple[float, float] = (0.0, 0.0),
) -> Prediction:
    """Every reflection of ``crystal`` within the profile model's cutoff that lands on a panel.

    Parameters
    ----------
    crystal : refined crystal (its ``A`` matrix and space group: absences are removed).
    beam, detector : the frame's geometry.
    profile : the crystal's :class:`ProfileModel` (:func:`refine_profile`).
    params : :class:`PredictParams`.
    detector_shift_mm : lateral detector shift refined with the crystal (lab ``x, y``).

    Returns
    -------
    Prediction
        Rows sorted by panel then ``ss``; ``n_off_detector`` counts predictions whose ray hits
        no panel (gaps, beyond the edges). ``lorentz`` is 1: in this still model the
        excitation-error profile (the partiality) already holds the geometry of how a
        reflection crosses the sphere. ``polarisation`` is the factor the intensity carries.

    Examples
    --------
    >>> from sfxflow.algorithms.simulate import random_crystal
    >>> from sfxflow.algorithms.layouts import simple
    >>> c = random_crystal("79 79 38 90 90 90", "P 43 21 2", np.random.default_rng(2))
    >>> beam = Beam(1.3, 1e-3)
    >>> pred = predict_reflections(c, beam, simple(), ProfileModel.for_beam(3e-4, beam))
    >>> len(pred) > 20, bool(np.all(pred.partiality >= np.exp(-0.5 * 2.5**2) - 1e-12))
    (True, True)
    """
    params = params or PredictParams()
    a = np.ascontiguousarray(crystal.a_matrix, dtype=float)
    s0 = np.asarray(beam.s0_inv_a, dtype=float)
    k0 = 1.0 / beam.wavelength_a
    q_max = detector_max_q_inv_a(detector, beam)
    if params.d_min_a > 0:
        q_max = min(q_max, 1.0 / params.d_min_a)
    exc_max = float(params.cutoff * profile.width_inv_a(np.array([q_max]))[0])
    hkl, exc = _lattice_near_sphere(a, s0, k0, q_max, exc_max)
    q = hkl @ a.T
    q_len = np.linalg.norm(q, axis=1)
    keep = np.abs(exc) <= params.cutoff * profile.width_inv_a(q_len)
    if keep.any():
        absent = np.asarray(_group_ops(crystal.space_group.xhm()).systematic_absences(
            hkl[keep].astype(np.int32)), dtype=bool)
        keep[np.flatnonzero(keep)[absent]] = False
    return _on_detector(hkl[keep], q[keep], exc[keep], beam, detector, profile,
                        params.polarisation_fraction, detector_shift_mm, by_panel=True)
