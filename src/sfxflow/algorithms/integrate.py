"""Summation integration of predicted reflections on a still, with honest sigmas and flags.

For each predicted reflection (position from :mod:`sfxflow.algorithms.predict`), as CrystFEL's
ring integration:

* the **peak** region is the disc of radius ``peak_radius_px`` around the prediction; the
  **background** annulus lies between ``background_inner_px`` and ``background_outer_px``;
* pixels that are masked, off the panel, or inside another predicted reflection's peak disc
  (of any lattice on the frame) are left out of the background;
* the background is a plane ``b0 + b1 dfs + b2 dss`` fitted to the annulus by least squares,
  then refitted without pixels more than ``outlier_nsigma`` standard deviations from it (zingers,
  unpredicted spots, other crystals), ``outlier_cycles`` times;
* ``I = Σ_peak (v / g) - Σ_peak plane`` in photons, ``g`` the gain (ADU per photon);
* ``σ(I)² = max(I, 0) + n_peak σ_b² + σ_b² wᵀ (XᵀX)⁻¹ w``: the reflection's own photon count,
  the background's pixel-to-pixel variance ``σ_b²`` measured in the annulus (Poisson, readout
  and any excess alike) over the peak pixels, and the uncertainty of the fitted plane summed
  over the peak (``w = (n_peak, Σ dfs, Σ dss)``).

Flags (:class:`Flag`) mark a masked pixel in the peak (``MASKED``; masked pixels are left out
of the sum, so the intensity is low), a pixel at or above the panel's ``max_adu`` in the peak
(``SATURATED``), a peak disc that crosses the panel edge (``EDGE``), another prediction whose
peak disc overlaps this one (``OVERLAP``) and background pixels rejected as outliers
(``BACKGROUND_OUTLIERS``).

The per-pixel work is one numba kernel over all reflections of a frame; the data stay in the
frame's own layout (no per-panel copies).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from sfxflow.algorithms.detector_tables import as_data3, frame_layout
from sfxflow.algorithms.predict import Prediction
from sfxflow.models import Detector, ReflectionTable
from sfxflow.settings import check_fields, setting

__all__ = ["Flag", "IntegrateParams", "integrate_reflections", "peak_occupancy"]


class Flag(enum.IntFlag):
    """Bits of the ``flags`` column of integrated reflections."""

    MASKED = 1
    SATURATED = 2
    EDGE = 4
    OVERLAP = 8
    BACKGROUND_OUTLIERS = 16


#: Flags that make an intensity unusable (left out of the stream's reflection lists).
BAD_FLAGS = Flag.MASKED | Flag.EDGE

# the flags as plain ints for the numba kernels (numba reads module-level ints as constants,
# not IntFlag members)
_MASKED = int(Flag.MASKED)
_SATURATED = int(Flag.SATURATED)
_EDGE = int(Flag.EDGE)
_OVERLAP = int(Flag.OVERLAP)
_BACKGROUND_OUTLIERS = int(Flag.BACKGROUND_OUTLIERS)


@dataclass(frozen=True)
class IntegrateParams:
    """Options of :func:`integrate_reflections`.

    Parameters
    ----------
    method : ``rings`` (summation in a disc with a background annulus) or ``none`` (no
        prediction or integration: crystals are recorded as indexed, as CrystFEL's
        ``--integration=none``).
    peak_radius_px : radius of the peak disc (CrystFEL ``--int-radius`` first value).
    background_inner_px, background_outer_px : the background annulus.
    outlier_nsigma : background pixels further than this many standard deviations from the
        fitted plane are rejected (then the plane is refitted).
    outlier_cycles : rounds of rejection and refitting.
    min_background_pixels : fewer usable background pixels: the reflection is not integrated.
    """

    method: str = setting("rings", choices=("rings", "none"))
    peak_radius_px: float = setting(3.0, gt=0, le=30)
    background_inner_px: float = setting(4.0, gt=0, le=30, at_least="peak_radius_px")
    background_outer_px: float = setting(6.0, gt=0, le=30, above="background_inner_px")
    outlier_nsigma: float = setting(4.0, gt=0, le=1000)
    outlier_cycles: int = setting(2, ge=0, le=100)
    min_background_pixels: int = setting(10, ge=4, le=100_000)

    def __post_init__(self) -> None:
        check_fields(self)


@njit(cache=True)
def _paint(occ, ptab, panel, fs, ss, radius, add):  # pragma: no cover - numba
    """Add ``add`` to ``occ`` over every reflection's peak disc."""
    r2 = radius * radius
    ir = math.ceil(radius) + 1
    for j in range(panel.shape[0]):
        lead, ss0, fs0, nss, nfs = ptab[panel[j]]
        cx = math.floor(fs[j])
        cy = math.floor(ss[j])
        for y in range(max(0, cy - ir), min(nss, cy + ir + 1)):
            dy = y + 0.5 - ss[j]
            for x in range(max(0, cx - ir), min(nfs, cx + ir + 1)):
                dx = x + 0.5 - fs[j]
                if dx * dx + dy * dy <= r2:
                    occ[lead, ss0 + y, fs0 + x] += add


@njit(cache=True, inline="always")
def _inv_sym3(a, b, c, d, e, f):  # pragma: no cover - numba
    """Inverse of the symmetric matrix [[a, b, c], [b, d, e], [c, e, f]] as its six distinct
    elements, and whether it is invertible."""
    c00 = d * f - e * e
    c01 = c * e - b * f
    c02 = b * e - c * d
    det = a * c00 + b * c01 + c * c02
    if abs(det) < 1e-12:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False
    inv = 1.0 / det
    return (c00 * inv, c01 * inv, c02 * inv, (a * f - c * c) * inv, (b * c - a * e) * inv,
            (a * d - b * b) * inv, True)


# The kernel's steps are inlined into it (inline="always"): as separate calls they cost about 10%
# per crystal (measured with integrate_reflections on simulated CSPAD stills).
@njit(cache=True, inline="always")
def _crosses_edge(fs, ss, cx, cy, ir, rp2, nfs, nss):  # pragma: no cover - numba
    """Whether any pixel of the peak disc around (fs, ss) lies off the panel."""
    for y in range(cy - ir, cy + ir + 1):
        dy = y + 0.5 - ss
        for x in range(cx - ir, cx + ir + 1):
            dx = x + 0.5 - fs
            if dx * dx + dy * dy <= rp2 and not (0 <= x < nfs and 0 <= y < nss):
                return True
    return False


@njit(cache=True, inline="always")
def _gather(data3, mask3, occ, lead, ss0, fs0, y0, y1, x0, x1, fs, ss, gain, max_adu, rp2, ri2,
            ro2, bx, by, bv, bok):  # pragma: no cover - numba
    """Sum the peak disc around (fs, ss) in photons and collect the usable background pixels of
    the annulus into ``bx, by, bv`` (offsets and photons; ``bok`` set). Returns the flags, the
    number of background pixels and the peak's sum, first moments, pixel count and maximum."""
    flags = 0
    nb = 0
    s_peak = 0.0
    n_peak = 0
    sx_peak = 0.0
    sy_peak = 0.0
    peak_max = -np.inf
    for y in range(y0, y1 + 1):
        dy = y + 0.5 - ss
        dy2 = dy * dy
        if dy2 > ro2:
            continue
        row = ss0 + y
        half = math.sqrt(ro2 - dy2)  # the disc's extent on this row
        for x in range(max(x0, math.ceil(fs - half - 0.5)),
                       min(x1, math.floor(fs + half - 0.5)) + 1):
            dx = x + 0.5 - fs
            r2 = dx * dx + dy2
            if r2 > ro2:
                continue
            col = fs0 + x
            if r2 <= rp2:
                if mask3[lead, row, col] == 0:
                    flags |= _MASKED
                    continue
                if occ[lead, row, col] > 1:
                    flags |= _OVERLAP
                v = data3[lead, row, col]
                if v >= max_adu:
                    flags |= _SATURATED
                v = v / gain
                s_peak += v
                sx_peak += dx
                sy_peak += dy
                n_peak += 1
                if v > peak_max:
                    peak_max = v
            elif r2 >= ri2:
                if mask3[lead, row, col] == 0 or occ[lead, row, col] > 0:
                    continue
                v = data3[lead, row, col]
                if v >= max_adu:
                    continue
                bx[nb] = dx
                by[nb] = dy
                bv[nb] = v / gain
                bok[nb] = True
                nb += 1
    return flags, nb, s_peak, n_peak, sx_peak, sy_peak, peak_max


@njit(cache=True, inline="always")
def _fit_background(bx, by, bv, bok, nb, nsigma, cycles, min_bg):  # pragma: no cover - numba
    """Least-squares plane ``c0 + c1 dfs + c2 dss`` through the background pixels, refitted
    without outliers ``cycles`` times. Returns the plane, the inverse normal matrix (six
    elements), the pixel variance about the plane, whether the fit succeeded and whether any
    pixel was rejected."""
    c0 = c1 = c2 = 0.0
    i00 = i01 = i02 = i11 = i12 = i22 = 0.0
    var_b = 0.0
    ok = True
    any_rejected = False
    for cyc in range(cycles + 1):
        s0 = sx = sy = sxx = sxy = syy = r0 = rx = ry = 0.0
        n_used = 0
        for i in range(nb):
            if not bok[i]:
                continue
            x_, y_, v_ = bx[i], by[i], bv[i]
            s0 += 1.0
            sx += x_
            sy += y_
            sxx += x_ * x_
            sxy += x_ * y_
            syy += y_ * y_
            r0 += v_
            rx += v_ * x_
            ry += v_ * y_
            n_used += 1
        i00, i01, i02, i11, i12, i22, ok = _inv_sym3(s0, sx, sy, sxx, sxy, syy)
        if not ok or n_used < min_bg:
            ok = False
            break
        c0 = i00 * r0 + i01 * rx + i02 * ry
        c1 = i01 * r0 + i11 * rx + i12 * ry
        c2 = i02 * r0 + i12 * rx + i22 * ry
        ss_res = 0.0
        for i in range(nb):
            if bok[i]:
                r = bv[i] - c0 - c1 * bx[i] - c2 * by[i]
                ss_res += r * r
        var_b = ss_res / max(n_used - 3, 1)
        if cyc == cycles:
            break
        # the pixel variance is at least the Poisson variance of the fitted background
        lim = nsigma * math.sqrt(max(var_b, c0, 1e-12))
        rejected = 0
        for i in range(nb):
            if bok[i]:
                r = bv[i] - c0 - c1 * bx[i] - c2 * by[i]
                if abs(r) > lim:
                    bok[i] = False
                    rejected += 1
        if rejected == 0:
            break
        any_rejected = True
    return c0, c1, c2, i00, i01, i02, i11, i12, i22, var_b, ok, any_rejected


@njit(cache=True)
def _integrate_kernel(data3, mask3, occ, ptab, pf, panel, fs, ss, r_peak, r_in, r_out,
                      nsigma, cycles, min_bg, out_i, out_sig, out_bg, out_peak, out_npk,
                      out_flags):  # pragma: no cover - numba
    ir = math.ceil(r_out)
    w = 2 * ir + 1
    bx = np.empty(w * w)
    by = np.empty(w * w)
    bv = np.empty(w * w)
    bok = np.empty(w * w, dtype=np.bool_)
    rp2, ri2, ro2 = r_peak * r_peak, r_in * r_in, r_out * r_out
    for j in range(panel.shape[0]):
        p = panel[j]
        lead, ss0, fs0, nss, nfs = ptab[p]
        cx = math.floor(fs[j])
        cy = math.floor(ss[j])
        y0 = max(cy - ir, 0)
        y1 = min(cy + ir, nss - 1)
        x0 = max(cx - ir, 0)
        x1 = min(cx + ir, nfs - 1)
        edge = 0
        if y0 != cy - ir or y1 != cy + ir or x0 != cx - ir or x1 != cx + ir:
            # near an edge: is any pixel of the peak disc off the panel?
            if _crosses_edge(fs[j], ss[j], cx, cy, ir, rp2, nfs, nss):
                edge = _EDGE
        flags, nb, s_peak, n_peak, sx_peak, sy_peak, peak_max = _gather(
            data3, mask3, occ, lead, ss0, fs0, y0, y1, x0, x1, fs[j], ss[j], pf[p, 0], pf[p, 1],
            rp2, ri2, ro2, bx, by, bv, bok)
        flags |= edge
        out_npk[j] = n_peak
        out_flags[j] = flags
        out_i[j] = out_sig[j] = out_bg[j] = out_peak[j] = np.nan
        if n_peak == 0 or nb < min_bg:
            continue
        c0, c1, c2, i00, i01, i02, i11, i12, i22, var_b, ok, rejected = _fit_background(
            bx, by, bv, bok, nb, nsigma, cycles, min_bg)
        if rejected:
            out_flags[j] = flags | _BACKGROUND_OUTLIERS
        if not ok:
            continue
        inten = s_peak - (c0 * n_peak + c1 * sx_peak + c2 * sy_peak)
        # variance of the fitted plane summed over the peak: var_b * w^T (X^T X)^-1 w
        w0, w1, w2 = float(n_peak), sx_peak, sy_peak
        plane_var = var_b * (i00 * w0 * w0 + i11 * w1 * w1 + i22 * w2 * w2
                             + 2.0 * (i01 * w0 * w1 + i02 * w0 * w2 + i12 * w1 * w2))
        out_i[j] = inten
        out_sig[j] = math.sqrt(max(inten, 0.0) + n_peak * var_b + plane_var)
        out_bg[j] = c0
        out_peak[j] = peak_max


def peak_occupancy(data: np.ndarray, detector: Detector, predictions: list[Prediction],
                   params: IntegrateParams) -> np.ndarray:
    """How many predicted peak discs (of every lattice on the frame) cover each pixel, in the
    (lead, ss, fs) layout of the frame data."""
    a = np.asarray(data)
    prep = frame_layout(detector, tuple(a.shape[:-2]), (a.shape[-2], a.shape[-1]))
    occ = np.zeros(prep.mask3.shape, dtype=np.uint8)
    for pred in predictions:
        if len(pred):
            _paint(occ, prep.ptab, pred.panel.astype(np.int64), pred.fs_px, pred.ss_px,
                   float(params.peak_radius_px), 1)
    return occ


def integrate_reflections(
    data: np.ndarray,
    detector: Detector,
    prediction: Prediction,
    params: IntegrateParams | None = None,
    gain_adu_per_photon: float | None = None,
    occupancy: np.ndarray | None = None,
) -> ReflectionTable:
    """Integrate one crystal's predicted reflections on a frame.

    Parameters
    ----------
    data : the frame's pixel array as stored (:attr:`sfxflow.models.Frame.data`), ADU.
    detector : its detector (masks, gains, saturation levels).
    prediction : the reflections (:func:`sfxflow.algorithms.predict.predict_reflections`).
    params : :class:`IntegrateParams`.
    gain_adu_per_photon : overrides every panel's gain (``detector.gain_adu_per_photon``);
        panels without a gain and no override are taken as 1 ADU per photon.
    occupancy : :func:`peak_occupancy` of every lattice on the frame; by default this
        crystal's own predictions only.

    Returns
    -------
    ReflectionTable
        The reflections that could be integrated (at least one peak pixel and
        ``min_background_pixels`` background pixels), with :class:`Flag` bits.

    Examples
    --------
    >>> from sfxflow.models import Panel
    >>> from sfxflow.algorithms.predict import Prediction
    >>> det = Detector((Panel("p", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (100, 100),
    ...                       adu_per_photon=10.0),))
    >>> img = np.full((100, 100), 20.0)  # 2 photons per pixel
    >>> img[49:52, 29:32] += 100.0  # 90 photons in a 3x3 spot at fs 30.5, ss 50.5
    >>> one = np.ones(1)
    >>> pred = Prediction(np.array([[1, 2, 3]]), np.array([0]), one * 30.5, one * 50.5, one,
    ...                   one * 0, one, one, one)
    >>> refl = integrate_reflections(img, det, pred)
    >>> round(float(refl["intensity"][0]), 6), round(float(refl["background"][0]), 6)
    (90.0, 2.0)
    """
    params = params or IntegrateParams()
    a = np.asarray(data)
    data3 = as_data3(a)
    prep = frame_layout(detector, tuple(a.shape[:-2]), (a.shape[-2], a.shape[-1]))
    pf = prep.pf(detector, gain_adu_per_photon)
    n = len(prediction)
    panel = np.ascontiguousarray(prediction.panel, dtype=np.int64)
    if occupancy is None:
        occupancy = peak_occupancy(a, detector, [prediction], params)
    out = {name: np.empty(n) for name in ("intensity", "sigma", "background", "peak")}
    npk = np.zeros(n, dtype=np.int32)
    flags = np.zeros(n, dtype=np.int32)
    _integrate_kernel(data3, prep.mask3, occupancy, prep.ptab, pf, panel,
                      np.ascontiguousarray(prediction.fs_px, dtype=float),
                      np.ascontiguousarray(prediction.ss_px, dtype=float),
                      float(params.peak_radius_px), float(params.background_inner_px),
                      float(params.background_outer_px), float(params.outlier_nsigma),
                      int(params.outlier_cycles), int(params.min_background_pixels),
                      out["intensity"], out["sigma"], out["background"], out["peak"], npk, flags)
    hkl = prediction.hkl
    table = ReflectionTable({
        "h": hkl[:, 0], "k": hkl[:, 1], "l": hkl[:, 2], "panel": prediction.panel,
        "fs_px": prediction.fs_px, "ss_px": prediction.ss_px, **out, "peak_pixels": npk,
        "partiality": prediction.partiality, "d_a": prediction.d_a,
        "excitation_error_inv_a": prediction.excitation_error_inv_a,
        "lorentz": prediction.lorentz, "polarisation": prediction.polarisation, "flags": flags,
    })
    return table.select(np.flatnonzero(np.isfinite(out["intensity"])))


def resolution_limit_a(reflections: ReflectionTable, min_i_over_sigma: float = 3.0,
                       quantile: float = 0.95, min_strong: int = 5) -> float:
    """Where a crystal's strong reflections stop: the ``quantile`` of ``1/d`` among the
    integrated reflections with ``I/σ >= min_i_over_sigma`` and no bad flag, as a d spacing (Å);
    NaN when fewer than ``min_strong`` are strong.

    Like CrystFEL's ``diffraction_resolution_limit``, it describes how far the crystal
    diffracted on this shot, from the crystal's own measured reflections.
    """
    if len(reflections) == 0:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = reflections["intensity"] / reflections["sigma"]
    good = (snr >= min_i_over_sigma) & ((reflections["flags"] & int(BAD_FLAGS)) == 0)
    if int(good.sum()) < min_strong:
        return math.nan
    inv_d = 1.0 / reflections["d_a"][good]
    return float(1.0 / np.quantile(inv_d, quantile))
