"""Sanity checks on what a reader returned, before any science sees it.

A frame whose pixels are all NaN, all infinite, all zero or all saturated carries no
information, and an absurd photon energy makes every later step wrong without an error: such
frames are recorded as ``failed`` at stage ``read`` with the reason (:func:`frame_problem`), and
a geometry file with such a beam is refused at the start (:func:`beam_problem`).

>>> import numpy as np
>>> from sfxflow.models import Beam, Detector, Frame, Panel
>>> panel = Panel("p0", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (4, 4), max_adu=1000.0)
>>> ok = Frame(np.arange(16, dtype=np.float32).reshape(4, 4), Detector((panel,)), Beam(1.3))
>>> frame_problem(ok)
''
>>> frame_problem(Frame(np.full((4, 4), np.nan, np.float32), Detector((panel,)), Beam(1.3)))
'every pixel is NaN'
>>> frame_problem(Frame(np.full((4, 4), 1000, np.int32), Detector((panel,)), Beam(1.3)))
'every pixel is saturated (>= max_adu 1000)'
>>> no_limit = Detector((Panel("p0", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (4, 4)),))
>>> frame_problem(Frame(np.full((4, 4), np.finfo(np.float32).max), no_limit, Beam(1.3)))
'every pixel is saturated (at the float32 maximum 3.40282e+38)'
>>> beam_problem(Beam(12398.42 / 1.0))
'photon energy 1 eV (wavelength 12398.4 Å) is outside the accepted range 620 eV to 6.2 MeV (wavelength 0.002 to 20 Å)'
"""

from __future__ import annotations

import math

import numpy as np

from sfxflow.models import Beam, Frame, wavelength_a_to_photon_energy_ev

__all__ = ["WAVELENGTH_RANGE_A", "beam_problem", "frame_problem"]

#: Accepted beam wavelengths in Å: soft X-rays (620 eV) to MeV electrons (0.002 Å); outside
#: this no diffraction geometry of this program is meaningful.
WAVELENGTH_RANGE_A = (0.002, 20.0)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _energy_text(energy_ev: float) -> str:
    for scale, unit in ((1e6, "MeV"), (1e3, "keV")):
        if energy_ev >= scale:
            return f"{energy_ev / scale:.3g} {unit}"
    return f"{energy_ev:.3g} eV"


def beam_problem(beam: Beam) -> str:
    """Why ``beam`` is physically absurd, naming the value and the accepted range; ``''`` if
    it is not."""
    wl = beam.wavelength_a
    lo, hi = WAVELENGTH_RANGE_A
    if lo <= wl <= hi:
        return ""
    energy = wavelength_a_to_photon_energy_ev(wl)
    return (f"photon energy {_energy_text(energy)} (wavelength {wl:.6g} Å) is outside the accepted "
            f"range {_energy_text(wavelength_a_to_photon_energy_ev(hi))} to "
            f"{_energy_text(wavelength_a_to_photon_energy_ev(lo))} (wavelength {lo:g} to {hi:g} Å)")


def frame_problem(frame: Frame) -> str:
    """Why ``frame`` cannot be a diffraction image (``''`` when it may be one).

    Two passes over the pixels (min and max); NaN or infinite values cost a third.
    """
    data = frame.data
    if data.size == 0:
        return "the frame has no pixels"
    lo = data.min()
    hi = data.max()
    if np.issubdtype(data.dtype, np.floating) and not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(data)
        if not finite.any():
            if np.isnan(data).all():
                return "every pixel is NaN"
            if np.isposinf(data).all():
                return "every pixel is +inf"
            if np.isneginf(data).all():
                return "every pixel is -inf"
            return "no pixel has a finite value (NaN or infinite)"
        lo, hi = data[finite].min(), data[finite].max()
    if lo == 0 and hi == 0:
        return "every pixel is zero"
    levels = [p.max_adu for p in frame.detector.panels if math.isfinite(p.max_adu)]
    if levels and lo >= max(levels):
        return f"every pixel is saturated (>= max_adu {max(levels):g})"
    if np.issubdtype(data.dtype, np.integer) and lo == np.iinfo(data.dtype).max:
        return f"every pixel is saturated (at the {data.dtype} maximum {lo})"
    if np.issubdtype(data.dtype, np.floating) and lo >= _FLOAT32_MAX:
        # a detector's "overflow" fill value (or float64 pixels converted from it): like +inf
        return f"every pixel is saturated (at the float32 maximum {_FLOAT32_MAX:g})"
    return beam_problem(frame.beam)
