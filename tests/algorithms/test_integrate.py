"""Prediction and summation integration against the simulator's truth (a different computation:
the simulator renders erf-integrated Gaussian spots with Poisson and readout noise; integration
only sums pixels)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sfxflow.algorithms import layouts
from sfxflow.algorithms.integrate import (
    Flag,
    IntegrateParams,
    integrate_reflections,
    resolution_limit_a,
)
from sfxflow.algorithms.predict import (
    Prediction,
    PredictParams,
    ProfileModel,
    excitation_errors,
    predict_reflections,
    refine_profile,
)
from sfxflow.algorithms.simulate import SimulationParams, random_crystal, simulate_frame
from sfxflow.models import Detector, Panel


def _with_gain(det: Detector, gain: float) -> Detector:
    return Detector(tuple(replace(p, adu_per_photon=gain) for p in det.panels))


@pytest.fixture(scope="module")
def simulated():
    params = SimulationParams(d_min_a=2.0, crystal_scale_photons=400.0)
    det = _with_gain(layouts.simple(distance_mm=100.0, n_px=1024), params.adu_per_photon)
    beam = params.beam()
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        crystal = random_crystal(params.cell, params.space_group, rng)
        image, truth = simulate_frame(det, beam, crystal, params, rng)
        out.append((crystal, image, truth))
    return params, det, beam, out


def _match(table_hkl: np.ndarray, truth: dict) -> np.ndarray:
    keys = {tuple(x): i for i, x in
            enumerate(np.stack([truth["h"], truth["k"], truth["l"]], axis=1).tolist())}
    return np.array([keys.get(tuple(x), -1) for x in table_hkl.tolist()], dtype=np.int64)


def test_integrated_intensities_and_sigmas_follow_the_truth(simulated):
    _, det, beam, frames = simulated
    z, i_obs, i_true, snr = [], [], [], []
    for crystal, image, truth in frames:
        # the profile width the crystal's own strong reflections give (from truth positions)
        strong = truth["partiality"] > 0.2
        hkl = np.stack([truth["h"], truth["k"], truth["l"]], axis=1)[strong]
        exc, q_len = excitation_errors(crystal, hkl, beam)
        profile = refine_profile(exc, q_len, beam)
        pred = predict_reflections(crystal, beam, det, profile)
        refl = integrate_reflections(image, det, pred)
        idx = _match(refl.hkl, truth)
        ok = (idx >= 0) & (refl["flags"] == 0)
        z.append((refl["intensity"][ok] - truth["intensity_photons"][idx[ok]]) / refl["sigma"][ok])
        i_obs.append(refl["intensity"][ok])
        i_true.append(truth["intensity_photons"][idx[ok]])
        snr.append(truth["snr_true"][idx[ok]])
        # every truth reflection with partiality >= 0.5 is predicted, within 0.5 px
        full = truth["partiality"] >= 0.5
        pidx = _match(pred.hkl, truth)
        hit = np.zeros(len(truth["h"]), bool)
        close = np.hypot(pred.fs_px - truth["fs_px"][np.maximum(pidx, 0)],
                         pred.ss_px - truth["ss_px"][np.maximum(pidx, 0)]) <= 0.5
        hit[pidx[(pidx >= 0) & close]] = True
        assert hit[full].mean() >= 0.95
        assert 1.5 < resolution_limit_a(refl) < 4.0
    zz = np.concatenate(z)
    med = float(np.median(zz))
    robust_sd = 1.4826 * float(np.median(np.abs(zz - med)))
    assert abs(med) < 0.25 and 0.85 < robust_sd < 1.25, (med, robust_sd)
    strong = np.concatenate(snr) >= 10
    cc = np.corrcoef(np.concatenate(i_obs)[strong], np.concatenate(i_true)[strong])[0, 1]
    assert strong.sum() > 30 and cc > 0.98


def test_profile_radius_tracks_the_true_width():
    rng = np.random.default_rng(4)
    beam = SimulationParams().beam()
    for width in (1e-4, 5e-4):
        exc = rng.normal(0.0, width, 300)
        m = refine_profile(exc, np.full(300, 0.3), beam, PredictParams(detection_bias=1.0))
        assert m.width_inv_a(np.array([0.3]))[0] == pytest.approx(width, rel=0.2)
    few = refine_profile(np.array([1e-4]), np.array([0.3]), beam)
    assert few.radius_inv_a == PredictParams().default_profile_radius_inv_a


def _one_spot(mask: np.ndarray | None = None, max_adu: float = np.inf, fs: float = 30.5,
              value: float = 100.0):
    det = Detector((Panel("p", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (100, 100),
                          mask=mask, adu_per_photon=10.0, max_adu=max_adu),))
    img = np.full((100, 100), 20.0)
    c = int(fs)
    img[49:52, c - 1:c + 2] += value
    one = np.ones(1)
    pred = Prediction(np.array([[1, 2, 3]]), np.array([0]), one * fs, one * 50.5, one,
                      one * 0, one, one, one)
    return img, det, pred


def test_flags_for_masked_saturated_edge_and_outliers():
    img, det, pred = _one_spot()
    clean = integrate_reflections(img, det, pred)
    assert clean["flags"][0] == 0 and clean["intensity"][0] == pytest.approx(90.0)
    # sigma: Poisson of the spot plus zero background variance here
    assert clean["sigma"][0] == pytest.approx(np.sqrt(90.0))

    mask = np.ones((100, 100), bool)
    mask[50, 30] = False
    img, det, pred = _one_spot(mask=mask)
    assert integrate_reflections(img, det, pred)["flags"][0] & Flag.MASKED

    img, det, pred = _one_spot(max_adu=100.0)
    assert integrate_reflections(img, det, pred)["flags"][0] & Flag.SATURATED

    img, det, pred = _one_spot(fs=1.5)
    assert integrate_reflections(img, det, pred)["flags"][0] & Flag.EDGE

    img, det, pred = _one_spot()
    img[50, 35] += 5000.0  # a zinger in the background annulus
    refl = integrate_reflections(img, det, pred)
    assert refl["flags"][0] & Flag.BACKGROUND_OUTLIERS
    assert refl["intensity"][0] == pytest.approx(90.0, abs=1.0)


def test_background_plane_and_noise_give_an_honest_sigma():
    rng = np.random.default_rng(7)
    det = Detector((Panel("p", (-5.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (100, 100),
                          adu_per_photon=1.0),))
    ss, fs = np.indices((100, 100)) + 0.5
    z = []
    for _ in range(200):
        mean = 5.0 + 0.05 * fs + 0.03 * ss  # sloped background, no spot
        img = rng.poisson(mean).astype(float)
        one = np.ones(1)
        pred = Prediction(np.array([[1, 0, 0]]), np.array([0]), one * 50.0, one * 50.0, one,
                          one * 0, one, one, one)
        refl = integrate_reflections(img, det, pred, IntegrateParams(outlier_cycles=0))
        z.append(refl["intensity"][0] / refl["sigma"][0])
    assert abs(np.mean(z)) < 0.2 and 0.8 < np.std(z) < 1.2


def test_prediction_off_the_detector_is_empty():
    params = SimulationParams()
    beam = params.beam()
    det = layouts.simple(distance_mm=100.0, n_px=1024)
    far = Detector(tuple(replace(p, origin_mm=(5000.0, 5000.0, 100.0)) for p in det.panels))
    crystal = random_crystal(params.cell, params.space_group, np.random.default_rng(0))
    pred = predict_reflections(crystal, beam, far, ProfileModel.for_beam(3e-4, beam))
    assert len(pred) == 0


def test_small_crystals_index_and_their_profile_follows_their_size():
    """100 nm crystals (broad shape transforms) index and integrate, and the refined profile
    radius is wider than for 2 µm crystals of the same frames' beam."""
    from sfxflow.algorithms.index import misorientation_deg
    from sfxflow.algorithms.simulate import iter_frames
    from sfxflow.models import Frame
    from sfxflow.pipeline.config import load_config
    from sfxflow.pipeline.frame import process_frame

    cfg = load_config(overrides=["target.cell=[93, 93, 130.5, 90, 90, 120]",
                                 "target.space_group='P6122'"])
    det = layouts.simple(distance_mm=100.0, n_px=1024)
    radii = {}
    for label, size in (("small", 1000.0), ("large", 20000.0)):
        sim = SimulationParams(hit_fraction=1.0, crystal_size_min_a=size,
                               crystal_size_max_a=size * 1.1)
        radii[label] = []
        for ft, image, _ in iter_frames(det, sim, 3, seed=21):
            assert size <= ft.size_a <= 1.1 * size
            res = process_frame(Frame(image, det, ft.beam, "x", ft.index), cfg)
            assert res.crystal is not None, res.reason
            assert misorientation_deg(res.crystal, ft.crystal) < 0.1
            (c,) = res.crystals
            assert c.status == "integrated" and c.n_integrated > 100
            radii[label].append(c.profile_radius_inv_a)
    assert min(radii["small"]) > 1.5 * max(radii["large"])
