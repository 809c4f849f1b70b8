"""False-solution rejection of the indexer: chance probability, binomial tail, trials
(sfxflow.algorithms.index.solution_significance and helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.stats import binom

from sfxflow.algorithms.geometry import pixels_to_lab_mm
from sfxflow.algorithms.index import (
    IndexParams,
    TargetCell,
    binomial_log10_tail,
    chance_match_probability,
    index_spots,
    log10_independent_trials,
)
from sfxflow.algorithms.layouts import cspad
from sfxflow.algorithms.refine import assign_hkl, predict_positions_px
from sfxflow.benchmarks.index import TARGETS, simulated_hit
from sfxflow.models import Beam, Crystal, SpotTable

DETECTOR = cspad(distance_mm=130.0)
BEAM = Beam(wavelength_a=1.3)


@pytest.mark.parametrize(("k", "n", "p"), [(1, 10, 0.1), (5, 20, 0.05), (12, 30, 0.01),
                                           (30, 30, 0.2), (3, 100, 0.001)])
def test_binomial_tail_matches_scipy(k: int, n: int, p: float) -> None:
    assert binomial_log10_tail(k, n, p) == pytest.approx(math.log10(binom.sf(k - 1, n, p)),
                                                         abs=1e-9)


def test_binomial_tail_far_tail_does_not_underflow() -> None:
    # 100 of 100 at p = 1e-5: 10^-500, below the smallest double
    assert binomial_log10_tail(100, 100, 1e-5) == pytest.approx(-500.0)
    assert binomial_log10_tail(0, 10, 0.3) == 0.0
    assert binomial_log10_tail(11, 10, 0.3) == -math.inf


def test_trials_grow_with_resolution_and_freedom() -> None:
    base = log10_independent_trials(0.01, 4)
    assert base == pytest.approx(math.log10(6 * math.pi / 4) + 6)
    assert log10_independent_trials(0.005, 4) == pytest.approx(base + 3 * math.log10(2))
    assert log10_independent_trials(0.01, 4, 3, 0.03) == pytest.approx(base + 3 * math.log10(6))
    # a range smaller than the resolution adds nothing
    assert log10_independent_trials(0.01, 4, 3, 0.001) == pytest.approx(base)


def test_chance_probability_matches_random_orientations() -> None:
    """The analytic per-spot chance probability equals the fraction of random spots that a
    lattice in random orientations matches within the same tolerances."""
    target = TargetCell("61.4 122.6 168.0 90 90 90", "C 2 2 21")
    params = IndexParams()
    tol_px, exc = params.significance_tolerance_px, params.significance_excitation_inv_a
    rng = np.random.default_rng(7)
    n = 400
    panel = rng.integers(0, len(DETECTOR), n)
    fs = rng.uniform(0, 194, n)
    ss = rng.uniform(0, 185, n)
    lab = pixels_to_lab_mm(DETECTOR, panel, fs, ss)
    dist = np.linalg.norm(lab, axis=1)
    normal = np.array([np.cross(p.fast_axis, p.slow_axis) for p in DETECTOR.panels])[panel]
    cos_inc = np.abs(np.sum(normal * lab, axis=1)) / dist
    omega = math.pi * (tol_px * DETECTOR[0].pixel_size_mm) ** 2 * cos_inc / dist**2
    p_expected = float(np.mean(chance_match_probability(target.cell.volume, 2, BEAM.wavelength_a,
                                                        omega, exc)))
    hits = 0
    n_rot = 150
    for rot in Rotation.random(n_rot, random_state=3).as_matrix():
        x = Crystal.from_u(target.cell, target.space_group, rot)
        hkl, ang, e = assign_hkl(x.a_matrix, lab / dist[:, None], BEAM, exc, target.space_group)
        f2, s2 = predict_positions_px(x.a_matrix, hkl, panel, DETECTOR, BEAM)
        ok = np.isfinite(ang)  # an allowed index exists (C centring: half the points are absent)
        hits += int(np.sum(ok & (np.hypot(f2 - fs, s2 - ss) <= tol_px) & (np.abs(e) <= exc)))
    observed = hits / (n * n_rot)
    assert 0.005 < p_expected < 0.05
    # binomial standard error of the empirical fraction is ~3% relative here
    assert observed == pytest.approx(p_expected, rel=0.2)


def test_random_spot_frames_never_index() -> None:
    target = TargetCell("61.4 122.6 168.0 90 90 90", "C 2 2 21")
    rng = np.random.default_rng(12)
    for n in [12, 20, 30, 45] * 6:
        panel = rng.integers(0, len(DETECTOR), n)
        z = np.zeros(n)
        spots = SpotTable(panel, rng.uniform(0, 194, n), rng.uniform(0, 185, n), z, z, z,
                          np.ones(n, np.int32), z)
        res = index_spots(spots, DETECTOR, BEAM, target)
        assert not res.success, (n, res)


def test_significance_is_reported_and_can_be_switched_off() -> None:
    target = TargetCell("79.1 79.1 38.0 90 90 90", "P 43 21 2")
    hit = simulated_hit(target, DETECTOR, BEAM, 30, np.random.default_rng(2))
    res = index_spots(hit.spots, DETECTOR, BEAM, target)
    assert res.success
    assert res.log10_false_probability < -20
    # demanding an absurd significance rejects it with a reason naming the numbers
    strict = IndexParams(max_false_probability=10.0 ** res.log10_false_probability / 10)
    res2 = index_spots(hit.spots, DETECTOR, BEAM, target, strict)
    assert not res2.success
    assert res2.reason.startswith("not significant")
    with pytest.raises(ValueError, match="max_false_probability"):
        IndexParams(max_false_probability=0.0)


@pytest.mark.slow
def test_simulated_rate_stays_high_with_significance_test() -> None:
    """>= 98% of simulated hits with 15-60 spots (15% of them false) index, over the five
    benchmark targets, and none in a wrong orientation."""
    rng = np.random.default_rng(99)
    ok = total = wrong = 0
    from sfxflow.algorithms.index import misorientation_deg

    for _, cell, sg in TARGETS:
        target = TargetCell(cell, sg)
        for n in [15, 30, 60] * 8:
            hit = simulated_hit(target, DETECTOR, BEAM, n, rng)
            res = index_spots(hit.spots, DETECTOR, BEAM, target)
            total += 1
            ok += res.success
            wrong += res.success and misorientation_deg(res.crystal, hit.truth) > 1.0
    assert ok / total >= 0.98, f"{ok}/{total}"
    assert wrong == 0
