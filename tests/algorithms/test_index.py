"""Indexing of simulated stills against a known cell (sfxflow.algorithms.index)."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sfxflow.algorithms.index import (
    IndexParams,
    TargetCell,
    canonical_crystal,
    index_spots,
    misorientation_deg,
    point_group_rotations,
    target_table,
)
from sfxflow.algorithms.layouts import cspad
from sfxflow.benchmarks.index import simulated_hit
from sfxflow.models import Beam, Crystal, SpotTable, reciprocal_basis

DETECTOR = cspad(distance_mm=130.0)
BEAM = Beam(wavelength_a=1.3)

TARGETS = {
    "P 61 2 2": "93 93 130.5 90 90 120",
    "P 21 21 21": "51.2 98.7 53.4 90 90 90",
    "C 2 2 21": "61.4 122.6 168.0 90 90 90",
    "P 1": "45.2 51.7 66.3 79.5 87.2 71.4",
}


def test_cells_with_the_symmetry_are_accepted():
    from sfxflow.algorithms.index import TargetCell

    for cell, sg in (("93 93 130.5 90 90 120", "P 61 2 2"), ("93 93 130.5 90 90 120", "R 3"),
                     ("61.4 122.6 168 90 90 90", "C 2 2 21"), ("50 60 70 90 100 90", "P 1 21 1"),
                     ("79.1 79.2 38 90 90 90", "P 43 21 2"), ("40 50 60 80 85 95", "P 1")):
        assert TargetCell(cell, sg).space_group.hm == sg


def test_rhombohedral_setting_is_kept_for_indexing():
    # "R 3:R" was reduced to its H-M symbol "R 3", i.e. the hexagonal setting: wrong point-group
    # rotations and centring absences for a cell on rhombohedral axes
    import numpy as np

    from sfxflow.algorithms.index import TargetCell, point_group_rotations, target_table

    target = TargetCell("60 60 60 80 80 80", "R 3:R")
    images = {tuple(int(v) for v in m @ np.array([1, 0, 0]))
              for m in point_group_rotations(target.space_group)}
    assert images == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}
    hkl = {tuple(int(v) for v in h) for h in target_table(target, 3.0).hkl}
    assert (1, 0, 0) in hkl  # primitive on rhombohedral axes: no centring absence



@pytest.mark.parametrize(("sg", "cell", "n_ops"), [
    ("P 1", "45.2 51.7 66.3 79.5 87.2 71.4", 1),
    ("P 21 21 21", "51.2 98.7 53.4 90 90 90", 4),
    ("C 2 2 21", "61.4 122.6 168 90 90 90", 4),
    ("P 61 2 2", "93 93 130.5 90 90 120", 12),
    ("P 43 21 2", "79 79 38 90 90 90", 8),
    ("I 2 3", "78 78 78 90 90 90", 12),
])
def test_point_group_rotations_are_proper_lattice_maps(sg: str, cell: str, n_ops: int) -> None:
    ops = point_group_rotations(sg)
    assert ops.shape == (n_ops, 3, 3)
    assert np.allclose([np.linalg.det(m) for m in ops], 1.0)
    assert any(np.array_equal(m, np.eye(3)) for m in ops)
    # each maps Miller indices to Miller indices preserving the reciprocal metric B^T B
    b = reciprocal_basis(TargetCell(cell, sg).cell)
    for m in ops:
        assert np.allclose((b @ m).T @ (b @ m), b.T @ b, atol=1e-12)


def test_misorientation_known_angle_and_symmetry() -> None:
    target = TargetCell(TARGETS["P 61 2 2"], "P 61 2 2")
    u = Rotation.random(random_state=4).as_matrix()
    a = Crystal.from_u(target.cell, target.space_group, u)
    r = Rotation.from_rotvec(np.radians(0.7) * np.array([0.6, 0.0, 0.8])).as_matrix()
    b = Crystal.from_u(target.cell, target.space_group, r @ u)
    assert misorientation_deg(a, b) == pytest.approx(0.7, abs=1e-6)
    for m in point_group_rotations(target.space_group):
        b_eq = Crystal(target.cell, target.space_group, b.a_matrix @ m)
        assert misorientation_deg(a, b_eq) == pytest.approx(0.7, abs=1e-6)
    # a 60 degree rotation about c is a symmetry of 622 ...
    c_axis = u @ np.array([0.0, 0.0, 1.0])
    r60 = Rotation.from_rotvec(np.radians(60.0) * c_axis).as_matrix()
    assert misorientation_deg(a, Crystal.from_u(target.cell, target.space_group, r60 @ u)) < 1e-6
    # ... but not of P 1
    p1 = gemmi.SpaceGroup("P 1")
    assert misorientation_deg(a, Crystal.from_u(target.cell, p1, r60 @ u), p1) == pytest.approx(60)


def test_misorientation_of_a_non_orthogonal_cell_in_every_setting() -> None:
    """A refined cell's angles are off 90 deg: each setting A @ M has its own cell and B."""
    sg = gemmi.SpaceGroup("C 2 2 21")
    cell = gemmi.UnitCell(64.8, 112.3, 52.1, 90.6, 89.2, 90.9)
    x = Crystal.from_u(cell, sg, Rotation.random(random_state=7).as_matrix())
    for m in point_group_rotations(sg):
        a_m = x.a_matrix @ m
        real = np.linalg.inv(a_m)
        lengths = np.linalg.norm(real, axis=1)
        cos = [real[1] @ real[2] / (lengths[1] * lengths[2]),
               real[0] @ real[2] / (lengths[0] * lengths[2]),
               real[0] @ real[1] / (lengths[0] * lengths[1])]
        y = Crystal(gemmi.UnitCell(*lengths, *np.degrees(np.arccos(cos))), sg, a_m)
        assert misorientation_deg(x, y) < 1e-6
        assert misorientation_deg(y, x) < 1e-6
        canon = canonical_crystal(y)
        real_canon = np.linalg.inv(reciprocal_basis(canon.cell))  # rows a, b, c
        np.testing.assert_allclose(real_canon @ real_canon.T,
                                   np.linalg.inv(canon.a_matrix) @ np.linalg.inv(canon.a_matrix).T,
                                   atol=1e-6)


def test_canonical_setting_is_deterministic() -> None:
    target = TargetCell(TARGETS["C 2 2 21"], "C 2 2 21")
    x = Crystal.from_u(target.cell, target.space_group, Rotation.random(random_state=8).as_matrix())
    ref = canonical_crystal(x)
    for m in point_group_rotations(target.space_group):
        other = canonical_crystal(Crystal(target.cell, target.space_group, x.a_matrix @ m))
        assert np.allclose(other.a_matrix, ref.a_matrix)
    assert np.trace(ref.u_matrix) >= max(
        np.trace(Crystal(target.cell, target.space_group, x.a_matrix @ m).u_matrix)
        for m in point_group_rotations(target.space_group)) - 1e-9


def test_every_spot_on_the_lattice_is_indexed_beyond_the_strongest() -> None:
    """Spots past ``max_spots`` get Miller indices too; ``fraction_indexed`` is over all spots."""
    target = TargetCell(TARGETS["P 61 2 2"], "P 61 2 2")
    hit = simulated_hit(target, DETECTOR, BEAM, 240, np.random.default_rng(5))
    snr = np.random.default_rng(6).uniform(5.0, 50.0, len(hit.spots))
    spots = SpotTable(hit.spots.panel, hit.spots.fs_px, hit.spots.ss_px, snr, snr, snr,
                      hit.spots.n_pixels, hit.spots.d_a)
    res = index_spots(spots, DETECTOR, BEAM, target, IndexParams(max_spots=100))
    assert res.success and res.crystal is not None
    assert res.n_spots == 240 and res.n_indexed == int(res.indexed_mask.sum())
    assert res.fraction_indexed == pytest.approx(res.n_indexed / 240)
    weak = np.argsort(-snr, kind="stable")[100:]
    true_weak = weak[~hit.is_false[weak]]
    assert res.indexed_mask[true_weak].mean() > 0.9
    assert res.indexed_mask[hit.is_false].mean() < 0.2
    # the indices are the truth's, in the solution's setting
    m = np.rint(np.linalg.solve(hit.truth.a_matrix, res.crystal.a_matrix)).astype(int)
    on = np.flatnonzero(res.indexed_mask & ~hit.is_false)
    np.testing.assert_array_equal(res.miller_indices[on] @ m.T, hit.true_hkl[on])


def test_candidate_table_uses_orbit_representatives() -> None:
    target = TargetCell(TARGETS["P 61 2 2"], "P 61 2 2")
    table = target_table(target, 8.0)
    assert np.all(np.diff(table.q_len) >= 0)
    assert np.all(1.0 / table.q_len >= 8.0 - 1e-9)
    # absences removed: 00l only with l = 6n
    c_axis = (table.hkl[:, 0] == 0) & (table.hkl[:, 1] == 0)
    assert np.all(table.hkl[c_axis, 2] % 6 == 0)
    # 622 has 12 rotations: general reflections come 12 to an orbit
    assert 10 < table.hkl.shape[0] / table.rep_idx.size <= 12
    assert target_table(target, 8.01) is table  # cached
    # one of each Friedel pair (their unit vectors exact negatives, the same |q|) and its mate
    half, mate = table.half_idx, table.mate
    assert np.all(mate[half] > half)  # every index has its mate here
    assert np.array_equal(np.sort(np.concatenate([half, mate[half]])), np.arange(len(mate)))
    assert np.array_equal(table.hkl[mate[half]], -table.hkl[half])
    assert np.array_equal(table.qc_unit[mate[half]], -table.qc_unit[half])
    assert np.array_equal(table.q_len[mate[half]], table.q_len[half])


@pytest.mark.parametrize("sg", list(TARGETS))
def test_simulated_hits_index_with_accurate_orientation(sg: str) -> None:
    target = TargetCell(TARGETS[sg], sg)
    rng = np.random.default_rng(20240 + len(sg))
    params = IndexParams()
    mis, wrong, failed = [], 0, 0
    spot_counts = [15, 20, 30, 45, 60] * 5
    for n in spot_counts:
        hit = simulated_hit(target, DETECTOR, BEAM, n, rng)
        res = index_spots(hit.spots, DETECTOR, BEAM, target, params)
        if not res.success:
            failed += 1
            continue
        m = misorientation_deg(res.crystal, hit.truth)
        mis.append(m)
        wrong += m > 1.0
        # the Miller indices are right (modulo the setting): A_res h_res == A_true h_true
        sel = res.indexed_mask & ~hit.is_false
        q_res = res.miller_indices[sel] @ res.crystal.a_matrix.T
        q_true = hit.true_hkl[sel] @ hit.truth.a_matrix.T
        assert np.median(np.linalg.norm(q_res - q_true, axis=1)) < 2e-3
        assert res.rmsd_px < 1.0
        assert res.n_indexed >= 0.7 * n
    rate = 1 - failed / len(spot_counts)
    assert rate >= 0.96, f"{sg}: indexed {rate:.0%}"
    assert wrong == 0
    assert np.median(mis) <= 0.05, f"{sg}: median misorientation {np.median(mis):.3f} deg"


def test_random_spots_are_not_indexed() -> None:
    target = TargetCell(TARGETS["P 21 21 21"], "P 21 21 21")
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 30
        panel = rng.integers(0, len(DETECTOR), n)
        fs = rng.uniform(0, 194, n)
        ss = rng.uniform(0, 185, n)
        z = np.zeros(n)
        spots = SpotTable(panel, fs, ss, z, z, z, np.ones(n, np.int32), z)
        res = index_spots(spots, DETECTOR, BEAM, target)
        assert not res.success
        assert res.reason
        assert res.crystal is None


def test_wrong_cell_is_not_indexed() -> None:
    truth_target = TargetCell("51.2 98.7 53.4 90 90 90", "P 21 21 21")
    wrong_target = TargetCell("61.0 88.0 47.0 90 90 90", "P 21 21 21")
    rng = np.random.default_rng(11)
    n_ok = 0
    for _ in range(5):
        hit = simulated_hit(truth_target, DETECTOR, BEAM, 30, rng)
        n_ok += index_spots(hit.spots, DETECTOR, BEAM, wrong_target).success
    assert n_ok == 0


def _pairs_needed(pairs: list[tuple[int, int, int]], n_off: int) -> int:
    """How many of ``pairs``, in their order, the search tries when at most ``n_off`` spots may
    be off a lattice and no set of two or three is tried instead (the first rule of
    :func:`~sfxflow.algorithms.index._pairs_tried`)."""
    from sfxflow.algorithms.index import _tried_positions

    rows = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    return int(_tried_positions(rows, len(pairs), rows[:, 0].max(initial=0), True, n_off,
                                False).size)


def _pairs_to_try(pairs: list[tuple[int, int, int]], n_off: int) -> list[tuple[int, int, int]]:
    """The pairs the search tries, in their order, when at most ``n_off`` spots may be off a
    lattice (:func:`~sfxflow.algorithms.index._pairs_tried`, every pair allowed)."""
    from sfxflow.algorithms.index import _pairs_tried

    rows = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    params = IndexParams(max_pairs=len(pairs), max_pair_candidates=int(rows[:, 0].max()))
    return [(int(c), int(i), int(j)) for c, i, j in _pairs_tried(rows, params, n_off)]


def test_pair_search_stops_once_further_pairs_cannot_find_another_lattice() -> None:
    pairs = [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 1, 2), (5, 2, 3)]
    assert _pairs_needed(pairs, 0) == 1  # every spot on the lattice: any pair finds it
    # one spot off: the pairs through spot 0 miss a lattice without it, (1, 2) finds that one
    assert _pairs_needed(pairs, 1) == 4
    assert _pairs_needed(pairs, 3) == 5  # all but two spots off: only their own pair finds it
    assert _pairs_needed(pairs[:3], 1) == 2  # a star: no pair finds a lattice without spot 0


def test_pairs_tried_are_the_cheapest_set_that_finds_every_lattice() -> None:
    pairs = [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 0, 4), (5, 1, 2), (6, 3, 4)]
    assert _pairs_needed(pairs, 1) == 5  # the first pair without spot 0 is the fifth
    # one spot off: (0, 1) finds a lattice without 3 or 4, (3, 4) one without 0 or 1 (cost 7,
    # the first five pairs cost 15, the triangle on 0, 1, 2 costs 8)
    assert _pairs_to_try(pairs, 1) == [(1, 0, 1), (6, 3, 4)]
    assert _pairs_to_try(pairs, 0) == [(1, 0, 1)]
    # two spots off: no two or three of them cover every set, so the first ones needed
    assert _pairs_to_try(pairs, 2) == pairs[: _pairs_needed(pairs, 2)]
    # three pairs on three spots (cost 8) against two disjoint ones (9 at best)
    triangle = [(1, 0, 1), (2, 0, 2), (4, 0, 3), (4, 0, 4), (5, 1, 2), (20, 3, 4)]
    assert _pairs_to_try(triangle, 1) == [(1, 0, 1), (2, 0, 2), (5, 1, 2)]


def test_pairs_tried_match_a_plain_search_over_every_set() -> None:
    """The compiled cover search (bit masks and words, the cached sets) against a plain
    boolean one over every set of off-lattice spots, on random pair lists of 8-12 spots (up to
    79 off-lattice sets: two words) and 0-2 off: the first pairs needed, then the sets."""
    import itertools

    def plain_finds(pairs: list[tuple[int, int, int]], n_off: int) -> np.ndarray:
        """``(set, pair)``: whether the pair has no spot in the set of off-lattice spots."""
        spots = sorted({s for _, i, j in pairs for s in (i, j)})
        off_sets = [set(c) for r in range(n_off + 1) for c in itertools.combinations(spots, r)]
        return np.array([[i not in off and j not in off for _, i, j in pairs]
                         for off in off_sets])

    def plain_needed(pairs: list[tuple[int, int, int]], n_off: int) -> int:
        if n_off >= len({s for _, i, j in pairs for s in (i, j)}) - 1:
            return len(pairs)  # all spots but two may be off: only their own pair finds it
        finds = plain_finds(pairs, n_off)
        must = finds.any(axis=1)
        return next(t for t in range(1, len(pairs) + 1)
                    if (finds[:, :t].any(axis=1) | ~must).all())

    def plain(pairs: list[tuple[int, int, int]], n_off: int) -> list[tuple[int, int, int]]:
        t = plain_needed(pairs, n_off)
        if t <= 2 or n_off > 2:
            return pairs[:t]
        finds = plain_finds(pairs, n_off)
        must = finds.any(axis=1)
        k = min(len(pairs), 16)
        best, best_cost = list(range(t)), sum(c for c, _, _ in pairs[:t])
        for size in (2, 3):
            for chosen in itertools.combinations(range(k), size):
                covers = (finds[:, list(chosen)].any(axis=1) | ~must).all()
                cost = sum(pairs[c][0] for c in chosen)
                if covers and cost < best_cost:
                    best, best_cost = list(chosen), cost
        return [pairs[i] for i in best]

    rng = np.random.default_rng(4)
    n_cases = 0
    for _ in range(60):
        n_spots = int(rng.integers(8, 13))
        every = [(int(i), int(j)) for i, j in itertools.combinations(range(n_spots), 2)]
        chosen = rng.permutation(len(every))[: int(rng.integers(3, len(every) + 1))]
        pairs = sorted((int(rng.integers(1, 50)), *every[c]) for c in chosen)
        for n_off in (0, 1, 2):
            assert _pairs_needed(pairs, n_off) == plain_needed(pairs, n_off)
            assert _pairs_to_try(pairs, n_off) == plain(pairs, n_off)
            n_cases += _pairs_needed(pairs, n_off) > 2
    assert n_cases > 50  # most cases reach the search over sets


def test_pairs_tried_with_many_pair_spots_and_many_off_are_every_pair() -> None:
    """Thirty pair spots with 21 off: 10^8 sets of off-lattice spots (the masks of all 2^30
    sets were once built to list them, 8 GB): every pair is tried, at once."""
    import itertools

    from sfxflow.algorithms.index import _n_off_lattice_sets, _subset_masks

    pairs = sorted((31 * i + j, i, j) for i, j in itertools.combinations(range(30), 2))
    assert _pairs_to_try(pairs, 21) == pairs
    assert _pairs_needed(pairs, 21) == len(pairs)
    # the sets it does list: every set of at most n_off spots, once
    sets = _subset_masks(9, 2, _n_off_lattice_sets(9, 2, 2**62))
    assert sets.size == 1 + 9 + 36 == np.unique(sets).size
    assert max(bin(int(x)).count("1") for x in sets) == 2


def test_nearest_rotation_is_the_svd_kabsch_fit() -> None:
    """The Newton polar factor against LAPACK's ``W Vᵀ`` (with the weakest axis flipped for a
    reflection): strained rotations, reflections and rank-2 sums (spots in a plane)."""
    from scipy.spatial.transform import Rotation

    from sfxflow.algorithms.index import _nearest_rotation

    def kabsch(m: np.ndarray) -> np.ndarray:
        w, _, vt = np.linalg.svd(m)
        if np.linalg.det(w @ vt) < 0:
            w[:, 2] *= -1.0
        return w @ vt

    rng = np.random.default_rng(7)
    for case in range(600):
        r = Rotation.random(random_state=rng).as_matrix()
        p = np.eye(3) + 0.4 * rng.normal(size=(3, 3))
        m = r @ (p @ p.T)
        if case % 3 == 1:
            m = m @ np.diag([1.0, 1.0, -1.0])  # a reflection: det < 0
        elif case % 3 == 2:
            v = rng.normal(size=(2, 3))
            m = r @ (v.T @ v)  # rank 2
        u = _nearest_rotation(m)
        np.testing.assert_allclose(u, kabsch(m), atol=1e-12)
        np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-14)
        assert np.linalg.det(u) > 0


def test_setting_traces_are_those_of_each_setting_cell() -> None:
    """The compiled traces of the canonical setting search against each setting's own cell,
    ``B`` and SVD polar factor, on strained (refined-like) crystals of every bench target."""
    from scipy.spatial.transform import Rotation

    from sfxflow.algorithms.index import _setting_cell, _setting_traces
    from sfxflow.benchmarks.index import TARGETS
    from sfxflow.models import as_space_group, as_unit_cell, cell_of_basis

    rng = np.random.default_rng(3)
    for _, cell, sg in TARGETS:
        target = TargetCell(as_unit_cell(cell), as_space_group(sg))
        for _ in range(20):
            u = Rotation.random(random_state=rng).as_matrix()
            a = u @ reciprocal_basis(target.cell) @ (np.eye(3) + 2e-3 * rng.normal(size=(3, 3)))
            own = cell_of_basis(a)
            ops = point_group_rotations(target.space_group)
            expected = []
            for m in ops:
                x = a @ m @ np.linalg.inv(reciprocal_basis(_setting_cell(own, m)))
                w, _, vt = np.linalg.svd(x)
                expected.append(np.trace(w @ vt))
            got = _setting_traces(a, reciprocal_basis(own), ops)
            np.testing.assert_allclose(got, expected, atol=1e-12)


def test_polishing_stop_is_exact() -> None:
    """Polishing stops once a round would repeat the last one's fit; three rounds in one call
    must equal three calls of one round each (which never stop early), bit for bit."""
    from sfxflow.algorithms.index import _polish_and_score

    target = TargetCell(TARGETS["P 1"], "P 1")
    b = reciprocal_basis(target.cell)
    rng = np.random.default_rng(8)
    truth = Rotation.random(random_state=8).as_matrix()
    hkl = rng.integers(-6, 7, (12, 3)).astype(float)
    q = (truth @ b @ hkl.T).T + rng.normal(0, 2e-4, (12, 3))
    q[9:] = rng.normal(0, 0.2, (3, 3))  # three spots off the lattice
    rays = q / np.linalg.norm(q, axis=1, keepdims=True)
    perp = np.full(12, 1e-3)
    # near the truth (polishing converges, then repeats) and random (few spots fit)
    rots = np.concatenate([
        Rotation.from_rotvec(rng.normal(0, 0.003, (6, 3))).as_matrix() @ truth,
        Rotation.random(6, random_state=9).as_matrix()])
    once, counts, err = _polish_and_score(rots, q, rays, perp, b, 0.3, 1e-3, 3)
    step = rots
    for _ in range(3):
        step, counts1, err1 = _polish_and_score(step, q, rays, perp, b, 0.3, 1e-3, 1)
    assert np.array_equal(once, step)
    assert np.array_equal(counts, counts1) and np.array_equal(err, err1)
    assert (counts[:6] >= 9).sum() >= 3  # the near ones do converge


def test_compiled_3x3_products_are_fused_multiply_add_chains() -> None:
    """The polishing's 3x3 products: each entry ``a_i0 b_0j`` then two fused multiply-adds
    (what OpenBLAS's small-matrix kernel computes), exact in rational arithmetic, and the
    matrix product to rounding."""
    from fractions import Fraction

    from numba import njit

    from sfxflow.algorithms.fused import product3_into, product3_t_into

    @njit
    def both(a, b):  # pragma: no cover - numba
        out, out_t = np.empty((3, 3)), np.empty((3, 3))
        product3_into(a, b, out)
        product3_t_into(a, b, out_t)
        return out, out_t

    def fma(x: float, y: float, z: float) -> float:
        return float(Fraction(x) * Fraction(y) + Fraction(z))

    rng = np.random.default_rng(4)
    for _ in range(200):
        a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3)) * 10.0 ** rng.uniform(-3, 3)
        out, out_t = both(a, b)
        for bb, got in ((b, out), (b.T, out_t)):
            want = [[fma(a[i, 2], bb[2, j], fma(a[i, 1], bb[1, j], a[i, 0] * bb[0, j]))
                     for j in range(3)] for i in range(3)]
            assert np.array_equal(got, np.array(want))
            np.testing.assert_allclose(got, a @ bb, rtol=1e-12, atol=1e-12 * np.abs(bb).max())


def test_pair_step_keeps_what_scoring_every_rotation_keeps() -> None:
    """The compiled pair step lists the matches from a float32 first pass of the cosines,
    scores them in float32 (again in float64 where unsure or in reach of being kept) and
    compares one by one only the rotations that a chunk's counts leave in reach of the kept
    ones; what it keeps must be what scoring every rotation in full (numpy) keeps, in order,
    and its matches those of the float64 angle test."""
    from sfxflow.algorithms.index import _pair_top_candidates

    target = TargetCell(TARGETS["P 1"], "P 1")
    rng = np.random.default_rng(5)
    for n_spots, narrow in ((9, False), (30, False), (30, True)):
        n = n_spots
        z = np.zeros(n)
        spots = SpotTable(rng.integers(0, len(DETECTOR), n), rng.uniform(0, 194, n),
                          rng.uniform(0, 185, n), z, z, z, np.ones(n, np.int32), z)
        from sfxflow.algorithms.geometry import pixels_to_q

        q = pixels_to_q(DETECTOR, BEAM, spots.panel, spots.fs_px, spots.ss_px)
        q_len = np.linalg.norm(q, axis=1)
        i, j = np.argsort(q_len)[n // 2 : n // 2 + 2]  # mid resolution: thousands of matches
        if narrow:  # the narrowest pair past 9 degrees: the float32 frames' widest unsure band
            unit_q = q / q_len[:, None]
            ang_all = np.degrees(np.arccos(np.clip(unit_q @ unit_q.T, -1, 1)))
            i, j = np.unravel_index(np.argmin(np.where(ang_all > 9.0, ang_all, 180.0)),
                                    ang_all.shape)
        table = target_table(target, 1.0 / q_len.max())
        b = reciprocal_basis(target.cell)
        b_inv = np.linalg.inv(b)

        tol = 0.01 * q_len[[i, j]] + 0.0005
        (lo1, lo2), (hi1, hi2) = (np.searchsorted(table.q_len, q_len[[i, j]] - tol).tolist(),
                                  np.searchsorted(table.q_len, q_len[[i, j]] + tol).tolist())
        rep = table.rep_idx[(table.rep_idx >= lo1) & (table.rep_idx < hi1)]
        ang = math.acos(float(q[i] @ q[j]) / (q_len[i] * q_len[j]))
        cos_lo, cos_hi = math.cos(ang + 0.03), math.cos(ang - 0.03)
        rots, n_matched = _pair_top_candidates(table.qc_unit, table.half_idx, table.half_unit,
                                               table.half_unit32, table.half_mate, rep, lo2,
                                               hi2, cos_lo, cos_hi, q, int(i), int(j), b_inv,
                                               0.3, 8)
        # the reference: every matching index pair's rotation, scored in full
        cos = table.qc_unit[rep] @ table.qc_unit[lo2:hi2].T
        aa, bb = np.nonzero((cos >= cos_lo) & (cos <= cos_hi))
        assert n_matched == aa.size > 100

        def frames(v: np.ndarray, w: np.ndarray) -> np.ndarray:
            v = v / np.linalg.norm(v, axis=-1, keepdims=True)
            w = w / np.linalg.norm(w, axis=-1, keepdims=True)
            e1 = (v + w) / np.linalg.norm(v + w, axis=-1, keepdims=True)
            e3 = np.cross(v + w, v - w)
            e3 /= np.linalg.norm(e3, axis=-1, keepdims=True)
            return np.stack([e1, np.cross(e3, e1), e3], axis=-1)

        t_obs = frames(q[i], q[j])
        all_rots = t_obs @ np.swapaxes(frames(table.qc[rep[aa]], table.qc[lo2 + bb]), 1, 2)
        frac = np.einsum("ij,kjl,nl->kni", b_inv, np.swapaxes(all_rots, 1, 2), q)
        worst = np.abs(frac - np.rint(frac)).max(axis=2)
        hit = worst <= 0.3
        counts = hit.sum(axis=1)
        err = np.where(hit, worst**2, 0.0).sum(axis=1)
        top = np.lexsort((err, -counts))[:8]
        top = top[counts[top] >= 3]
        assert rots.shape == (top.size, 3, 3) and top.size > 0
        np.testing.assert_allclose(rots, all_rots[top], atol=1e-12)


def test_search_among_noise_spots_tries_only_the_pairs_a_lattice_needs() -> None:
    """8 random spots at high resolution, as a 60-spot hit leaves after its crystal: a lattice
    must index all 8 (``min_indexed``), so the first pair finds it if any does (the old search
    tried every pair: 10^4 to 10^5 candidate orientations, 50 ms)."""
    target = TargetCell(TARGETS["P 21 21 21"], "P 21 21 21")
    rng = np.random.default_rng(4)
    for _ in range(3):
        n = 8
        z = np.zeros(n)
        spots = SpotTable(rng.integers(0, len(DETECTOR), n), rng.uniform(0, 194, n),
                          rng.uniform(0, 185, n), z, z, z, np.ones(n, np.int32), z)
        res = index_spots(spots, DETECTOR, BEAM, target)
        first_pair = index_spots(spots, DETECTOR, BEAM, target, IndexParams(max_pairs=1))
        assert not res.success and first_pair.n_candidates > 0
        assert res.n_candidates == first_pair.n_candidates


def test_lattice_with_one_false_spot_among_nine_is_found() -> None:
    """The pair search stops early there (one spot may be off the lattice) and still finds it."""
    target = TargetCell(TARGETS["P 21 21 21"], "P 21 21 21")
    rng = np.random.default_rng(8)
    for _ in range(5):
        hit = simulated_hit(target, DETECTOR, BEAM, 9, rng, false_fraction=0.12)
        assert hit.is_false.sum() == 1
        res = index_spots(hit.spots, DETECTOR, BEAM, target)
        assert res.success and res.crystal is not None
        assert misorientation_deg(res.crystal, hit.truth) < 0.2


def test_too_few_spots_reason() -> None:
    target = TargetCell(TARGETS["P 1"], "P 1")
    hit = simulated_hit(target, DETECTOR, BEAM, 5, np.random.default_rng(0), false_fraction=0)
    res = index_spots(hit.spots, DETECTOR, BEAM, target)
    assert not res.success
    assert res.reason.startswith("too few spots")
    assert res.miller_indices.shape == (5, 3)
    assert math.isnan(res.rmsd_px)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="hkl_tolerance"):
        IndexParams(hkl_tolerance=0.7)
    with pytest.raises(ValueError, match="min_indexed"):
        IndexParams(min_indexed=2)


def test_spots_near_a_lattice_are_judged_with_its_refined_distance() -> None:
    """A frame recorded 1.5 mm further than the geometry says, refined with a distance shift:
    its own spots lie on its predictions (its refined detector), so none of them may seed the
    search for a further lattice; judged at the unshifted distance (as they were), 18 of the
    first frame's 60 were near and the other 42 went on to the next search."""
    from dataclasses import replace

    from sfxflow.algorithms.index import _near_lattice_columns
    from sfxflow.algorithms.refine import RefineParams

    target = TargetCell("79.1 79.1 38.0 90 90 90", "P 43 21 2")
    params = IndexParams(refine=RefineParams(refine_cell=False, refine_distance=True))
    rng = np.random.default_rng(11)
    far = cspad(distance_mm=131.5)
    n_near = n_spots = 0
    for _ in range(5):
        hit = simulated_hit(target, far, BEAM, 60, rng, false_fraction=0.0, noise_px=0.1)
        res = index_spots(hit.spots, DETECTOR, BEAM, target, params)
        assert res.success and abs(res.distance_shift_mm - 1.5) < 0.3
        columns = (hit.spots.panel, hit.spots.fs_px, hit.spots.ss_px)
        near = _near_lattice_columns(res, *columns, DETECTOR, BEAM, params)
        n_near += int(near.sum())
        n_spots += len(hit.spots)
        unshifted = _near_lattice_columns(replace(res, distance_shift_mm=0.0), *columns,
                                          DETECTOR, BEAM, params)
        assert unshifted.sum() < near.sum()
    assert n_near >= 0.98 * n_spots


def test_candidate_pairs_match_a_plain_listing() -> None:
    """The compiled windows and pairs against a plain listing: every pair of pair spots not
    within 8 degrees of collinear with candidates in both windows, sorted as tuples."""
    from sfxflow.algorithms.geometry import lab_to_q, pixels_to_lab_mm
    from sfxflow.algorithms.index import _candidate_pairs

    target = TargetCell("61.4 122.6 168.0 90 90 90", "C 2 2 21")
    params = IndexParams()
    rng = np.random.default_rng(8)
    for n_spots in (9, 15, 30, 60):
        hit = simulated_hit(target, DETECTOR, BEAM, n_spots, rng)
        spots = hit.spots
        q = lab_to_q(pixels_to_lab_mm(DETECTOR, spots.panel, spots.fs_px, spots.ss_px), BEAM)
        q_len = np.linalg.norm(q, axis=1)
        sel = np.argsort(q_len, kind="stable")[: params.n_pair_spots]
        table = target_table(target, 1.0 / (q_len[sel].max() * 1.02))
        win_rep, win_all, pairs = _candidate_pairs(q, q_len, sel, table, params)
        expected = []
        for a, i in enumerate(sel.tolist()):
            tol = params.q_tolerance_rel * q_len[i] + params.q_tolerance_abs_inv_a
            window = [int(np.searchsorted(table.rep_q_len, q_len[i] + d)) for d in (-tol, tol)]
            assert tuple(win_rep[i].tolist()) == tuple(window)
            for j in sel[a + 1:].tolist():
                tol_j = params.q_tolerance_rel * q_len[j] + params.q_tolerance_abs_inv_a
                lo, hi = (int(np.searchsorted(table.q_len, q_len[j] + d)) for d in (-tol_j, tol_j))
                assert tuple(win_all[j].tolist()) == (lo, hi)
                cos = float(q[i] @ q[j]) / (q_len[i] * q_len[j])
                n = (window[1] - window[0]) * (hi - lo)
                if abs(cos) <= math.cos(math.radians(8.0)) and n > 0:
                    expected.append((n, i, j))
        assert [tuple(p) for p in pairs.tolist()] == sorted(expected) and len(pairs) > 0


def test_search_vectors_are_the_numpy_steps_to_the_bit() -> None:
    """The compiled prelude of ``index_spots`` (:func:`_search_vectors`) against the numpy steps
    it replaced: ``q``, ``|q|``, rays, the strict tolerance and the pair order, bit for bit."""
    from sfxflow.algorithms.geometry import lab_to_q, pixels_to_lab_mm
    from sfxflow.algorithms.index import _search_vectors

    params = IndexParams(max_d_a=20.0)
    rng = np.random.default_rng(11)
    shapes = np.array([p.shape for p in DETECTOR.panels])
    pix_all = np.array([p.pixel_size_mm for p in DETECTOR.panels])
    for _ in range(50):
        n = int(rng.integers(1, 80))
        panel = rng.integers(0, len(DETECTOR), n)
        fs, ss = rng.uniform(0, shapes[panel, 1]), rng.uniform(0, shapes[panel, 0])
        z = np.zeros(n)
        spots = SpotTable(panel, fs, ss, z, z, z, np.ones(n, np.int32), z)
        beam = Beam(wavelength_a=float(rng.uniform(0.7, 2.0)))
        lab = pixels_to_lab_mm(DETECTOR, panel, fs, ss)
        q = lab_to_q(lab, beam)
        q_len = np.linalg.norm(q, axis=1)
        eligible = np.flatnonzero((q_len > 0) & (q_len >= 1.0 / params.max_d_a))
        dist = np.linalg.norm(lab, axis=1)
        got = _search_vectors(spots.panel, spots.fs_px, spots.ss_px, DETECTOR, beam, params)
        assert np.array_equal(got[0], q)
        assert np.array_equal(got[1], q_len)
        assert np.array_equal(got[2], lab / dist[:, None])
        assert np.array_equal(got[3], params.strict_tolerance_px * pix_all[panel] / dist
                              / beam.wavelength_a)
        assert np.array_equal(got[4], eligible[np.argsort(q_len[eligible], kind="stable")])


def _least_indexed_numpy(spots: SpotTable, target: TargetCell, params: IndexParams) -> int:
    """``_least_indexed`` as numpy steps, the cell freedom from the gemmi objects each call:
    the reference of the compiled one."""
    from sfxflow.algorithms.index import (
        _PROFILE_PARAMS,
        _acceptance_geometry,
        binomial_log10_tail,
        chance_match_probability,
        log10_independent_trials,
    )
    from sfxflow.algorithms.predict import ProfileModel
    from sfxflow.algorithms.refine import cell_parameters

    n = len(spots)
    f = params.min_fraction_indexed
    least_fraction = min(n, math.ceil(f * n))
    while least_fraction > 0 and (least_fraction - 1) / n >= f:
        least_fraction -= 1
    while least_fraction < n and least_fraction / n < f:
        least_fraction += 1
    least = max(params.min_indexed, least_fraction)
    if least > n or n - least >= min(n, params.n_pair_spots) - 1 or (
            params.max_false_probability >= 1.0):
        return least
    omega, q_len, r_inv_a, _ = _acceptance_geometry(spots, DETECTOR, BEAM, params)
    if params.profile_acceptance:
        narrowest = ProfileModel.for_beam(_PROFILE_PARAMS.min_profile_radius_inv_a, BEAM)
        depth = params.profile_nsigma * narrowest.width_inv_a(q_len)
    else:
        depth = np.full(n, params.significance_excitation_inv_a)
    p = float(np.mean(chance_match_probability(
        target.cell.volume, len(target.space_group.operations().cen_ops), BEAM.wavelength_a,
        omega, depth)))
    delta = float(np.max(r_inv_a) / max(float(np.min(q_len)), 1e-9))
    n_len = n_ang = 0
    if params.refine.refine_cell:
        vals, build = cell_parameters(target.cell, target.space_group)
        n_ang = {"triclinic": 3, "monoclinic": 1}.get(target.space_group.crystal_system_str(), 0)
        if vals.size == 2 and abs(build(vals).alpha - 90.0) > 1e-6:
            n_ang = 1
        n_len = vals.size - n_ang
    trials = log10_independent_trials(
        delta, len(point_group_rotations(target.space_group)), n_len,
        params.cell_length_tolerance, n_ang, params.cell_angle_tolerance_deg, 1.0)
    limit = math.log10(params.max_false_probability) - trials
    if binomial_log10_tail(least, n, p) <= limit:
        return least
    if not binomial_log10_tail(n, n, p) <= limit:
        return n + 1
    lo, hi = least, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if binomial_log10_tail(mid, n, p) <= limit else (mid, hi)
    return hi


def test_least_indexed_is_the_numpy_computation() -> None:
    """The compiled bound (one pass: acceptance geometry, narrowest profile, chance probability,
    resolution) gives the numpy steps' answer on random spot sets, every target and settings
    where the significance test bounds it and where the count tests do."""
    from dataclasses import replace

    from sfxflow.algorithms.index import _least_indexed
    from sfxflow.algorithms.refine import RefineParams
    from sfxflow.benchmarks.index import TARGETS as BENCH_TARGETS

    rng = np.random.default_rng(12)
    settings = [IndexParams(), IndexParams(min_indexed=3), IndexParams(min_indexed=4),
                IndexParams(min_indexed=3, profile_acceptance=False),
                IndexParams(min_indexed=3, max_false_probability=1e-8),
                IndexParams(min_indexed=5, max_false_probability=0.2, profile_nsigma=6.0),
                IndexParams(min_indexed=3, refine=RefineParams(refine_cell=False)),
                IndexParams(min_indexed=3, min_fraction_indexed=0.9, n_pair_spots=30)]
    shapes = np.array([p.shape for p in DETECTOR.panels])
    answers = set()
    for _, cell, sg in BENCH_TARGETS:
        target = TargetCell(cell, sg)
        for _ in range(25):
            n = int(rng.integers(3, 16))
            panel = rng.integers(0, len(DETECTOR), n)
            z = np.zeros(n)
            spots = SpotTable(panel, rng.uniform(0, shapes[panel, 1]),
                              rng.uniform(0, shapes[panel, 0]), z, z, z, np.ones(n, np.int32), z)
            for params in settings:
                got = _least_indexed(spots, DETECTOR, BEAM, target, params)
                assert got == _least_indexed_numpy(spots, target, params)
                answers.add(got - max(params.min_indexed, 1))
            fresh = replace(target)  # a new object: its constants computed again
            assert _least_indexed(spots, DETECTOR, BEAM, fresh, settings[1]) == \
                _least_indexed_numpy(spots, fresh, settings[1])
    assert len(answers) > 3  # the count tests and the significance test both decide somewhere


def test_target_constants_are_rebuilt_read_only_after_pickling() -> None:
    """A target sent to a worker carries its cell and space group, not its search constants."""
    import pickle

    target = TargetCell(TARGETS["P 61 2 2"], "P 61 2 2")
    fixed = target._fixed
    copy = pickle.loads(pickle.dumps(target))
    assert "_fixed" not in copy.__dict__
    assert np.array_equal(copy._fixed.b, fixed.b) and not copy._fixed.b.flags.writeable
    assert copy._fixed.cell_params == fixed.cell_params == tuple(target.cell.parameters)
    assert copy._fixed.n_rotations == len(point_group_rotations(target.space_group)) == 12


def test_further_lattices_may_be_asked_to_index_more_spots_than_the_first() -> None:
    """``further_min_indexed``: a second crystal's 10 spots beside a 30-spot hit are found with
    the default (a further lattice, like the first, must index 8), not when a further lattice
    must index 12; and the 8 spots a hit leaves are not searched when 9 are needed."""
    from dataclasses import replace

    from sfxflow.algorithms.index import (
        IndexParams,
        further_lattice_params,
        index_lattices,
        spots_left_after,
    )
    from sfxflow.benchmarks.index import with_second_crystal

    default = IndexParams()
    assert further_lattice_params(default) is default
    strict = IndexParams(further_min_indexed=12)
    assert further_lattice_params(strict) == replace(strict, min_indexed=12)
    target = TargetCell(TARGETS["P 21 21 21"], "P 21 21 21")
    rng = np.random.default_rng(3)
    both_default = both_strict = 0
    for _ in range(6):
        hit = simulated_hit(target, DETECTOR, BEAM, 30, rng)
        spots, second = with_second_crystal(hit, target, DETECTOR, BEAM, 10, rng)
        for params in (default, strict):
            found = [r for r in index_lattices(spots, DETECTOR, BEAM, target, params) if r.success]
            crystals = [r.crystal for r in found]
            both = all(any(misorientation_deg(c, t) < 0.1 for c in crystals)
                       for t in (hit.truth, second))
            if params is default:
                both_default += both
            else:
                both_strict += both
                assert all(r.n_indexed >= 12 for r in found[1:])
    assert both_default >= 3 and both_strict == 0
    hit = simulated_hit(target, DETECTOR, BEAM, 30, rng)
    (res,) = index_lattices(hit.spots, DETECTOR, BEAM, target, replace(default, max_crystals=1))
    assert res.success
    left = np.flatnonzero(~res.indexed_mask)[:8]
    keep = np.union1d(np.flatnonzero(res.indexed_mask), left)
    sub = hit.spots.select(keep)
    on_sub = replace(res, indexed_mask=res.indexed_mask[keep])
    assert spots_left_after(on_sub, sub, keep, DETECTOR, BEAM, default).size <= 8
    assert spots_left_after(on_sub, sub, keep, DETECTOR, BEAM,
                            replace(default, min_indexed=9)).size == 0
