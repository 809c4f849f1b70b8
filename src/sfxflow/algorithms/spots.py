"""Spot finding and hit finding on still images (compiled with numba, one core per frame).

Method (per panel, with the panel mask)
---------------------------------------
``dispersion`` (DIALS-style local dispersion threshold). For every good pixel, the mean ``m``
and unbiased variance ``v`` of the good pixels in a ``window_px x window_px`` window around it
are computed with O(1) work per pixel (column running sums updated row by row, then fixed-size
window sums in one vectorised loop). With an expected background variance ``e`` (ADU²; see
``noise_model``: ``gain * m`` for Poisson data, where ``gain`` is the panel's
``adu_per_photon``, so no photon-scaled copy of the frame is made) a pixel is *strong* when

* its value is above ``global_threshold_photons * gain``;
* at least ``min_local`` good pixels are in its window;
* ``value - m > sigma_strong * sqrt(e)`` (DIALS' code uses the Poisson ``sqrt(gain * m)``;
  ``noise_model="local"`` uses ``sqrt(v)`` instead, which spots themselves inflate);
* the index of dispersion ``v / e > 1 + sigma_background * sqrt(2 / (n - 1))``.

``radial`` (peakfinder8-style). Pixels are binned by their distance from the beam axis; per bin
the mean and standard deviation of good pixels are found with ``radial.iterations`` rounds of
clipping at ``radial.snr`` sigma, and a pixel is strong when it exceeds its bin's mean by
``radial.snr`` standard deviations (and the global threshold); :class:`RadialParams`.

Strong pixels are joined into spots with 8-connectivity in the same compiled pass (union-find).
Spots with fewer than ``min_spot_pixels`` or more than ``max_spot_pixels`` pixels are dropped.
For each spot, the local background is the mean of the good, non-strong pixels in a ring
``background_margin_px`` wide, one pixel outside its bounding box; the intensity is the sum of
background-subtracted photons; the centroid is weighted by the background-subtracted photons
(pixel centres at +0.5, see :mod:`sfxflow.models`); the SNR is
``I / sqrt(max(I, 0) + n * var_bg * (1 + n / n_bg))``. The resolution ``d_a`` comes from
:func:`sfxflow.algorithms.geometry.pixels_to_q`; optional resolution limits and an ice-ring
filter (hexagonal ice Ih reflections, DIALS-style) remove spots afterwards.

Spots whose SNR is below ``min_snr`` are dropped (default 3: on simulated CSPAD frames this
removes 0.1 % of the truth reflections with SNR >= 5 and half of the false spots).

Real CSPAD data
---------------
Measured on the two LCLS CSPAD thermolysin CBFs (64 ASICs of 185 x 194, pedestal-subtracted
integer ADU, header gain a placeholder 1.0):

* background: per-ASIC medians 0-40 ADU; on the emptiest ASICs the pixel histogram shows the
  zero-photon peak (sigma ~1.7 ADU of readout noise) and a one-photon peak ~9 ADU above it, so
  these files hold ~9 ADU per photon. The background's variance grows as ~5-6 x its mean (the
  index of dispersion; charge sharing between pixels keeps it below the photon gain) plus a few
  ADU²: ``noise_model="auto"`` measures this per ASIC and frame. One detector-wide affine fit
  ``var = G * mean + R`` was tried and found more noise spots: the index varies per ASIC.
* the background has isolated pixels of 100-300 ADU (10-30 photons) well beyond Poisson; pairs
  of them pass the 3-sigma pixel tests, so the defaults find ~1,200-1,400 spots per frame, most
  of them not on the lattice. Their integrated SNR is low: ``min_snr`` removes them.
* ASIC edges: with ``border_px=0`` the double-width middle columns of each 2x1 sensor (fs 193 of
  the first ASIC, fs 0 of the second) carry 17-35 times the spot density of the interior and
  the outer columns 2-4 times; rows are normal. ``border_px=1`` (default) masks them; 2 changes
  little on these frames but loses 2 % of the simulated reflections.

For such data use ``gain_adu_per_photon=9`` (intensities in photons; an argument of
:func:`find_spots`, the detector's setting ``detector.gain_adu_per_photon`` in a configuration,
:data:`CSPAD_CBF_GAIN_ADU_PER_PHOTON`) and ``min_snr=6``
(:data:`CSPAD_CBF_SETTINGS`; ``--preset cspad-cbf`` on the command line, the file
``sfxflow/presets/cspad-cbf.toml``): on the two frames this keeps
203 and 118 spots, of which 93 % and 47 % lie within 3 px of the indexed lattice's predictions
(defaults: 31 % of 1,194 and 11 % of 1,392). The second frame holds two crystals: indexing the
left-over spots found a second lattice 35 degrees away with ~30 spots in runs with nearby
settings (75-84 % on either lattice). The cctbx.xfel habit of gain 25 with a 100 ADU global
threshold (``gain_adu_per_photon=25, noise_model="poisson", global_threshold_photons=4``) gives
a similar purity with ~10 % fewer lattice spots. For other CSPAD data, read the gain off the
one-photon peak of an empty ASIC's histogram.

Hit finding: :func:`is_hit` compares the spot count (and optionally the count of spots at
``d <= d_a``) with :class:`HitParams`.

The compiled kernels run single-threaded (no numba ``parallel``), so a worker process can run
one frame per core; they release the GIL (``nogil``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from sfxflow.algorithms.detector_tables import FrameLayout, as_data3, frame_layout
from sfxflow.algorithms.geometry import d_spacing_a, miller_indices, pixels_to_q
from sfxflow.errors import GeometryError
from sfxflow.models import (
    Beam,
    Detector,
    Frame,
    Panel,
    SpotTable,
    as_space_group,
    as_unit_cell,
)
from sfxflow.settings import check_fields, section, setting

__all__ = [
    "CSPAD_CBF_GAIN_ADU_PER_PHOTON",
    "CSPAD_CBF_SETTINGS",
    "ICE_IH_CELL",
    "METHODS",
    "NOISE_MODELS",
    "HitParams",
    "RadialParams",
    "SpotParams",
    "find_spots",
    "find_spots_panel",
    "ice_ring_d_spacings_a",
    "is_hit",
]

log = logging.getLogger(__name__)

METHODS = ("dispersion", "radial")
NOISE_MODELS = ("auto", "poisson", "local")

#: SpotParams settings for LCLS CSPAD CBF files (pedestal-subtracted ADU; see the module
#: docstring): ``SpotParams(**CSPAD_CBF_SETTINGS)``, with their gain below.
CSPAD_CBF_SETTINGS: dict[str, Any] = {"min_snr": 6.0}
#: ADU per photon of LCLS CSPAD CBF files, whose headers say 1.0 (``find_spots``' argument)
CSPAD_CBF_GAIN_ADU_PER_PHOTON = 9.0


@dataclass(frozen=True)
class RadialParams:
    """Settings of the ``radial`` spot-finding method (the ``dispersion`` method ignores them).

    Parameters
    ----------
    snr : threshold in standard deviations above the ring mean.
    iterations : rounds of sigma clipping of the ring statistics.
    bin_px : ring width in pixels.
    """

    snr: float = setting(5.0, ge=0, le=1000)
    iterations: int = setting(5, ge=0, le=100)
    bin_px: float = setting(1.0, gt=0, le=1000)

    def __post_init__(self) -> None:
        check_fields(self)

#: Hexagonal ice Ih: unit cell (Å, degrees) and space group used for the ice-ring filter.
ICE_IH_CELL = (4.498, 4.498, 7.338, 90.0, 90.0, 120.0)
ICE_IH_SPACE_GROUP = "P 63/m m c"


@dataclass(frozen=True)
class SpotParams:
    """Parameters of :func:`find_spots` (defaults suit CSPAD-class XFEL stills).

    Parameters
    ----------
    method : ``"dispersion"`` (DIALS-style local threshold) or ``"radial"`` (peakfinder8-style).
    noise_model : the expected background variance of both tests: ``"poisson"`` is
        ``gain * mean`` (DIALS' code); ``"auto"`` (default) is the same with the gain raised, per
        panel and frame, to the background's own index of dispersion when that is larger (so ADU
        data declared as 1 ADU/photon do not flood with noise spots), and a noise floor where the
        background mean is <= 0; ``"local"`` uses the window's own variance for the strong test
        (as described in DIALS' documentation; spots inflate it, so it finds fewer weak spots).
    window_px : odd edge of the square local window of the dispersion method (9 = 9x9).
    sigma_strong : a strong pixel exceeds the local mean by this many local standard deviations.
    sigma_background : the local index of dispersion must exceed ``1 + sigma_background *
        sqrt(2 / (n - 1))``.
    min_local : fewest good pixels in a window for its centre to be tested.
    global_threshold_photons : a strong pixel must be above this value (photons).
    border_px : pixels this close to a panel edge are ignored (the ASIC-edge mask: the edge
        pixels of CSPAD-class detectors are larger and brighter than the rest; 0 keeps them).
    min_spot_pixels, max_spot_pixels : allowed number of strong pixels in one spot.
    min_snr : drop spots whose integrated signal-to-noise ratio (the ``snr`` column) is below
        this (0 keeps all; like CrystFEL's ``--min-snr``). The per-pixel tests find candidate
        spots; this decides which are kept (6 for CSPAD CBFs, see *Real CSPAD data* in the
        module docstring).
    background_margin_px : width of the ring used for a spot's background; the ring starts one
        pixel outside the spot's bounding box.
    d_min_a, d_max_a : keep spots with ``d_min_a <= d <= d_max_a`` (Å; ``None`` = no limit).
    filter_ice_rings : drop spots within ``ice_ring_half_width_inv_a`` of an ice Ih ring in 1/d.
    ice_ring_half_width_inv_a : half width of an ice ring in 1/d (Å⁻¹).
    radial : the ``radial`` method's settings (:class:`RadialParams`).

    >>> SpotParams(window_px=7).half_window
    3
    """

    method: str = setting("dispersion", choices=METHODS)
    noise_model: str = setting("auto", choices=NOISE_MODELS)
    window_px: int = setting(9, ge=3, le=63, odd=True)
    sigma_strong: float = setting(3.0, ge=0, le=1000)
    sigma_background: float = setting(4.5, ge=0, le=1000)
    min_local: int = setting(2, ge=2, le=4096)
    global_threshold_photons: float = setting(0.0, ge=-1e9, le=1e9)
    border_px: int = setting(1, ge=0, le=256)
    min_spot_pixels: int = setting(2, ge=1, le=1_000_000)
    max_spot_pixels: int = setting(500, ge=1, le=10_000_000, at_least="min_spot_pixels")
    min_snr: float = setting(3.0, ge=0, le=1000)
    background_margin_px: int = setting(2, ge=1, le=100)
    d_min_a: float | None = setting(None, gt=0, le=1e4)
    d_max_a: float | None = setting(None, gt=0, le=1e4, at_least="d_min_a")
    filter_ice_rings: bool = False
    ice_ring_half_width_inv_a: float = setting(0.004, ge=0, le=0.1)
    radial: RadialParams = section(RadialParams, flag_prefix="spots-radial-")

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def half_window(self) -> int:
        """Half width of the local window (``window_px // 2``)."""
        return int(self.window_px) // 2


@dataclass(frozen=True)
class HitParams:
    """When a frame counts as a hit.

    Parameters
    ----------
    min_spots : fewest spots on a hit.
    min_spots_beyond_d_a : fewest spots with ``d <= d_a`` (0 disables this test).
    d_a : resolution (Å) for ``min_spots_beyond_d_a``.

    >>> HitParams(min_spots=10).min_spots
    10
    """

    min_spots: int = setting(10, ge=0, le=100_000)
    min_spots_beyond_d_a: int = setting(0, ge=0, le=100_000)
    d_a: float = setting(4.0, gt=0, le=1000)

    def __post_init__(self) -> None:
        check_fields(self)


def is_hit(spots: SpotTable, params: HitParams) -> bool:
    """Whether a frame with these spots is a hit.

    >>> t = SpotTable(**{k: np.zeros(12) for k in
    ...     ("panel", "fs_px", "ss_px", "intensity", "background", "snr", "n_pixels")},
    ...     d_a=np.full(12, 3.0))
    >>> is_hit(t, HitParams(min_spots=10)), is_hit(t, HitParams(min_spots=13))
    (True, False)
    >>> is_hit(t, HitParams(min_spots=5, min_spots_beyond_d_a=5, d_a=2.5))
    False
    """
    if len(spots) < params.min_spots:
        return False
    if params.min_spots_beyond_d_a > 0:
        n_high = int(np.count_nonzero(spots.d_a <= params.d_a))
        return n_high >= params.min_spots_beyond_d_a
    return True


# --------------------------------------------------------------------------------------------
# Compiled kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _grow(a):  # pragma: no cover - compiled
    b = np.empty(a.shape[0] * 2, a.dtype)
    b[: a.shape[0]] = a
    return b


@njit(cache=True, nogil=True, inline="always")
def _find_root(parent, i):  # pragma: no cover - compiled
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True, inline="always")
def _union(parent, a, b):  # pragma: no cover - compiled
    ra = _find_root(parent, a)
    rb = _find_root(parent, b)
    if ra < rb:
        parent[rb] = ra
    elif rb < ra:
        parent[ra] = rb


@njit(cache=True, nogil=True, inline="always")
def _link_strong(rowlab, rowtag, parent, p, r, c, nfs, n):  # pragma: no cover - compiled
    """Label strong pixel ``n`` at panel ``p`` (r, c) and union it with its already visited
    8-connected neighbours (left, and the three above).

    Labels live in two row buffers (``rowlab[r & 1]``) tagged with a row id, so nothing
    frame-sized is touched (sparse writes into a frame-sized label image cost page faults).
    """
    parent[n] = n
    row_id = p * 1048576 + r
    cur = r & 1
    rowlab[cur, c] = n
    rowtag[cur, c] = row_id
    if c > 0 and rowtag[cur, c - 1] == row_id:
        _union(parent, n, rowlab[cur, c - 1])
    if r > 0:
        prev = 1 - cur
        for cc in range(max(c - 1, 0), min(c + 2, nfs)):
            if rowtag[prev, cc] == row_id - 1:
                _union(parent, n, rowlab[prev, cc])


@njit(cache=True, nogil=True)
def _max_panel_width(ptab):  # pragma: no cover - compiled
    max_fs = 1
    for p in range(ptab.shape[0]):
        max_fs = max(max_fs, ptab[p, 4])
    return max_fs


@njit(cache=True, nogil=True)
def _new_labels(ptab, cap):  # pragma: no cover - compiled
    """The strong-pixel list and its labelling buffers, as one tuple for both kernels:
    ``(sp_panel, sp_r, sp_c, parent, rowlab, rowtag)`` (see :func:`_link_strong`)."""
    max_fs = _max_panel_width(ptab)
    return (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int32),
            np.empty(cap, np.int32), np.zeros((2, max_fs), np.int32),
            np.full((2, max_fs), -1, np.int64))


@njit(cache=True, nogil=True, inline="always")
def _room_for_row(labels, n, nfs):  # pragma: no cover - compiled
    """``labels`` with room for a whole row of ``nfs`` more strong pixels after the ``n``."""
    sp_panel, sp_r, sp_c, parent, rowlab, rowtag = labels
    if n + nfs <= sp_panel.shape[0]:
        return labels
    return (_grow(sp_panel), _grow(sp_r), _grow(sp_c), _grow(parent), rowlab, rowtag)


@njit(cache=True, nogil=True, inline="always")
def _add_strong(labels, p, r, c, nfs, n):  # pragma: no cover - compiled
    """Record strong pixel ``n`` at panel ``p`` (r, c), labelled; returns ``n + 1``."""
    sp_panel, sp_r, sp_c, parent, rowlab, rowtag = labels
    sp_panel[n] = p
    sp_r[n] = r
    sp_c[n] = c
    _link_strong(rowlab, rowtag, parent, p, r, c, nfs, n)
    return n + 1


@njit(cache=True, nogil=True, inline="always")
def _strong_test(v, good, cnt, s, q, gain, floor, thr_adu, min_local, s2, b2, local_sigma):
    """The dispersion test of one pixel from its window sums (no branches: vectorisable).

    ``cnt``, ``s``, ``q``: number, sum and sum of squares (ADU) of the window's good pixels.
    The expected background variance (ADU²) is ``max(gain * mean, floor)``.
    """
    a = cnt * v - s  # = N (v - mean)
    big_a = cnt * q - s * s  # = N (N - 1) var
    nm1 = cnt - 1.0
    # N * expected variance = max(gain S, N floor)
    gs = max(gain * s, cnt * floor)
    if local_sigma:
        # (v - mean)^2 > s2 var  <=>  a^2 (N - 1) > s2 N A ; dispersion passes where mean <= 0
        strong_s = (a * a * nm1 > s2 * cnt * big_a)
        gs_ok = True
        disp_free = s <= 0.0
    else:
        # v - mean > sigma_s sqrt(expected var)  <=>  a^2 > s2 N gs  (DIALS: gs = gain S >= 0)
        strong_s = a * a > s2 * cnt * gs
        gs_ok = gs > 0.0
        disp_free = False
    # var > expected var * (1 + sigma_b sqrt(2 / (N - 1)))
    #   <=>  A - gs (N - 1) > gs sigma_b sqrt(2 (N - 1))
    lhs = big_a - gs * nm1
    disp = (lhs > 0.0) & (disp_free | (lhs * lhs > gs * gs * b2 * nm1))
    return (good & (v > thr_adu) & (cnt >= min_local) & (a > 0.0) & strong_s & gs_ok
            & disp)


_FLOOR_CLIP2 = 36.0  # clip neighbour differences at 6 sigma: drops spots, keeps photon noise


@njit(cache=True, nogil=True, fastmath={"contract", "arcp", "nsz"})
def _noise_floor(data3, mask3, ptab, pf, row_step, out):  # pragma: no cover - compiled
    """Per panel, a robust background variance (ADU²) from differences of neighbouring pixels
    along fs on every ``row_step``-th row: three rounds of clipping at 3 sigma (so spots and
    hot pixels drop out), corrected for the clipping; insensitive to smooth background
    gradients. Written to ``out[p]``.
    """
    for p in range(ptab.shape[0]):
        lead = ptab[p, 0]
        ss0 = ptab[p, 1]
        fs0 = ptab[p, 2]
        nss = ptab[p, 3]
        nfs = ptab[p, 4]
        max_adu = pf[p, 1]
        clip = np.inf
        est = 0.0
        mean = 0.0
        for _ in range(3):
            acc = 0.0
            acc_v = 0.0
            cnt = 0.0
            for r in range(0, nss, row_step):
                drow = data3[lead, ss0 + r, fs0 : fs0 + nfs]
                mrow = mask3[lead, ss0 + r, fs0 : fs0 + nfs]
                for c in range(nfs - 1):
                    v0 = np.float64(drow[c])
                    v1 = np.float64(drow[c + 1])
                    d2 = (v1 - v0) * (v1 - v0)
                    ok = ((mrow[c] != 0) & (mrow[c + 1] != 0) & (v0 < max_adu) & (v1 < max_adu)
                          & (d2 <= clip))
                    acc += d2 if ok else 0.0
                    acc_v += v0 + v1 if ok else 0.0
                    cnt += 1.0 if ok else 0.0
            if cnt < 2.0:
                est = 0.0
                break
            # var(v1 - v0) = 2 var(v); a normal clipped at 3 sigma keeps 97.3% of its variance
            est = acc / cnt / 2.0
            mean = acc_v / cnt / 2.0
            clip = _FLOOR_CLIP2 * 2.0 * est
        # Poisson data: variance = gain * mean, so the background's own index of dispersion is
        # the effective gain (raises a declared gain that is too low, e.g. 1 for ADU data)
        if mean > 0.0 and est / mean > pf[p, 0]:
            out[p, 0] = est / mean
        # no photons in the mean (pedestal-subtracted, empty background): noise floor instead
        out[p, 1] = est if mean <= 0.0 else 0.0


@njit(cache=True, nogil=True, inline="always")
def _sum7(a, c):
    return ((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + ((a[c + 4] + a[c + 5]) + a[c + 6])


@njit(cache=True, nogil=True, inline="always")
def _sum9(a, c):
    return (((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + ((a[c + 4] + a[c + 5])
            + (a[c + 6] + a[c + 7]))) + a[c + 8]


@njit(cache=True, nogil=True, inline="always")
def _sum5(a, c):
    return ((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + a[c + 4]


@njit(cache=True, nogil=True, fastmath={"contract", "arcp", "nsz"})
def _dispersion_strong(data3, mask3, ptab, pf, half, sigma_s, sigma_b, min_local,
                       global_thr, local_sigma, border, cap):  # pragma: no cover - compiled
    """Threshold every panel and label strong pixels (union-find, 8-connectivity).

    Per panel row: the incoming row is cleaned (mask, saturation, NaN) into a ring buffer, the
    column sums over the window's rows are updated (add the incoming row, subtract the
    outgoing one), and one fused loop forms the window sums and applies the test. Each of these
    loops writes one or two arrays and has no loop-carried dependency, so LLVM vectorises it;
    only the rare strong pixels take the branchy labelling path.
    Returns ``(sp_panel, sp_r, sp_c, parent, n)`` for the ``n`` strong pixels in raster order.
    """
    k = 2 * half + 1
    s2 = sigma_s * sigma_s
    b2 = 2.0 * sigma_b * sigma_b
    max_fs = _max_panel_width(ptab)
    n_ring = 2 * half + 2
    ringv = np.zeros((n_ring, max_fs))
    ringg = np.zeros((n_ring, max_fs))
    width = max_fs + 2 * half
    # column sums over the rows in the window, with `half` zero columns on each side
    col_s = np.zeros(width)
    col_q = np.zeros(width)
    col_n = np.zeros(width)
    win_s = np.zeros(max_fs)
    win_q = np.zeros(max_fs)
    win_n = np.zeros(max_fs)
    flag = np.zeros(max_fs, np.bool_)
    labels = _new_labels(ptab, cap)
    n = 0
    for p in range(ptab.shape[0]):
        lead = ptab[p, 0]
        ss0 = ptab[p, 1]
        fs0 = ptab[p, 2]
        nss = ptab[p, 3]
        nfs = ptab[p, 4]
        gain = pf[p, 0]
        max_adu = pf[p, 1]
        floor = pf[p, 2]
        thr_adu = global_thr * gain
        col_s[:] = 0.0
        col_q[:] = 0.0
        col_n[:] = 0.0
        for rr in range(-half, nss):
            rin = rr + half
            rout = rr - half - 1
            has_in = rin < nss
            has_out = rout >= 0
            if has_in:
                drow = data3[lead, ss0 + rin, fs0 : fs0 + nfs]
                mrow = mask3[lead, ss0 + rin, fs0 : fs0 + nfs]
                rv = ringv[rin % n_ring]
                rg = ringg[rin % n_ring]
                row_ok = (rin >= border) & (rin < nss - border)
                for c in range(nfs):
                    v = np.float64(drow[c])
                    good = ((mrow[c] != 0) & (v < max_adu) & row_ok  # NaN compares False
                            & (c >= border) & (c < nfs - border))
                    rv[c] = v if good else 0.0
                    rg[c] = 1.0 if good else 0.0
                if has_out:
                    ov = ringv[rout % n_ring]
                    og = ringg[rout % n_ring]
                    for c in range(nfs):
                        col_s[half + c] += rv[c] - ov[c]
                    for c in range(nfs):
                        col_q[half + c] += rv[c] * rv[c] - ov[c] * ov[c]
                    for c in range(nfs):
                        col_n[half + c] += rg[c] - og[c]
                else:
                    for c in range(nfs):
                        col_s[half + c] += rv[c]
                    for c in range(nfs):
                        col_q[half + c] += rv[c] * rv[c]
                    for c in range(nfs):
                        col_n[half + c] += rg[c]
            elif has_out:
                ov = ringv[rout % n_ring]
                og = ringg[rout % n_ring]
                for c in range(nfs):
                    col_s[half + c] -= ov[c]
                for c in range(nfs):
                    col_q[half + c] -= ov[c] * ov[c]
                for c in range(nfs):
                    col_n[half + c] -= og[c]
            if rr < 0:
                continue
            r = rr
            rv = ringv[r % n_ring]
            rg = ringg[r % n_ring]
            any_strong = False
            # fused window sums + test; fixed-size sums for the usual windows
            if k == 7:
                for c in range(nfs):
                    f = _strong_test(rv[c], rg[c] > 0.0, _sum7(col_n, c), _sum7(col_s, c),
                                     _sum7(col_q, c), gain, floor, thr_adu, min_local, s2,
                                     b2, local_sigma)
                    flag[c] = f
                    any_strong |= f
            elif k == 9:
                for c in range(nfs):
                    f = _strong_test(rv[c], rg[c] > 0.0, _sum9(col_n, c), _sum9(col_s, c),
                                     _sum9(col_q, c), gain, floor, thr_adu, min_local, s2,
                                     b2, local_sigma)
                    flag[c] = f
                    any_strong |= f
            elif k == 5:
                for c in range(nfs):
                    f = _strong_test(rv[c], rg[c] > 0.0, _sum5(col_n, c), _sum5(col_s, c),
                                     _sum5(col_q, c), gain, floor, thr_adu, min_local, s2,
                                     b2, local_sigma)
                    flag[c] = f
                    any_strong |= f
            else:
                win_s[:nfs] = col_s[:nfs]
                win_q[:nfs] = col_q[:nfs]
                win_n[:nfs] = col_n[:nfs]
                for d in range(1, k):
                    for c in range(nfs):
                        win_s[c] += col_s[c + d]
                    for c in range(nfs):
                        win_q[c] += col_q[c + d]
                    for c in range(nfs):
                        win_n[c] += col_n[c + d]
                for c in range(nfs):
                    f = _strong_test(rv[c], rg[c] > 0.0, win_n[c], win_s[c], win_q[c], gain,
                                     floor, thr_adu, min_local, s2, b2, local_sigma)
                    flag[c] = f
                    any_strong |= f
            if not any_strong:
                continue
            labels = _room_for_row(labels, n, nfs)
            for c in range(nfs):
                if flag[c]:
                    n = _add_strong(labels, p, r, c, nfs, n)
    return labels[0], labels[1], labels[2], labels[3], n


@njit(cache=True, nogil=True)
def _radial_strong(data3, mask3, bins3, n_bins, ptab, pf, snr, iterations, global_thr,
                   border, cap):  # pragma: no cover - compiled
    """peakfinder8-style: per-ring mean/sigma with sigma clipping, then threshold + label."""
    bsum = np.zeros(n_bins)
    bsq = np.zeros(n_bins)
    bcnt = np.zeros(n_bins)
    thr = np.full(n_bins, np.inf)
    mean = np.zeros(n_bins)
    for it in range(iterations + 1):
        bsum[:] = 0.0
        bsq[:] = 0.0
        bcnt[:] = 0.0
        for p in range(ptab.shape[0]):
            lead = ptab[p, 0]
            ss0 = ptab[p, 1]
            fs0 = ptab[p, 2]
            gain = pf[p, 0]
            max_adu = pf[p, 1]
            for r in range(border, ptab[p, 3] - border):
                for c in range(border, ptab[p, 4] - border):
                    b = bins3[lead, ss0 + r, fs0 + c]
                    if b < 0 or mask3[lead, ss0 + r, fs0 + c] == 0:
                        continue
                    v = np.float64(data3[lead, ss0 + r, fs0 + c])
                    if not (v == v and v < max_adu):
                        continue
                    v = v / gain
                    if it > 0 and v > thr[b]:
                        continue
                    bsum[b] += v
                    bsq[b] += v * v
                    bcnt[b] += 1.0
        for b in range(n_bins):
            if bcnt[b] >= 2:
                m = bsum[b] / bcnt[b]
                var = max((bsq[b] - bsum[b] * m) / (bcnt[b] - 1.0), 0.0)
                mean[b] = m
                thr[b] = m + snr * math.sqrt(var)
            else:
                mean[b] = 0.0
                thr[b] = np.inf
    labels = _new_labels(ptab, cap)
    n = 0
    for p in range(ptab.shape[0]):
        lead = ptab[p, 0]
        ss0 = ptab[p, 1]
        fs0 = ptab[p, 2]
        nfs = ptab[p, 4]
        gain = pf[p, 0]
        max_adu = pf[p, 1]
        for r in range(ptab[p, 3]):
            row = ss0 + r
            labels = _room_for_row(labels, n, nfs)
            if r < border or r >= ptab[p, 3] - border:
                continue
            for c in range(border, nfs - border):
                col = fs0 + c
                b = bins3[lead, row, col]
                if b < 0 or mask3[lead, row, col] == 0:
                    continue
                v = np.float64(data3[lead, row, col])
                if not (v == v and v < max_adu):
                    continue
                v = v / gain
                if v <= thr[b] or v <= global_thr:
                    continue
                n = _add_strong(labels, p, r, c, nfs, n)
    return labels[0], labels[1], labels[2], labels[3], n


_BG_GAP_PX = 1


@njit(cache=True, nogil=True)
def _ring_background(data3, mask3, keys, p, lead, ss0, fs0, nss, nfs, gain, max_adu,
                     r0, r1, c0, c1, margin):  # pragma: no cover - compiled
    """Mean, variance (photons) and count of good non-strong pixels in the ring of width
    ``margin`` around the box rows [r0, r1], cols [c0, c1] (panel coordinates) grown by
    ``_BG_GAP_PX`` (the gap keeps the spot's own tails out of its background)."""
    r0 -= _BG_GAP_PX
    r1 += _BG_GAP_PX
    c0 -= _BG_GAP_PX
    c1 += _BG_GAP_PX
    ra = max(r0 - margin, 0)
    rb = min(r1 + margin, nss - 1)
    ca = max(c0 - margin, 0)
    cb = min(c1 + margin, nfs - 1)
    s = 0.0
    q = 0.0
    cnt = 0
    for r in range(ra, rb + 1):
        inner_row = r0 <= r <= r1
        for c in range(ca, cb + 1):
            if inner_row and c0 <= c <= c1:
                continue
            row = ss0 + r
            col = fs0 + c
            if mask3[lead, row, col] == 0:
                continue
            key = (p * 1048576 + r) * 1048576 + c
            at = np.searchsorted(keys, key)
            if at < keys.shape[0] and keys[at] == key:  # a strong pixel
                continue
            v = np.float64(data3[lead, row, col])
            if not (v == v and v < max_adu):
                continue
            v = v / gain
            s += v
            q += v * v
            cnt += 1
    if cnt == 0:
        return 0.0, 0.0, 0
    m = s / cnt
    var = 0.0
    if cnt > 1:
        var = max((q - s * m) / (cnt - 1), 0.0)
    return m, var, cnt


@njit(cache=True, nogil=True)
def _spot_stats(data3, mask3, ptab, pf, sp_panel, sp_r, sp_c, parent, n,
                min_pix, max_pix, margin):  # pragma: no cover - compiled
    """Group strong pixels by root and measure each spot.

    Returns ``(panel, fs_px, ss_px, intensity, background, snr, n_pixels)`` arrays.
    """
    # strong pixels come in raster order (panel, r, c): sorted keys for membership tests
    keys = np.empty(n, np.int64)
    for i in range(n):
        keys[i] = (np.int64(sp_panel[i]) * 1048576 + sp_r[i]) * 1048576 + sp_c[i]
    spot_of_root = np.full(n, -1, np.int64)
    spot_id = np.empty(n, np.int64)
    n_spots = 0
    for i in range(n):
        root = _find_root(parent, i)
        if spot_of_root[root] < 0:
            spot_of_root[root] = n_spots
            n_spots += 1
        spot_id[i] = spot_of_root[root]
    cnt = np.zeros(n_spots, np.int64)
    panel = np.zeros(n_spots, np.int64)
    rmin = np.full(n_spots, 1 << 30, np.int64)
    rmax = np.full(n_spots, -1, np.int64)
    cmin = np.full(n_spots, 1 << 30, np.int64)
    cmax = np.full(n_spots, -1, np.int64)
    raw = np.zeros(n_spots)
    for i in range(n):
        j = spot_id[i]
        p = sp_panel[i]
        r = sp_r[i]
        c = sp_c[i]
        cnt[j] += 1
        panel[j] = p
        rmin[j] = min(rmin[j], r)
        rmax[j] = max(rmax[j], r)
        cmin[j] = min(cmin[j], c)
        cmax[j] = max(cmax[j], c)
        v = np.float64(data3[ptab[p, 0], ptab[p, 1] + r, ptab[p, 2] + c])
        raw[j] += v / pf[p, 0]
    keep = np.zeros(n_spots, np.bool_)
    bg = np.zeros(n_spots)
    bg_var = np.zeros(n_spots)
    bg_n = np.zeros(n_spots)
    for j in range(n_spots):
        if cnt[j] < min_pix or cnt[j] > max_pix:
            continue
        keep[j] = True
        p = panel[j]
        m, var, nb = _ring_background(data3, mask3, keys, p, ptab[p, 0], ptab[p, 1], ptab[p, 2],
                                      ptab[p, 3], ptab[p, 4], pf[p, 0], pf[p, 1],
                                      rmin[j], rmax[j], cmin[j], cmax[j], margin)
        if nb < 4:  # crowded or at a masked edge: look further out
            m, var, nb = _ring_background(data3, mask3, keys, p, ptab[p, 0], ptab[p, 1],
                                          ptab[p, 2], ptab[p, 3], ptab[p, 4], pf[p, 0],
                                          pf[p, 1], rmin[j], rmax[j], cmin[j], cmax[j],
                                          margin + 3)
        bg[j] = m
        bg_var[j] = var
        bg_n[j] = nb
    sw = np.zeros(n_spots)
    swf = np.zeros(n_spots)
    sws = np.zeros(n_spots)
    sf = np.zeros(n_spots)
    ssum = np.zeros(n_spots)
    for i in range(n):
        j = spot_id[i]
        if not keep[j]:
            continue
        p = sp_panel[i]
        r = sp_r[i]
        c = sp_c[i]
        v = np.float64(data3[ptab[p, 0], ptab[p, 1] + r, ptab[p, 2] + c]) / pf[p, 0]
        w = max(v - bg[j], 0.0)
        sw[j] += w
        swf[j] += w * (c + 0.5)
        sws[j] += w * (r + 0.5)
        sf[j] += c + 0.5
        ssum[j] += r + 0.5
    n_out = 0
    for j in range(n_spots):
        if keep[j]:
            n_out += 1
    o_panel = np.empty(n_out, np.int32)
    o_fs = np.empty(n_out)
    o_ss = np.empty(n_out)
    o_int = np.empty(n_out)
    o_bg = np.empty(n_out)
    o_snr = np.empty(n_out)
    o_npix = np.empty(n_out, np.int32)
    k = 0
    for j in range(n_spots):
        if not keep[j]:
            continue
        o_panel[k] = panel[j]
        if sw[j] > 0.0:
            o_fs[k] = swf[j] / sw[j]
            o_ss[k] = sws[j] / sw[j]
        else:
            o_fs[k] = sf[j] / cnt[j]
            o_ss[k] = ssum[j] / cnt[j]
        inten = raw[j] - cnt[j] * bg[j]
        o_int[k] = inten
        o_bg[k] = bg[j]
        var_i = max(inten, 0.0)
        if bg_n[j] > 0:
            var_i += cnt[j] * bg_var[j] * (1.0 + cnt[j] / bg_n[j])
        if var_i > 0.0:
            o_snr[k] = inten / math.sqrt(var_i)
        else:
            o_snr[k] = 0.0
        o_npix[k] = cnt[j]
        k += 1
    return o_panel, o_fs, o_ss, o_int, o_bg, o_snr, o_npix


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


_STRONG_CAPACITY = 4096
_FLOOR_ROW_STEP = 16  # every 16th row: ~12 rows per CSPAD ASIC, ~150k pixel pairs

def _find_spots_raw(
    data: np.ndarray, detector: Detector, params: SpotParams, gain_adu_per_photon: float | None
) -> tuple[tuple[np.ndarray, ...], FrameLayout]:
    a = np.asarray(data)
    if a.ndim < 2:
        raise GeometryError(f"frame data must have at least 2 dimensions, got shape {a.shape}")
    data3 = as_data3(a)
    prep = frame_layout(detector, tuple(a.shape[:-2]), (a.shape[-2], a.shape[-1]))
    pf = prep.pf(detector, gain_adu_per_photon)
    if params.method == "dispersion" and params.noise_model == "auto":
        _noise_floor(data3, prep.mask3, prep.ptab, pf, _FLOOR_ROW_STEP, pf[:, ::2])
    if params.method == "dispersion":
        sp_panel, sp_r, sp_c, parent, n = _dispersion_strong(
            data3, prep.mask3, prep.ptab, pf, params.half_window, float(params.sigma_strong),
            float(params.sigma_background), float(params.min_local),
            float(params.global_threshold_photons), params.noise_model == "local",
            int(params.border_px), _STRONG_CAPACITY,
        )
    else:
        bins3, n_bins = prep.radial_bins(detector, float(params.radial.bin_px))
        sp_panel, sp_r, sp_c, parent, n = _radial_strong(
            data3, prep.mask3, bins3, n_bins, prep.ptab, pf, float(params.radial.snr),
            int(params.radial.iterations), float(params.global_threshold_photons),
            int(params.border_px), _STRONG_CAPACITY,
        )
    stats = _spot_stats(
        data3, prep.mask3, prep.ptab, pf, sp_panel, sp_r, sp_c, parent, n,
        int(params.min_spot_pixels), int(params.max_spot_pixels),
        int(params.background_margin_px),
    )
    if params.min_snr > 0 and stats[0].size:
        keep = np.flatnonzero(stats[5] >= params.min_snr)
        if keep.size < stats[0].size:
            stats = tuple(a[keep] for a in stats)
    return stats, prep


_ICE_RINGS: dict[float, np.ndarray] = {}


def ice_ring_d_spacings_a(d_min_a: float = 1.0) -> np.ndarray:
    """Distinct d-spacings (Å, descending) of hexagonal ice Ih reflections with ``d >= d_min_a``.

    Computed from the ice Ih cell and space group (systematic absences removed), as DIALS does.

    >>> [round(float(d), 3) for d in ice_ring_d_spacings_a(3.0)]
    [3.895, 3.669, 3.441]
    """
    key = float(d_min_a)
    if key not in _ICE_RINGS:
        cell = as_unit_cell(ICE_IH_CELL)
        sg = as_space_group(ICE_IH_SPACE_GROUP)
        hkl = miller_indices(cell, sg, key)
        b = np.array(cell.frac.mat.tolist(), dtype=float).T
        d = d_spacing_a(hkl @ b.T)
        _ICE_RINGS[key] = np.unique(np.round(d, 4))[::-1]
    return _ICE_RINGS[key]


def _resolution_keep(d: np.ndarray, params: SpotParams) -> np.ndarray:
    keep = np.ones(d.shape, dtype=bool)
    if params.d_min_a is not None:
        keep &= d >= params.d_min_a
    if params.d_max_a is not None:
        keep &= d <= params.d_max_a
    if params.filter_ice_rings and d.size:
        rings_inv = 1.0 / ice_ring_d_spacings_a(1.0)
        with np.errstate(divide="ignore"):
            inv = 1.0 / d
        dist = np.min(np.abs(inv[:, None] - rings_inv[None, :]), axis=1)
        keep &= dist > params.ice_ring_half_width_inv_a
    return keep


def _table(stats: tuple[np.ndarray, ...], d: np.ndarray) -> SpotTable:
    panel, fs, ss, inten, bg, snr, npix = stats
    return SpotTable(panel=panel, fs_px=fs, ss_px=ss, intensity=inten, background=bg, snr=snr,
                     n_pixels=npix, d_a=d)


def find_spots(
    frame: Frame,
    params: SpotParams | None = None,
    *,
    gain_adu_per_photon: float | None = None,
    timings: dict[str, float] | None = None,
) -> SpotTable:
    """Find Bragg spots on every panel of a frame.

    Parameters
    ----------
    frame : the still image and its geometry (masks, gains and saturation from its panels).
    params : spot-finding parameters (defaults: :class:`SpotParams`).
    gain_adu_per_photon : the detector's gain, overriding every panel's ``adu_per_photon`` when
        given; panels without a gain and no override are taken as 1 ADU per photon. LCLS CSPAD
        CBFs declare a placeholder 1.0; their one-photon peak is at ~9 ADU (use 9, see the
        module docstring).
    timings : when given, ``spots_threshold_s`` (threshold, labelling and spot measurement in the
        compiled kernels) and ``spots_resolution_s`` (d-spacings and filters) are added to it.

    Returns
    -------
    SpotTable
        One row per spot: panel index into ``frame.detector``, centroid ``fs_px``/``ss_px`` in
        panel pixels (centre of the first pixel at 0.5), background-subtracted ``intensity`` and
        per-pixel ``background`` in photons, ``snr``, ``n_pixels`` and ``d_a`` (Å).

    Examples
    --------
    >>> from sfxflow.models import Beam, Detector, Frame, Panel
    >>> panel = Panel("p0", (-10.0, -10.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (200, 200))
    >>> rng = np.random.default_rng(0)
    >>> img = rng.poisson(2.0, (200, 200)).astype(np.float32)
    >>> img[120:123, 60:63] += 60.0
    >>> spots = find_spots(Frame(img, Detector((panel,)), Beam(1.0)))
    >>> len(spots), round(float(spots.fs_px[0]), 1), round(float(spots.ss_px[0]), 1)
    (1, 61.5, 121.5)
    """
    params = params if params is not None else SpotParams()
    t0 = time.perf_counter()
    stats, _ = _find_spots_raw(frame.data, frame.detector, params, gain_adu_per_photon)
    t1 = time.perf_counter()
    panel, fs, ss = stats[0], stats[1], stats[2]
    if panel.size:
        d = d_spacing_a(pixels_to_q(frame.detector, frame.beam, panel, fs, ss))
    else:
        d = np.zeros(0)
    table = _table(stats, d)
    if params.d_min_a is not None or params.d_max_a is not None or params.filter_ice_rings:
        keep = _resolution_keep(d, params)
        if not keep.all():
            table = table.select(np.flatnonzero(keep))
    if timings is not None:
        timings["spots_threshold_s"] = timings.get("spots_threshold_s", 0.0) + (t1 - t0)
        timings["spots_resolution_s"] = (
            timings.get("spots_resolution_s", 0.0) + time.perf_counter() - t1
        )
    return table


def find_spots_panel(
    data: np.ndarray,
    panel: Panel,
    params: SpotParams | None = None,
    *,
    beam: Beam | None = None,
    panel_index: int = 0,
    gain_adu_per_photon: float | None = None,
) -> SpotTable:
    """Find spots on one panel's pixels (``data`` of shape ``panel.shape``).

    ``data_index``/``data_origin`` of the panel are ignored: ``data`` is the panel itself. The
    panel's mask, gain and saturation level apply. ``d_a`` is computed when ``beam`` is given
    (``nan`` otherwise) and the resolution filters apply only then. ``panel_index`` is written
    into the ``panel`` column.

    >>> panel = Panel("p0", (-10.0, -10.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (64, 64))
    >>> img = np.ones((64, 64), np.float32)
    >>> img[10:12, 20:22] = 50.0
    >>> t = find_spots_panel(img, panel, panel_index=3)
    >>> int(t.panel[0]), float(t.fs_px[0]), float(t.ss_px[0]), int(t.n_pixels[0])
    (3, 21.0, 11.0, 4)
    """
    params = params if params is not None else SpotParams()
    a = np.asarray(data)
    if a.shape != panel.shape:
        raise GeometryError(
            f"panel {panel.name}: data shape {a.shape} differs from panel shape {panel.shape}"
        )
    from dataclasses import replace

    local = replace(panel, data_index=(), data_origin=(0, 0))
    detector = Detector((local,))
    stats, _ = _find_spots_raw(a, detector, params, gain_adu_per_photon)
    n = stats[0].shape[0]
    if beam is not None and n:
        d = d_spacing_a(pixels_to_q(detector, beam, stats[0], stats[1], stats[2]))
    else:
        d = np.full(n, np.nan)
    table = _table(stats, d)
    if beam is not None:
        keep = _resolution_keep(d, params)
        if not keep.all():
            table = table.select(np.flatnonzero(keep))
    if panel_index:
        table = SpotTable(**{**table.to_dict(), "panel": np.full(len(table), panel_index)})
    return table
