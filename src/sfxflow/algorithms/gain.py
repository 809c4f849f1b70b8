"""The detector gain read off the data: the one-photon peak of the pixel histogram.

A wrong gain (ADU per photon) silently changes what the spot finder calls significant: the LCLS
CSPAD CBFs declare a placeholder of 1 ADU per photon where their one-photon peak sits ~9 ADU
above the zero peak, and the defaults then find ~1,200-1,400 "spots" per frame instead of
~120-200. :func:`measured_gain` finds the zero-photon and one-photon peaks in the histograms of
the emptiest panels of one frame; :func:`gain_warning` says, in one line, when the declared gain
is off by more than a factor 2.

>>> import numpy as np
>>> from sfxflow.models import Detector, Frame, Panel
>>> rng = np.random.default_rng(0)
>>> photons = rng.poisson(0.6, (256, 256))
>>> data = np.round(photons * 9.0 + rng.normal(0, 1.5, photons.shape)).astype(np.float32)
>>> panel = Panel("p", (0, 0, 100), (1, 0, 0), (0, 1, 0), 0.1, (256, 256))
>>> frame = Frame(data, Detector([panel]), None)
>>> round(measured_gain(frame))
9
>>> gain_warning(frame, 1.0).split(";")[0]
'detector gain: the one-photon peak of the pixel histogram is at 9 ADU, the declared gain 1 ADU per photon'
"""

from __future__ import annotations

from itertools import pairwise
from statistics import median
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sfxflow.models import Frame

__all__ = ["GAIN_TOLERANCE", "gain_warning", "measured_gain", "one_photon_peak"]

#: a declared gain further than this factor from the measured one gets a warning
GAIN_TOLERANCE = 2.0
_MAX_BINS = 400
_PANELS = 16


def one_photon_peak(values: np.ndarray) -> float | None:
    """Distance (ADU) from the zero-photon to the one-photon peak of ``values``' histogram.

    ``None`` when the histogram shows no two separate peaks (too few pixels, a gain below the
    readout noise, or photon counts already).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2000:
        return None
    lo, hi = np.percentile(v, [0.5, 99.0])
    if not hi > lo:
        return None
    width = max(1.0, (hi - lo) / _MAX_BINS)
    n_bins = int(np.ceil((hi - lo) / width)) + 1
    # whole-ADU data: centre the bins on the integers (no empty bins between them)
    edges = np.floor(lo) - 0.5 + width * np.arange(n_bins + 1)
    counts, _ = np.histogram(v, edges)
    smooth = np.convolve(counts, np.ones(3) / 3.0, mode="same")
    floor = 0.01 * smooth.max()
    peaks = [i for i in range(2, len(smooth) - 2)
             if smooth[i] >= floor and smooth[i] == smooth[i - 2:i + 3].max()
             and smooth[i] > smooth[i - 2] and smooth[i] > smooth[i + 2]]
    # the first two peaks from the low end with a real dip between them
    for a, b in pairwise(peaks):
        dip = smooth[a:b + 1].min()
        if dip < 0.85 * min(smooth[a], smooth[b]):
            return float((b - a) * width)
    return None


def measured_gain(frame: Frame, panels: int = _PANELS) -> float | None:
    """The gain (ADU per photon) of ``frame``'s detector from its emptiest panels.

    The median over the ``panels`` panels of lowest median value (the least light: their
    histogram shows the zero- and one-photon peaks best); ``None`` when fewer than half of them
    (and fewer than 3) show the two peaks.
    """
    det = frame.detector
    chosen: list[tuple[float, np.ndarray]] = []
    for i, p in enumerate(det.panels):
        values = np.asarray(frame.panel_data(i))[p.good_mask()]
        if values.size:
            chosen.append((float(np.median(values)), values))
    chosen.sort(key=lambda t: t[0])
    chosen = chosen[:panels]
    found = [g for g in (one_photon_peak(v) for _, v in chosen) if g is not None]
    if not found or len(found) < min(3, max(1, len(chosen) // 2)):
        return None
    return float(median(found))


def gain_warning(frame: Frame, declared: float | None,
                 option: str = "--gain-adu-per-photon") -> str:
    """One line when ``frame``'s one-photon peak and the declared gain differ more than 2x.

    ``declared`` is the configured gain (``None``: the detector's own, 1 when it has none);
    ``option`` is the flag that sets it. ``""`` when they agree or nothing can be measured.
    """
    if declared is None:
        gains = [p.adu_per_photon for p in frame.detector.panels if p.adu_per_photon]
        declared = float(median(gains)) if gains else 1.0
    measured = measured_gain(frame)
    if measured is None or not declared > 0:
        return ""
    if 1.0 / GAIN_TOLERANCE <= measured / declared <= GAIN_TOLERANCE:
        return ""
    return (f"detector gain: the one-photon peak of the pixel histogram is at {measured:.3g} ADU, "
            f"the declared gain {declared:g} ADU per photon; spots will be miscounted: set "
            f"{option} {measured:.3g} (for LCLS CSPAD CBFs: --preset cspad-cbf)")
