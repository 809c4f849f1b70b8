from __future__ import annotations

from dataclasses import replace

import gemmi
import numpy as np
import pytest

from sfxflow.algorithms.layouts import cspad, simple
from sfxflow.algorithms.predict import predict_spots
from sfxflow.algorithms.simulate import (
    TRUTH_COLUMNS,
    SimulationParams,
    expected_background,
    iter_frames,
    partiality_width_inv_a,
    random_crystal,
    render_spots,
    simulate_frame,
)
from sfxflow.models import Beam, Crystal

NOISELESS = SimulationParams(noise=False, dead_fraction=0.0, hot_fraction=0.0)


@pytest.fixture(scope="module")
def det():
    return cspad()


def _centroid(img: np.ndarray) -> tuple[float, float]:
    ss, fs = np.indices(img.shape) + 0.5
    w = img.sum()
    return float((img * fs).sum() / w), float((img * ss).sum() / w)


def test_truth_is_self_consistent_on_every_cspad_panel(det):
    """Re-predicting every truth reflection from the truth orientation lands on the centroid of
    its noiseless rendered spot, on all 64 panels; the image holds exactly the truth spots."""
    params = NOISELESS
    beam = params.beam()
    rng = np.random.default_rng(2024)
    covered: set[int] = set()
    scratch = np.zeros(det.data_shape(), dtype=np.float64)
    n_checked = 0
    for _ in range(12):
        crystal = random_crystal(params.cell, params.space_group, rng)
        image, truth = simulate_frame(det, beam, crystal, params, rng)
        n = len(truth["h"])
        assert n > 100
        hkl = np.stack([truth["h"], truth["k"], truth["l"]], axis=1)
        # 1. re-prediction from the truth orientation gives the truth positions
        pred = predict_spots(crystal, beam, det, hkl, 0.01)
        assert len(pred.hkl) == n
        np.testing.assert_array_equal(pred.hkl, hkl)
        np.testing.assert_array_equal(pred.panel, truth["panel"])
        np.testing.assert_allclose(pred.fs_px, truth["fs_px"], atol=1e-9)
        np.testing.assert_allclose(pred.ss_px, truth["ss_px"], atol=1e-9)
        # 2. the noiseless image is background + exactly the truth spots
        bg = expected_background(det, beam, params)
        spots_only, _ = render_spots(det, truth["panel"], truth["fs_px"], truth["ss_px"],
                                     truth["intensity_photons"] / truth["on_panel_fraction"],
                                     params.spot_sigma_px)
        np.testing.assert_allclose(image / params.adu_per_photon, bg + spots_only,
                                   rtol=2e-6, atol=2e-5)
        # 3. each spot alone: its intensity-weighted centroid is the predicted position
        inside = truth["on_panel_fraction"] > 0.999
        for j in np.flatnonzero(inside):
            p = int(truth["panel"][j])
            view = scratch[det.panels[p].data_slices()]
            render_spots(det, truth["panel"][j:j + 1], truth["fs_px"][j:j + 1],
                         truth["ss_px"][j:j + 1], np.array([100.0]), params.spot_sigma_px,
                         out=scratch)
            fs_c, ss_c = _centroid(view)
            assert abs(fs_c - pred.fs_px[j]) < 0.5 and abs(ss_c - pred.ss_px[j]) < 0.5
            assert abs(fs_c - pred.fs_px[j]) < 0.01 and abs(ss_c - pred.ss_px[j]) < 0.01
            assert view.sum() == pytest.approx(100.0 * truth["on_panel_fraction"][j], rel=1e-9)
            view[...] = 0.0
            covered.add(p)
            n_checked += 1
        if len(covered) == len(det):
            break
    assert covered == set(range(len(det))), f"panels without a checked spot: {set(range(64)) - covered}"
    assert n_checked > 500


def test_spots_cut_by_panel_edges_report_the_fraction_recorded():
    det = simple(n_px=64)
    img, frac = render_spots(det, np.array([0, 0, 0]), np.array([0.0, 32.0, 63.6]),
                             np.array([32.0, 0.0, 63.6]), np.array([50.0, 50.0, 50.0]), 1.0)
    from scipy.special import ndtr

    np.testing.assert_allclose(frac, [0.5, 0.5, ndtr(0.4) ** 2], rtol=1e-6)
    assert img.sum() == pytest.approx(50.0 * frac.sum())


def _crystal_with_axis_at_bragg(params, axis_col: int, order: int, det, beam) -> Crystal:
    """A crystal whose reciprocal axis ``axis_col`` puts reflection ``order`` of it exactly in
    the Bragg condition, at an azimuth where its spot lands on a panel."""
    from scipy.spatial.transform import Rotation

    from sfxflow.models import reciprocal_basis

    cell, sg = params.unit_cell(), params.spacegroup()
    b = reciprocal_basis(cell)
    axis = b[:, axis_col] / np.linalg.norm(b[:, axis_col])
    q = order * np.linalg.norm(b[:, axis_col])
    theta = np.arcsin(beam.wavelength_a * q / 2)
    hkl = np.zeros((1, 3), dtype=int)
    hkl[0, axis_col] = order
    for phi in np.linspace(0, 2 * np.pi, 72, endpoint=False):
        d = np.array([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), -np.sin(theta)])
        u = Rotation.align_vectors([d], [axis])[0].as_matrix()
        crystal = Crystal.from_u(cell, sg, u)
        if len(predict_spots(crystal, beam, det, hkl, 1e-6).hkl):
            return crystal
    raise AssertionError("no azimuth puts the reflection on a panel")


def test_systematic_absences_never_in_truth(det):
    params = NOISELESS
    beam = params.beam()
    sg = params.spacegroup()
    # P 61 2 2: 00l only with l = 6n. Put 0 0 12 in the Bragg condition: 0 0 11 is then close
    # enough to the Ewald sphere, and on a panel, to be simulated, were it not absent.
    crystal = _crystal_with_axis_at_bragg(params, 2, 12, det, beam)
    _, truth = simulate_frame(det, beam, crystal, params, np.random.default_rng(0))
    hkl = np.stack([truth["h"], truth["k"], truth["l"]], axis=1)
    axial = hkl[(hkl[:, 0] == 0) & (hkl[:, 1] == 0)]
    assert [0, 0, 12] in axial.tolist()
    assert np.all(axial[:, 2] % 6 == 0)
    near = predict_spots(crystal, beam, det, np.array([[0, 0, 11]]), 0.01)
    assert len(near.hkl) == 1  # on a panel
    width = partiality_width_inv_a(1 / near.d_a, beam, params)
    assert np.exp(-0.5 * (near.excitation_error_inv_a / width) ** 2) > params.partiality_min
    assert not np.any(sg.operations().systematic_absences(hkl))
    # random orientations: no absent index anywhere in the truth
    rng = np.random.default_rng(7)
    for _ in range(4):
        crystal = random_crystal(params.cell, sg, rng)
        _, truth = simulate_frame(det, beam, crystal, params, rng)
        hkl = np.stack([truth["h"], truth["k"], truth["l"]], axis=1)
        assert not np.any(sg.operations().systematic_absences(hkl))
    # an I-centred group makes half of all indices absent
    params_i = replace(params, cell=(60.0, 70.0, 80.0, 90.0, 90.0, 90.0), space_group="I 2 2 2")
    crystal = random_crystal(params_i.cell, params_i.space_group, rng)
    _, truth = simulate_frame(det, beam, crystal, params_i, rng)
    assert len(truth["h"]) > 50
    assert np.all((truth["h"] + truth["k"] + truth["l"]) % 2 == 0)


def test_same_seed_gives_byte_identical_frames():
    det = simple()
    params = replace(SimulationParams(), hit_fraction=0.7)
    a = list(iter_frames(det, params, 4, seed=11))
    b = list(iter_frames(det, params, 4, seed=11))
    for (ta, ia, ra), (tb, ib, rb) in zip(a, b, strict=True):
        assert ia.tobytes() == ib.tobytes()
        assert ta.is_hit == tb.is_hit and ta.beam == tb.beam
        for k in TRUTH_COLUMNS:
            assert ra[k].tobytes() == rb[k].tobytes()
    # frame 2 regenerated alone is the same frame
    (_, alone, _), = iter_frames(det, params, 1, seed=11, start=2)
    assert alone.tobytes() == a[2][1].tobytes()
    c = list(iter_frames(det, params, 4, seed=12))
    assert all(ia.tobytes() != ic.tobytes() for (_, ia, _), (_, ic, _) in zip(a, c, strict=True))
    # simulate_frame itself: same rng state, same bytes
    crystal = random_crystal(params.cell, params.space_group, np.random.default_rng(0))
    x, _ = simulate_frame(det, params.beam(), crystal, params, np.random.default_rng(5))
    y, _ = simulate_frame(det, params.beam(), crystal, params, np.random.default_rng(5))
    assert x.tobytes() == y.tobytes()


def test_blank_frames_hold_background_only(det):
    params = replace(SimulationParams(), hit_fraction=0.5, dead_fraction=0.0, hot_fraction=0.0)
    frames = list(iter_frames(det, params, 6, seed=3))
    blanks = [f for f in frames if not f[0].is_hit]
    hits = [f for f in frames if f[0].is_hit]
    assert blanks and hits
    for truth_frame, image, truth in blanks:
        assert truth_frame.crystal is None
        assert all(len(v) == 0 for v in truth.values())
        bg = expected_background(det, truth_frame.beam, params)
        photons = image / params.adu_per_photon
        # mean equals the background's (Poisson + readout noise average out over 2.3 Mpixel)
        se = np.sqrt(bg.mean() / bg.size)
        assert abs(photons.mean() - bg.mean()) < 6 * se + 1e-4
        # no Bragg peaks: no pixel stands far out of its Poisson background
        assert np.count_nonzero(photons > bg + 8 * np.sqrt(bg) + 3) <= 2
    for _, image, truth in hits:
        photons = image / params.adu_per_photon
        bg = expected_background(det, hits[0][0].beam, params)
        assert np.count_nonzero(photons > bg + 8 * np.sqrt(bg) + 3) > 30
        assert np.count_nonzero(truth["snr_true"] >= 5) > 30


@pytest.mark.parametrize("mu", [0.3, 3.0, 11.5, 40.0, 400.0])
def test_pixel_noise_is_poisson(mu):
    params = SimulationParams(background_photons=mu, water_ring_photons=0.0,
                              readout_noise_photons=0.0, adu_per_photon=1.0,
                              dead_fraction=0.0, hot_fraction=0.0)
    img, _ = simulate_frame(simple(), params.beam(), None, params, np.random.default_rng(1))
    n = img.size
    assert np.all(img == np.round(img)) and img.min() >= 0
    assert abs(img.mean() - mu) < 5 * np.sqrt(mu / n)
    assert img.var() == pytest.approx(mu, rel=6 * np.sqrt(2 / n) + 1e-3)
    if mu < 5:  # P(0) = exp(-mu)
        assert np.mean(img == 0) == pytest.approx(np.exp(-mu), abs=5 * np.sqrt(np.exp(-mu) / n))


def test_gain_dead_hot_and_masked_pixels():
    det = simple()
    mask = np.ones((1024, 1024), dtype=bool)
    mask[:10, :] = False
    det_m = type(det)((det.panels[0].with_mask(mask),))
    params = SimulationParams(dead_fraction=1e-3, hot_fraction=1e-3, hot_photons=500.0)
    img, _ = simulate_frame(det_m, params.beam(), None, params, np.random.default_rng(0))
    assert np.all(img[:10] == 0)
    assert np.all(np.mod(img, 1) == 0)  # whole ADU
    zeros = np.count_nonzero(img[10:] == 0)
    assert zeros >= 0.9e-3 * img[10:].size  # dead pixels (plus a few true zeros)
    hot = np.count_nonzero(img > 400 * params.adu_per_photon)
    assert hot == pytest.approx(1e-3 * img.size, rel=0.2)
    img2, _ = simulate_frame(det_m, params.beam(), None, params, np.random.default_rng(1))
    # the defect pattern is fixed; the noise is not
    np.testing.assert_array_equal(img > 400 * params.adu_per_photon, img2 > 400 * params.adu_per_photon)
    assert img.tobytes() != img2.tobytes()


def test_partiality_and_intensities_follow_the_model(det):
    params = NOISELESS
    beam = params.beam()
    rng = np.random.default_rng(5)
    crystal = random_crystal(params.cell, params.space_group, rng)
    _, truth = simulate_frame(det, beam, crystal, params, rng)
    sigma = partiality_width_inv_a(1 / truth["d_a"], beam, params)
    np.testing.assert_allclose(truth["partiality"],
                               np.exp(-0.5 * (truth["excitation_error_inv_a"] / sigma) ** 2))
    assert truth["partiality"].min() >= params.partiality_min
    assert truth["d_a"].min() >= params.d_min_a
    # symmetry mates share one structure factor: re-labelling the lattice by a point-group
    # operation M (A' = A M, so h' = M^-1 h sits where h did) leaves every spot's photons as is
    ops = params.spacegroup().operations()
    r = np.array(ops.sym_ops[1].rot) // gemmi.Op.DEN  # rotation part of the 6-fold screw
    relabelled = Crystal(crystal.cell, crystal.space_group, crystal.a_matrix @ np.linalg.inv(r).T)
    _, truth2 = simulate_frame(det, beam, relabelled, params, rng)
    assert not np.array_equal(truth2["h"], truth["h"])
    np.testing.assert_allclose(np.sort(truth["intensity_photons"]),
                               np.sort(truth2["intensity_photons"]), rtol=1e-9)


def test_default_hits_look_like_sfx(det):
    """Defaults give about 30-150 reflections per hit clearly above background."""
    params = replace(SimulationParams(), hit_fraction=1.0)
    counts = [int(np.count_nonzero(t["snr_true"] >= 5)) for _, _, t in iter_frames(det, params, 6, 0)]
    assert 30 <= np.median(counts) <= 160, counts


def test_random_crystal_orientations_are_uniform():
    rng = np.random.default_rng(0)
    us = np.array([random_crystal("93 93 130.5 90 90 120", "P6122", rng).u_matrix for _ in range(2000)])
    np.testing.assert_allclose(us.mean(axis=0), 0.0, atol=0.05)  # Haar: E[U] = 0


def test_params_validation():
    with pytest.raises(ValueError, match="hit_fraction"):
        SimulationParams(hit_fraction=1.5)
    with pytest.raises(ValueError, match="spot_sigma_px"):
        SimulationParams(spot_sigma_px=0.0)
    assert SimulationParams().beam() == Beam(1.3051, 2e-3, (0.0, 0.0, 1.0), 5e-5)
