"""Merging algorithms: asymmetric unit, scale fits, statistics, ambiguity, physical simulation."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.layouts import simple
from sfxflow.algorithms.merge.ambiguity import resolve_ambiguity
from sfxflow.algorithms.merge.reflections import (
    AsuIndex,
    ambiguity_operators,
    operator_products,
)
from sfxflow.algorithms.merge.scale import (
    ACCEPTED,
    ErrorModel,
    MergeParams,
    Reference,
    ShardSums,
    accumulate,
    error_bins,
    fit_crystals,
    prepare_shard,
)
from sfxflow.algorithms.merge.statistics import cc_star, merge_sums, shell_statistics, wilson_b
from sfxflow.algorithms.simulate_physical import (
    PhysicalParams,
    TrueIntensities,
    block_profile,
    simulate_crystal,
)


def synthetic_truth(cell: str, sg: str, d_min: float, seed: int = 0) -> TrueIntensities:
    uc, group = gemmi.UnitCell(*map(float, cell.split())), gemmi.SpaceGroup(sg)
    hkl = np.asarray(gemmi.make_miller_array(uc, group, d_min, 0, True))
    rng = np.random.default_rng(seed)
    d = 1.0 / np.linalg.norm(hkl @ np.asarray(uc.frac.mat), axis=1)
    i = rng.exponential(1000.0, len(hkl)) * np.exp(-20.0 / (2 * d * d))
    return TrueIntensities.from_arrays(uc, group, hkl, i, i * rng.uniform(0.9, 1.1, len(hkl)))


def test_asu_lookup_matches_gemmi_to_asu():
    idx = AsuIndex.build("42.37 42.37 39.69 90 90 90", "P 41 21 2", 2.0)
    rng = np.random.default_rng(1)
    hkl = rng.integers(-15, 16, (500, 3))
    code = idx.lookup(hkl)
    asu, ops = gemmi.ReciprocalAsu(idx.space_group), idx.space_group.operations()
    n_checked = 0
    for h, c in zip(hkl, code, strict=True):
        d = float(idx.cell.calculate_d(list(map(int, h)))) if np.any(h) else math.inf
        absent = ops.is_systematically_absent(list(map(int, h)))
        if c < 0:
            assert d < 2.0 or absent or not np.any(h)
            continue
        want, isym = asu.to_asu(list(map(int, h)), ops)
        assert idx.hkl[c // 2].tolist() == want
        if not idx.centric[c // 2]:
            assert (c % 2 == 1) == (isym % 2 == 0)  # even isym: Friedel mate, I(-)
        n_checked += 1
    assert n_checked > 100


def test_ambiguity_operators_and_products():
    ops = ambiguity_operators("60 60 90 90 90 120", "P 63")
    assert len(ops) == 2
    idx = AsuIndex.build("60 60 90 90 90 120", "P 63", 4.0)
    assert operator_products(idx, ops).tolist() == [[0, 1], [1, 0]]
    assert len(ambiguity_operators("60 60 90 90 90 90", "P 4")) == 2
    assert len(ambiguity_operators("60 60 90 90 90 90", "P 4 2 2")) == 1


def test_true_intensities_keep_friedel_mates_and_absences():
    t = synthetic_truth("42.37 42.37 39.69 90 90 90", "P 41 21 2", 3.0)
    v = t.at(np.array([[1, 2, 5], [-1, -2, -5], [0, 0, 1], [0, 0, 4]]))
    assert np.isfinite(v[:2]).all() and v[0] != v[1]  # anomalous pair kept apart
    assert np.isnan(v[2]) and np.isfinite(v[3])  # 00l: l = 4n only in P 41 21 2


def test_block_profile_has_power_law_tails_not_a_gaussian():
    eps = np.array([0.0, 2e-4, 1e-3, 3e-3])
    p = block_profile(eps, 1000.0)
    # a Gaussian matched at half width would be ~1e-8 at 3e-3; a sphere's transform is not
    sigma = 2e-4 / math.sqrt(-2 * math.log(p[1]))
    assert p[3] > 100 * math.exp(-0.5 * (3e-3 / sigma) ** 2)


def _shard_from_sims(sims, index, params, ops=None):
    obs_c, hkl, i, s, pol = [], [], [], [], []
    for c, sim in enumerate(sims):
        r = sim.reflections
        obs_c.append(np.full(len(r["h"]), c))
        hkl.append(np.column_stack([r["h"], r["k"], r["l"]]))
        i.append(r["intensity"])
        s.append(r["sigma"])
        pol.append(r["polarisation"])
    return prepare_shard(np.arange(len(sims)), np.array([x.reported.a_matrix for x in sims]),
                         np.array([x.wavelength_a for x in sims]), np.concatenate(obs_c),
                         np.concatenate(hkl), np.concatenate(i), np.concatenate(s),
                         np.concatenate(pol), index, ops or [np.eye(3, dtype=int)], params)


def test_fit_recovers_relative_scale_of_physically_simulated_crystals():
    truth = synthetic_truth("42.37 42.37 39.69 90 90 90", "P 41 21 2", 2.0)
    phys = PhysicalParams(d_min_a=2.0, scale_photons=1.0, scale_range=100.0, b_sigma_a2=0.0)
    sims = [simulate_crystal(truth, simple(80.0, 0.1, 3000), phys, np.random.default_rng(i))
            for i in range(12)]
    params = MergeParams(model="partiality")
    index = AsuIndex.build(truth.index.cell, truth.index.space_group, 2.0)
    shard = _shard_from_sims(sims, index, params)
    fits = fit_crystals(shard, truth.merged()[: len(index)] if len(truth.index) == len(index)
                        else truth.at(index.hkl), params, np.zeros(12, dtype=np.int16))
    assert (fits.status == ACCEPTED).all()
    true_scale = np.array([x.scale for x in sims])
    # scales span two orders of magnitude; the fitted ones follow them
    r = np.corrcoef(np.log(fits.scale), np.log(true_scale))[0, 1]
    assert r > 0.95
    assert np.all(np.abs(fits.b_a2) < 10)


def _orthorhombic_set(n: int, photons: float, model: str) -> tuple:
    """``n`` physically simulated P212121 crystals to 3 A, the merge parameters, the
    asymmetric unit and the truth as the reference."""
    truth = synthetic_truth("50 60 70 90 90 90", "P 21 21 21", 3.0)
    phys = PhysicalParams(d_min_a=3.0, scale_photons=photons)
    sims = [simulate_crystal(truth, simple(80.0, 0.1, 3000), phys, np.random.default_rng(i))
            for i in range(n)]
    index = AsuIndex.build(truth.index.cell, truth.index.space_group, 3.0)
    ref = Reference(truth.at(index.hkl), np.full(len(index), np.nan), np.zeros(len(index)))
    return sims, MergeParams(model=model), index, ref


def test_sums_add_across_shards_and_merge():
    sims, params, index, ref = _orthorhombic_set(10, 1.0, "unity")
    whole = _shard_from_sims(sims, index, params)
    a, b = _shard_from_sims(sims[:4], index, params), _shard_from_sims(sims[4:], index, params)

    def sums(shard):
        fits = fit_crystals(shard, ref.intensity, params, np.zeros(shard.n_crystals, np.int16))
        return accumulate(shard, fits, ref, params, fits.status == ACCEPTED, 2 * len(index))

    total, parts = sums(whole), sums(a) + sums(b)
    assert np.allclose(total.swi, parts.swi) and np.array_equal(total.n, parts.n)
    merged = merge_sums(total)
    assert np.isfinite(merged.imean).sum() > 50
    assert isinstance(ShardSums.zeros(4) + ShardSums.zeros(4), ShardSums)


def test_binned_error_model_recovers_a_mostly_proportional_error():
    # unity-like: deviations mostly proportional to I (unmodelled partiality), sdadd large
    rng = np.random.default_rng(4)
    ref = rng.exponential(100.0, 50000)
    sigma = np.sqrt(ref + 20.0)
    obs = ref + rng.normal(0, 1, ref.size) * 1.5 * np.sqrt(sigma**2 + (0.4 * ref) ** 2)
    n = ref.size
    bins = error_bins({"use": np.ones(n, bool), "ref_n": np.full(n, 1e9), "reference": ref,
                       "self_in": np.ones(n), "sigma_raw": sigma, "intensity": obs})
    em = ErrorModel.fit_binned(bins)
    assert em.sdfac == pytest.approx(1.5, rel=0.1)
    assert em.sdadd == pytest.approx(0.4, rel=0.1)
    assert ErrorModel.fit_binned(np.zeros_like(bins)) == ErrorModel()


def test_statistics_of_perfect_halves_and_wilson_b():
    idx = AsuIndex.build("40 50 60 90 90 90", "P 21 21 21", 2.0)
    rng = np.random.default_rng(0)
    d = idx.d_a
    true = rng.exponential(1.0, len(idx)) * 1000 * np.exp(-30.0 / (2 * d * d))
    n = 2 * len(idx)
    sums = ShardSums.zeros(n)
    plus = np.arange(len(idx)) * 2
    for half in ("a", "b"):
        getattr(sums, f"sw_{half}")[plus] = 1.0
        getattr(sums, f"swi_{half}")[plus] = true
        getattr(sums, f"n_{half}")[plus] = 2
    sums.sw[plus], sums.swi[plus], sums.n[plus] = 2.0, 2 * true, 4
    merged = merge_sums(sums)
    overall, shells = shell_statistics(idx, merged, 5, truth=true)
    assert overall["cc_half"] == pytest.approx(1.0) and overall["r_split"] == pytest.approx(0.0)
    assert overall["completeness"] == pytest.approx(1.0) and overall["multiplicity"] == 4
    assert overall["cc_truth"] == pytest.approx(1.0) and len(shells) == 5
    assert wilson_b(idx, merged.imean)["b_a2"] == pytest.approx(30.0, abs=4.0)
    assert cc_star(1.0) == 1.0 and math.isnan(cc_star(-0.1))


def test_brehm_diederichs_resolves_p63_crystals():
    truth = synthetic_truth("60 60 90 90 90 120", "P 63", 3.0, seed=2)
    ops = ambiguity_operators(truth.index.cell, truth.index.space_group)
    phys = PhysicalParams(d_min_a=3.0, scale_photons=2.0, scale_range=10.0)
    sims = [simulate_crystal(truth, simple(80.0, 0.1, 3000), phys, np.random.default_rng(i), ops)
            for i in range(40)]
    index = AsuIndex.build(truth.index.cell, truth.index.space_group, 3.0)
    shard = _shard_from_sims(sims, index, MergeParams(), ops)
    vectors = []
    for c in range(shard.n_crystals):
        lo, hi = shard.offsets[c], shard.offsets[c + 1]
        per_op = []
        for o in range(len(ops)):
            code = shard.codes[o, lo:hi]
            ok = code >= 0
            u, inv = np.unique(code[ok] // 2, return_inverse=True)
            per_op.append((u, np.bincount(inv, shard.intensity[lo:hi][ok]) / np.bincount(inv)))
        vectors.append(per_op)
    found = resolve_ambiguity(vectors, operator_products(index, ops), np.random.default_rng(0))
    true_ops = np.array([s.reindex_op for s in sims])
    agree = float(np.mean(found == true_ops))
    assert max(agree, 1 - agree) >= 0.9


def test_images_with_true_intensities_and_physical_partiality():
    from sfxflow.algorithms.simulate import SimulationParams, random_crystal, simulate_frame
    from sfxflow.algorithms.simulate_physical import PhysicalFrames

    truth = synthetic_truth("42.37 42.37 39.69 90 90 90", "P 41 21 2", 3.0)
    params = SimulationParams(cell=(42.37, 42.37, 39.69, 90, 90, 90), space_group="P 41 21 2",
                              d_min_a=3.0, wilson_b_a2=0.0, noise=False)
    physics = PhysicalFrames(truth, PhysicalParams(d_min_a=3.0, b_sigma_a2=0.0))
    crystal = random_crystal(params.cell, params.space_group, np.random.default_rng(4))
    image, t = simulate_frame(simple(), params.beam(), crystal, params,
                              np.random.default_rng(5), physics)
    hkl = np.column_stack([t["h"], t["k"], t["l"]])
    assert len(hkl) > 5 and image.max() > 0
    # photons / partiality follow the true intensities (polarisation and edges aside)
    ratio = t["intensity_photons"] / (t["partiality"] * truth.at(hkl))
    full = t["on_panel_fraction"] > 0.99
    assert np.std(np.log(ratio[full])) < 0.2


def test_delta_cc_half_equals_merging_without_the_crystal():
    """The per-crystal shortcut (six moment sums corrected by the crystal's own reflections)
    against merging the shard again without each crystal in turn."""
    from sfxflow.algorithms.merge.rejection import HalfSums, delta_cc_half
    from sfxflow.algorithms.merge.statistics import pearson

    sims, params, index, ref = _orthorhombic_set(14, 0.3, "partiality")
    shard = _shard_from_sims(sims, index, params)
    fits = fit_crystals(shard, ref.intensity, params, np.zeros(shard.n_crystals, np.int16))
    ok = fits.status == ACCEPTED
    assert ok.sum() >= 12 and set(shard.half) == {0, 1}

    def cc_half(accepted):
        h = HalfSums.of(accumulate(shard, fits, ref, params, accepted, 2 * len(index), False))
        with np.errstate(invalid="ignore", divide="ignore"):
            return pearson(h.swi_a / h.sw_a, h.swi_b / h.sw_b)

    full = accumulate(shard, fits, ref, params, ok, 2 * len(index), False)
    fast = delta_cc_half(shard, fits, None, ref, params, HalfSums.of(full))
    slow = [cc_half(ok) - cc_half(ok & (np.arange(len(ok)) != c)) if ok[c] else np.nan
            for c in range(len(ok))]
    np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-9)
    assert np.nanstd(fast) > 0  # crystals differ: the comparison is not trivially zero


def test_low_cc_crystals_are_rejected_only_against_a_merge():
    from sfxflow.algorithms.merge.rejection import reject_globally
    from sfxflow.algorithms.merge.scale import REJECT_CC, CrystalFits

    def fits():
        f = CrystalFits(*(np.ones(20) for _ in range(9)))
        f.status[:] = ACCEPTED
        f.cc[:] = np.linspace(0.55, 0.65, 20)
        f.cc[3] = 0.02  # its observations do not follow the reference
        return f

    params = MergeParams(model="unity", cc_outlier_sigma=2.0)  # off by default
    first = [fits()]
    kept, dropped = reject_globally(first, None, params, against_merge=False)
    assert kept[0].all() and not dropped[0].any()  # a Wilson curve says nothing of a crystal
    later = [fits()]
    kept, _ = reject_globally(later, None, params)
    assert later[0].status[3] == REJECT_CC and kept[0].sum() == 19
