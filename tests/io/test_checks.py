"""Frames that cannot be diffraction images, and absurd beams (issue 10, item 6)."""

from __future__ import annotations

import numpy as np
import pytest

from sfxflow.io.checks import beam_problem, frame_problem
from sfxflow.models import Beam, Detector, Frame, Panel, photon_energy_ev_to_wavelength_a

PANEL = Panel("p0", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (8, 8), max_adu=16000.0)
DET = Detector((PANEL,))


def _frame(data: np.ndarray, energy_ev: float = 9500.0) -> Frame:
    return Frame(data, DET, Beam(photon_energy_ev_to_wavelength_a(energy_ev)), "x.cxi", 3)


@pytest.mark.parametrize(("data", "reason"), [
    (np.full((8, 8), np.nan, np.float32), "every pixel is NaN"),
    (np.full((8, 8), np.inf, np.float32), "every pixel is +inf"),
    (np.zeros((8, 8), np.int32), "every pixel is zero"),
    (np.zeros((8, 8), np.float32), "every pixel is zero"),
    (np.full((8, 8), 16000, np.int32), "every pixel is saturated (>= max_adu 16000)"),
    (np.full((8, 8), 65535, np.uint16), "saturated"),
])
def test_frames_without_information_are_named(data, reason):
    assert reason in frame_problem(_frame(data))


def test_ordinary_frames_pass():
    rng = np.random.default_rng(1)
    data = rng.poisson(5, (8, 8)).astype(np.float32)
    assert frame_problem(_frame(data)) == ""
    data[:2] = np.nan  # masked gaps as NaN are normal
    assert frame_problem(_frame(data)) == ""
    data[2:] = 0.0
    data[7, 7] = 1.0  # a very weak frame is still a frame
    assert frame_problem(_frame(data)) == ""


@pytest.mark.parametrize("energy_ev", [1.0, 1e9])
def test_absurd_photon_energy_is_named_with_the_range(energy_ev):
    text = beam_problem(Beam(photon_energy_ev_to_wavelength_a(energy_ev)))
    assert "photon energy" in text and "accepted range 620 eV to 6.2 MeV" in text
    assert ("1 eV" in text) if energy_ev == 1.0 else ("1e+03 MeV" in text)
    assert "photon energy" in frame_problem(_frame(np.ones((8, 8), np.float32), energy_ev))


@pytest.mark.parametrize("energy_ev", [700.0, 9500.0, 25000.0])
def test_real_photon_energies_pass(energy_ev):
    assert beam_problem(Beam(photon_energy_ev_to_wavelength_a(energy_ev))) == ""


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_frame_of_float32_maxima_is_saturated_without_a_max_adu(dtype):
    # before: '' (no max_adu in the geometry) - the frame went on as a plain miss
    panel = Panel("p0", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (8, 8))
    data = np.full((8, 8), np.finfo(np.float32).max, dtype)
    frame = Frame(data, Detector((panel,)), Beam(photon_energy_ev_to_wavelength_a(9500.0)))
    assert frame_problem(frame) == "every pixel is saturated (at the float32 maximum 3.40282e+38)"
