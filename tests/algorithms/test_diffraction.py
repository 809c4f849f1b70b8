"""The one diffraction model: partiality limits and symmetry, profile width, numba twins equal to
the array functions, polarisation against hand values, and the detector-table cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from sfxflow.algorithms.detector_tables import detector_tables, frame_layout
from sfxflow.algorithms.diffraction import (
    ProfileModel,
    angular_term,
    bandwidth_term_a,
    excitation_error_inv_a,
    lorentz_factor,
    partiality,
    partiality_nb,
    polarisation_factor,
    profile_sigma2_inv_a2,
    profile_sigma2_nb,
    profile_width_inv_a,
    scaled_partiality,
    scaled_partiality_nb,
)
from sfxflow.algorithms.layouts import simple
from sfxflow.models import FWHM_TO_SIGMA, Beam


def test_partiality_is_one_on_the_sphere_falls_to_zero_and_is_symmetric():
    s2 = np.full(7, 3e-4**2)
    eps = np.array([0.0, 1e-4, 3e-4, 6e-4, 3e-3, 1.0, -1e-4])
    p = partiality(eps, s2)
    assert p[0] == 1.0
    assert np.all(np.diff(p[:6]) < 0) and p[5] == 0.0  # monotone, vanishing far off
    assert p[2] == pytest.approx(math.exp(-0.5))  # one σ off: e^-1/2
    assert np.array_equal(partiality(-eps, s2), p)  # inside and outside the sphere alike
    assert p[6] == p[1]


def test_scaled_partiality_integrates_to_the_radius():
    # (R/σ) exp(-ε²/2σ²) integrates over ε to R sqrt(2π) whatever σ: the merger's G stays one
    # number per crystal however the profile widens
    eps = np.linspace(-0.05, 0.05, 200_001)
    for r, eta, q2 in ((3e-4, 0.0, 0.1), (3e-4, 1e-3, 0.2), (1e-4, 5e-3, 0.3)):
        s2 = profile_sigma2_inv_a2(q2, r, eta, 1e-3)
        area = np.trapezoid(scaled_partiality(eps, r, s2), eps)
        assert area == pytest.approx(r * math.sqrt(2 * math.pi), rel=1e-6)


def test_profile_width_adds_its_terms_in_quadrature():
    q = np.array([0.0, 0.1, 0.5])
    r, eta, w = 2e-4, 1e-3, 4e-3
    want = np.sqrt(r**2 + (eta * q) ** 2 + (w * q * q) ** 2)
    assert np.allclose(profile_width_inv_a(q, r, eta, w), want, rtol=1e-15)
    assert profile_width_inv_a(np.array([0.0]), r, eta, w)[0] == pytest.approx(r)
    assert bandwidth_term_a(2e-3, 1.3) == pytest.approx(2e-3 * FWHM_TO_SIGMA * 1.3 / 2)
    assert angular_term(1e-3) == pytest.approx(1e-3 * FWHM_TO_SIGMA)
    beam = Beam(1.3, 2e-3, divergence_rad=1e-4)
    m = ProfileModel.for_beam(3e-4, beam)
    assert m.bandwidth_term_a == bandwidth_term_a(2e-3, 1.3)
    assert m.divergence_term == angular_term(1e-4)
    assert np.allclose(m.width_inv_a(q), profile_width_inv_a(q, 3e-4, angular_term(1e-4),
                                                             bandwidth_term_a(2e-3, 1.3)))
    assert np.allclose(m.partiality(np.array([0.0, 3e-4]), np.array([0.0, 0.0])),
                       [1.0, math.exp(-0.5)])


@njit(cache=False)
def _kernel(q2, r, eta, bw, eps, out_g, out_s):  # pragma: no cover - numba
    for i in range(q2.shape[0]):
        s2 = profile_sigma2_nb(q2[i], r, eta, bw[i])
        out_g[i] = partiality_nb(eps[i], s2)
        out_s[i] = scaled_partiality_nb(eps[i], r, s2)


def test_numba_twins_equal_the_array_functions():
    rng = np.random.default_rng(0)
    q2 = rng.uniform(0, 0.4, 500)
    bw = rng.uniform(0, 3e-3, 500)
    eps = rng.normal(0, 5e-4, 500)
    g, s = np.empty(500), np.empty(500)
    _kernel(q2, 3e-4, 2e-4, bw, eps, g, s)
    s2 = profile_sigma2_inv_a2(q2, 3e-4, 2e-4, bw)
    assert np.allclose(g, partiality(eps, s2), rtol=1e-14, atol=0)
    assert np.allclose(s, scaled_partiality(eps, 3e-4, s2), rtol=1e-14, atol=0)


def test_excitation_error_is_zero_on_the_sphere_and_positive_outside():
    lam = 1.3
    s0 = np.array([0.0, 0.0, 1.0 / lam])
    two_theta = np.radians(20.0)
    s1 = np.array([math.sin(two_theta), 0.0, math.cos(two_theta)]) / lam
    q = np.stack([s1 - s0, 1.01 * (s1 - s0), 0.99 * (s1 - s0)])
    e = excitation_error_inv_a(q, s0, lam)
    assert abs(e[0]) < 1e-15 and e[1] > 0 > e[2]


def test_polarisation_against_hand_values():
    two_theta, phi = np.radians(30.0), np.radians([0.0, 90.0, 45.0])
    rays = np.stack([np.sin(two_theta) * np.cos(phi), np.sin(two_theta) * np.sin(phi),
                     np.full(3, np.cos(two_theta))], axis=1)
    # horizontally polarised (XFEL): 1 - sin²2θ cos²φ; in the plane of polarisation 1 - 1/4
    assert polarisation_factor(rays).tolist() == pytest.approx([0.75, 1.0, 0.875])
    # vertically polarised
    assert polarisation_factor(rays, 0.0).tolist() == pytest.approx([1.0, 0.75, 0.875])
    # half and half is the unpolarised (1 + cos²2θ) / 2 = 0.875 everywhere
    assert polarisation_factor(rays * 7.5, 0.5).tolist() == pytest.approx([0.875] * 3)
    # the stream reader's old formula, 1 - u_x², is the model at fraction 1 to the bit
    u = rays / np.linalg.norm(rays, axis=1, keepdims=True)
    assert np.array_equal(polarisation_factor(rays), 1.0 - u[:, 0] ** 2)


def test_lorentz_factor_of_a_still_is_one():
    assert lorentz_factor(3).tolist() == [1.0, 1.0, 1.0]


def test_detector_tables_are_built_once_per_detector():
    det, other = simple(), simple(120.0)
    t = detector_tables(det)
    assert detector_tables(det) is t and detector_tables(other) is not t
    assert t.corner_dirs is t.corner_dirs and t.d is t.d
    assert np.allclose(np.linalg.norm(t.corner_dirs, axis=1), 1.0)
    lay = frame_layout(det, (), (1024, 1024))
    assert lay is t.layout((), (1024, 1024)) and lay.mask3.shape == (1, 1024, 1024)
    assert t.memo("x", lambda: [1]) is t.memo("x", lambda: [2])
