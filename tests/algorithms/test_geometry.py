from __future__ import annotations

import gemmi
import numpy as np
import pytest
from numba import njit
from scipy.spatial.transform import Rotation

from sfxflow.algorithms.geometry import (
    miller_indices,
    panel_matrices,
    panel_point_mm,
    pixels_to_lab_mm,
    pixels_to_q,
    plane_grid_to_pixels,
    rays_to_pixels,
)
from sfxflow.algorithms.predict import predict_spots
from sfxflow.models import Beam, Crystal, Detector, Panel


def _two_panel_detector() -> Detector:
    # two tilted panels left and right of the beam, 100 mm away
    left = Panel("left", (-60.0, -30.0, 100.0), (1, 0, 0.1), (0, 1, 0), 0.1, (600, 550))
    right = Panel("right", (5.0, 30.0, 102.0), (0, -1, 0), (1, 0, 0), 0.1, (600, 550))
    return Detector((left, right))


def test_plane_grid_to_pixels_matches_rays_to_pixels_per_panel():
    # the frame picture's fast path: a grid on the plane z = 101 mm through tilted panels
    det = _two_panel_detector()
    x_mm = np.linspace(-70.0, 70.0, 157)
    y_mm = np.linspace(-40.0, 90.0, 131)
    cols, rows = np.meshgrid(x_mm, y_mm)
    dirs = np.stack([cols, rows, np.full(cols.shape, 101.0)], axis=-1).reshape(-1, 3)
    for i, p in enumerate(det.panels):
        hit, fs, ss = plane_grid_to_pixels(panel_matrices(det), i, x_mm, y_mm, 101.0)
        ref_panel, ref_fs, ref_ss = rays_to_pixels(Detector((p,)), dirs)
        assert hit.shape == (131, 157) and hit.any() and not hit.all()
        np.testing.assert_array_equal(hit.reshape(-1), ref_panel == 0)
        np.testing.assert_allclose(fs.reshape(-1)[ref_panel == 0], ref_fs[ref_panel == 0],
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(ss.reshape(-1)[ref_panel == 0], ref_ss[ref_panel == 0],
                                   rtol=0, atol=1e-9)


def test_rays_to_pixels_inverts_pixels_to_lab():
    det = _two_panel_detector()
    rng = np.random.default_rng(0)
    panel = rng.integers(0, 2, 500)
    fs = rng.uniform(0, 550, 500)
    ss = rng.uniform(0, 600, 500)
    lab = pixels_to_lab_mm(det, panel, fs, ss)
    p2, fs2, ss2 = rays_to_pixels(det, lab * 3.7)  # any positive scale of the ray
    np.testing.assert_array_equal(p2, panel)
    np.testing.assert_allclose(fs2, fs, atol=1e-9)
    np.testing.assert_allclose(ss2, ss, atol=1e-9)


def test_rays_missing_every_panel_get_minus_one():
    det = _two_panel_detector()
    p, fs, _ = rays_to_pixels(det, np.array([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]))
    assert p.tolist() == [-1, -1]
    assert np.isnan(fs).all()


def test_pixels_to_q_lies_on_ewald_sphere():
    det = _two_panel_detector()
    beam = Beam(1.3)
    q = pixels_to_q(det, beam, np.array([0, 1]), np.array([10.0, 200.0]), np.array([20.0, 300.0]))
    np.testing.assert_allclose(np.linalg.norm(q + beam.s0_inv_a, axis=1), 1 / 1.3)


@pytest.mark.parametrize(
    ("sg", "cell", "absent"),
    [
        ("P 61 2 2", (93, 93, 130.5, 90, 90, 120), [[0, 0, 1], [0, 0, 5]]),
        ("P 21 21 21", (40, 50, 60, 90, 90, 90), [[1, 0, 0], [0, 3, 0]]),
        ("C 2 2 21", (60, 70, 80, 90, 90, 90), [[1, 0, 1], [0, 0, 3]]),
    ],
)
def test_miller_indices_honour_resolution_and_absences(sg, cell, absent):
    uc = gemmi.UnitCell(*cell)
    hkl = miller_indices(uc, gemmi.SpaceGroup(sg), d_min_a=4.0, d_max_a=30.0)
    d = np.array([uc.calculate_d(list(map(int, h))) for h in hkl[:2000]])
    assert d.min() >= 4.0 - 1e-9
    assert d.max() <= 30.0 + 1e-9
    rows = {tuple(h) for h in hkl.tolist()}
    for h in absent:
        assert tuple(h) not in rows
    # completeness: every allowed index inside the shell is present
    ops = gemmi.SpaceGroup(sg).operations()
    brute = 0
    hmax = [int(x / 4.0) + 1 for x in (uc.a, uc.b, uc.c)]
    for h in range(-hmax[0], hmax[0] + 1):
        for k in range(-hmax[1], hmax[1] + 1):
            for l in range(-hmax[2], hmax[2] + 1):
                if (h, k, l) == (0, 0, 0):
                    continue
                dd = uc.calculate_d([h, k, l])
                if 4.0 <= dd <= 30.0 and not ops.is_systematically_absent([h, k, l]):
                    brute += 1
    assert len(hkl) == brute


def test_predicted_spots_satisfy_the_diffraction_condition():
    cell = gemmi.UnitCell(93, 93, 130.5, 90, 90, 120)
    sg = gemmi.SpaceGroup("P 61 2 2")
    xtal = Crystal.from_u(cell, sg, Rotation.random(random_state=3).as_matrix())
    beam = Beam(1.3)
    det = Detector((Panel("p", (-100.0, -100.0, 120.0), (1, 0, 0), (0, 1, 0), 0.1, (2000, 2000)),))
    pred = predict_spots(xtal, beam, det, miller_indices(cell, sg, 2.0), 2e-3)
    assert len(pred.hkl) > 100
    assert np.abs(pred.excitation_error_inv_a).max() <= 2e-3
    # the pixel's scattering vector is parallel to q + s0 and has the predicted |q| direction
    q_pix = pixels_to_q(det, beam, pred.panel, pred.fs_px, pred.ss_px)
    k_pix = q_pix + beam.s0_inv_a
    k_pred = pred.hkl @ xtal.a_matrix.T + beam.s0_inv_a
    cos = np.sum(k_pix * k_pred, 1) / (np.linalg.norm(k_pix, axis=1) * np.linalg.norm(k_pred, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)


@njit
def _points_mm(d, panel, fs, ss):
    out = np.empty((panel.size, 3))
    for i in range(panel.size):
        out[i, 0], out[i, 1], out[i, 2] = panel_point_mm(d, panel[i], fs[i], ss[i])
    return out


def test_compiled_panel_point_is_pixels_to_lab_to_the_bit():
    """Compiled kernels' affine map sums as the einsum of pixels_to_lab_mm does: same bits, on
    random panel matrices of every scale and any number of points."""
    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 8, 9, 100, 5000):
        d = rng.normal(size=(16, 3, 3)) * rng.choice([1e-3, 0.1, 100.0], size=(16, 3, 3))
        m = panel_matrices(_two_panel_detector())
        m = type(m)(d=d, d_inv=np.linalg.inv(d), shape=np.tile(m.shape[:1], (16, 1)))
        panel = rng.integers(0, 16, n)
        fs, ss = rng.uniform(0, 400, n), rng.uniform(0, 400, n)
        expected = pixels_to_lab_mm(None, panel, fs, ss, matrices=m)  # type: ignore[arg-type]
        assert np.array_equal(_points_mm(d, panel, fs, ss), expected)
