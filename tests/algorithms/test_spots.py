"""Spot finding and hit finding: compiled kernels against numpy/scipy references, synthetic
frames with known spots, the simulator's ground truth, and the real CSPAD CBF frames."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from sfxflow.algorithms import spots as S
from sfxflow.algorithms.detector_tables import as_data3, frame_layout
from sfxflow.algorithms.geometry import d_spacing_a, pixels_to_q
from sfxflow.algorithms.spots import (
    HitParams,
    SpotParams,
    find_spots,
    find_spots_panel,
    ice_ring_d_spacings_a,
    is_hit,
)
from sfxflow.errors import ConfigError, GeometryError
from sfxflow.models import Beam, Detector, Frame, Panel, SpotTable

BEAM = Beam(wavelength_a=1.3)


def _detector(n_panels: int = 4, shape: tuple[int, int] = (96, 120), gain: float | None = None,
              stacked: bool = False, masks: dict[int, np.ndarray] | None = None,
              distance_mm: float = 100.0) -> Detector:
    """Panels in a 2 x 2 arrangement 100 mm from the sample, side by side in a 2-D data array
    (or stacked as (n_panels, ss, fs) with ``stacked``)."""
    panels = []
    n_fs = shape[1]
    for i in range(n_panels):
        x0 = -13.0 + 13.5 * (i % 2)
        y0 = -11.0 + 11.5 * (i // 2)
        panels.append(Panel(
            name=f"p{i}", origin_mm=(x0, y0, distance_mm), fast_axis=(1, 0, 0), slow_axis=(0, 1, 0),
            pixel_size_mm=0.11, shape=shape,
            data_index=(i,) if stacked else (),
            data_origin=(0, 0) if stacked else (0, i * n_fs),
            mask=(masks or {}).get(i), adu_per_photon=gain,
        ))
    return Detector(tuple(panels))


def _gauss_spots(img_shape: tuple[int, ...], centres: np.ndarray, photons: float,
                 sigma_px: float = 0.8) -> np.ndarray:
    """Expected photons of Gaussian spots at continuous (fs, ss) centres on a 2-D plane."""
    out = np.zeros(img_shape)
    for fs, ss in centres:
        c0, r0 = int(fs), int(ss)
        rr, cc = np.mgrid[r0 - 4 : r0 + 5, c0 - 4 : c0 + 5]
        ok = (rr >= 0) & (rr < img_shape[0]) & (cc >= 0) & (cc < img_shape[1])
        g = np.exp(-((cc + 0.5 - fs) ** 2 + (rr + 0.5 - ss) ** 2) / (2 * sigma_px**2))
        g *= photons / (2 * math.pi * sigma_px**2)
        out[rr[ok], cc[ok]] += g[ok]
    return out


def _synthetic_frame(rng: np.random.Generator, n_spots: int = 40, gain: float = 8.0,
                     background: float = 2.0, photons: float = 250.0, stacked: bool = False,
                     masks: dict[int, np.ndarray] | None = None, distance_mm: float = 100.0):
    """4 panels with Poisson background and Gaussian spots; returns (frame, truth rows
    (panel, fs, ss))."""
    det = _detector(gain=gain, stacked=stacked, masks=masks, distance_mm=distance_mm)
    n_ss, n_fs = det[0].shape
    truth = []
    planes = []
    for i in range(len(det)):
        centres = []
        while len(centres) < n_spots // len(det):
            c = rng.uniform([6, 6], [n_fs - 6, n_ss - 6])
            if all(np.hypot(*(c - o)) > 8 for o in centres):
                centres.append(c)
        centres_a = np.array(centres)
        truth.extend((i, fs, ss) for fs, ss in centres_a)
        expected = background + _gauss_spots((n_ss, n_fs), centres_a, photons)
        planes.append(rng.poisson(expected) * gain)
    data = np.stack(planes) if stacked else np.concatenate(planes, axis=1)
    return Frame(data.astype(np.float32), det, BEAM, "synthetic", 0), np.array(truth)


def _match(spots: SpotTable, truth: np.ndarray, radius: float = 2.0):
    found_ok = np.zeros(len(spots), bool)
    truth_ok = np.zeros(len(truth), bool)
    errors = []
    for j in range(len(spots)):
        on = truth[:, 0] == spots.panel[j]
        if not on.any():
            continue
        d = np.hypot(truth[on, 1] - spots.fs_px[j], truth[on, 2] - spots.ss_px[j])
        k = int(np.argmin(d))
        if d[k] <= radius:
            found_ok[j] = True
            truth_ok[np.flatnonzero(on)[k]] = True
            errors.append(d[k])
    return truth_ok.mean(), found_ok.mean() if len(spots) else 0.0, np.median(errors)


# ------------------------------------------------------------------------------------------
# Kernel against a numpy reference
# ------------------------------------------------------------------------------------------


def _reference_strong(img: np.ndarray, good: np.ndarray, half: int, p: SpotParams, gain: float,
                      floor: float = 0.0) -> np.ndarray:
    """Straightforward numpy version of the dispersion test on one panel."""
    k = 2 * half + 1
    v = np.where(good, img.astype(np.float64), 0.0)
    ones = np.ones((k, k))
    n = ndimage.convolve(good.astype(np.float64), ones, mode="constant")
    s = ndimage.convolve(v, ones, mode="constant")
    q = ndimage.convolve(v * v, ones, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = (q - s * mean) / (n - 1)
        expected = np.maximum(gain * mean, floor)
        if p.noise_model == "local":
            strong = (img - mean) > p.sigma_strong * np.sqrt(np.maximum(var, 0))
            disp = (var > expected * (1 + p.sigma_background * np.sqrt(2 / (n - 1)))) | (
                (s <= 0) & (var > expected))
        else:
            strong = (img - mean > p.sigma_strong * np.sqrt(expected)) & (expected > 0)
            disp = var > expected * (1 + p.sigma_background * np.sqrt(2 / (n - 1)))
    return good & (n >= p.min_local) & (img > p.global_threshold_photons * gain) & strong & disp


def _kernel_strong(frame: Frame, p: SpotParams, floor: float = 0.0) -> np.ndarray:
    data3 = as_data3(frame.data)
    prep = frame_layout(frame.detector, tuple(frame.data.shape[:-2]), frame.data.shape[-2:])
    pf = prep.pf(frame.detector, None)
    pf[:, 2] = floor
    sp_panel, sp_r, sp_c, _, n = S._dispersion_strong(
        data3, prep.mask3, prep.ptab, pf, p.half_window, p.sigma_strong, p.sigma_background,
        float(p.min_local), p.global_threshold_photons, p.noise_model == "local", p.border_px,
        16,  # small capacity: exercises the growth path
    )
    out = np.zeros((len(frame.detector), *frame.detector[0].shape), bool)
    out[sp_panel[:n], sp_r[:n], sp_c[:n]] = True
    return out


@pytest.mark.parametrize("window", [5, 7, 9, 11])
@pytest.mark.parametrize("noise_model", ["poisson", "local"])
def test_strong_pixels_match_numpy_reference(window: int, noise_model: str) -> None:
    rng = np.random.default_rng(window)
    masks = {1: rng.random((96, 120)) > 0.05}  # 5 % bad pixels on panel 1
    frame, _ = _synthetic_frame(rng, gain=1.0, photons=120.0, background=3.0, masks=masks)
    p = SpotParams(window_px=window, noise_model=noise_model, border_px=0, sigma_background=4.0)
    got = _kernel_strong(frame, p)
    assert got.sum() > 10
    for i, panel in enumerate(frame.detector):
        ref = _reference_strong(frame.panel_data(i), panel.good_mask(), p.half_window, p, 1.0)
        np.testing.assert_array_equal(got[i], ref, err_msg=f"panel {i}")


@pytest.mark.parametrize("offset", [0.1, 150000.0])
def test_values_inexact_in_float32_are_swept_in_float64(offset: float) -> None:
    # the counts and sums are float32 while the values are integers of at most 2**23 / k**2;
    # a fraction or a larger value from row 40 of the third panel (its own band) makes the
    # sweep redo that band, and sweep the rest, in float64: still the reference's pixels
    rng = np.random.default_rng(11)
    frame, _ = _synthetic_frame(rng, gain=1.0, photons=120.0, background=3.0, stacked=True)
    data = frame.data.copy()
    data[2, 40:, :] += np.float32(offset)
    frame = replace(frame, data=data)
    p = SpotParams(noise_model="poisson", border_px=0, sigma_background=4.0)
    got = _kernel_strong(frame, p)
    assert got[:2].sum() > 10 and got[3].sum() > 5
    for i, panel in enumerate(frame.detector):
        ref = _reference_strong(frame.panel_data(i), panel.good_mask(), p.half_window, p, 1.0)
        np.testing.assert_array_equal(got[i], ref, err_msg=f"panel {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int32, np.float64])
def test_saturation_in_the_data_type_compares_like_float64(dtype: type) -> None:
    # the cleaning loop compares x * float32(1) with the level in that type, rounded up
    levels = np.array([1000.5, 2.0**24 + 0.5, 0.1, 1e39, np.inf, 65535.0, 70000.25])
    max_t = S._saturation(np.zeros((1, 1, 1), dtype), levels)
    for level, m in zip(levels, max_t, strict=True):
        near = np.float64(min(level, 1e7))
        x = np.concatenate([np.arange(-3, 4) + np.floor(near), [0, 65535, 2**24, 2**24 + 2]])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = x[(x >= info.min) & (x <= info.max)]
        else:
            x = np.concatenate([x, np.nextafter(np.float32(near), np.float32([-np.inf, np.inf]))])
        x = x.astype(dtype)
        np.testing.assert_array_equal(x * np.float32(1.0) < m, x.astype(np.float64) < level,
                                      err_msg=f"{dtype.__name__} {level}")


def test_noise_floor_and_gain_enter_the_test_like_the_reference() -> None:
    rng = np.random.default_rng(3)
    frame, _ = _synthetic_frame(rng, gain=4.0, photons=150.0, background=0.5)
    p = SpotParams(noise_model="poisson", border_px=0)
    got = _kernel_strong(frame, p, floor=30.0)
    for i, panel in enumerate(frame.detector):
        ref = _reference_strong(frame.panel_data(i), panel.good_mask(), p.half_window, p, 4.0,
                                floor=30.0)
        np.testing.assert_array_equal(got[i], ref)


def test_components_match_scipy_labelling() -> None:
    rng = np.random.default_rng(5)
    frame, _ = _synthetic_frame(rng, n_spots=60, gain=1.0, photons=400.0)
    # touching spots and a diagonal chain exercise the union-find
    data = frame.data.copy()
    data[40, 10:14] += 80.0
    data[41:45, 60] += 80.0
    for d in range(5):
        data[70 + d, 200 + d] += 90.0
    frame = replace(frame, data=data)
    p = SpotParams(min_spot_pixels=1, max_spot_pixels=10_000, border_px=0, noise_model="poisson",
                   min_snr=0.0)
    strong = _kernel_strong(frame, p)
    spots = find_spots(frame, p)
    expected_sizes = []
    for i in range(len(frame.detector)):
        lab, n = ndimage.label(strong[i], structure=np.ones((3, 3)))
        expected_sizes += list(np.bincount(lab.ravel())[1:])
        assert n == int(np.sum(spots.panel == i))
    assert sorted(expected_sizes) == sorted(spots.n_pixels.tolist())
    assert 5 in spots.n_pixels  # the diagonal chain is one spot


# ------------------------------------------------------------------------------------------
# Synthetic frames with known spots
# ------------------------------------------------------------------------------------------


def test_finds_synthetic_spots_with_accurate_centroids() -> None:
    rng = np.random.default_rng(11)
    frame, truth = _synthetic_frame(rng, n_spots=48)
    spots = find_spots(frame)
    recall, precision, err = _match(spots, truth)
    assert recall >= 0.97 and precision >= 0.97, (recall, precision)
    assert err <= 0.2
    # intensities are background-subtracted photons: ~250 of which the strong pixels hold most
    assert 150 < np.median(spots.intensity) < 280
    assert np.all(np.abs(spots.background - 2.0) < 1.0)
    assert np.median(spots.snr) > 8
    np.testing.assert_allclose(
        spots.d_a, d_spacing_a(pixels_to_q(frame.detector, BEAM, spots.panel, spots.fs_px,
                                           spots.ss_px)))


def test_blank_frame_has_no_spots_and_is_a_miss() -> None:
    rng = np.random.default_rng(2)
    det = _detector(gain=8.0)
    data = (rng.poisson(2.0, det.data_shape()) * 8.0).astype(np.float32)
    spots = find_spots(Frame(data, det, BEAM))
    assert len(spots) <= 1
    assert not is_hit(spots, HitParams())


def test_gain_is_folded_in_not_copied() -> None:
    rng = np.random.default_rng(4)
    frame, _ = _synthetic_frame(rng, gain=1.0)
    det8 = Detector(tuple(replace(p, adu_per_photon=8.0) for p in frame.detector))
    frame8 = Frame((frame.data * 8.0).astype(np.float32), det8, BEAM)
    p = SpotParams(noise_model="poisson")
    a, b = find_spots(frame, p), find_spots(frame8, p)
    assert len(a) == len(b) > 10
    np.testing.assert_allclose(a.fs_px, b.fs_px)
    np.testing.assert_allclose(a.intensity, b.intensity, rtol=1e-9)
    # the override wins over the panels' gain
    c = find_spots(frame8, p, gain_adu_per_photon=1.0)
    assert len(c) > len(b)


def test_stacked_layout_gives_the_same_spots() -> None:
    flat, _ = _synthetic_frame(np.random.default_rng(8))
    stacked, _ = _synthetic_frame(np.random.default_rng(8), stacked=True)
    a, b = find_spots(flat), find_spots(stacked)
    assert len(a) == len(b) > 10
    for k in ("panel", "fs_px", "ss_px", "intensity", "snr", "n_pixels"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k))


def test_panels_swept_as_one_band_match_each_panel_alone() -> None:
    """Panels side by side in the data rows (swept together, one ring row with gaps between
    them) of different widths and gains, beside a panel in other rows, give each panel the
    spots it has alone: no window reaches across a panel edge."""
    rng = np.random.default_rng(21)
    widths = (120, 57, 90)
    panels = []
    planes = []
    fs0 = 0
    for i, (n_fs, gain) in enumerate(zip(widths, (8.0, 1.0, 3.0), strict=True)):
        panels.append(Panel(f"p{i}", (-13.0 + 4.0 * i, -11.0, 100.0), (1, 0, 0), (0, 1, 0),
                            0.11, (96, n_fs), data_origin=(0, fs0), adu_per_photon=gain))
        fs0 += n_fs
        img = rng.poisson(2.0, (96, n_fs)).astype(np.float64)
        img[:, -1] += 60.0  # a bright last column: it must not leak into the next panel
        img[40:42, n_fs // 2 : n_fs // 2 + 2] += 90.0
        planes.append(img * gain)
    panels.append(Panel("p3", (-13.0, 0.5, 100.0), (1, 0, 0), (0, 1, 0), 0.11, (40, 100),
                        data_origin=(96, 0), adu_per_photon=2.0))
    data = np.zeros((136, fs0), np.float32)
    data[:96] = np.concatenate(planes, axis=1)
    data[96:, :100] = rng.poisson(2.0, (40, 100)) * 2.0
    data[110:112, 50:52] += 180.0
    det = Detector(tuple(panels))
    p = SpotParams(border_px=0, min_snr=0.0)
    frame = Frame(data, det, BEAM)
    whole = find_spots(frame, p)
    assert np.all(np.diff(whole.panel) >= 0)  # panel by panel, as before the band sweep
    for i, panel in enumerate(det):
        alone = find_spots_panel(frame.panel_data(i), panel, p, beam=BEAM, panel_index=i)
        on = whole.select(np.flatnonzero(whole.panel == i))
        assert len(on) == len(alone) >= 1, i
        for k in ("fs_px", "ss_px", "intensity", "background", "snr", "n_pixels"):
            np.testing.assert_array_equal(getattr(on, k), getattr(alone, k), err_msg=k)


def test_masked_nan_and_saturated_pixels_never_make_spots() -> None:
    rng = np.random.default_rng(9)
    mask0 = np.ones((96, 120), bool)
    mask0[20:40, 20:40] = False
    frame, _ = _synthetic_frame(rng, masks={0: mask0}, gain=8.0)
    data = frame.data.copy()
    data[25:28, 25:28] = 1e6  # a bright blob on masked pixels
    data[60, 60:63] = np.nan  # NaN pixels in panel 0
    det = Detector(tuple(replace(p, max_adu=5e5) for p in frame.detector))
    data[10:12, 130:132] = 6e5  # saturated blob on panel 1
    spots = find_spots(Frame(data, det, BEAM))
    assert np.all(np.isfinite(spots.fs_px)) and np.all(np.isfinite(spots.intensity))
    for j in range(len(spots)):
        panel = det[int(spots.panel[j])]
        c, r = int(spots.fs_px[j]), int(spots.ss_px[j])
        assert 0 <= r < panel.shape[0] and 0 <= c < panel.shape[1]
        assert panel.good_mask()[r, c]
    assert not np.any((spots.panel == 1) & (np.abs(spots.fs_px - 11) < 3)
                      & (np.abs(spots.ss_px - 11) < 3))


def test_border_pixels_are_ignored() -> None:
    det = _detector(n_panels=1, gain=1.0)
    data = np.random.default_rng(1).poisson(2.0, det.data_shape()).astype(np.float32)
    data[0:2, 50] += 100.0  # bright pair on the first row
    assert len(find_spots(Frame(data, det, BEAM), SpotParams(border_px=0))) == 1
    assert len(find_spots(Frame(data, det, BEAM), SpotParams(border_px=1))) == 0


def test_spot_size_limits() -> None:
    det = _detector(n_panels=1, gain=1.0)
    data = np.random.default_rng(1).poisson(1.0, det.data_shape()).astype(np.float32)
    data[30:33, 30:33] += 100.0  # 9 px
    data[60, 80:82] += 100.0  # 2 px
    f = Frame(data, det, BEAM)
    assert sorted(find_spots(f).n_pixels.tolist()) == [2, 9]
    assert find_spots(f, SpotParams(min_spot_pixels=3)).n_pixels.tolist() == [9]
    assert find_spots(f, SpotParams(max_spot_pixels=8)).n_pixels.tolist() == [2]


def test_resolution_and_ice_ring_filters() -> None:
    rng = np.random.default_rng(12)
    frame, _ = _synthetic_frame(rng, n_spots=120, distance_mm=30.0)
    spots = find_spots(frame)
    d = spots.d_a
    lo, hi = np.percentile(d, [30, 70])
    kept = find_spots(frame, SpotParams(d_min_a=lo, d_max_a=hi))
    assert len(kept) == int(np.sum((d >= lo) & (d <= hi)))
    assert np.all((kept.d_a >= lo) & (kept.d_a <= hi))
    rings = ice_ring_d_spacings_a(1.0)
    near = np.min(np.abs(1 / d[:, None] - 1 / rings[None, :]), axis=1) <= 0.01
    assert near.any()  # 30 mm away the panels span d ~ 2-50 Å: some spots sit on ice rings
    no_ice = find_spots(frame, SpotParams(filter_ice_rings=True, ice_ring_half_width_inv_a=0.01))
    assert len(no_ice) == int(np.sum(~near))


def test_ice_ring_spacings() -> None:
    rings = ice_ring_d_spacings_a(1.5)
    # the strong ice Ih powder lines (Å)
    for d in (3.90, 3.67, 3.44, 2.67, 2.25, 2.07, 1.92, 1.88):
        assert np.min(np.abs(rings - d)) < 0.01, d


def test_radial_method_finds_the_spots() -> None:
    rng = np.random.default_rng(13)
    frame, truth = _synthetic_frame(rng, n_spots=40)
    spots = find_spots(frame, SpotParams(method="radial"))
    recall, precision, err = _match(spots, truth)
    assert recall >= 0.95 and precision >= 0.9 and err <= 0.25


def test_find_spots_panel_matches_find_spots() -> None:
    frame, _ = _synthetic_frame(np.random.default_rng(14))
    whole = find_spots(frame)
    one = find_spots_panel(frame.panel_data(2), frame.detector[2], beam=BEAM, panel_index=2)
    on2 = whole.select(np.flatnonzero(whole.panel == 2))
    np.testing.assert_allclose(one.fs_px, on2.fs_px)
    np.testing.assert_array_equal(one.panel, on2.panel)
    np.testing.assert_allclose(one.d_a, on2.d_a)
    with pytest.raises(GeometryError, match="differs from panel shape"):
        find_spots_panel(np.zeros((3, 3)), frame.detector[0])
    assert np.all(np.isnan(find_spots_panel(frame.panel_data(2), frame.detector[2]).d_a))


def test_timings_are_recorded() -> None:
    frame, _ = _synthetic_frame(np.random.default_rng(15))
    t: dict[str, float] = {}
    find_spots(frame, timings=t)
    assert t["spots_threshold_s"] > 0 and t["spots_resolution_s"] >= 0


def test_bad_frame_layout_is_a_geometry_error() -> None:
    det = _detector()
    with pytest.raises(GeometryError, match="do not fit"):
        find_spots(Frame(np.zeros((96, 200), np.float32), det, BEAM))
    with pytest.raises(GeometryError, match="integer or float"):
        find_spots(Frame(np.zeros(det.data_shape(), bool), det, BEAM))


def test_big_endian_and_integer_data() -> None:
    frame, _ = _synthetic_frame(np.random.default_rng(16))
    ref = find_spots(frame)
    for dtype in (">f4", "<i4", "<u2"):
        got = find_spots(replace(frame, data=frame.data.astype(dtype)))
        np.testing.assert_allclose(got.fs_px, ref.fs_px)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window_px": 8}, "window_px"),
    ({"method": "fast"}, "method"),
    ({"noise_model": "gauss"}, "noise_model"),
    ({"sigma_strong": -1.0}, "sigma_strong"),
    ({"min_spot_pixels": 5, "max_spot_pixels": 2}, "max_spot_pixels"),
    ({"d_min_a": 5.0, "d_max_a": 2.0}, "d_min_a"),
    ({"background_margin_px": 0}, "background_margin_px"),
    ({"border_px": -1}, "border_px"),
])
def test_bad_parameters_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SpotParams(**kwargs)


def test_hit_decision() -> None:
    n = 15
    t = SpotTable(panel=np.zeros(n), fs_px=np.zeros(n), ss_px=np.zeros(n),
                  intensity=np.zeros(n), background=np.zeros(n), snr=np.zeros(n),
                  n_pixels=np.zeros(n), d_a=np.linspace(2.0, 9.0, n))
    assert is_hit(t, HitParams(min_spots=15))
    assert not is_hit(t, HitParams(min_spots=16))
    n_high = int(np.sum(t.d_a <= 4.0))
    assert is_hit(t, HitParams(min_spots=5, min_spots_beyond_d_a=n_high, d_a=4.0))
    assert not is_hit(t, HitParams(min_spots=5, min_spots_beyond_d_a=n_high + 1, d_a=4.0))
    assert not is_hit(SpotTable.empty(), HitParams(min_spots=1))
    with pytest.raises(ConfigError, match="min_spots"):
        HitParams(min_spots=-1)
    with pytest.raises(ConfigError, match="d_a"):
        HitParams(d_a=0.0)


# ------------------------------------------------------------------------------------------
# Simulator ground truth (looser versions of the bench --accuracy goals)
# ------------------------------------------------------------------------------------------


def test_accuracy_against_simulated_truth() -> None:
    pytest.importorskip("sfxflow.algorithms.simulate")
    from sfxflow.benchmarks.spots import measure_accuracy

    rep = measure_accuracy(16, seed=21)
    assert rep.hits_true >= 4 and rep.reflections_snr5 > 200
    assert rep.recall >= 0.92, rep
    assert rep.precision >= 0.95, rep
    assert rep.median_centroid_error_px <= 0.3, rep
    assert rep.hit_accuracy >= 0.9, rep


# ------------------------------------------------------------------------------------------
# Real CSPAD frames
# ------------------------------------------------------------------------------------------


def test_real_cspad_cbf_frames(shared_data) -> None:
    pytest.importorskip("sfxflow.io.cbf")
    from sfxflow.io.sources import open_source

    cbfs = sorted((shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))
    assert len(cbfs) == 2
    for path in cbfs:
        with open_source(str(path)) as src:
            frame = src.read_frame(0)
        for params, gain in ((SpotParams(), None), (SpotParams(noise_model="poisson"), 25.0)):
            spots = find_spots(frame, params, gain_adu_per_photon=gain)
            assert 50 < len(spots) < 5000, (path.name, len(spots))
            assert is_hit(spots, HitParams())
            # every centroid lies on a good pixel of its own panel (none in gaps or masks)
            for j in range(len(spots)):
                panel = frame.detector[int(spots.panel[j])]
                r, c = int(spots.ss_px[j]), int(spots.fs_px[j])
                assert 0 <= r < panel.shape[0] and 0 <= c < panel.shape[1]
                assert panel.good_mask()[r, c]
            assert np.all((spots.d_a > 1.0) & (spots.d_a < 100.0))


def test_min_snr_drops_weak_spots_only() -> None:
    rng = np.random.default_rng(17)
    frame, _ = _synthetic_frame(rng, n_spots=48, photons=60.0)
    every = find_spots(frame, SpotParams(min_snr=0.0))
    assert len(every) > 20 and every.snr.min() < 6.0 < every.snr.max()
    strong = find_spots(frame, SpotParams(min_snr=6.0))
    assert len(strong) == int(np.sum(every.snr >= 6.0)) < len(every)
    assert np.all(strong.snr >= 6.0)
    np.testing.assert_allclose(strong.fs_px, every.fs_px[every.snr >= 6.0])
    panel = find_spots_panel(frame.panel_data(1), frame.detector[1], SpotParams(min_snr=6.0))
    assert np.all(panel.snr >= 6.0)
    with pytest.raises(ConfigError, match="min_snr"):
        SpotParams(min_snr=-1.0)


# ------------------------------------------------------------------------------------------
# Real CSPAD frames through the indexer
# ------------------------------------------------------------------------------------------

THERMOLYSIN = ("93 93 130.5 90 90 120", "P 61 2 2")


def _on_lattice(crystal, spots: SpotTable, frame: Frame, tol_px: float = 3.0) -> np.ndarray:
    """Spots within ``tol_px`` of the predicted position of their best Miller index."""
    from sfxflow.algorithms.geometry import pixels_to_lab_mm
    from sfxflow.algorithms.refine import assign_hkl, predict_positions_px

    lab = pixels_to_lab_mm(frame.detector, spots.panel, spots.fs_px, spots.ss_px)
    dirs = lab / np.linalg.norm(lab, axis=1)[:, None]
    hkl, _, _ = assign_hkl(crystal.a_matrix, dirs, frame.beam, 0.0015, crystal.space_group)
    fs, ss = predict_positions_px(crystal.a_matrix, hkl, spots.panel, frame.detector,
                                  frame.beam)
    r = np.hypot(fs - spots.fs_px, ss - spots.ss_px)
    return np.isfinite(r) & (r <= tol_px)


@pytest.mark.parametrize(("name", "min_on_lattice"), [
    ("idx-20130301060858401.cbf", 0.85),
    ("idx-20130301060858601.cbf", 0.4),  # two crystals: the second lattice holds ~30 spots
])
def test_real_cspad_settings_find_lattice_spots(shared_data, name: str,
                                                min_on_lattice: float) -> None:
    """With CSPAD_CBF_SETTINGS most found spots lie on the indexed lattice, many more than with
    the defaults, and the indexer still indexes as many spots."""
    pytest.importorskip("sfxflow.io.cbf")
    from sfxflow.algorithms.index import IndexParams, TargetCell, index_spots
    from sfxflow.algorithms.spots import CSPAD_CBF_GAIN_ADU_PER_PHOTON, CSPAD_CBF_SETTINGS
    from sfxflow.io.sources import open_source

    with open_source(str(shared_data / "lcls-cspad-thermolysin" / name)) as src:
        frame = src.read_frame(0)
    target = TargetCell(*THERMOLYSIN)
    fractions = {}
    for label, params, gain in (("cspad", SpotParams(**CSPAD_CBF_SETTINGS),
                                 CSPAD_CBF_GAIN_ADU_PER_PHOTON), ("default", SpotParams(), None)):
        spots = find_spots(frame, params, gain_adu_per_photon=gain)
        res = index_spots(spots, frame.detector, frame.beam, target, IndexParams())
        assert res.success, (label, res.reason)
        a, _, c = res.crystal.cell.parameters[:3]
        assert abs(a / 93.0 - 1) < 0.01 and abs(c / 130.5 - 1) < 0.01
        on = _on_lattice(res.crystal, spots, frame)
        fractions[label] = on.mean()
        print(f"\n{name} {label}: {len(spots)} spots, {res.n_indexed} indexed, rmsd "
              f"{res.rmsd_px:.2f} px, {on.sum()} ({on.mean():.2f}) within 3 px of the lattice")
        if label == "cspad":
            assert 80 <= len(spots) <= 400
            assert res.n_indexed >= 40 and res.rmsd_px <= 1.5
            assert on.mean() >= min_on_lattice
            assert np.all(spots.snr >= CSPAD_CBF_SETTINGS["min_snr"])
    assert fractions["cspad"] >= 2.0 * fractions["default"]


@pytest.mark.parametrize("border", [1, 2])
def test_real_cspad_no_spot_on_masked_pixels(shared_data, border: int) -> None:
    """Spots keep off the masked ASIC edges (incl. the double-width middle columns of each
    2x1 sensor) and off the panel masks."""
    pytest.importorskip("sfxflow.io.cbf")
    from sfxflow.io.sources import open_source

    path = sorted((shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))[1]
    with open_source(str(path)) as src:
        frame = src.read_frame(0)
    for min_snr in (0.0, 6.0):
        spots = find_spots(frame, SpotParams(border_px=border, min_snr=min_snr))
        assert len(spots) > 50
        for j in range(len(spots)):
            panel = frame.detector[int(spots.panel[j])]
            r, c = int(spots.ss_px[j]), int(spots.fs_px[j])
            assert border <= r < panel.shape[0] - border, (j, r)
            assert border <= c < panel.shape[1] - border, (j, c)
            assert panel.good_mask()[r, c]
