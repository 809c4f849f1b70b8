from __future__ import annotations

import itertools

import numpy as np
import pytest

from sfxflow.algorithms.geometry import rays_to_pixels
from sfxflow.algorithms.layouts import by_name, cspad, jungfrau4m, lab_extent_mm, simple
from sfxflow.errors import InputError
from sfxflow.models import Detector


def _lab_rect(p) -> tuple[float, float, float, float]:
    n_ss, n_fs = p.shape
    c = p.lab_mm(np.array([0, n_fs, 0, n_fs]), np.array([0, 0, n_ss, n_ss]))
    return c[:, 0].min(), c[:, 0].max(), c[:, 1].min(), c[:, 1].max()


def _assert_no_lab_overlap(det: Detector) -> None:
    for a, b in itertools.combinations(det.panels, 2):
        ax0, ax1, ay0, ay1 = _lab_rect(a)
        bx0, bx1, by0, by1 = _lab_rect(b)
        overlap_x = min(ax1, bx1) - max(ax0, bx0)
        overlap_y = min(ay1, by1) - max(ay0, by0)
        assert overlap_x <= 1e-9 or overlap_y <= 1e-9, (a.name, b.name)


def _assert_data_layout_tiles(det: Detector) -> None:
    count = np.zeros(det.data_shape(), dtype=np.int32)
    for p in det.panels:
        count[p.data_slices()] += 1
    assert count.min() == 1 and count.max() == 1  # every data pixel in exactly one panel


def test_cspad_panels_and_cheetah_data_layout():
    det = cspad()
    assert len(det) == 64
    assert det.data_shape() == (1480, 1552)
    assert [p.name for p in det.panels[:3]] == ["q0a0", "q0a1", "q0a2"]
    assert det.panels[-1].name == "q3a15"
    assert all(p.shape == (185, 194) for p in det.panels)
    assert all(p.pixel_size_mm == pytest.approx(0.10992) for p in det.panels)
    q2a5 = det.panels[det.panel_index("q2a5")]
    assert q2a5.data_origin == (2 * 185, 2 * 388 + 194)
    _assert_data_layout_tiles(det)
    assert set(det.rigid_groups) == {"q0", "q1", "q2", "q3"}
    assert det.mean_distance_mm() == pytest.approx(130.0)


def test_cspad_geometry_is_physical():
    det = cspad(distance_mm=100.0)
    _assert_no_lab_overlap(det)
    # central hole: the direct beam and rays close to it hit nothing
    ang = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    dirs = np.stack([2.0 * np.cos(ang), 2.0 * np.sin(ang), np.full(36, 100.0)], axis=1)
    panel, _, _ = rays_to_pixels(det, np.vstack([[0.0, 0.0, 1.0], dirs]))
    assert (panel == -1).all()
    # the two ASICs of a sensor are side by side with a 3-pixel gap along fs
    a0, a1 = det.panels[0], det.panels[1]
    gap = np.asarray(a1.origin_mm) - np.asarray(a0.lab_mm(194, 0))
    assert np.linalg.norm(gap) == pytest.approx(3 * 0.10992)
    x0, x1, y0, y1 = lab_extent_mm(det)
    assert 85 < -x0 < 110 and 85 < x1 < 110 and 85 < -y0 < 110 and 85 < y1 < 110


def test_cspad_quadrants_are_quarter_turns():
    det = cspad()
    for q in range(1, 4):
        c, s = np.cos(q * np.pi / 2), np.sin(q * np.pi / 2)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        for a in range(16):
            p0 = det.panels[det.panel_index(f"q0a{a}")]
            pq = det.panels[det.panel_index(f"q{q}a{a}")]
            np.testing.assert_allclose(rot @ p0.origin_mm, pq.origin_mm, atol=1e-9)
            np.testing.assert_allclose(rot @ p0.fast_axis, pq.fast_axis, atol=1e-12)
            np.testing.assert_allclose(rot @ p0.slow_axis, pq.slow_axis, atol=1e-12)


def test_cspad_matches_crystfel_cxi_layout(shared_data):
    """Same panel names, data layout and axes as CrystFEL's cspad-cxiformat.geom, and lab
    positions close to its (refined) metrology."""
    from sfxflow.io.geometry import read_geom

    geom = read_geom(shared_data / "geometry" / "cspad-cxiformat.geom")
    real, _ = geom.resolve({k: 0.0 for k in geom.references if "clen" in k} | {
        k: 9500.0 for k in geom.references if "photon_energy" in k})
    det = cspad()
    assert [p.name for p in det.panels] == [p.name for p in real.panels]
    for ours, theirs in zip(det.panels, real.panels, strict=True):
        assert ours.data_origin == theirs.data_origin
        assert ours.shape == theirs.shape
        assert np.dot(ours.fast_axis, theirs.fast_axis) > 0.999
        assert np.dot(ours.slow_axis, theirs.slow_axis) > 0.999
        d_px = np.linalg.norm(np.subtract(ours.origin_mm[:2], theirs.origin_mm[:2])) / 0.10992
        # quadrant 0 is the template (nominal placements); the real quadrants 1-3 are not exact
        # quarter turns about the beam but sit a few mm off (about 20-30 pixels)
        assert d_px < (2.0 if ours.name.startswith("q0") else 35.0), (ours.name, d_px)


def test_jungfrau4m_layout():
    det = jungfrau4m()
    assert len(det) == 8
    assert det.data_shape() == (4096, 1024)
    assert det.n_pixels == 4 * 1024 * 1024
    assert all(p.shape == (512, 1024) and p.pixel_size_mm == 0.075 for p in det.panels)
    _assert_data_layout_tiles(det)
    _assert_no_lab_overlap(det)
    xs = sorted({round(p.origin_mm[0], 6) for p in det.panels})
    assert len(xs) == 2  # two columns
    panel, _, _ = rays_to_pixels(det, np.array([[0.0, 0.0, 1.0]]))
    assert panel[0] == -1  # the beam passes through the central gap


def test_simple_and_by_name():
    det = simple()
    assert det.data_shape() == (1024, 1024)
    panel, fs, ss = rays_to_pixels(det, np.array([[0.0, 0.0, 1.0]]))
    assert panel[0] == 0 and fs[0] == pytest.approx(512) and ss[0] == pytest.approx(512)
    assert by_name("CSPAD", distance_mm=90.0).mean_distance_mm() == pytest.approx(90.0)
    assert by_name("jungfrau4m").mean_distance_mm() == pytest.approx(100.0)
    with pytest.raises(InputError, match="unknown detector layout 'pilatus'"):
        by_name("pilatus")
    with pytest.raises(InputError, match="distance -5"):
        by_name("simple", distance_mm=-5)
