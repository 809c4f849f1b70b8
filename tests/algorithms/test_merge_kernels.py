"""The merge's vectorised loops: the exponential, the profile and the scaled observations
against the formulas of :mod:`sfxflow.algorithms.diffraction` written with numpy."""

from __future__ import annotations

import numba
import numpy as np

from sfxflow.algorithms.diffraction import (
    angular_term,
    profile_sigma2_inv_a2,
    scaled_partiality,
)
from sfxflow.algorithms.merge.kernels import exp32, exp_vec_array, profile_vec
from sfxflow.algorithms.merge.scale import ACCEPTED, fit_crystals, scaled_observations

from .test_merge_algorithms import _orthorhombic_set, _shard_from_sims


def test_exp_vec_matches_the_c_library():
    x = np.concatenate([np.linspace(-720.0, 720.0, 20001),
                        np.random.default_rng(0).normal(0, 5, 20000), [0.0, -0.0, 1e-300]])
    with np.errstate(over="ignore"):
        got, want = exp_vec_array(x), np.exp(x)
    normal = (x > -708.0) & (x < 709.0)
    assert np.all(np.abs(got[normal] - want[normal]) <= 2 * np.spacing(want[normal]))
    assert np.all(got[x <= -708.0] < 1e-307) and np.all(np.isinf(got[x >= 709.0]))
    assert np.isnan(exp_vec_array(np.array([np.nan]))[0])


def test_exp32_is_single_precision_exp():
    @numba.njit
    def each(x):  # pragma: no cover - numba
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = exp32(x[i])
        return out

    x = np.linspace(-86.0, 88.0, 10001).astype(np.float32)
    got = each(x)
    assert got.dtype == np.float32
    assert np.allclose(got, np.exp(x.astype(float)), rtol=4e-7, atol=0)
    assert each(np.array([-100.0], np.float32))[0] == 0.0


def test_profile_vec_is_the_scaled_partiality():
    rng = np.random.default_rng(1)
    n = 1000
    q2, eps, bw = rng.uniform(0, 0.4, n), rng.normal(0, 3e-3, n), rng.uniform(0, 3e-3, n)
    radius, eta = 1e-3, float(angular_term(np.radians(0.05)))
    p = np.empty(n)
    numba.njit(lambda *a: profile_vec(*a))(n, q2, 0.5 * eps * eps, bw, radius, eta, p)
    want = scaled_partiality(eps, radius, profile_sigma2_inv_a2(q2, radius, eta, bw))
    assert np.allclose(p, want, rtol=1e-13, atol=1e-300)


def test_scaled_observations_follow_the_model():
    sims, params, index, ref = _orthorhombic_set(6, 1.0, "partiality")
    shard = _shard_from_sims(sims, index, params)
    fits = fit_crystals(shard, ref.intensity, params, np.zeros(shard.n_crystals, np.int16))
    ok = fits.status == ACCEPTED
    assert ok.all()
    obs = scaled_observations(shard, fits, ref, params, ok, reject_outliers=False)
    counts = np.diff(shard.offsets)
    r = np.repeat(fits.radius_inv_a, counts)
    eta = angular_term(np.radians(np.repeat(fits.mosaicity_deg, counts)))
    p = scaled_partiality(shard.eps, r, profile_sigma2_inv_a2(shard.inv_d2, r, eta,
                                                          np.repeat(shard.bw, counts)))
    corr = (np.repeat(fits.scale, counts) * np.exp(-0.5 * np.repeat(fits.b_a2, counts)
                                                   * shard.inv_d2) * p)
    assert np.allclose(obs["partiality"], p, rtol=1e-12)
    assert np.allclose(obs["intensity"], shard.intensity / corr, rtol=1e-12)
    assert np.allclose(obs["sigma_raw"], shard.sigma / corr, rtol=1e-12)
    assert obs["use"].sum() > 0.5 * len(shard) and not obs["outlier"].any()
