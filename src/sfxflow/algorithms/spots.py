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

Speed (``sfxflow bench spots``): the dispersion method sweeps the frame once, a band of rows at
a time (the panels side by side in the data, e.g. the 8 ASICs of a CSPAD row, share one ring
row with zero columns between them). Per row: clean the incoming row into the ring and slide
the column sums in the same loop, then, panel by panel (its gain, floor and threshold as
scalars), one vectorised loop forms each pixel's 9 x 9 sums of count and value and applies the
tests that need no variance; the variance test and the labelling run on the 1-2 % of pixels
that pass. The 9-column sums are ``(quad[c] + quad[c + 4]) + col[c + 8]`` with ``quad`` the
sums of 4 columns: the association of the plain 9-term sum (the same bits for any data) in 5
additions instead of 8. The counts and sums of values are float32 (eight lanes, not four)
while they are exact: every value an integer of magnitude at most ``2**23 / k**2`` (ADU
counts, uint16 stills, pedestal-subtracted CBFs), so every column, 4-column and window sum is
an exact float32 integer; the cleaning loop checks each value as it copies it (a boolean
or-ed in the loop: no measurable cost) and a band where one fails is swept again, with the
rest of the frame, in float64 sums (the earlier labels dropped). The 9 x 9 flag loop applies
the strong test in float32 too, as a superset of the float64 test (threshold rounded down,
``sigma_strong**2`` scaled by 1 - 2**-10, far above float32 rounding), and the flagged pixels
are tested again in float64 before the variance test (sums of squares stay float64): the
same strong pixels, bit for bit, as the float64 sweep. The cleaning loop's saturation test
compares each value in float32 too (for float32 and 8/16-bit data: the level rounded up,
:func:`_saturation`, decides as the float64 compare), 2-3 % of the frame's time. Each band's
spots are measured right
after the band is swept, while its pixels are in cache (measured after the whole frame, the
background rings cost ~3 cache misses per ring row: 0.4-0.7 ms more per CSPAD frame); the
strong pixels' values are kept with their labels and ``min_snr`` applies as the spots are
measured. About 2.5-2.55 ms per Mpixel on one core of the development VM on the stills,
2.55-2.7 on the CSPAD CBFs with CSPAD_CBF_SETTINGS (3.0 and 3.05-3.2 before the float32
sums), ~8-9x one vectorised read of the frame on the stills, ~19x on the CBFs (whose 2-frame
floor sits in cache). What costs on a CBF with CSPAD_CBF_SETTINGS (2.3 Mpixel, ms per
frame): the sweep without candidates ~4.5 (~2.0 ms/Mpixel; in float64 sums and compares
~5.3: of that the cleaning and sliding ~2.2, the 4-column sums ~1.2 and the flag loop
~1.5, the byte scan of the flags ~0.6; each band row is cleaned into the ring in 8 short
loops, one per ASIC, and with per-ASIC gains also flagged in 8), the ~20,000 candidates'
tests and labelling ~0.75 (0.9 % of the pixels vs 0.6 % on the stills), the spot
measurement ~0.5 (~4,300 components, mostly single pixels; 700-1,000 measured), the noise
floor ~0.3 (2,300 calls of 194 pixels, taken row by row across each band, the data's memory
order: a per-panel 2-D variant was 3x slower, not vectorised). Per-row numba calls with
array arguments cost ~100-300 ns each (reference counting), hence the helpers are inlined. A
float32 first test was tried before and dropped (the flag loop 40 % cheaper, but its row
checks cost more); with the check as a boolean or-ed in the cleaning loop and float32 sums
it pays (above). Tried and dropped: the variance test on every pixel in the vectorised loop
(no branchy candidate pass) was 15-30 % slower overall; per panel, sliding a row's column
sums and testing it right away (its buffers in L1) was 3-5 % slower on the CBFs; cleaning
per panel but sliding the whole band row in one loop, 0-4 % slower; the flag loop over a
whole band row with per-column settings (not only where the panels share them), ~10 % slower
on one panel; the flagged pixels found by a trailing-zero count instead of a byte scan, no
faster; the background ring's rows as runs left and right of the box, 1-4 % slower;
compiled d-spacings are not the bits of numpy's einsum and norm.
Tried with the float32 sums (same-process A/B on the CBFs and stills): no column sums of
squares slid with every pixel, ``q`` formed from the ring for the flagged pixels alone (per
column, kept for the row), saved ~0.35 ms per CBF frame in the sweep but cost ~1.4 in the
~20,000 candidates (a 9-row dependent chain per column); float32 sums with the float64 test
alone, no faster (the flag loop is what gains); the exactness flag as an int32 or-reduction,
~25 % of the cleaning loop (a boolean: free); a "no flag in this row" summary from the flag
loop, no faster (on the CBFs nearly every band row has candidates); the nonzero flag words
compacted branch-free before the scan, no faster; 9-term window sums without the 4-column
sums, 3 % slower; one flag loop per band row with per-column settings on the CBFs (8
per-ASIC gains), 3 % slower; the candidates' count and sum from the 4-column sums, or the
pre-test without the good-pixel flag, no faster.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from sfxflow.algorithms.detector_tables import (
    FrameLayout,
    as_data3,
    detector_tables,
    frame_layout,
)
from sfxflow.algorithms.geometry import d_spacing_a, lab_to_q, miller_indices, pixels_to_lab_mm
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
# Compiled kernels: labelling
# --------------------------------------------------------------------------------------------

# no reassociation: the vectorised and the scalar evaluation of a test round alike
_FASTMATH = {"contract", "arcp", "nsz"}
_ROW_ID = 1048576  # row ids: band (or panel) * _ROW_ID + row


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
def _link_strong(rowlab, rowtag, parent, j, row_id, n):  # pragma: no cover - compiled
    """Label strong pixel ``n`` in column ``j`` of row ``row_id`` and union it with its already
    visited 8-connected neighbours (left, and the three above).

    Labels live in two row buffers (``rowlab[row_id & 1]``) tagged with the row id, so nothing
    frame-sized is touched (sparse writes into a frame-sized label image cost page faults).
    """
    parent[n] = n
    cur = row_id & 1
    rowlab[cur, j] = n
    rowtag[cur, j] = row_id
    if j > 0 and rowtag[cur, j - 1] == row_id:
        _union(parent, n, rowlab[cur, j - 1])
    prev = 1 - cur
    for jj in range(max(j - 1, 0), min(j + 2, rowlab.shape[1])):
        if rowtag[prev, jj] == row_id - 1:
            _union(parent, n, rowlab[prev, jj])


@njit(cache=True, nogil=True)
def _new_labels(width, cap):  # pragma: no cover - compiled
    """The strong-pixel list and its labelling buffers (rows of ``width`` columns), as one
    tuple for both kernels: ``(sp_panel, sp_r, sp_c, parent, rowlab, rowtag, sp_v)``, with
    ``sp_v`` the pixels' values (ADU, so measuring the spots reads no frame data)."""
    # tags start at -2: row ids are >= 0, so no first row (id 0) sees a row "id - 1" above
    return (np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int32),
            np.empty(cap, np.int32), np.zeros((2, width), np.int32),
            np.full((2, width), -2, np.int64), np.empty(cap))


@njit(cache=True, nogil=True, inline="always")
def _room_for_row(labels, n, nfs):  # pragma: no cover - compiled
    """``labels`` with room for a whole row of ``nfs`` more strong pixels after the ``n``."""
    sp_panel, sp_r, sp_c, parent, rowlab, rowtag, sp_v = labels
    if n + nfs <= sp_panel.shape[0]:
        return labels
    return (_grow(sp_panel), _grow(sp_r), _grow(sp_c), _grow(parent), rowlab, rowtag,
            _grow(sp_v))


@njit(cache=True, nogil=True, inline="always")
def _add_strong(labels, p, r, c, v, j, row_id, n):  # pragma: no cover - compiled
    """Record strong pixel ``n`` at panel ``p`` (r, c) with value ``v`` (ADU), labelled in
    column ``j`` of row ``row_id`` of the labelling buffers; returns ``n + 1``."""
    sp_panel, sp_r, sp_c, parent, rowlab, rowtag, sp_v = labels
    sp_panel[n] = p
    sp_r[n] = r
    sp_c[n] = c
    sp_v[n] = v
    _link_strong(rowlab, rowtag, parent, j, row_id, n)
    return n + 1


# --------------------------------------------------------------------------------------------
# Compiled kernels: the dispersion test
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _bright(v, good, cnt, s, gs, thr_adu, min_local, s2):  # pragma: no cover - compiled
    """The dispersion method's tests that need no variance (Poisson-type noise models).

    ``cnt``, ``s``: number and sum (ADU) of the window's good pixels; ``gs``: ``cnt`` times
    the expected background variance (ADU²), ``max(gain * s, cnt * floor)``.
    v - mean > sigma_s sqrt(expected var)  <=>  a^2 > s2 N gs with a = N (v - mean) > 0.
    """
    a = cnt * v - s
    return (good & (v > thr_adu) & (cnt >= min_local) & (a > 0.0) & (a * a > s2 * cnt * gs)
            & (gs > 0.0))


@njit(cache=True, nogil=True, inline="always")
def _dispersed(cnt, s, q, gs, b2, disp_free):  # pragma: no cover - compiled
    """The index-of-dispersion test: var > expected var * (1 + sigma_b sqrt(2 / (N - 1))),
    i.e. A - gs (N - 1) > gs sigma_b sqrt(2 (N - 1)) with A = N q - s^2 = N (N - 1) var
    (``q``: the window's sum of squares; ``disp_free`` passes it where it does not apply)."""
    nm1 = cnt - 1.0
    lhs = (cnt * q - s * s) - gs * nm1
    return (lhs > 0.0) & (disp_free | (lhs * lhs > gs * gs * b2 * nm1))


@njit(cache=True, nogil=True, inline="always")
def _strong_local(v, good, cnt, s, q, gain, floor, thr_adu, min_local, s2,
                  b2):  # pragma: no cover - compiled
    """The whole dispersion test with ``noise_model="local"``: the strong test uses the
    window's own variance, (v - mean)^2 > s2 var <=> a^2 (N - 1) > s2 N A; the dispersion
    test passes where the mean is <= 0."""
    a = cnt * v - s
    big_a = cnt * q - s * s
    gs = max(gain * s, cnt * floor)
    strong_s = a * a * (cnt - 1.0) > s2 * cnt * big_a
    return (good & (v > thr_adu) & (cnt >= min_local) & (a > 0.0) & strong_s
            & _dispersed(cnt, s, q, gs, b2, s <= 0.0))


@njit(cache=True, nogil=True, inline="always")
def _box(a, c, k):  # pragma: no cover - compiled
    """``a[c] + ... + a[c + k - 1]``, summed in the order of :func:`_window_sums`."""
    if k == 9:
        return _sum9(a, c)
    if k == 7:
        return _sum7(a, c)
    if k == 5:
        return _sum5(a, c)
    t = a[c]
    for d in range(1, k):
        t += a[c + d]
    return t


@njit(cache=True, nogil=True, inline="always")
def _sum9(a, c):  # pragma: no cover - compiled
    return (((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + ((a[c + 4] + a[c + 5])
            + (a[c + 6] + a[c + 7]))) + a[c + 8]


@njit(cache=True, nogil=True, inline="always")
def _sum7(a, c):  # pragma: no cover - compiled
    return ((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + ((a[c + 4] + a[c + 5]) + a[c + 6])


@njit(cache=True, nogil=True, inline="always")
def _sum5(a, c):  # pragma: no cover - compiled
    return ((a[c] + a[c + 1]) + (a[c + 2] + a[c + 3])) + a[c + 4]


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _quad_sums(col, quad, m):  # pragma: no cover - compiled
    """``quad[c] = (col[c] + col[c + 1]) + (col[c + 2] + col[c + 3])`` for ``c < m``: the
    9-column window sum is then ``(quad[c] + quad[c + 4]) + col[c + 8]``, the association of
    :func:`_sum9` (the same bits) in 5 additions instead of 8."""
    for c in range(m):
        quad[c] = (col[c] + col[c + 1]) + (col[c + 2] + col[c + 3])


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _window_sums(col, win, k, m):  # pragma: no cover - compiled
    """``win[c] = col[c] + ... + col[c + k - 1]`` for ``c < m``: the column sums summed over
    the window's columns (fixed-size sums for the usual windows, in the order of
    :func:`_box`; a branch on ``k`` inside the loop would stop LLVM vectorising it)."""
    if k == 9:
        for c in range(m):
            win[c] = _sum9(col, c)
    elif k == 7:
        for c in range(m):
            win[c] = _sum7(col, c)
    elif k == 5:
        for c in range(m):
            win[c] = _sum5(col, c)
    else:
        for c in range(m):
            win[c] = col[c]
        for d in range(1, k):
            for c in range(m):
                win[c] += col[c + d]


@njit(cache=True, nogil=True)
def _bands(ptab, half):  # pragma: no cover - compiled
    """Group the panels that cover the same rows of one data plane (equal lead index, first
    row and row count: the ASICs side by side in a CSPAD or Jungfrau row) into bands. A band
    is swept as one row buffer, its panels at ring columns ``off[p]`` with ``half`` zero
    columns before, between and after them, so no window reaches across a panel edge and
    each row costs one pass instead of one per panel.

    Returns ``(members, starts, off, width)``: band b holds the panels
    ``members[starts[b]:starts[b + 1]]`` (in panel order) in ``width[b]`` ring columns.
    """
    n = ptab.shape[0]
    key = (ptab[:, 0] * _ROW_ID + ptab[:, 1]) * _ROW_ID + ptab[:, 3]
    members = np.argsort(key, kind="mergesort")
    starts = np.zeros(n + 1, np.int64)
    off = np.zeros(n, np.int64)
    width = np.zeros(n, np.int64)
    nb = 0
    o = half
    for i in range(n):
        p = members[i]
        if i > 0 and key[p] != key[members[i - 1]]:
            width[nb] = o
            nb += 1
            starts[nb] = i
            o = half
        off[p] = o
        o += ptab[p, 4] + half
    width[nb] = o
    starts[nb + 1] = n
    return members, starts[: nb + 2], off, width[: nb + 1]


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _clean_slide(drow, mrow, rv, rg, vout, gout, col_n, col_s, col_q, max_adu, lo, hi, one,
                 lim):  # pragma: no cover - compiled
    """Copy one panel row into the ring (bad pixels: masked, saturated, NaN, in the border
    columns outside [lo, hi), as 0 with good flag 0) and slide the column sums down by it in
    the same loop, as :func:`_slide_sums` would (one pass over the row instead of two).
    ``max_adu``: the saturation level in the type of ``x * float32(1)`` (:func:`_saturation`).

    The counts and sums are in the type of ``one`` (float32 or float64: ``x * one`` converts,
    exactly). Returns True when a cleaned value is not an integer of magnitude at most
    ``lim``, the values whose float32 sums are exact (:func:`_dispersion_sweep`; a boolean
    accumulated this way costs nothing measurable, an int32 one ~25 % of the loop)."""
    inexact = False
    for c in range(drow.shape[0]):
        x = drow[c]
        good = (mrow[c] != 0) & (x * np.float32(1.0) < max_adu) & (c >= lo) & (c < hi)
        v = x if good else 0
        rv[c] = v
        rg[c] = good
        a = np.float64(rv[c])
        b = np.float64(vout[c])
        y = rv[c] * one
        inexact |= (y != np.floor(y)) | (np.abs(y) > lim)
        col_n[c] += rg[c] * one - gout[c] * one
        col_s[c] += y - vout[c] * one
        col_q[c] += a * a - b * b
    return inexact


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _slide_sums(vin, gin, vout, gout, col_n, col_s, col_q, one):  # pragma: no cover - compiled
    """Column sums over the window's rows, moved down one row: add the incoming ring row,
    subtract the outgoing one (a zero row where there is none); counts and sums in the type
    of ``one``."""
    for c in range(col_n.shape[0]):
        a = np.float64(vin[c])
        b = np.float64(vout[c])
        col_n[c] += gin[c] * one - gout[c] * one
        col_s[c] += vin[c] * one - vout[c] * one
        col_q[c] += a * a - b * b


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _flag_segment9(rv, rg, col_n, col_s, quad_n, quad_s, seg_par,
                   flag):  # pragma: no cover - compiled
    """:func:`_flag_row` of one panel's columns with the 9 x 9 window: the window sums as
    ``(quad[c] + quad[c + 4]) + col[c + 8]`` (:func:`_quad_sums`, the bits of :func:`_sum9`),
    and :func:`_bright` in the sums' type with the settings ``seg_par`` of
    :func:`_segment_params` (in float32, twice the lanes: a superset of the pixels that pass
    in float64, which :func:`_collect_row` tests again)."""
    m = rv.shape[0]
    gain, floor, thr, min_local, s2, one = (seg_par[0], seg_par[1], seg_par[2], seg_par[3],
                                            seg_par[4], seg_par[5])
    _quad_sums(col_n, quad_n, m + 4)
    _quad_sums(col_s, quad_s, m + 4)
    for c in range(m):
        cnt = (quad_n[c] + quad_n[c + 4]) + col_n[c + 8]
        s = (quad_s[c] + quad_s[c + 4]) + col_s[c + 8]
        gs = max(gain * s, cnt * floor)
        flag[c] = _bright(rv[c] * one, rg[c] != 0, cnt, s, gs, thr, min_local, s2)


@njit(cache=True, nogil=True)
def _segment_params(segments, par, min_local, s2, one):  # pragma: no cover - compiled
    """Per flag segment, its settings for :func:`_flag_segment9` in the type of ``one``:
    ``(gain, floor, thr, min_local, s2, 1)``. In float32 they are rounded so that the test
    passes wherever the float64 test does: the threshold rounded down, a positive floor kept
    positive, and ``s2`` scaled by 1 - 2**-10, far more than the few float32 roundings of
    the strong test (relative 2**-24 each; the window sums and ``cnt * v - s`` are exact,
    see :func:`_dispersion_sweep`). The float64 sums get the same margin: their flags too
    are tested again."""
    out = np.full((segments.shape[0], 6), one)
    for i in range(segments.shape[0]):
        a = segments[i, 0]
        thr = par[2, a]
        out[i, 0] = par[0, a]
        out[i, 1] = par[1, a]
        if par[1, a] > 0.0 and out[i, 1] <= 0:  # no float32 underflow to 0
            out[i, 1] = 1.2e-38
        out[i, 2] = thr
        if out[i, 2] > thr:
            out[i, 2] = thr - abs(thr) * 1e-6
        out[i, 3] = min_local
        out[i, 4] = s2 * (1.0 - 2.0**-10)
    return out


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _flag_row(rv, rg, cols, col_q, win, win_q, gain, floor, thr, k, min_local, s2, b2,
              local_sigma, segments, seg_par, flag):  # pragma: no cover - compiled
    """Flag the pixels of one band row from the sums of the column sums ``cols`` (n, s) and
    ``col_q`` over their windows (into ``win``, ``win_q``). With a Poisson-type noise model
    the flag is :func:`_bright`, a necessary condition that 1-2 % of the pixels pass: the
    variance is tested on those alone (:func:`_collect_row`); with ``"local"`` it is the
    whole test. Loops without branches: LLVM vectorises them (the default 9 x 9 window panel
    by panel, ``segments`` = (first tested column, width) of each, with its settings
    ``seg_par`` as scalars in the sums' type; the gaps' flags stay 0; other windows through
    ``win``, in float64)."""
    if k == 9 and not local_sigma:
        for i in range(segments.shape[0]):
            a = segments[i, 0]
            b = a + segments[i, 1]
            _flag_segment9(rv[a:b], rg[a:b], cols[0, a : b + 8], cols[1, a : b + 8],
                           win[0, a : b + 4], win[1, a : b + 4], seg_par[i], flag[a:b])
        return
    for i in range(2):
        _window_sums(cols[i], win[i], k, rv.shape[0])
    if local_sigma:  # the variance only where it is needed
        _window_sums(col_q, win_q, k, rv.shape[0])
    win_n, win_s = win[0], win[1]
    for c in range(rv.shape[0]):
        cnt = np.float64(win_n[c])
        s = np.float64(win_s[c])
        if local_sigma:
            flag[c] = _strong_local(np.float64(rv[c]), rg[c] != 0, cnt, s, win_q[c], gain[c],
                                    floor[c], thr[c], min_local, s2, b2)
        else:
            gs = max(gain[c] * s, cnt * floor[c])
            flag[c] = _bright(np.float64(rv[c]), rg[c] != 0, cnt, s, gs, thr[c], min_local,
                              s2)


@njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _collect_row(flag, n_cols, cols, col_q, par, k, tests, band, r, row_id, labels,
                 n):  # pragma: no cover - compiled
    """Record the flagged pixels of one band row as strong pixels, in raster order, labelled;
    with a Poisson-type noise model only those that pass :func:`_bright` in float64 (the
    9 x 9 flags are a superset, :func:`_segment_params`) and the variance test as well
    (``band``: each ring column's panel, the panels' ring offsets, ``half``, the ring and the
    row's ring row, for the pixels' values; ``tests`` as in :func:`_sweep_band`)."""
    col_panel, off, half, ring_v, slot = band
    min_local, s2, b2, _, local_sigma = tests
    words = flag.view(np.uint64)
    labels = _room_for_row(labels, n, n_cols)
    for w in range((n_cols + 7) // 8):
        if words[w] == 0:  # eight pixels at once: most rows have no flagged pixel
            continue
        for c in range(8 * w, min(8 * w + 8, n_cols)):
            if flag[c] == 0:
                continue
            j = c + half
            if not local_sigma:
                cnt = np.float64(_box(cols[0], c, k))
                s = np.float64(_box(cols[1], c, k))
                gs = max(par[0, c] * s, cnt * par[1, c])
                if not (_bright(np.float64(ring_v[slot, j]), True, cnt, s, gs, par[2, c],
                                min_local, s2)
                        and _dispersed(cnt, s, _box(col_q, c, k), gs, b2, False)):
                    continue
            p = col_panel[j]
            n = _add_strong(labels, p, r, j - off[p], np.float64(ring_v[slot, j]), j, row_id, n)
    return labels, n


@njit(cache=True, nogil=True)
def _band_setup(ptab, pf, panels, off, w, global_thr, bufs):  # pragma: no cover - compiled
    """Clear a band's ring and column sums; per ring column the panel's gain, noise floor
    (ADU²) and threshold (ADU), and the panel index (-1 in the gaps, whose pixels are never
    good)."""
    ring_v, ring_g, cols, col_q, par, col_panel, _, _, _ = bufs
    ring_v[:, :w] = 0
    ring_g[:, :w] = 0
    cols[:, :w] = 0.0
    col_q[:w] = 0.0
    par[0, :w] = 1.0
    par[1, :w] = 0.0
    par[2, :w] = np.inf
    col_panel[:w] = -1
    for p in panels:
        o = off[p]
        nfs = ptab[p, 4]
        par[0, o : o + nfs] = pf[p, 0]
        par[1, o : o + nfs] = pf[p, 2]
        par[2, o : o + nfs] = global_thr * pf[p, 0]
        col_panel[o : o + nfs] = p


@njit(cache=True, nogil=True, inline="always")
def _ring_row_in(data3, mask3, ptab, max_t, panels, off, w, rin, border, ring_v, ring_g,
                 slot_in, slot_out, cols, col_q, one, lim):  # pragma: no cover - compiled
    """Clean band row ``rin`` of every panel into ring row ``slot_in`` and slide the column
    sums down (ring row ``slot_out`` leaves them). The gap columns stay zero in every ring
    row, so their sums need no update. Returns True where a value is no integer of at most
    ``lim`` (:func:`_clean_slide`)."""
    p0 = panels[0]
    lead = ptab[p0, 0]
    row = ptab[p0, 1] + rin
    nss = ptab[p0, 3]
    vin = ring_v[slot_in]
    gin = ring_g[slot_in]
    vout = ring_v[slot_out]
    gout = ring_g[slot_out]
    if rin < border or rin >= nss - border:
        vin[:w] = 0
        gin[:w] = 0
        _slide_sums(vin[:w], gin[:w], vout[:w], gout[:w], cols[0, :w], cols[1, :w], col_q[:w],
                    one)
        return False
    inexact = False
    for p in panels:
        fs0 = ptab[p, 2]
        nfs = ptab[p, 4]
        o = off[p]
        inexact |= _clean_slide(data3[lead, row, fs0 : fs0 + nfs],
                                mask3[lead, row, fs0 : fs0 + nfs], vin[o : o + nfs],
                                gin[o : o + nfs], vout[o : o + nfs], gout[o : o + nfs],
                                cols[0, o : o + nfs], cols[1, o : o + nfs], col_q[o : o + nfs],
                                max_t[p], border, nfs - border, one, lim)
    return inexact


@njit(cache=True, nogil=True)
def _flag_segments(ptab, panels, off, half, m, par):  # pragma: no cover - compiled
    """The (first tested column, width) of each panel of a band, or one segment for the
    whole band row where its panels share their gain, noise floor and threshold (one loop
    per row instead of one per panel: a CSPAD row of 8 ASICs is ~10 % faster; the gaps'
    pixels are never good, so their flags stay 0)."""
    p0 = panels[0]
    uniform = True
    for p in panels:
        for i in range(3):
            uniform &= par[i, off[p]] == par[i, off[p0]]
    if uniform:
        return np.array([[off[p0] - half, m]], np.int64)
    segments = np.empty((panels.shape[0], 2), np.int64)
    for i in range(panels.shape[0]):
        segments[i, 0] = off[panels[i]] - half
        segments[i, 1] = ptab[panels[i], 4]
    return segments


@njit(cache=True, nogil=True)
def _sweep_band(data3, mask3, ptab, pf, max_t, panels, off, w, row_id0, half, border, tests,
                bufs, lim, labels, n):  # pragma: no cover - compiled
    """Threshold and label one band, row by row: the incoming row is cleaned into the ring
    (``k + 1`` rows, and a last row kept zero) as the column sums slide down one row, and the
    window sums of the row ``half`` above are tested (:func:`_flag_row`).

    Returns ``(labels, n, exact)``: with float32 counts and sums (the dtype of the buffers
    ``bufs``; ``lim`` finite), the sweep stops at the first value that is no integer of at
    most ``lim`` (``exact`` False: the band is to be swept again in float64)."""
    ring_v, ring_g, cols, col_q, par, col_panel, win, win_q, flag = bufs
    one = np.ones(1, cols.dtype)[0]
    check = lim < np.inf  # float64 sums (lim inf) are never abandoned
    lim_t = np.full(1, one)
    lim_t[0] = lim  # in the sums' type: the check compares values without converting them
    min_local, s2, b2, global_thr, local_sigma = tests
    k = 2 * half + 1
    zero = ring_v.shape[0] - 1
    _band_setup(ptab, pf, panels, off, w, global_thr, bufs)
    nss = ptab[panels[0], 3]
    m = w - 2 * half  # tested columns: ring columns half .. w - half - 1
    segments = _flag_segments(ptab, panels, off, half, m, par)
    seg_par = _segment_params(segments, par[:, half:], min_local, s2, one)
    flag[:m] = 0  # the gaps' flags (not written by the 9 x 9 flag loop)
    for rr in range(-half, nss):
        rin = rr + half
        rout = rr - half - 1
        slot_out = rout % (k + 1) if rout >= 0 else zero
        if rin < nss:
            inexact = _ring_row_in(data3, mask3, ptab, max_t, panels, off, w, rin, border, ring_v,
                                   ring_g, rin % (k + 1), slot_out, cols, col_q, one, lim_t[0])
            if check and inexact:
                return labels, n, False
        else:
            _slide_sums(ring_v[zero, :w], ring_g[zero, :w], ring_v[slot_out, :w],
                        ring_g[slot_out, :w], cols[0, :w], cols[1, :w], col_q[:w], one)
        if rr < 0:
            continue
        slot = rr % (k + 1)
        _flag_row(ring_v[slot, half : w - half], ring_g[slot, half : w - half], cols, col_q,
                  win, win_q, par[0, half : w - half], par[1, half : w - half],
                  par[2, half : w - half], k, min_local, s2, b2, local_sigma, segments, seg_par,
                  flag)
        labels, n = _collect_row(flag, m, cols, col_q, par[:, half:], k, tests,
                                 (col_panel, off, half, ring_v, slot), rr, row_id0 + rr,
                                 labels, n)
    return labels, n, True


@njit(cache=True, nogil=True)
def _dispersion_strong(data3, mask3, ptab, pf, half, sigma_s, sigma_b, min_local,
                       global_thr, local_sigma, border, cap):  # pragma: no cover - compiled
    """The strong pixels of :func:`_dispersion_spots`: ``(sp_panel, sp_r, sp_c, parent, n)``
    for the ``n`` strong pixels (in raster order within each panel)."""
    tests = (min_local, sigma_s * sigma_s, 2.0 * sigma_b * sigma_b, global_thr, local_sigma)
    labels, n, _ = _dispersion_sweep(data3, mask3, ptab, pf, half, tests, border, cap, None)
    return labels[0], labels[1], labels[2], labels[3], n


@njit(cache=True, nogil=True)
def _dispersion_spots(data3, mask3, ptab, pf, half, sigma_s, sigma_b, min_local,
                      global_thr, local_sigma, border, cap,
                      limits):  # pragma: no cover - compiled
    """Threshold every panel, label strong pixels (union-find, 8-connectivity) and measure
    the spots (:func:`_spot_columns`; ``limits``: see :func:`_spot_stats`)."""
    tests = (min_local, sigma_s * sigma_s, 2.0 * sigma_b * sigma_b, global_thr, local_sigma)
    _, _, spots = _dispersion_sweep(data3, mask3, ptab, pf, half, tests, border, cap, limits)
    return _spot_columns(spots, ptab.shape[0])


@njit(cache=True, nogil=True)
def _saturation(data3, max_adu):  # pragma: no cover - compiled
    """Each panel's saturation level ``max_adu`` (float64) in the type of ``x * float32(1)``
    for the frame's values ``x`` (float32 for float32 and 8/16-bit integer data), rounded up,
    so ``x * float32(1) < max_t[p]`` is ``float64(x) < max_adu[p]`` for every value: the
    cleaning loop compares without converting each value to float64."""
    max_t = np.full(max_adu.shape[0], data3[0, 0, 0] * np.float32(1.0))
    big = np.full(1, max_t[0])
    big[0] = np.inf
    for p in range(max_adu.shape[0]):
        max_t[p] = max_adu[p]
        if max_t[p] < max_adu[p]:  # rounded down: the next value of the type up
            max_t[p] = np.nextafter(max_t[p], big[0])
    return max_t


@njit(cache=True, nogil=True)
def _sweep_buffers(dtype, k, max_w, sum_dtype):  # pragma: no cover - compiled
    """The buffers of :func:`_sweep_band`: ``(ring_v, ring_g, cols, col_q, par, col_panel,
    win, win_q, flag)``, the counts and sums (``cols``, ``win``) in ``sum_dtype``."""
    return (np.zeros((k + 2, max_w), dtype), np.zeros((k + 2, max_w), np.uint8),
            np.zeros((2, max_w), sum_dtype), np.zeros(max_w), np.zeros((3, max_w)),
            np.zeros(max_w, np.int64), np.zeros((2, max_w), sum_dtype), np.zeros(max_w),
            np.zeros(max_w + 8 - max_w % 8, np.uint8))


@njit(cache=True, nogil=True)
def _dispersion_sweep(data3, mask3, ptab, pf, half, tests, border, cap,
                      limits):  # pragma: no cover - compiled
    """Threshold every panel and label strong pixels (union-find, 8-connectivity); with
    ``limits``, measure each band's spots right after sweeping it, while its pixels are still
    in cache (measured after the whole frame, each spot's background ring cost ~3 cache
    misses per row; rows of spots to :func:`_new_spots`).

    Panels side by side in the data are swept together, one band of rows at a time
    (:func:`_bands`). Per row: the incoming row is cleaned (mask, saturation, NaN, border)
    into a ring buffer in the data's own dtype, the column sums over the window's rows slide
    down (add the incoming row, subtract the outgoing one), and one loop forms each pixel's
    window sums and applies the cheap tests; the variance test runs on the 1-2 % of pixels
    that pass them. The loops have no branches and no loop-carried dependency, so LLVM
    vectorises them; only the rare flagged pixels take the branchy path.
    Returns ``(labels, n, spots)``.
    """
    members, starts, off, width = _bands(ptab, half)
    max_w = width.max()
    k = 2 * half + 1
    bufs64 = _sweep_buffers(data3.dtype, k, max_w, np.float64)
    bufs32 = _sweep_buffers(data3.dtype, k, max_w, np.float32)
    # float32 counts and sums while they are exact: integers of magnitude at most lim, whose
    # window sums (k * k values) stay below 2**24; the variance test and the sums of squares
    # stay float64. "local" uses float64 throughout.
    lim = 2.0**23 / (k * k)
    narrow = not tests[4]
    max_t = _saturation(data3, pf[:, 1])
    labels = _new_labels(max_w, cap)
    spots = _new_spots(data3.shape)
    n = 0
    for b in range(width.shape[0]):
        n0 = n
        panels = members[starts[b] : starts[b + 1]]
        if narrow:
            labels, n, narrow = _sweep_band(data3, mask3, ptab, pf, max_t, panels, off, width[b],
                                            b * _ROW_ID, half, border, tests, bufs32, lim,
                                            labels, n)
            if not narrow:  # not exact in float32: this band and the rest in float64
                n = n0
                labels[5][:] = -2  # the row tags of the abandoned sweep
        if not narrow:
            labels, n, _ = _sweep_band(data3, mask3, ptab, pf, max_t, panels, off, width[b],
                                       b * _ROW_ID, half, border, tests, bufs64, np.inf,
                                       labels, n)
        if limits is not None:
            spots = _spot_stats(data3, mask3, ptab, pf, labels, n0, n, limits, spots)
    return labels, n, spots


_FLOOR_CLIP2 = 36.0  # clip neighbour differences at 6 sigma: drops spots, keeps photon noise


@njit(cache=True, nogil=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def _pair_moments(drow, mrow, max_adu, clip):  # pragma: no cover - compiled
    """Sum of squared differences, sum of values and number of the neighbouring good pixel
    pairs along one row whose squared difference is at most ``clip`` (reassociated sums:
    vectorised; the estimate is a statistic, its last bits do not matter)."""
    acc = 0.0
    acc_v = 0.0
    cnt = 0.0
    for c in range(drow.shape[0] - 1):
        v0 = np.float64(drow[c])
        v1 = np.float64(drow[c + 1])
        d2 = (v1 - v0) * (v1 - v0)
        ok = ((mrow[c] != 0) & (mrow[c + 1] != 0) & (v0 < max_adu) & (v1 < max_adu)
              & (d2 <= clip))
        # selects into named values first: that form LLVM vectorises (NaN pixels select 0)
        d2_ok = d2 if ok else 0.0
        sum_ok = v0 + v1 if ok else 0.0
        acc += d2_ok
        acc_v += sum_ok
        cnt += np.float64(ok)
    return acc, acc_v, cnt


@njit(cache=True, nogil=True, inline="always")
def _floor_round(data3, mask3, ptab, pf, panels, row_step, clip, done,
                 acc):  # pragma: no cover - compiled
    """One clipping round of :func:`_noise_floor` on the panels of one band: ``acc[p]`` =
    the sums of :func:`_pair_moments` over panel ``p``'s sampled rows, in row order. Row by
    row across the band (the data's memory order: prefetched better than panel by panel)."""
    p0 = panels[0]
    lead = ptab[p0, 0]
    for p in panels:
        acc[p, :] = 0.0
    for r in range(ptab[p0, 1], ptab[p0, 1] + ptab[p0, 3], row_step):
        for p in panels:
            if done[p]:
                continue
            fs0 = ptab[p, 2]
            nfs = ptab[p, 4]
            a, b, c = _pair_moments(data3[lead, r, fs0 : fs0 + nfs],
                                    mask3[lead, r, fs0 : fs0 + nfs], pf[p, 1], clip[p])
            acc[p, 0] += a
            acc[p, 1] += b
            acc[p, 2] += c


@njit(cache=True, nogil=True)
def _noise_floor(data3, mask3, ptab, pf, row_step, out):  # pragma: no cover - compiled
    """Per panel, a robust background variance (ADU²) from differences of neighbouring pixels
    along fs on every ``row_step``-th row: three rounds of clipping at 3 sigma (so spots and
    hot pixels drop out), corrected for the clipping; insensitive to smooth background
    gradients. Written to ``out[p]``.
    """
    members, starts, _, _ = _bands(ptab, 0)
    n = ptab.shape[0]
    clip = np.full(n, np.inf)
    est = np.zeros(n)
    mean = np.zeros(n)
    done = np.zeros(n, np.bool_)
    acc = np.zeros((n, 3))
    for b in range(starts.shape[0] - 1):
        panels = members[starts[b] : starts[b + 1]]
        for _ in range(3):
            _floor_round(data3, mask3, ptab, pf, panels, row_step, clip, done, acc)
            for p in panels:
                if done[p]:
                    continue
                if acc[p, 2] < 2.0:
                    est[p] = 0.0
                    done[p] = True
                    continue
                # var(v1 - v0) = 2 var(v); a normal clipped at 3 sigma keeps 97.3% of its
                # variance
                est[p] = acc[p, 0] / acc[p, 2] / 2.0
                mean[p] = acc[p, 1] / acc[p, 2] / 2.0
                clip[p] = _FLOOR_CLIP2 * 2.0 * est[p]
    for p in range(n):
        # Poisson data: variance = gain * mean, so the background's own index of dispersion
        # is the effective gain (raises a declared gain that is too low, e.g. 1 for ADU data)
        if mean[p] > 0.0 and est[p] / mean[p] > pf[p, 0]:
            out[p, 0] = est[p] / mean[p]
        # no photons in the mean (pedestal-subtracted, empty background): noise floor instead
        out[p, 1] = est[p] if mean[p] <= 0.0 else 0.0


@njit(cache=True, nogil=True)
def _radial_spots(data3, mask3, bins3, n_bins, ptab, pf, snr, iterations, global_thr,
                  border, cap, limits):  # pragma: no cover - compiled
    """peakfinder8-style: per-ring mean/sigma with sigma clipping, then threshold, label and
    measure the spots (:func:`_spot_columns`)."""
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
    max_fs = 1
    for p in range(ptab.shape[0]):
        max_fs = max(max_fs, ptab[p, 4])
    labels = _new_labels(max_fs, cap)
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
                v_adu = np.float64(data3[lead, row, col])
                if not (v_adu == v_adu and v_adu < max_adu):
                    continue
                v = v_adu / gain
                if v <= thr[b] or v <= global_thr:
                    continue
                n = _add_strong(labels, p, r, c, v_adu, c, p * _ROW_ID + r, n)
    spots = _spot_stats(data3, mask3, ptab, pf, labels, 0, n, limits, _new_spots(data3.shape))
    return _spot_columns(spots, ptab.shape[0])


_BG_GAP_PX = 1


@njit(cache=True, nogil=True)
def _new_spots(shape3):  # pragma: no cover - compiled
    """The measured spots of a frame as they are found, ``(bits, rows, n_rows)``: one bit per
    pixel of the frame data, set on the strong pixels (the membership test of the background
    rings, 36 kB per Mpixel), and one row per spot (see :func:`_spot_stats`)."""
    bits = np.zeros(shape3[0] * shape3[1] * shape3[2] // 8 + 1, np.uint8)
    return bits, np.empty((256, 7)), 0


@njit(cache=True, nogil=True)
def _set_strong_bits(bits, shape3, ptab, sp_panel, sp_r, sp_c, n0,
                     n):  # pragma: no cover - compiled
    """Set the bits of strong pixels ``n0 .. n - 1``."""
    n_ss = shape3[1]
    n_fs = shape3[2]
    for i in range(n0, n):
        p = sp_panel[i]
        at = (ptab[p, 0] * n_ss + ptab[p, 1] + sp_r[i]) * n_fs + ptab[p, 2] + sp_c[i]
        bits[at >> 3] |= np.uint8(1 << (at & 7))


@njit(cache=True, nogil=True)
def _ring_background(data3, mask3, bits, lead, ss0, fs0, nss, nfs, gain, max_adu,
                     r0, r1, c0, c1, margin):  # pragma: no cover - compiled
    """Mean, variance (photons) and count of good non-strong pixels in the ring of width
    ``margin`` around the box rows [r0, r1], cols [c0, c1] (panel coordinates) grown by
    ``_BG_GAP_PX`` (the gap keeps the spot's own tails out of its background)."""
    r0 -= _BG_GAP_PX
    r1 += _BG_GAP_PX
    c0 -= _BG_GAP_PX
    c1 += _BG_GAP_PX
    n_ss = data3.shape[1]
    n_fs = data3.shape[2]
    s = 0.0
    q = 0.0
    cnt = 0
    for r in range(max(r0 - margin, 0), min(r1 + margin, nss - 1) + 1):
        inner_row = r0 <= r <= r1
        row = ss0 + r
        for c in range(max(c0 - margin, 0), min(c1 + margin, nfs - 1) + 1):
            if inner_row and c0 <= c <= c1:
                continue
            col = fs0 + c
            at = (lead * n_ss + row) * n_fs + col
            if mask3[lead, row, col] == 0 or bits[at >> 3] & (1 << (at & 7)):
                continue  # masked or a strong pixel
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
def _panel_order(panel, n_panels):  # pragma: no cover - compiled
    """Indices that sort ``panel`` (a stable counting sort)."""
    start = np.zeros(n_panels + 1, np.int64)
    for p in panel:
        start[p + 1] += 1
    for p in range(n_panels):
        start[p + 1] += start[p]
    order = np.empty(panel.shape[0], np.int64)
    for i in range(panel.shape[0]):
        order[start[panel[i]]] = i
        start[panel[i]] += 1
    return order


@njit(cache=True, nogil=True)
def _spot_ids(sp_panel, parent, n0, n, n_panels):  # pragma: no cover - compiled
    """The strong pixels ``n0 .. n - 1`` (whole components) in raster order of the panels
    (panel, row, column; the sweep order interleaves the panels of a band) and each one's
    spot (``spot_id[i - n0]``), numbered in that order. Returns ``(order, spot_id,
    n_spots)``."""
    order = _panel_order(sp_panel[n0:n], n_panels) + n0
    spot_of_root = np.full(n - n0, -1, np.int64)
    spot_id = np.empty(n - n0, np.int64)
    n_spots = 0
    for i in order:
        root = _find_root(parent, i) - n0
        if spot_of_root[root] < 0:
            spot_of_root[root] = n_spots
            n_spots += 1
        spot_id[i - n0] = spot_of_root[root]
    return order, spot_id, n_spots


@njit(cache=True, nogil=True)
def _spot_boxes(labels, pf, order, spot_id, n0, n_spots):  # pragma: no cover - compiled
    """Per spot: pixel count, panel, bounding box ``(rmin, rmax, cmin, cmax)`` and the sum of
    its pixels (photons)."""
    sp_panel, sp_r, sp_c, _, _, _, sp_v = labels
    cnt = np.zeros(n_spots, np.int64)
    panel = np.zeros(n_spots, np.int64)
    box = np.empty((n_spots, 4), np.int64)
    box[:, 0::2] = 1 << 30
    box[:, 1::2] = -1
    raw = np.zeros(n_spots)
    for i in order:
        j = spot_id[i - n0]
        p = sp_panel[i]
        r = sp_r[i]
        c = sp_c[i]
        cnt[j] += 1
        panel[j] = p
        box[j, 0] = min(box[j, 0], r)
        box[j, 1] = max(box[j, 1], r)
        box[j, 2] = min(box[j, 2], c)
        box[j, 3] = max(box[j, 3], c)
        raw[j] += sp_v[i] / pf[p, 0]
    return cnt, panel, box, raw


@njit(cache=True, nogil=True)
def _spot_backgrounds(data3, mask3, ptab, pf, bits, keep, panel, box,
                      margin):  # pragma: no cover - compiled
    """Per kept spot: the mean, variance and count of its background ring (a wider ring
    where fewer than 4 pixels are left)."""
    n_spots = keep.shape[0]
    bg = np.zeros((n_spots, 3))
    for j in range(n_spots):
        if not keep[j]:
            continue
        p = panel[j]
        for extra in (0, 3):  # crowded or at a masked edge: look further out
            m, var, nb = _ring_background(data3, mask3, bits, ptab[p, 0], ptab[p, 1],
                                          ptab[p, 2], ptab[p, 3], ptab[p, 4], pf[p, 0],
                                          pf[p, 1], box[j, 0], box[j, 1], box[j, 2],
                                          box[j, 3], margin + extra)
            if nb >= 4:
                break
        bg[j, 0] = m
        bg[j, 1] = var
        bg[j, 2] = nb
    return bg


@njit(cache=True, nogil=True)
def _spot_centroids(labels, pf, order, spot_id, n0, keep, bg):  # pragma: no cover - compiled
    """Per spot: sums of the background-subtracted photons (clipped at 0) and of their
    products with the pixel centres, and the plain sums of the centres: columns
    ``(w, w fs, w ss, fs, ss)``."""
    sp_panel, sp_r, sp_c, _, _, _, sp_v = labels
    acc = np.zeros((keep.shape[0], 5))
    for i in order:
        j = spot_id[i - n0]
        if not keep[j]:
            continue
        p = sp_panel[i]
        r = sp_r[i]
        c = sp_c[i]
        v = sp_v[i] / pf[p, 0]
        w = max(v - bg[j, 0], 0.0)
        acc[j, 0] += w
        acc[j, 1] += w * (c + 0.5)
        acc[j, 2] += w * (r + 0.5)
        acc[j, 3] += c + 0.5
        acc[j, 4] += r + 0.5
    return acc


@njit(cache=True, nogil=True)
def _spot_stats(data3, mask3, ptab, pf, labels, n0, n, limits,
                spots):  # pragma: no cover - compiled
    """Group the strong pixels ``n0 .. n - 1`` (whole components) by root and measure each
    spot of ``limits[0] .. limits[1]`` pixels (background ring ``limits[2]`` wide), in raster
    order of the panels; ``spots`` (:func:`_new_spots`) with a row appended per spot whose
    SNR is at least ``limits[3]`` (when > 0): ``(panel, fs_px, ss_px, intensity,
    background, snr, n_pixels)``."""
    min_pix, max_pix, margin, min_snr = limits
    bits, rows, n_rows = spots
    order, spot_id, n_spots = _spot_ids(labels[0], labels[3], n0, n, ptab.shape[0])
    cnt, panel, box, raw = _spot_boxes(labels, pf, order, spot_id, n0, n_spots)
    keep = (cnt >= min_pix) & (cnt <= max_pix)
    _set_strong_bits(bits, data3.shape, ptab, labels[0], labels[1], labels[2], n0, n)
    bg = _spot_backgrounds(data3, mask3, ptab, pf, bits, keep, panel, box, margin)
    acc = _spot_centroids(labels, pf, order, spot_id, n0, keep, bg)
    while rows.shape[0] < n_rows + n_spots:
        rows = np.concatenate((rows, np.empty_like(rows)))
    for j in np.flatnonzero(keep):
        out = rows[n_rows]
        out[0] = panel[j]
        if acc[j, 0] > 0.0:
            out[1] = acc[j, 1] / acc[j, 0]
            out[2] = acc[j, 2] / acc[j, 0]
        else:
            out[1] = acc[j, 3] / cnt[j]
            out[2] = acc[j, 4] / cnt[j]
        out[3] = raw[j] - cnt[j] * bg[j, 0]
        var_i = max(out[3], 0.0)
        if bg[j, 2] > 0:
            var_i += cnt[j] * bg[j, 1] * (1.0 + cnt[j] / bg[j, 2])
        out[5] = out[3] / math.sqrt(var_i) if var_i > 0.0 else 0.0
        out[4] = bg[j, 0]
        out[6] = cnt[j]
        if min_snr <= 0.0 or out[5] >= min_snr:  # kept (else the next spot overwrites it)
            n_rows += 1
    return bits, rows, n_rows


@njit(cache=True, nogil=True)
def _spot_columns(spots, n_panels):  # pragma: no cover - compiled
    """The measured spots in raster order of the panels (a stable sort by panel: bands
    measured one after the other interleave the panels) as ``(panel, fs_px, ss_px,
    intensity, background, snr, n_pixels)`` arrays."""
    rows = spots[1][: spots[2]]
    order = _panel_order(rows[:, 0].astype(np.int64), n_panels)
    rows = rows[order]
    return (rows[:, 0].astype(np.int32), rows[:, 1].copy(), rows[:, 2].copy(),
            rows[:, 3].copy(), rows[:, 4].copy(), rows[:, 5].copy(),
            rows[:, 6].astype(np.int32))


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
    limits = (int(params.min_spot_pixels), int(params.max_spot_pixels),
              int(params.background_margin_px), float(params.min_snr))
    if params.method == "dispersion":
        stats = _dispersion_spots(
            data3, prep.mask3, prep.ptab, pf, params.half_window, float(params.sigma_strong),
            float(params.sigma_background), float(params.min_local),
            float(params.global_threshold_photons), params.noise_model == "local",
            int(params.border_px), _STRONG_CAPACITY, limits,
        )
    else:
        bins3, n_bins = prep.radial_bins(detector, float(params.radial.bin_px))
        stats = _radial_spots(
            data3, prep.mask3, bins3, n_bins, prep.ptab, pf, float(params.radial.snr),
            int(params.radial.iterations), float(params.global_threshold_photons),
            int(params.border_px), _STRONG_CAPACITY, limits,
        )
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


def _d_spacings_a(detector: Detector, beam: Beam, panel: np.ndarray, fs_px: np.ndarray,
                  ss_px: np.ndarray) -> np.ndarray:
    """The spots' resolution (Å), from the detector's cached panel matrices (rebuilding them
    cost 0.24 ms per CSPAD frame, more than measuring the spots)."""
    matrices = detector_tables(detector).matrices
    lab_mm = pixels_to_lab_mm(detector, panel, fs_px, ss_px, matrices=matrices)
    return d_spacing_a(lab_to_q(lab_mm, beam))


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
        d = _d_spacings_a(frame.detector, frame.beam, panel, fs, ss)
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
        d = _d_spacings_a(detector, beam, stats[0], stats[1], stats[2])
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
