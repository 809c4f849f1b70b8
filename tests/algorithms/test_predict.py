"""Prediction: a reflection placed on the Ewald sphere lands at its known pixel, fully recorded;
the profile cutoff, detector shift, absences and the two entry points agree."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.diffraction import ProfileModel, polarisation_factor
from sfxflow.algorithms.geometry import rays_to_pixels
from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.predict import (
    PredictParams,
    detector_max_q_inv_a,
    excitation_errors,
    predict_reflections,
    predict_spots,
    refine_profile,
)
from sfxflow.algorithms.simulate import random_crystal
from sfxflow.models import Beam, Crystal

LAMBDA = 1.0
TWO_THETA = math.radians(8.0)


def _on_sphere_crystal(sg: str = "P 1") -> Crystal:
    """A cubic 10 Å-ish cell rotated so that reflection (1, 0, 0) lies exactly on the Ewald
    sphere, diffracting along ``(sin 2θ, 0, cos 2θ)``."""
    s0 = np.array([0.0, 0.0, 1.0 / LAMBDA])
    s1 = np.array([math.sin(TWO_THETA), 0.0, math.cos(TWO_THETA)]) / LAMBDA
    q = s1 - s0
    a = 1.0 / float(np.linalg.norm(q))
    cell = gemmi.UnitCell(a, a, a, 90, 90, 90)
    qh = q / np.linalg.norm(q)
    beta = math.atan2(-qh[2], qh[0])  # rotation about y taking x onto q
    u = np.array([[math.cos(beta), 0.0, math.sin(beta)], [0.0, 1.0, 0.0],
                  [-math.sin(beta), 0.0, math.cos(beta)]])
    crystal = Crystal.from_u(cell, gemmi.SpaceGroup(sg), u)
    assert np.allclose(crystal.a_matrix @ [1, 0, 0], q, atol=1e-14)
    return crystal


def test_reflection_on_the_sphere_lands_at_its_pixel_with_partiality_one():
    det = simple(100.0, 0.1, 1024)  # fs along +x from x = -51.2 mm, ss along -y from y = 51.2
    beam = Beam(LAMBDA)
    pred = predict_reflections(_on_sphere_crystal(), beam, det, ProfileModel.for_beam(3e-4, beam))
    row = np.flatnonzero(np.all(pred.hkl == [1, 0, 0], axis=1))
    assert row.size == 1
    i = int(row[0])
    assert pred.panel[i] == 0
    assert pred.fs_px[i] == pytest.approx((100.0 * math.tan(TWO_THETA) + 51.2) / 0.1, abs=1e-9)
    assert pred.ss_px[i] == pytest.approx(512.0, abs=1e-9)
    assert abs(pred.excitation_error_inv_a[i]) < 1e-12
    assert pred.partiality[i] == pytest.approx(1.0, abs=1e-12)
    assert pred.d_a[i] == pytest.approx(LAMBDA / (2 * math.sin(TWO_THETA / 2)))
    assert pred.lorentz[i] == 1.0
    # horizontal polarisation: 1 - sin²2θ for a ray in the x-z plane
    assert pred.polarisation[i] == pytest.approx(1.0 - math.sin(TWO_THETA) ** 2)


def test_detector_shift_moves_the_spot_by_the_shift():
    det = simple(100.0, 0.1, 1024)
    beam = Beam(LAMBDA)
    c, prof = _on_sphere_crystal(), ProfileModel.for_beam(3e-4, beam)
    a = predict_reflections(c, beam, det, prof)
    b = predict_reflections(c, beam, det, prof, detector_shift_mm=(0.5, -0.2))
    ia = int(np.flatnonzero(np.all(a.hkl == [1, 0, 0], axis=1))[0])
    ib = int(np.flatnonzero(np.all(b.hkl == [1, 0, 0], axis=1))[0])
    # the panel moves, the ray does not: 0.5 mm along +x is 5 px less fs; 0.2 mm along -y
    # (the slow axis) is 2 px less ss
    assert b.fs_px[ib] - a.fs_px[ia] == pytest.approx(-5.0)
    assert b.ss_px[ib] - a.ss_px[ia] == pytest.approx(-2.0)


def test_predictions_are_within_the_cutoff_and_on_their_rays():
    rng = np.random.default_rng(3)
    c = random_crystal("79 79 38 90 90 90", "P 43 21 2", rng)
    beam = Beam(1.3, 2e-3, divergence_rad=1e-4)
    det = simple()
    prof = ProfileModel.for_beam(4e-4, beam)
    params = PredictParams(cutoff=2.0)
    pred = predict_reflections(c, beam, det, prof, params)
    assert len(pred) > 20
    exc, q = excitation_errors(c, pred.hkl, beam)
    assert np.allclose(exc, pred.excitation_error_inv_a, atol=1e-15)
    assert np.all(np.abs(exc) <= 2.0 * prof.width_inv_a(q) * (1 + 1e-12))
    assert np.all(pred.partiality >= math.exp(-0.5 * 2.0**2) - 1e-12)
    assert np.all(q <= detector_max_q_inv_a(det, beam) * (1 + 1e-12))
    # no systematic absence predicted (00l: l = 4n in P 43 21 2)
    axial = (pred.hkl[:, 0] == 0) & (pred.hkl[:, 1] == 0)
    assert np.all(pred.hkl[axial, 2] % 4 == 0)
    # positions are where the rays q + s0 meet the panel (the numpy intersection agrees)
    k = pred.hkl @ c.a_matrix.T + np.asarray(beam.s0_inv_a)
    panel, fs, ss = rays_to_pixels(det, k)
    assert np.array_equal(panel, pred.panel)
    assert np.allclose(fs, pred.fs_px, atol=1e-9) and np.allclose(ss, pred.ss_px, atol=1e-9)
    assert np.allclose(pred.polarisation, polarisation_factor(k))
    # rows by panel, then ss
    assert np.all(np.diff(pred.ss_px) >= 0)


def test_predict_spots_agrees_with_predict_reflections():
    rng = np.random.default_rng(5)
    c = random_crystal("79 79 38 90 90 90", "P 43 21 2", rng)
    beam = Beam(1.3, 1e-3)
    det = simple()
    prof = ProfileModel.for_beam(3e-4, beam)
    pred = predict_reflections(c, beam, det, prof)
    reach = float(np.max(np.abs(pred.excitation_error_inv_a)))
    spots = predict_spots(c, beam, det, pred.hkl[::-1], reach)
    assert np.array_equal(spots.hkl, pred.hkl[::-1])  # input order kept
    assert np.array_equal(spots.fs_px, pred.fs_px[::-1])
    assert np.array_equal(spots.ss_px, pred.ss_px[::-1])
    # (the search kernel sums the ray's components in its own order: last-bit differences)
    assert np.allclose(spots.excitation_error_inv_a, pred.excitation_error_inv_a[::-1],
                       rtol=0, atol=1e-15)
    assert np.allclose(spots.polarisation, pred.polarisation[::-1], rtol=0, atol=1e-15)
    assert np.allclose(spots.d_a, pred.d_a[::-1], rtol=1e-15)
    assert np.isnan(spots.partiality).all()  # a reach, not a profile model, was given
    # and drops what is beyond its reach
    assert 0 < predict_spots(c, beam, det, pred.hkl, reach / 10).hkl.shape[0] < len(pred)


def test_refine_profile_falls_back_with_few_spots():
    beam = Beam(1.3)
    params = PredictParams(min_spots=5, default_profile_radius_inv_a=2e-4)
    m = refine_profile(np.array([1e-4, 2e-4]), np.array([0.2, 0.3]), beam, params)
    assert m.radius_inv_a == 2e-4


def test_d_min_and_the_polarisation_fraction_reach_the_prediction():
    det = simple(100.0, 0.1, 1024)
    beam = Beam(LAMBDA)
    c, prof = _on_sphere_crystal(), ProfileModel.for_beam(3e-4, beam)
    d_100 = LAMBDA / (2 * math.sin(TWO_THETA / 2))
    # beam polarised along y: a ray in the x-z plane is perpendicular to it, factor 1
    vertical = predict_reflections(c, beam, det, prof, PredictParams(polarisation_fraction=0.0))
    i = int(np.flatnonzero(np.all(vertical.hkl == [1, 0, 0], axis=1))[0])
    assert vertical.polarisation[i] == pytest.approx(1.0)
    # a resolution limit just above d(100) removes (1 0 0) and everything finer
    cut = predict_reflections(c, beam, det, prof, PredictParams(d_min_a=d_100 * 1.001))
    assert not np.any(np.all(cut.hkl == [1, 0, 0], axis=1))
    assert np.all(cut.d_a >= d_100 * 1.001)


def test_refine_profile_is_bounded_and_scaled_by_the_detection_bias():
    beam = Beam(1.3)
    exc = np.random.default_rng(1).normal(0, 4e-4, 400)
    q = np.full(400, 0.3)
    plain = refine_profile(exc, q, beam, PredictParams(detection_bias=1.0)).radius_inv_a
    biased = refine_profile(exc, q, beam, PredictParams(detection_bias=1.5)).radius_inv_a
    assert biased == pytest.approx(1.5 * plain, rel=1e-9)
    # wider than the bounds allow: clipped to the bound, whichever side
    params = PredictParams(min_profile_radius_inv_a=5e-4, max_profile_radius_inv_a=1e-3)
    assert refine_profile(exc * 10, q, beam, params).radius_inv_a == 1e-3
    assert refine_profile(exc / 10, q, beam, params).radius_inv_a == 5e-4
    # non-finite errors do not count towards min_spots
    few = np.array([1e-4, np.nan, np.inf, 2e-4, 3e-4])
    fallback = PredictParams(min_spots=4, default_profile_radius_inv_a=2e-4)
    assert refine_profile(few, np.full(5, 0.3), beam, fallback).radius_inv_a == 2e-4


def test_profile_radius_is_that_of_the_whole_grid_median() -> None:
    """refine_profile's bisection against numpy's median of |ε|/σ(R) over all 97 radii at
    once, interpolated at the first below the half-normal median: the same radius, bit for bit."""
    from sfxflow.algorithms.predict import _HALF_NORMAL_MEDIAN, refine_profile

    params = PredictParams()
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(params.min_spots, 150))
        exc = np.abs(rng.normal(0, 10 ** rng.uniform(-5.5, -2.0), n))
        q = rng.uniform(0.05, 0.6, n)
        beam = Beam(wavelength_a=float(rng.uniform(0.8, 2.0)))
        lo, hi = params.min_profile_radius_inv_a, params.max_profile_radius_inv_a
        grid = np.geomspace(lo, hi, 97)
        terms = ProfileModel.for_beam(0.0, beam).width_inv_a(q) ** 2
        typical = np.median(exc[None, :] / np.sqrt(grid[:, None] ** 2 + terms[None, :]), axis=1)
        if typical[0] <= _HALF_NORMAL_MEDIAN:
            r = lo
        elif typical[-1] >= _HALF_NORMAL_MEDIAN:
            r = hi
        else:
            k = int(np.flatnonzero(typical < _HALF_NORMAL_MEDIAN)[0])
            t0, t1 = typical[k - 1], typical[k]
            frac = (t0 - _HALF_NORMAL_MEDIAN) / (t0 - t1) if t0 != t1 else 0.0
            r = float(np.exp(np.log(grid[k - 1]) + frac * np.log(grid[k] / grid[k - 1])))
        r = min(max(r * params.detection_bias, lo), hi)
        assert refine_profile(exc, q, beam, params).radius_inv_a == r
