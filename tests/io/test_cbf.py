"""CBF reading: the real multi-panel LCLS CSPAD files (checked against CBFlib), mini-CBF, bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfxflow.errors import SourceError
from sfxflow.io.cbf import CbfSource, cbf_geometry, cbf_to_lab, read_cbf
from sfxflow.models import Frame

CSPAD = "lcls-cspad-thermolysin"
FILES = ("idx-20130301060858401.cbf", "idx-20130301060858601.cbf")


@pytest.fixture(scope="module")
def cspad_path(shared_data: Path) -> Path:
    return shared_data / CSPAD / FILES[0]


@pytest.fixture(scope="module")
def cspad_frame(cspad_path: Path) -> Frame:
    return read_cbf(cspad_path.read_bytes(), str(cspad_path))


def _cbflib_raw_arrays(path: Path) -> dict[str, np.ndarray]:
    """Quadrant arrays decoded by CBFlib directly, (8, 185, 388) each."""
    import pycbf

    h = pycbf.cbf_handle_struct()
    h.read_widefile(str(path).encode(), pycbf.MSG_DIGEST)
    out = {}
    for r in range(4):
        h.find_category(b"array_data")
        h.find_column(b"data")
        h.select_row(r)
        h.find_column(b"array_id")
        aid = h.get_value().decode()
        h.find_column(b"data")
        p = h.get_integerarrayparameters_wdims_fs()
        a = np.frombuffer(h.get_integerarray_as_string(), dtype=np.int32)
        out[aid] = a.reshape(p[11], p[10], p[9])
    return out


def test_every_cspad_panel_matches_cbflib(cspad_path: Path, cspad_frame: Frame) -> None:
    """Origin, axes, pixel size and a far pixel of all 64 ASICs agree with CBFlib's own math."""
    import pycbf

    h = pycbf.cbf_handle_struct()
    h.read_widefile(str(cspad_path).encode(), pycbf.MSG_DIGEST)
    det = cspad_frame.detector
    by_name = {p.name: p for p in det.panels}
    assert len(det) == 64
    seen = set()
    for element in range(64):
        cd = h.construct_detector(element)
        fast_axis_id = cd.get_detector_surface_axes(0).decode()  # e.g. AXIS_D0Q1S3A0_F
        section = "ARRAY_" + fast_axis_id[len("AXIS_"):].rsplit("_", 1)[0]
        panel = by_name[section]
        seen.add(section)
        assert panel.shape == (185, 194)
        origin = np.array(cbf_to_lab(cd.get_pixel_coordinates_fs(0, 0)))
        np.testing.assert_allclose(panel.origin_mm, origin, atol=1e-3)
        axes = cd.get_detector_axes_fs()
        np.testing.assert_allclose(panel.fast_axis, cbf_to_lab(axes[0:3]), atol=1e-6)
        np.testing.assert_allclose(panel.slow_axis, cbf_to_lab(axes[3:6]), atol=1e-6)
        assert panel.pixel_size_mm == pytest.approx(cd.get_inferred_pixel_size(1), abs=1e-6)
        assert panel.pixel_size_mm == pytest.approx(cd.get_inferred_pixel_size(2), abs=1e-6)
        for fs, ss in ((193, 184), (57, 120)):
            far = np.array(cbf_to_lab(cd.get_pixel_coordinates_fs(fs, ss)))
            np.testing.assert_allclose(panel.lab_mm(fs, ss), far, atol=1e-3)
    assert seen == set(by_name)


def test_cspad_header_values(cspad_frame: Frame) -> None:
    det, beam = cspad_frame.detector, cspad_frame.beam
    assert beam.wavelength_a == pytest.approx(1.272607)
    np.testing.assert_allclose(beam.direction, (0, 0, 1), atol=1e-12)
    assert det.mean_distance_mm() == pytest.approx(130.1, abs=0.1)
    for p in det.panels:
        assert p.pixel_size_mm == pytest.approx(0.11, abs=1e-3)
        assert p.max_adu == 90000
        assert p.normal[2] == pytest.approx(1.0, abs=1e-3)  # facing the sample, +z downstream
    assert det.data_shape() == (1480, 1552)


def test_cspad_pixels_land_in_cheetah_layout(cspad_path: Path, cspad_frame: Frame) -> None:
    raw = _cbflib_raw_arrays(cspad_path)
    data = cspad_frame.data
    assert data.shape == (1480, 1552) and data.dtype == np.float32
    for q in range(4):
        a = raw[f"ARRAY_D0Q{q}"]
        np.testing.assert_array_equal(data[:, 388 * q : 388 * (q + 1)], a.reshape(1480, 388))
        for s in (0, 5):
            for asic in (0, 1):
                i = cspad_frame.detector.panel_index(f"ARRAY_D0Q{q}S{s}A{asic}")
                np.testing.assert_array_equal(
                    cspad_frame.panel_data(i), a[s, :, 194 * asic : 194 * (asic + 1)]
                )


def test_untrusted_pixels_are_masked(cspad_path: Path, cspad_frame: Frame) -> None:
    raw = _cbflib_raw_arrays(cspad_path)
    n_bad = sum(int((a <= -400).sum()) for a in raw.values())
    assert n_bad > 0  # this file has a few pixels at or below _array_intensities.undefined_value
    masked = sum(int((~p.good_mask()).sum()) for p in cspad_frame.detector.panels)
    assert masked == n_bad
    for i, p in enumerate(cspad_frame.detector.panels):
        bad = cspad_frame.panel_data(i) <= -400
        np.testing.assert_array_equal(~p.good_mask(), bad)


def test_both_files_through_the_source(shared_data: Path) -> None:
    frames = []
    for name in FILES:
        url = str(shared_data / CSPAD / name)
        with CbfSource(url) as src:
            assert src.n_frames == 1
            frames.append(src.read_frame(0))
            with pytest.raises(SourceError, match="out of range"):
                src.read_frame(1)
    assert frames[0].detector == frames[1].detector  # same metrology in both files
    # ... but each shot has its own wavelength in its header
    assert [f.beam.wavelength_a for f in frames] == pytest.approx([1.272607, 1.272444])
    assert not np.array_equal(frames[0].data, frames[1].data)
    assert all(f.source_url.endswith(".cbf") and f.index == 0 for f in frames)


def test_truncated_cbf_raises_source_error(cspad_path: Path) -> None:
    data = cspad_path.read_bytes()
    for cut in (3000, len(data) // 2, len(data) - 5000):
        with pytest.raises(SourceError, match=r"bad\.cbf"):
            read_cbf(data[:cut], "bad.cbf")


def test_corrupt_binary_section_raises_source_error(cspad_path: Path) -> None:
    data = bytearray(cspad_path.read_bytes())
    start = data.index(b"\x0c\x1a\x04\xd5") + 4 + 2000  # inside the first binary section
    data[start : start + 64] = bytes(range(64))
    with pytest.raises(SourceError, match=r"corrupt\.cbf.*(corrupt|digest|CBFlib)"):
        read_cbf(bytes(data), "corrupt.cbf")


def test_not_a_cbf() -> None:
    with pytest.raises(SourceError, match=r"x\.cbf: not a CBF"):
        read_cbf(b"hello world" * 10, "x.cbf")


def _write_minicbf(path: Path, data: np.ndarray) -> None:
    import fabio.cbfimage

    header = "\n".join(
        [
            "# Detector: PILATUS 1M, S/N 10-0001",
            "# Pixel_size 172e-6 m x 172e-6 m",
            "# Detector_distance 0.2000 m",
            "# Wavelength 1.0332 A",
            "# Beam_xy (15.50, 10.00) pixels",
            "# Count_cutoff 1048500 counts",
        ]
    )
    img = fabio.cbfimage.CbfImage(
        data=data,
        header={"_array_data.header_contents": header,
                "_array_data.header_convention": "PILATUS_1.2"},
    )
    img.write(str(path))


def test_minicbf_single_panel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.poisson(5, size=(20, 30)).astype(np.int32)
    data[0, 0], data[3, 7] = -1, -2  # Pilatus gap / bad pixel
    path = tmp_path / "pilatus_0001.cbf"
    _write_minicbf(path, data)
    frame = read_cbf(path.read_bytes(), str(path))
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    (panel,) = frame.detector.panels
    assert panel.shape == (20, 30)
    assert panel.pixel_size_mm == pytest.approx(0.172)
    assert panel.max_adu == 1048500
    assert frame.beam.wavelength_a == pytest.approx(1.0332)
    np.testing.assert_allclose(panel.lab_mm(15.5, 10.0), (0.0, 0.0, 200.0), atol=1e-9)
    assert int((~panel.good_mask()).sum()) == 2 and not panel.good_mask()[3, 7]
    det, beam = cbf_geometry(path.read_bytes(), str(path))
    assert det[0].shape == (20, 30) and beam.wavelength_a == pytest.approx(1.0332)


def test_minicbf_without_geometry_keys(tmp_path: Path) -> None:
    import fabio.cbfimage

    path = tmp_path / "nogeom.cbf"
    fabio.cbfimage.CbfImage(data=np.zeros((4, 5), np.int32)).write(str(path))
    from sfxflow.errors import GeometryError

    with pytest.raises(GeometryError, match=r"nogeom\.cbf: .*lacks \['pixel'"):
        read_cbf(path.read_bytes(), str(path))
