"""The gain check: the one-photon peak of the pixel histogram against the declared gain."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sfxflow.algorithms import layouts
from sfxflow.algorithms.gain import gain_warning, measured_gain, one_photon_peak
from sfxflow.algorithms.simulate import SimulationParams, simulate_frame
from sfxflow.models import Beam, Frame


def _simulated(adu_per_photon: float, panel_gain: float) -> Frame:
    det = layouts.cspad(distance_mm=130.0)
    det = replace(det, panels=tuple(replace(p, adu_per_photon=panel_gain) for p in det.panels))
    params = SimulationParams(adu_per_photon=adu_per_photon, background_photons=0.8,
                              readout_noise_photons=0.15, hit_fraction=1.0)
    image, _ = simulate_frame(det, Beam(wavelength_a=1.3), None, params,
                              np.random.default_rng(3))
    return Frame(image, det, Beam(wavelength_a=1.3))


@pytest.mark.parametrize("gain", [9.0, 32.0])
def test_simulated_gain_is_measured(gain):
    assert measured_gain(_simulated(gain, gain)) == pytest.approx(gain, rel=0.15)


def test_simulated_frame_with_a_placeholder_gain_warns_and_with_the_true_one_not():
    frame = _simulated(32.0, 1.0)  # the header says 1, the data hold 32 ADU per photon
    note = gain_warning(frame, None)
    assert "one-photon peak of the pixel histogram is at 3" in note
    assert "declared gain 1 ADU per photon" in note and "--gain-adu-per-photon" in note
    assert gain_warning(frame, 32.0) == ""
    assert gain_warning(frame, 20.0) == ""      # within 2x: no warning
    assert "declared gain 100" in gain_warning(frame, 100.0)  # too high is as wrong


def test_photon_counts_and_flat_data_give_no_measurement():
    rng = np.random.default_rng(1)
    assert one_photon_peak(rng.poisson(0.5, 100_000)) is None   # gain 1: peaks not separable
    assert one_photon_peak(np.zeros(100_000)) is None
    assert one_photon_peak(np.arange(100)) is None               # too few pixels


@pytest.fixture(scope="module")
def cspad_frames(shared_data):
    from sfxflow.io.sources import open_source

    frames = []
    for path in sorted((shared_data / "lcls-cspad-thermolysin").glob("*.cbf")):
        with open_source(str(path)) as src:
            frames.append(src.read_frame(0))
    if not frames:
        pytest.skip("no CSPAD CBFs in ../shared/data/lcls-cspad-thermolysin")
    return frames


def test_real_cspad_cbfs_warn_without_the_preset_and_not_with_it(cspad_frames):
    from sfxflow.pipeline.config import load_config

    preset_gain = load_config(presets=["cspad-cbf"]).detector.gain_adu_per_photon
    for frame in cspad_frames:
        # documented in algorithms/spots.py: the one-photon peak sits ~9 ADU above the zero peak
        assert measured_gain(frame) == pytest.approx(9.0, abs=1.0)
        note = gain_warning(frame, None)  # the header's placeholder gain of 1
        assert note.startswith("detector gain: the one-photon peak") and "--preset cspad-cbf" in note
        assert gain_warning(frame, preset_gain) == ""
