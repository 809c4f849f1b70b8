"""CrystFEL reflection lists: the half-data sets keep their precision at any intensity scale."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.merge.scale import ShardSums
from sfxflow.algorithms.merge.statistics import merge_sums, pearson
from sfxflow.io.hkl import read_hkl, write_half_hkls, write_reflections


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_reflection_lists_keep_seven_digits_at_any_scale(tmp_path, scale):
    rng = np.random.default_rng(0)
    hkl = np.array([[h, 0, 1] for h in range(1, 51)])
    i = rng.exponential(scale, 50)
    s = i * 0.1 + scale * 0.01
    write_reflections(tmp_path / "x.hkl", gemmi.SpaceGroup("P 1"), hkl, i, s, np.full(50, 3))
    sym, hkl2, i2, s2, n2 = read_hkl(tmp_path / "x.hkl")
    assert sym == "-1" and np.array_equal(hkl2, hkl) and (n2 == 3).all()
    assert i2 == pytest.approx(i, rel=1e-5, abs=scale * 1e-6)
    assert s2 == pytest.approx(s, rel=1e-5, abs=scale * 1e-6)


def test_half_hkls_hold_the_crystfel_half_sets(tmp_path):
    idx = AsuIndex.build("40 50 60 90 90 90", "P 21 21 21", 3.0)
    rng = np.random.default_rng(1)
    n = len(idx)
    sums = ShardSums.zeros(2 * n)
    plus = 2 * np.arange(n)
    true = rng.exponential(100.0, n)
    # half a: 2 observations everywhere; half b: 2 on the first half of the reflections, 1 after
    n_b = np.where(np.arange(n) < n // 2, 2.0, 1.0)
    for half, count in (("a", np.full(n, 2.0)), ("b", n_b)):
        getattr(sums, f"n_{half}")[plus] = count
        getattr(sums, f"sw_{half}")[plus] = count
        getattr(sums, f"swi_{half}")[plus] = count * (true + rng.normal(0, 5, n))
    merged = merge_sums(sums, min_measurements=2)
    one, two = write_half_hkls(tmp_path / "merged", idx.space_group, idx.hkl, merged)
    assert (one.name, two.name) == ("merged.hkl1", "merged.hkl2")
    _, hkl_a, i_a, _, n_a = read_hkl(one)
    _, hkl_b, i_b, _, n_b_read = read_hkl(two)
    assert len(hkl_a) == n and len(hkl_b) == n // 2  # a half-set value needs 2 observations
    assert (n_a == 2).all() and (n_b_read == 2).all()
    common = {tuple(h): v for h, v in zip(hkl_b.tolist(), i_b, strict=True)}
    a = np.array([v for h, v in zip(hkl_a.tolist(), i_a, strict=True) if tuple(h) in common])
    b = np.array([common[tuple(h)] for h in hkl_a.tolist() if tuple(h) in common])
    assert pearson(a, b) == pytest.approx(pearson(merged.i_half_a, merged.i_half_b), abs=1e-6)
