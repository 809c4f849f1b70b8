"""Merging statistics on synthetic sums with known answers: pair counts, the two CC1/2
conventions, blanked thin shells, measured shell limits, CC_ano, balanced half-sets and the
resolution estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.merge.scale import ShardSums
from sfxflow.algorithms.merge.statistics import (
    MIN_PAIRS,
    balanced_halves,
    estimate_resolution,
    format_estimate,
    format_table,
    halves_of_accepted,
    merge_sums,
    shell_edges,
    shell_statistics,
)


def sums_of(n_refl: int, code: np.ndarray, intensity: np.ndarray, half: np.ndarray
            ) -> ShardSums:
    """Per-reflection sums of unit-weight observations (``code`` = 2 * asu + minus)."""
    s = ShardSums.zeros(2 * n_refl)
    for name, sel in (("", np.ones(code.size, bool)), ("_a", half == 0), ("_b", half == 1)):
        np.add.at(getattr(s, f"n{name}"), code[sel], 1.0)
        np.add.at(getattr(s, f"sw{name}"), code[sel], 1.0)
        np.add.at(getattr(s, f"swi{name}"), code[sel], intensity[sel])
    return s


@pytest.fixture(scope="module")
def index() -> AsuIndex:
    return AsuIndex.build("40 50 60 90 90 90", "P 21 21 21", 2.0)


def test_balanced_halves_split_evenly_and_repeat_with_the_seed():
    halves = balanced_halves([10, 13, 11], seed=3)
    assert [h.size for h in halves] == [10, 13, 11]
    ones = int(sum(h.sum() for h in halves))
    assert ones == 17  # 34 crystals: 17/17, never 21/13
    again = balanced_halves([10, 13, 11], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(halves, again, strict=True))
    other = balanced_halves([10, 13, 11], seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(halves, other, strict=True))
    assert int(sum(h.sum() for h in balanced_halves([7], 0))) == 4  # odd: 3/4


def test_half_sets_balance_the_accepted_crystals_only():
    rng = np.random.default_rng(5)
    accepted = [rng.random(n) < 0.7 for n in (12, 9, 20)]
    halves, (n_a, n_b) = halves_of_accepted(accepted, seed=1)
    n_ok = int(sum(a.sum() for a in accepted))
    assert n_a + n_b == n_ok and n_b - n_a in (0, 1)
    in_b = sum(int(h[a].sum()) for h, a in zip(halves, accepted, strict=True))
    assert in_b == n_b and all(h[~a].sum() == 0 for h, a in zip(halves, accepted, strict=True))


def test_shells_start_at_the_lowest_resolution_reflection_observed(index):
    rng = np.random.default_rng(0)
    seen = np.flatnonzero((index.d_a < 12.0) & (index.d_a > 2.2))
    once = np.flatnonzero(index.d_a < 2.1)[:5]  # seen once each: nothing to merge
    code = np.concatenate([np.repeat(2 * seen, 4), 2 * once])
    half = np.concatenate([np.tile([0, 0, 1, 1], seen.size), np.zeros(once.size, int)])
    truth = rng.exponential(100.0, len(index))
    merged = merge_sums(sums_of(len(index), code, truth[code // 2], half))
    overall, shells = shell_statistics(index, merged, 6)
    assert overall["d_max_a"] == pytest.approx(index.d_a[seen].max())  # not the cell's 60 A
    assert overall["d_min_a"] == pytest.approx(index.d_a[seen].min())  # not 2.1 A
    assert shells[0]["d_max_a"] == overall["d_max_a"] and shells[-1]["d_min_a"] == \
        overall["d_min_a"]
    # equal reciprocal-space volumes, as compare_hkl's shells
    edges = shell_edges(index, 6, measured=merged.n > 0)
    assert np.allclose(np.diff(edges**1.5), np.diff(edges**1.5)[0])
    assert overall["completeness"] == pytest.approx(1.0)
    assert sum(s["n_unique"] for s in shells) == seen.size == overall["n_unique"]
    # noiseless halves: CC1/2 1, Rsplit 0, counted over every reflection
    assert overall["n_pairs"] == seen.size and overall["cc_half"] == pytest.approx(1.0)
    assert overall["r_split"] == pytest.approx(0.0) and overall["multiplicity"] == 4


def test_one_observation_per_half_counts_for_aimless_not_for_crystfel(index):
    rng = np.random.default_rng(1)
    refl = np.arange(len(index))
    truth = rng.exponential(100.0, len(index))
    noise = 30.0
    code = np.repeat(2 * refl, 2)
    half = np.tile([0, 1], refl.size)
    obs = truth[code // 2] + rng.normal(0.0, noise, code.size)
    merged = merge_sums(sums_of(len(index), code, obs, half))
    overall, _ = shell_statistics(index, merged, 4)
    # CrystFEL's rule (>= 2 per half) leaves no pair; aimless's (>= 1) keeps every one
    assert overall["n_pairs"] == 0 and math.isnan(overall["cc_half"])
    assert math.isnan(overall["r_split"]) and math.isnan(overall["cc_star"])
    assert overall["n_pairs_aimless"] == len(index)
    # expected CC between two noisy copies: var(I) / (var(I) + noise²)
    want = np.var(truth) / (np.var(truth) + noise**2)
    assert overall["cc_half_aimless"] == pytest.approx(want, abs=0.03)
    assert overall["cc_star_aimless"] == pytest.approx(math.sqrt(2 * want / (1 + want)),
                                                      abs=0.02)
    # the merged values (two observations each) are all there
    assert overall["n_unique"] == len(index)


def test_thin_shells_show_a_dash_not_a_number(index):
    rng = np.random.default_rng(2)
    # a full low-resolution range and only a few reflections at high resolution
    low = np.flatnonzero(index.d_a > 3.0)
    high = np.flatnonzero(index.d_a <= 3.0)[: MIN_PAIRS - 8]
    refl = np.concatenate([low, high])
    truth = rng.exponential(100.0, len(index))
    code = np.repeat(2 * refl, 4)
    half = np.tile([0, 0, 1, 1], refl.size)
    obs = truth[code // 2] + rng.normal(0.0, 5.0, code.size)
    merged = merge_sums(sums_of(len(index), code, obs, half))
    overall, shells = shell_statistics(index, merged, 8)
    thin = [s for s in shells if 0 < s["n_pairs"] < MIN_PAIRS]
    assert thin, [s["n_pairs"] for s in shells]
    for s in thin:
        assert math.isnan(s["cc_half"]) and math.isnan(s["cc_half_aimless"])
        assert math.isnan(s["r_split"]) and math.isnan(s["cc_star"])
        assert math.isnan(s["mean_i_over_sigma"])  # one reflection cannot carry the curve
    full = [s for s in shells if s["n_pairs"] >= MIN_PAIRS]
    assert full and all(s["cc_half"] > 0.9 for s in full)
    table = format_table(overall, shells)
    row = next(line for line in table.splitlines()
               if line.split()[1] == f"{thin[0]['d_min_a']:.2f}")
    assert f" {thin[0]['n_pairs']} " in row and " - " in row
    assert "pairs" in table.splitlines()[0] and "fewer than 20 pairs" in table


def test_cc_ano_and_anomalous_completeness_from_friedel_mates_kept_apart(index):
    rng = np.random.default_rng(3)
    refl = np.flatnonzero(~index.centric)
    mean = rng.exponential(100.0, len(index))
    delta = rng.normal(0.0, 10.0, len(index))  # the anomalous signal
    code, obs, half = [], [], []
    for sign, d in ((0, +0.5), (1, -0.5)):  # I(+) and I(-), each twice in each half
        c = np.repeat(2 * refl + sign, 4)
        code.append(c)
        obs.append(mean[c // 2] + d * delta[c // 2] + rng.normal(0.0, 1.0, c.size))
        half.append(np.tile([0, 0, 1, 1], refl.size))
    merged = merge_sums(sums_of(len(index), np.concatenate(code), np.concatenate(obs),
                                np.concatenate(half)))
    overall, _ = shell_statistics(index, merged, 3)
    # differences of sd 10 measured with noise sd 1/√2 per half-mean: CC_ano near 0.99
    assert overall["n_pairs_ano"] == refl.size
    assert overall["cc_ano"] == pytest.approx(1.0 / (1.0 + 1.0 / 100.0), abs=0.01)
    assert overall["anomalous_completeness"] == pytest.approx(1.0)
    assert overall["anomalous_multiplicity"] == pytest.approx(4.0)
    assert overall["n_possible_acentric"] == refl.size
    # without a signal the anomalous differences do not correlate
    flat = merge_sums(sums_of(len(index), np.concatenate(code),
                              np.concatenate([mean[c // 2] + rng.normal(0.0, 1.0, c.size)
                                              for c in code]), np.concatenate(half)))
    assert abs(shell_statistics(index, flat, 3)[0]["cc_ano"]) < 0.1


def test_cc_ano_sigma_is_its_scatter_without_a_signal_where_noise_grows_with_intensity(index):
    # I(+) = I(-), each observation off by a fraction of the intensity (unmodelled partiality
    # with unity scaling): the strong reflections' differences, noisy in both halves, carry
    # the correlation, and CC_ano scatters far beyond 1/sqrt(n - 3) about zero
    rng = np.random.default_rng(11)
    refl = np.flatnonzero(~index.centric)
    code = np.concatenate([np.repeat(2 * refl + sign, 4) for sign in (0, 1)])
    half = np.tile([0, 0, 1, 1], 2 * refl.size)
    cc, sigma = [], []
    for _ in range(60):
        mean = rng.exponential(100.0, len(index))[code // 2]
        obs = mean * (1.0 + rng.normal(0.0, 0.5, code.size)) + rng.normal(0.0, 1.0, code.size)
        overall, shells = shell_statistics(index, merge_sums(sums_of(len(index), code, obs,
                                                                     half)), 3)
        cc.append(overall["cc_ano"])
        sigma.append(overall["cc_ano_sigma"])
        assert all(math.isfinite(s["cc_ano_sigma"]) for s in shells)
    naive = 1.0 / math.sqrt(refl.size - 3)
    scatter = float(np.std(cc))
    assert scatter > 1.5 * naive  # the textbook error understates it
    assert float(np.mean(sigma)) == pytest.approx(scatter, rel=0.25)
    assert abs(float(np.mean(cc))) < 3 * scatter / math.sqrt(len(cc))  # and nothing biases it
    assert "+-" in format_table(overall, shells).splitlines()[0]


def _shells(cc_at, ios_at, n_pairs=800, n=10, s_max=0.3):
    s = np.linspace(s_max / n, s_max, n)
    return [{"d_min_a": 1 / math.sqrt(x), "cc_half_aimless": float(cc_at(x)),
             "n_pairs_aimless": n_pairs, "mean_i_over_sigma": float(ios_at(x))} for x in s]


def test_resolution_estimate_finds_where_cc_half_and_i_over_sigma_fall():
    rng = np.random.default_rng(4)
    s0, width = 0.18, 0.04  # CC1/2 = 0.3 at 1/d² = 0.18 + 0.04 atanh(0.4)
    want_cc = 1 / math.sqrt(s0 + width * math.atanh(0.4))
    shells = _shells(lambda x: 0.5 * (1 - math.tanh((x - s0) / width)) + rng.normal(0, 0.01),
                     lambda x: 30.0 * math.exp(-20.0 * x))
    est = estimate_resolution(shells)
    assert est["cc_half"]["reached"] and est["cc_half"]["d_min_a"] == pytest.approx(want_cc,
                                                                                   abs=0.03)
    assert est["cc_half"]["fit_s0_inv_a2"] == pytest.approx(s0, abs=0.01)
    assert len(est["cc_half"]["fitted"]) == len(shells)
    want_ios = 1 / math.sqrt(math.log(30.0) / 20.0)
    assert est["i_over_sigma"]["d_min_a"] == pytest.approx(want_ios, abs=0.02)
    assert "CC1/2 = 0.3 at" in format_estimate(est)


def test_resolution_estimate_says_when_the_data_end_first():
    shells = _shells(lambda x: 0.95 - x, lambda x: 10.0)  # never falls to 0.3 or 1
    est = estimate_resolution(shells)
    d_data = shells[-1]["d_min_a"]
    assert not est["cc_half"]["reached"] and est["cc_half"]["d_min_a"] == pytest.approx(d_data)
    assert not est["i_over_sigma"]["reached"]
    assert "beyond the data" in format_estimate(est)
    # too few shells to fit: not determined, never a made-up number
    few = estimate_resolution(shells[:2])
    assert math.isnan(few["cc_half"]["d_min_a"]) and "not determined" in format_estimate(few)
