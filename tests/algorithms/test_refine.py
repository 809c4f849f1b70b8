"""Least-squares refinement of stills (sfxflow.algorithms.refine)."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sfxflow.algorithms.geometry import miller_indices
from sfxflow.algorithms.index import misorientation_deg
from sfxflow.algorithms.layouts import cspad
from sfxflow.algorithms.predict import predict_spots
from sfxflow.algorithms.refine import (
    RefineParams,
    assign_hkl,
    cell_parameters,
    predict_positions_px,
    refine_still,
    rotation_matrix,
)
from sfxflow.models import Beam, Crystal, Detector, Panel

BEAM = Beam(wavelength_a=1.3)


def _crystal(cell: str, sg: str, seed: int) -> Crystal:
    return Crystal.from_u(gemmi.UnitCell(*map(float, cell.split())), gemmi.SpaceGroup(sg),
                          Rotation.random(random_state=seed).as_matrix())


def _spots(crystal: Crystal, detector: Detector, noise_px: float, seed: int):
    hkl = miller_indices(crystal.cell, crystal.space_group, 2.2)
    p = predict_spots(crystal, BEAM, detector, hkl, 5e-4)
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(p.panel), size=min(40, len(p.panel)), replace=False)
    fs = p.fs_px[keep] + rng.normal(0, noise_px, keep.size)
    ss = p.ss_px[keep] + rng.normal(0, noise_px, keep.size)
    return p.panel[keep], fs, ss, p.hkl[keep]


def test_rotation_matrix_matches_scipy() -> None:
    v = np.array([0.3, -0.2, 0.5])
    assert np.allclose(rotation_matrix(v), Rotation.from_rotvec(v).as_matrix())
    assert np.allclose(rotation_matrix(np.zeros(3)), np.eye(3))


@pytest.mark.parametrize(("cell", "sg", "n_free"), [
    ("35 41 56 79 87 71", "P 1", 6),
    ("40 50 60 90 101 90", "P 1 21 1", 4),
    ("51 98 53 90 90 90", "P 21 21 21", 3),
    ("79 79 38 90 90 90", "P 43 21 2", 2),
    ("93 93 130.5 90 90 120", "P 61 2 2", 2),
    ("60 60 60 80 80 80", "R 3:R", 2),
    ("78 78 78 90 90 90", "I 2 3", 1),
])
def test_cell_parameters_round_trip(cell: str, sg: str, n_free: int) -> None:
    c = gemmi.UnitCell(*map(float, cell.split()))
    vals, build = cell_parameters(c, gemmi.SpaceGroup(sg))
    assert vals.size == n_free
    assert np.allclose(build(vals).parameters, c.parameters)


def test_assign_hkl_recovers_true_indices() -> None:
    det = cspad(130.0)
    x = _crystal("93 93 130.5 90 90 120", "P 61 2 2", 1)
    panel, fs, ss, hkl = _spots(x, det, 0.0, 1)
    from sfxflow.algorithms.geometry import pixels_to_lab_mm

    lab = pixels_to_lab_mm(det, panel, fs, ss)
    got, ang, exc = assign_hkl(x.a_matrix, lab / np.linalg.norm(lab, axis=1)[:, None], BEAM,
                               1.5e-3, x.space_group)
    assert np.array_equal(got, hkl)
    assert np.all(ang < 1e-6)  # arccos of a float cosine
    assert np.all(np.abs(exc) <= 5e-4 + 1e-12)
    f2, s2 = predict_positions_px(x.a_matrix, got, panel, det, BEAM)
    assert np.allclose(f2, fs) and np.allclose(s2, ss)


def test_refinement_recovers_orientation_and_cell() -> None:
    det = cspad(130.0)
    truth = _crystal("93 93 130.5 90 90 120", "P 61 2 2", 5)
    panel, fs, ss, _ = _spots(truth, det, 0.2, 5)
    # start 0.3 degrees and 1% away
    r = Rotation.from_rotvec(np.radians(0.3) * np.array([0.0, 0.6, 0.8])).as_matrix()
    start = Crystal.from_u(gemmi.UnitCell(93.9, 93.9, 129.2, 90, 90, 120), truth.space_group,
                           r @ truth.u_matrix)
    res = refine_still(start, panel, fs, ss, det, BEAM, RefineParams())
    assert res.n_indexed == len(panel)
    assert res.rmsd_px < 0.5
    assert misorientation_deg(res.crystal, truth) < 0.05
    a, _, c = res.crystal.cell.parameters[:3]
    assert a == pytest.approx(93.0, rel=3e-3)
    assert c == pytest.approx(130.5, rel=3e-3)
    assert res.crystal.cell.gamma == pytest.approx(120.0)


def test_refinement_finds_a_distance_error_and_rejects_outliers() -> None:
    det = Detector((Panel("p", (-100.0, -100.0, 100.0), (1, 0, 0), (0, 1, 0), 0.1, (2000, 2000)),))
    truth = _crystal("79 79 38 90 90 90", "P 43 21 2", 9)
    panel, fs, ss, _ = _spots(truth, det, 0.1, 9)
    fs = fs.copy()
    fs[:3] += 25.0  # three bad centroids
    # the geometry we refine against has the detector 1.5 mm too close
    near = Detector((Panel("p", (-100.0, -100.0, 98.5), (1, 0, 0), (0, 1, 0), 0.1, (2000, 2000)),))
    params = RefineParams(refine_cell=False, refine_distance=True)
    res = refine_still(truth, panel, fs, ss, near, BEAM, params)
    assert res.distance_shift_mm == pytest.approx(1.5, abs=0.1)
    assert not res.indexed_mask[:3].any()
    assert res.indexed_mask[3:].all()
    assert res.rmsd_px < 0.3
    assert np.isnan(res.residuals_px[:3]).all()


def test_distance_and_cell_together_are_refused() -> None:
    """On one still the distance and the cell scale are degenerate: the joint fit traded one for
    the other and turned good solutions into 'refined cell too far from target'."""
    with pytest.raises(ValueError, match="refine_distance needs refine_cell = False"):
        RefineParams(refine_distance=True)


def _shifted(det: Detector, dx: float, dy: float) -> Detector:
    from dataclasses import replace

    return Detector(tuple(replace(p, origin_mm=(p.origin_mm[0] + dx, p.origin_mm[1] + dy,
                                                p.origin_mm[2])) for p in det.panels))


def test_refinement_recovers_a_lateral_detector_shift() -> None:
    """Spots recorded on a detector 0.15 mm / -0.10 mm off its nominal position (a beam-centre
    error of ~1.4 px): the shift is refined, the RMSD drops to the noise and the orientation
    is right; without shift refinement the error stays in the residuals."""
    det = cspad(130.0)
    truth = _crystal("61.4 122.6 168 90 90 90", "C 2 2 21", 21)
    panel, fs, ss, _ = _spots(truth, _shifted(det, 0.15, -0.10), 0.2, 21)
    on = refine_still(truth, panel, fs, ss, det, BEAM, RefineParams(refine_detector_shift=True))
    off = refine_still(truth, panel, fs, ss, det, BEAM, RefineParams())
    assert on.detector_shift_mm == pytest.approx((0.15, -0.10), abs=0.01)
    assert on.rmsd_px < 0.4 < off.rmsd_px
    assert off.detector_shift_mm == (0.0, 0.0)
    assert misorientation_deg(on.crystal, truth) < 0.05
    # the refined shift reproduces the positions through predict_positions_px
    sel = on.indexed_mask
    f2, s2 = predict_positions_px(on.crystal.a_matrix, on.miller_indices[sel], panel[sel], det,
                                  BEAM, detector_shift_mm=on.detector_shift_mm)
    assert np.allclose(f2 - fs[sel], on.residuals_px[sel, 0])
    assert np.allclose(s2 - ss[sel], on.residuals_px[sel, 1])


def test_detector_shift_is_bounded_and_needs_enough_spots() -> None:
    det = cspad(130.0)
    truth = _crystal("61.4 122.6 168 90 90 90", "C 2 2 21", 22)
    panel, fs, ss, _ = _spots(truth, _shifted(det, 0.5, 0.0), 0.2, 22)
    on = RefineParams(refine_detector_shift=True, max_detector_shift_mm=0.1)
    res = refine_still(truth, panel, fs, ss, det, BEAM, on)
    assert abs(res.detector_shift_mm[0]) <= 0.1 + 1e-9
    few = refine_still(truth, panel[:12], fs[:12], ss[:12], det, BEAM, on)
    assert few.detector_shift_mm == (0.0, 0.0)  # 12 < min_spots_detector_shift
    with pytest.raises(ValueError, match="max_detector_shift_mm"):
        RefineParams(max_detector_shift_mm=0.0)


def test_spots_at_absent_reflections_are_not_indexed() -> None:
    """A spot placed exactly where a systematically absent reflection (C centring: h + k odd)
    would be is left unindexed rather than given the absent index."""
    det = cspad(130.0)
    truth = _crystal("61.4 122.6 168 90 90 90", "C 2 2 21", 23)
    p_all = predict_spots(Crystal(truth.cell, gemmi.SpaceGroup("P 1"), truth.a_matrix), BEAM,
                          det, miller_indices(truth.cell, gemmi.SpaceGroup("P 1"), 2.5), 5e-4)
    absent = (p_all.hkl[:, 0] + p_all.hkl[:, 1]) % 2 == 1
    panel, fs, ss, _ = _spots(truth, det, 0.1, 23)
    i = np.flatnonzero(absent)[:5]
    panel2 = np.concatenate([panel, p_all.panel[i]])
    fs2 = np.concatenate([fs, p_all.fs_px[i]])
    ss2 = np.concatenate([ss, p_all.ss_px[i]])
    res = refine_still(truth, panel2, fs2, ss2, det, BEAM, RefineParams())
    assert res.indexed_mask[: len(panel)].sum() >= len(panel) - 1
    assert not res.indexed_mask[len(panel):].any()


@pytest.mark.parametrize(("cell", "sg"), [
    ("35 41 56 79 87 71", "P 1"),
    ("40 50 60 90 101 90", "P 1 21 1"),
    ("93 93 130.5 90 90 120", "P 61 2 2"),
    ("60 60 60 80 80 80", "R 3:R"),
    ("78 78 78 90 90 90", "I 2 3"),
])
def test_compiled_cell_model_matches_gemmi(cell: str, sg: str) -> None:
    # the compiled fit builds B from the free cell parameters itself: it must be gemmi's B
    from sfxflow.algorithms.refine import _cell_map, _reciprocal_basis_of
    from sfxflow.models import reciprocal_basis

    c = gemmi.UnitCell(*map(float, cell.split()))
    values, build, cell6, index = _cell_map(c, gemmi.SpaceGroup(sg))
    moved = values * 1.01
    p = cell6.copy()
    p[index >= 0] = moved[index[index >= 0]]
    assert np.allclose(p, build(moved).parameters, rtol=0, atol=1e-12)
    b = np.empty((3, 3))
    _reciprocal_basis_of(p, b)
    assert np.allclose(b, reciprocal_basis(build(moved)), rtol=1e-12, atol=1e-15)


def test_cell_map_index_cached_per_parameterisation() -> None:
    # the index is found once per lattice system (and free monoclinic angle), then reused
    from sfxflow.algorithms.refine import _cell_map

    sg = gemmi.SpaceGroup("P 1 1 2")  # c-unique: gamma free
    first = _cell_map(gemmi.UnitCell(40, 50, 60, 90, 90, 101), sg)[3]
    again = _cell_map(gemmi.UnitCell(41, 52, 63, 90, 90, 97), sg)[3]
    b_unique = _cell_map(gemmi.UnitCell(40, 50, 60, 90, 101, 90), gemmi.SpaceGroup("P 1 21 1"))[3]
    assert again is first and first.tolist() == [0, 1, 2, -1, -1, 3]
    assert b_unique.tolist() == [0, 1, 2, -1, 3, -1]


def test_compiled_absences_match_gemmi_in_every_setting() -> None:
    # assign_hkl tests absences compiled: it must agree with gemmi's GroupOps everywhere
    from numba import njit

    from sfxflow.algorithms.refine import _absence_ops, _is_absent

    @njit(cache=False)
    def absent(hkl, cen, rot, tran, out):  # pragma: no cover - compiled
        for i in range(hkl.shape[0]):
            out[i] = _is_absent(hkl[i, 0], hkl[i, 1], hkl[i, 2], cen, rot, tran)

    r = np.arange(-7, 8)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3).astype(np.int32)
    out = np.empty(len(hkl), dtype=bool)
    for sg in gemmi.spacegroup_table():
        absent(hkl.astype(np.int64), *_absence_ops(sg.hall), out)
        assert np.array_equal(out, sg.operations().systematic_absences(hkl)), sg.xhm()


def test_compiled_median_is_numpys() -> None:
    from sfxflow.algorithms.robust import median_in_place as _median

    rng = np.random.default_rng(3)
    for n in range(1, 40):
        x = rng.normal(size=n) if n % 3 else np.round(rng.normal(size=n), 1)  # ties too
        assert _median(x.copy()) == np.median(x)
    assert np.isnan(_median(np.array([1.0, np.nan, 2.0])))
    assert np.isnan(_median(np.zeros(0)))


def _assign_hkl_numpy(a, dirs, beam, max_exc, space_group):
    """assign_hkl as it was in numpy (before it was compiled): the reference it must match."""
    a_inv = np.linalg.inv(a)
    s0 = np.asarray(beam.s0_inv_a)
    k0 = 1.0 / beam.wavelength_a
    n = dirs.shape[0]
    offsets = np.linspace(-max_exc, max_exc, 5)
    cand = np.rint(((k0 + offsets)[:, None, None] * dirs[None] - s0) @ a_inv.T).astype(np.int64)
    cand = cand.reshape(-1, 3)
    k = cand @ a.T + s0
    k_len = np.linalg.norm(k, axis=1)
    ang = np.arccos(np.clip(np.einsum("ij,ij->i", k, np.tile(dirs, (5, 1))) / k_len, -1, 1))
    exc = k_len - k0
    bad = np.all(cand == 0, axis=1) | (np.abs(exc) > 2.0 * max_exc)
    if space_group is not None:
        bad |= np.asarray(space_group.operations().systematic_absences(cand.astype(np.int32)))
    ang = np.where(bad, np.inf, ang).reshape(5, n)
    best = np.argmin(ang, axis=0)
    cols = np.arange(n)
    return cand.reshape(5, n, 3)[best, cols], ang[best, cols], exc.reshape(5, n)[best, cols]


@pytest.mark.parametrize(("cell", "sg"), [
    ("93 93 130.5 90 90 120", "P 61 2 2"),
    ("61.4 122.6 168.0 90 90 90", "C 2 2 21"),
    ("45.2 51.7 66.3 79.5 87.2 71.4", None),
])
def test_compiled_assign_hkl_matches_numpy(cell: str, sg: str | None) -> None:
    # random rays (most far from any lattice point, so many have no admissible index) and
    # near-lattice ones: the same index, angle and excitation error as the numpy formulation
    x = _crystal(cell, sg or "P 1", 5)
    rng = np.random.default_rng(5)
    dirs = rng.normal(size=(400, 3)) * [0.3, 0.3, 0.05] + [0.0, 0.0, 1.0]
    dirs[:10] = BEAM.s0_inv_a  # along the beam: only 000 (never chosen) nearby
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    space_group = None if sg is None else x.space_group
    n_none = 0
    for max_exc in (1e-4, 1.5e-3, 1e-2):
        got = assign_hkl(x.a_matrix, dirs, BEAM, max_exc, space_group)
        want = _assign_hkl_numpy(x.a_matrix, dirs, BEAM, max_exc, space_group)
        assert np.array_equal(got[0], want[0])
        assert np.array_equal(np.isinf(got[1]), np.isinf(want[1]))
        # the arccos of a cosine rounded either way: up to sqrt(2 eps) rad near zero
        assert np.allclose(got[1], want[1], rtol=1e-9, atol=3e-8)
        assert np.allclose(got[2], want[2], rtol=0, atol=1e-15)
        assert np.isinf(got[1]).sum() < len(dirs)
        n_none += np.isinf(got[1]).sum()
    assert n_none > 0  # some rays with no admissible index were compared too


def _predict_positions_numpy(a, hkl, panel, detector, dsh, xy):
    """predict_positions_px as it was in numpy (before it was compiled): the reference."""
    from sfxflow.algorithms.refine import _spot_matrices

    _, d_inv = _spot_matrices(detector, panel, dsh, xy)
    k = np.asarray(hkl, dtype=float) @ np.asarray(a).T + np.asarray(BEAM.s0_inv_a)
    v = np.einsum("nij,nj->ni", d_inv, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        return v[:, 0] / v[:, 2], v[:, 1] / v[:, 2]


def test_compiled_predict_positions_match_numpy() -> None:
    # the spots judged near a found lattice (index._near_lattice_columns) depend on these bits:
    # numpy's to the bit from 2 spots on, the detector moved or not; one spot is a single-row
    # product numpy rounds in another order (gemv): within a few ulp
    det = cspad(distance_mm=130.0)
    rng = np.random.default_rng(8)
    for t in range(300):
        n = int(rng.integers(1, 60))
        a = Rotation.random(random_state=t).as_matrix() @ np.diag(1 / rng.uniform(30, 150, 3))
        hkl = rng.integers(-40, 40, (n, 3)).astype(np.int32)
        panel = rng.integers(0, len(det), n)
        shift = (0.0, (0.0, 0.0)) if t % 3 else (float(rng.normal()), tuple(rng.normal(size=2)))
        got = predict_positions_px(a, hkl, panel, det, BEAM, *shift)
        want = _predict_positions_numpy(a, hkl, panel, det, *shift)
        for g, w in zip(got, want, strict=True):
            if n > 1:
                assert np.array_equal(g, w, equal_nan=True)
            else:
                assert np.allclose(g, w, rtol=1e-13, atol=1e-9, equal_nan=True)
