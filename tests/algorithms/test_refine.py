"""Least-squares refinement of stills (sfxflow.algorithms.refine)."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sfxflow.algorithms.geometry import miller_indices, predict_spots
from sfxflow.algorithms.index import misorientation_deg
from sfxflow.algorithms.layouts import cspad
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
