"""CrystFEL .geom reading/writing: the five real files, semantics, round trips, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from sfxflow.errors import GeometryError
from sfxflow.io.geometry import MaskRef, format_geom, parse_geom, read_geom, write_geom
from sfxflow.models import Beam, Detector, Panel


def _unit(*v: float) -> np.ndarray:
    a = np.array(v, dtype=float)
    return a / np.linalg.norm(a)


def _text_value(path: Path, key: str) -> str:
    """The value of ``key = ...`` in a geometry file's own text (comments stripped)."""
    for line in path.read_text().splitlines():
        line = line.split(";", 1)[0]
        if "=" in line and line.split("=", 1)[0].strip() == key:
            return line.split("=", 1)[1].strip()
    raise KeyError(key)


def _vector_from_text(s: str) -> np.ndarray:
    comp = dict.fromkeys("xyz", 0.0)
    for sign, coef, ax in re.findall(r"([+-]?)\s*([\d.]*)\s*([xyz])", s):
        c = float(coef) if coef else 1.0
        comp[ax] += -c if sign == "-" else c
    return _unit(comp["x"], comp["y"], comp["z"])


def _check_panel_against_text(path: Path, det: Detector, name: str) -> Panel:
    """Corner, fs/ss and data rectangle of ``name`` equal the numbers written in the file."""
    p = det[det.panel_index(name)]
    pix = p.pixel_size_mm
    assert p.origin_mm[0] == pytest.approx(float(_text_value(path, f"{name}/corner_x")) * pix)
    assert p.origin_mm[1] == pytest.approx(float(_text_value(path, f"{name}/corner_y")) * pix)
    np.testing.assert_allclose(p.fast_axis, _vector_from_text(_text_value(path, f"{name}/fs")))
    np.testing.assert_allclose(p.slow_axis, _vector_from_text(_text_value(path, f"{name}/ss")))
    min_fs = int(float(_text_value(path, f"{name}/min_fs")))
    max_fs = int(float(_text_value(path, f"{name}/max_fs")))
    min_ss = int(float(_text_value(path, f"{name}/min_ss")))
    max_ss = int(float(_text_value(path, f"{name}/max_ss")))
    assert p.data_origin == (min_ss, min_fs)
    assert p.shape == (max_ss - min_ss + 1, max_fs - min_fs + 1)
    return p


# ------------------------------------------------------------------------------ real files


def test_cspad_cxiformat(shared_data: Path) -> None:
    path = shared_data / "geometry" / "cspad-cxiformat.geom"
    g = read_geom(path)
    assert g.n_panels == 64
    assert g.data_path == "/entry_1/data_1/data" and g.frame_dim == 0
    # clen and photon energy are per-frame HDF5 values; CrystFEL reads header clen in mm
    assert g.references == {"clen": "/LCLS/detector_1/EncoderValue",
                            "photon_energy": "/LCLS/photon_energy_eV"}
    assert g.reference_units == {"clen": "mm", "photon_energy": "eV"}
    with pytest.raises(GeometryError, match="EncoderValue"):
        g.detector()
    det, beam = g.resolve({"clen": -500.0, "photon_energy": 9500.0})
    res = float(_text_value(path, "res"))
    coffset = float(_text_value(path, "coffset"))
    for p in det:
        assert p.pixel_size_mm == pytest.approx(1000.0 / res)
        assert p.origin_mm[2] == pytest.approx(1000.0 * (-0.5 + coffset))  # 73.224 mm
        assert p.shape == (185, 194) and p.data_index == ()
    for name in ("q0a0", "q1a7", "q3a15"):
        _check_panel_against_text(path, det, name)
    assert det.data_shape() == (1480, 1552)  # Cheetah CXI layout
    assert beam is not None and beam.photon_energy_ev == pytest.approx(9500.0)
    # adu_per_eV * photon energy -> adu_per_photon
    assert det[0].adu_per_photon == pytest.approx(0.00338 * 9500.0)
    # values may also be keyed by the HDF5 path itself
    det2, _ = g.resolve({"/LCLS/detector_1/EncoderValue": -500.0,
                         "/LCLS/photon_energy_eV": 9500.0})
    assert det2[5].origin_mm == det[5].origin_mm
    assert g.mask_refs == (MaskRef("/entry_1/data_1/mask", None, 0x0, 0xFFFF,
                                   g.panel_names),)
    # group_* hierarchy expanded to panels
    assert det.rigid_groups["a0"] == ("q0a0", "q0a1")
    assert len(det.rigid_groups["all"]) == 64
    assert len(det.rigid_groups["q1"]) == 16


def test_jungfrau_16m(shared_data: Path) -> None:
    path = shared_data / "geometry" / "jf-swissfel-16M.geom"
    g = read_geom(path)
    assert g.n_panels == 32
    assert g.data_path == "/data/data" and g.frame_dim == 0  # dim0 = %, dim1 = ss, dim2 = fs
    assert g.references == {}
    det, beam = g.resolve()
    assert det == g.detector()
    assert beam is not None and beam.photon_energy_ev == pytest.approx(4570.0)
    for name in ("m0", "m2", "m15", "m31"):
        p = _check_panel_against_text(path, det, name)
        assert p.shape == (514, 1030) and p.data_index == ()
    # "clen = 95.3 mm", per-panel "m0/coffset = -0.000085" (metres) at the end of the file
    assert det[0].origin_mm[2] == pytest.approx(95.3 - 0.085)
    assert det.data_shape() == (16448, 1030)
    assert det[0].pixel_size_mm == pytest.approx(1000.0 / 13333.3)
    assert det[0].adu_per_photon == 1.0
    (mref,) = g.mask_refs
    assert (mref.data_path, mref.file, mref.good_bits, mref.bad_bits) == (
        "/mask", "run47.JF06T32V01.mask.h5", 1, 0)
    # bad_bs_1: fs 890..1029, ss 7710..7770 on m15 (data coordinates; m15 starts at ss 7710)
    m15 = det[det.panel_index("m15")]
    assert m15.mask is not None
    assert int((~m15.mask).sum()) == 61 * 140
    assert not m15.mask[0:61, 890:1030].any() and m15.mask[61:, :].all()
    assert det[det.panel_index("m0")].mask is None


def test_eiger_16m_native(shared_data: Path) -> None:
    path = shared_data / "geometry" / "Eiger16M-binning2-nativefiles.geom"
    g = read_geom(path)
    assert g.n_panels == 1
    assert g.data_path == "/entry/data/data" and g.frame_dim == 0
    assert g.mask_refs == ()  # commented out in the file
    det, beam = g.resolve()
    p = _check_panel_against_text(path, det, "panel0")
    assert p.shape == (2167, 2070)
    assert p.origin_mm == pytest.approx((-1000.0 * 0.075, -1000.0 * 0.075, 100.0), rel=1e-5)
    assert beam is not None and beam.photon_energy_ev == pytest.approx(22000.0)
    # bad regions without a panel apply in data coordinates; check against the file's numbers
    expected = np.ones(p.shape, dtype=bool)
    for name in ("bad_v0", "bad_h0", "bad_h1", "bad_h2"):
        lim = {k: int(_text_value(path, f"{name}/{k}"))
               for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
        expected[lim["min_ss"]:lim["max_ss"] + 1, lim["min_fs"]:lim["max_fs"] + 1] = False
    assert p.mask is not None
    np.testing.assert_array_equal(p.mask, expected)


def test_pilatus(shared_data: Path) -> None:
    path = shared_data / "geometry" / "pilatus.geom"
    g = read_geom(path)
    assert g.n_panels == 1 and g.data_path is None and g.frame_dim is None
    assert g.references == {"clen": "/LCLS/detectorPosition"}
    det, beam = g.resolve({"clen": 100.0})  # mm, as CrystFEL reads a header clen
    p = _check_panel_against_text(path, det, "0")
    assert p.pixel_size_mm == pytest.approx(1000.0 / 5814.0)
    assert p.origin_mm[2] == pytest.approx(100.0 - 0.64)  # coffset = -0.000640 m
    assert beam is not None and beam.photon_energy_ev == pytest.approx(9800.0)
    assert p.adu_per_photon == pytest.approx(0.0001 * 9800.0)
    # x/y beam-stop region (lab plane, pixel units, tested at pixel centres)
    assert p.mask is not None
    x = p.origin_mm[0] / p.pixel_size_mm
    y = p.origin_mm[1] / p.pixel_size_mm
    fs_in, ss_in = int(50 - x), int(50 - y)  # centre near (x, y) = (50.5, 50.5) px
    assert not p.mask[ss_in, fs_in]
    fs_out, ss_out = int(150 - x), int(150 - y)  # x = 150 > max_x = 100, not on a strip
    assert p.mask[ss_out, fs_out]
    # fs/ss strips
    assert not p.mask[:, 487:494].any() and not p.mask[195:212, :].any()


def test_simple(shared_data: Path) -> None:
    path = shared_data / "geometry" / "simple.geom"
    g = read_geom(path)
    assert g.panel_names == ("0", "1")
    det, beam = g.resolve()
    assert beam is None  # no photon_energy/wavelength in the file
    for name in ("0", "1"):
        p = _check_panel_against_text(path, det, name)
        assert p.pixel_size_mm == pytest.approx(1000.0 / 13333.3)
        assert p.origin_mm[2] == pytest.approx(50.0)  # clen = 50.0e-3 m
        assert p.adu_per_photon is None  # adu_per_eV but no photon energy
    assert det[0].data_origin == (512, 0) and det[1].data_origin == (0, 0)
    assert det.data_shape() == (1024, 1024)


@pytest.mark.parametrize("name", ["cspad-cxiformat", "jf-swissfel-16M",
                                  "Eiger16M-binning2-nativefiles", "pilatus", "simple"])
def test_write_then_read_real_files(shared_data: Path, tmp_path: Path, name: str) -> None:
    g = read_geom(shared_data / "geometry" / f"{name}.geom")
    values = {"clen": 120.0, "photon_energy": 9000.0}
    det, beam = g.resolve({k: v for k, v in values.items() if k in g.references})
    out = tmp_path / "out.geom"
    write_geom(det, out, beam=beam, data_path=g.data_path, frame_dim=g.frame_dim,
               mask_refs=g.mask_refs)
    g2 = read_geom(out)
    det2, beam2 = g2.resolve()
    _assert_same_detector(det, det2)
    assert (beam is None) == (beam2 is None)
    if beam is not None and beam2 is not None:
        assert beam2.wavelength_a == pytest.approx(beam.wavelength_a, rel=1e-12)
    assert g2.data_path == g.data_path and g2.frame_dim == g.frame_dim
    assert [(m.data_path, m.file, m.good_bits, m.bad_bits) for m in g2.mask_refs] == \
        [(m.data_path, m.file, m.good_bits, m.bad_bits) for m in g.mask_refs]
    assert det2.rigid_groups == det.rigid_groups


def test_cbf_geometry_round_trips_through_our_reader(shared_data: Path) -> None:
    """The CSPAD CBF's rotated axes carry -0.0 components; they must not be written as '+-0z'."""
    from sfxflow.io.cbf import cbf_geometry

    cbf = shared_data / "lcls-cspad-thermolysin" / "idx-20130301060858401.cbf"
    det, beam = cbf_geometry(cbf.read_bytes(), str(cbf))
    text = format_geom(det, beam=beam, data_path=None, frame_dim=None)
    assert "+-" not in text
    det2, beam2 = parse_geom(text).resolve()
    _assert_same_detector(det, det2)
    assert beam2 is not None and beam2.wavelength_a == pytest.approx(beam.wavelength_a)


def test_negative_zero_axis_components_are_written_readably() -> None:
    panel = Panel(name="p0", shape=(4, 6), pixel_size_mm=0.1, origin_mm=(-0.3, -0.2, 100.0),
                  fast_axis=(1.0, -0.0, -0.0), slow_axis=(-0.0, 1.0, -0.0))
    text = format_geom(Detector((panel,)), beam=Beam(wavelength_a=1.0))
    assert "p0/fs = +1x +0y +0z" in text and "p0/ss = +0x +1y +0z" in text
    _assert_same_detector(Detector((panel,)), parse_geom(text).resolve()[0])


def _assert_same_detector(a: Detector, b: Detector) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert p.name == q.name
        np.testing.assert_allclose(p.origin_mm, q.origin_mm, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(p.fast_axis, q.fast_axis, atol=1e-12)
        np.testing.assert_allclose(p.slow_axis, q.slow_axis, atol=1e-12)
        assert p.pixel_size_mm == pytest.approx(q.pixel_size_mm, rel=1e-12)
        assert (p.shape, p.data_index, p.data_origin) == (q.shape, q.data_index, q.data_origin)
        np.testing.assert_array_equal(p.good_mask(), q.good_mask())
        assert p.max_adu == q.max_adu
        if p.adu_per_photon is None:
            assert q.adu_per_photon is None
        else:
            assert q.adu_per_photon == pytest.approx(p.adu_per_photon)


# ------------------------------------------------------------------------------ semantics

_BASE = """\
res = 10000
clen = 0.1
photon_energy = 12 keV
"""


def _panel(name: str, fs0: int = 0, ss0: int = 0, extra: str = "") -> str:
    return (f"{name}/min_fs = {fs0}\n{name}/max_fs = {fs0 + 9}\n{name}/min_ss = {ss0}\n"
            f"{name}/max_ss = {ss0 + 4}\n{name}/corner_x = -5\n{name}/corner_y = 3\n"
            f"{name}/fs = x\n{name}/ss = y\n{extra}")


def test_defaults_apply_to_later_panels_and_later_lines_override() -> None:
    text = _BASE + _panel("a") + "res = 5000\ncoffset = 0.01\n" + _panel("b", ss0=5) \
        + "a/corner_x = -7\n"
    det = parse_geom(text, "t.geom").detector()
    a, b = det
    assert a.pixel_size_mm == pytest.approx(0.1) and b.pixel_size_mm == pytest.approx(0.2)
    assert a.origin_mm[2] == pytest.approx(100.0) and b.origin_mm[2] == pytest.approx(110.0)
    assert a.origin_mm[0] == pytest.approx(-0.7)  # later a/corner_x overrides
    assert b.data_origin == (5, 0)


def test_clen_units_and_tilted_vectors() -> None:
    text = "res = 10000\nclen = 95.3 mm\n" + _panel("p").replace(
        "p/fs = x", "p/fs = -0.0002x +1.0000y +0.01z")
    det, beam = parse_geom(text, "t.geom").resolve()
    assert beam is None
    p = det[0]
    assert p.origin_mm[2] == pytest.approx(95.3)
    np.testing.assert_allclose(p.fast_axis, _unit(-0.0002, 1.0, 0.01))
    text_m = text.replace("clen = 95.3 mm", "clen = /d/clen m")
    g = parse_geom(text_m, "t.geom")
    assert g.reference_units["clen"] == "m"
    assert g.detector({"clen": 0.2})[0].origin_mm[2] == pytest.approx(200.0)


def test_beam_forms() -> None:
    base = "res = 10000\nclen = 0.1\n" + _panel("p")
    b = parse_geom("photon_energy = 12 keV\n" + base).beam()
    assert b is not None and b.photon_energy_ev == pytest.approx(12000.0)
    b = parse_geom("wavelength = 1.5 A\nbandwidth = 0.001\n" + base).beam()
    assert b is not None and b.wavelength_a == 1.5
    assert b.bandwidth_fwhm == pytest.approx(0.001 * 2.0 * math.sqrt(2.0 * math.log(2.0)))
    b = parse_geom("wavelength = 1.5e-10 m\n" + base).beam()
    assert b is not None and b.wavelength_a == pytest.approx(1.5)
    b = parse_geom("electron_voltage = 200 kV\n" + base).beam()
    assert b is not None and b.wavelength_a == pytest.approx(0.02508, rel=1e-3)
    g = parse_geom("photon_energy = /LCLS/photon_energy_eV\n" + base)
    assert g.references == {"photon_energy": "/LCLS/photon_energy_eV"}
    assert g.detector().panels[0].origin_mm[2] == pytest.approx(100.0)  # no per-frame geometry
    with pytest.raises(GeometryError, match="photon_energy_eV"):
        g.beam()
    b = g.beam({"photon_energy": 9000.0})
    assert b is not None and b.photon_energy_ev == pytest.approx(9000.0)


def test_multi_dimensional_layout() -> None:
    text = ("res = 5000\nclen = 0.2\nphoton_energy = 9000\ndata = /entry/data\n"
            "dim0 = %\ndim2 = ss\ndim3 = fs\n"
            + _panel("m0", extra="m0/dim1 = 0\n") + _panel("m1", extra="m1/dim1 = 1\n")
            + _panel("m2", ss0=5, extra="m2/dim1 = 1\n"))
    g = parse_geom(text, "t.geom")
    assert g.frame_dim == 0 and g.data_path == "/entry/data"
    det = g.detector()
    assert [p.data_index for p in det] == [(0,), (1,), (1,)]
    assert det.data_shape() == (2, 10, 10)
    out = format_geom(det, data_path="/entry/data")
    det2 = parse_geom(out, "out.geom").detector()
    _assert_same_detector(det, det2)


def test_no_clen_is_an_error_only_when_resolving() -> None:
    g = parse_geom("res = 10000\n" + _panel("p"), "noclen.geom")
    assert g.n_panels == 1
    with pytest.raises(GeometryError, match=r"noclen\.geom: clen of panel p is not given"):
        g.resolve()


def test_no_index_and_edges_mask_panels() -> None:
    text = _BASE + _panel("a", extra="a/no_index = 1\n") + _panel(
        "b", ss0=5, extra="b/mask_edge_pixels = 1\n")
    a, b = parse_geom(text).detector()
    assert a.mask is not None and not a.mask.any()
    assert b.mask is not None and int(b.mask.sum()) == (5 - 2) * (10 - 2)
    # written back: no_index / bad regions
    det2 = parse_geom(format_geom(parse_geom(text).detector())).detector()
    np.testing.assert_array_equal(det2[0].good_mask(), a.good_mask())
    np.testing.assert_array_equal(det2[1].good_mask(), b.good_mask())


def test_arbitrary_mask_round_trip() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((5, 10)) > 0.3
    det = Detector((Panel("p", (-1.0, 2.0, 80.0), (1, 0, 0), (0, 1, 0), 0.1, (5, 10),
                          mask=mask),))
    det2 = parse_geom(format_geom(det, beam=Beam(1.0)), "m.geom").detector()
    np.testing.assert_array_equal(det2[0].mask, mask)


def test_references_written_and_resolved(tmp_path: Path) -> None:
    p0 = Panel("a", (-10.0, 5.0, 100.0), (1, 0, 0), (0, 1, 0), 0.075, (4, 6))
    p1 = Panel("b", (3.0, 5.0, 100.5), (0, 1, 0), (-1, 0, 0), 0.075, (4, 6),
               data_origin=(4, 0))
    det = Detector((p0, p1), rigid_groups={"all": ("a", "b")})
    path = tmp_path / "r.geom"
    write_geom(det, path, references={"clen": "/det/z", "photon_energy": "/beam/e"})
    g = read_geom(path)
    assert g.references == {"clen": "/det/z", "photon_energy": "/beam/e"}
    det2, beam2 = g.resolve({"clen": 0.10025, "photon_energy": 9000.0})
    _assert_same_detector(det, det2)
    assert det2.rigid_groups == {"all": ("a", "b")}
    assert beam2 is not None and beam2.photon_energy_ev == pytest.approx(9000.0)


def test_values_from_headers_and_mask_bits() -> None:
    g = parse_geom("clen = /LCLS/detector0-EncoderValue\nres = 1e4\n" + _panel("p"))
    assert g.values_from_headers({"/LCLS/detector0-EncoderValue": -430.0, "/x": 1}) == {
        "clen": -430.0}
    m = MaskRef("/m", None, good_bits=0x1, bad_bits=0xFFFE)
    np.testing.assert_array_equal(m.good_pixels(np.array([0, 1, 2, 3])),
                                  [False, True, False, False])


def test_bad_region_xy_and_panel(shared_data: Path) -> None:
    # the geometry inside the real stream has x/y bad regions and rigid groups
    from sfxflow.io.stream import read_stream

    s = read_stream(shared_data / "crystfel" / "test.stream")
    g = s.geometry
    assert g is not None and g.n_panels == 64
    assert g.peak_list == "/processing/hitfinder/peakinfo-raw"
    assert g.references == {"clen": "/LCLS/detector0-EncoderValue",
                            "photon_energy": "/LCLS/photon_energy_eV"}
    assert [r.name for r in g.bad_regions] == ["bad_thing", "bad_sparkly", "bad_squiggle"]
    det = g.detector({"clen": -430.0})
    assert len(det.rigid_groups["q0"]) == 16
    assert g.rigid_group_collections["quadrants"] == ("q0", "q1", "q2", "q3")
    # every masked pixel centre lies inside one of the x/y rectangles
    for p in det:
        if p.mask is None:
            continue
        ss, fs = np.nonzero(~p.mask)
        xyz = p.lab_mm(fs + 0.5, ss + 0.5) / p.pixel_size_mm
        inside = np.zeros(len(fs), dtype=bool)
        for r in g.bad_regions:
            inside |= ((xyz[:, 0] >= r.min_x) & (xyz[:, 0] <= r.max_x)
                       & (xyz[:, 1] >= r.min_y) & (xyz[:, 1] <= r.max_y))
        assert inside.all()
    assert sum(int((~p.good_mask()).sum()) for p in det) > 1000


# ------------------------------------------------------------------------------ bad input

_GOOD = _BASE + _panel("p0") + _panel("p1", ss0=5)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, s in enumerate(text.splitlines(), start=1) if needle in s)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("p0/fs = x", "p0/fs = x\np0/colour = blue", "blue"),  # unknown panel key
        ("res = 10000", "res = 10000\nmagic_number = 7", "7"),  # unknown key
        ("p1/min_fs = 0", "p1/min_fs = 20", "max_fs=9"),  # min_fs > max_fs
        ("p0/corner_x = -5", "p0/corner_x = -5.x3", "-5.x3"),  # unparsable number
        ("p0/fs = x", "p0/fs = 1.0q +0.2y", "1.0q +0.2y"),  # unparsable vector
        ("p0/max_ss = 4", "p0/max_ss = 4.5", "4.5"),  # not a whole pixel
    ],
)
def test_bad_lines_name_file_line_and_value(old: str, new: str, value: str) -> None:
    text = _GOOD.replace(old, new, 1)
    with pytest.raises(GeometryError) as exc:
        parse_geom(text, "bad.geom")
    msg = str(exc.value)
    assert "\n" not in msg
    line = _line_of(text, new.splitlines()[-1]) if "min_fs = 20" not in new else \
        _line_of(text, "p1/max_fs")
    assert msg.startswith(f"bad.geom:{line}: "), msg
    assert value in msg


@pytest.mark.parametrize("key", ["corner_x", "corner_y", "fs", "ss"])
def test_missing_panel_key(key: str) -> None:
    text = "\n".join(s for s in _GOOD.splitlines() if not s.startswith(f"p1/{key} ")) + "\n"
    with pytest.raises(GeometryError) as exc:
        parse_geom(text, "missing.geom")
    msg = str(exc.value)
    assert msg.startswith(f"missing.geom:{_line_of(text, 'p1/')}: ")
    assert f"panel 'p1' has no {key}" in msg


def test_duplicate_panel_block() -> None:
    text = _GOOD + _panel("p0")  # the whole p0 block pasted again after p1
    with pytest.raises(GeometryError) as exc:
        parse_geom(text, "dup.geom")
    msg = str(exc.value)
    n = len(_GOOD.splitlines()) + 1
    assert msg.startswith(f"dup.geom:{n}: duplicate panel 'p0'") and "p0/min_fs = 0" in msg


def test_duplicate_panel_same_pixels() -> None:
    text = _BASE + _panel("p0") + _panel("p1")  # both read data ss 0..4, fs 0..9
    with pytest.raises(GeometryError) as exc:
        parse_geom(text, "overlap.geom")
    msg = str(exc.value)
    assert msg.startswith(f"overlap.geom:{_line_of(text, 'p1/min_fs')}: duplicate panel 'p1'")
    assert "ss 0..4, fs 0..9" in msg


def test_other_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(GeometryError, match=r"x\.geom:1: line is not 'key = value'"):
        parse_geom("just words\n", "x.geom")
    with pytest.raises(GeometryError, match="no panels"):
        parse_geom("res = 100\n", "x.geom")
    with pytest.raises(GeometryError, match=r"x\.geom:4: unknown unit for clen"):
        parse_geom(_BASE + "clen = 5 furlongs\n" + _panel("p"), "x.geom")
    with pytest.raises(GeometryError, match=r"unknown panel.*'q9'"):
        parse_geom(_GOOD + "bad_a/min_fs = 0\nbad_a/max_fs = 1\nbad_a/min_ss = 0\n"
                   "bad_a/max_ss = 1\nbad_a/panel = q9\n", "x.geom")
    with pytest.raises(GeometryError, match="mixes fs/ss and x/y"):
        parse_geom(_GOOD + "bad_a/min_fs = 0\nbad_a/max_x = 1\n", "x.geom")
    with pytest.raises(GeometryError, match=r"nothere\.geom: cannot read geometry file"):
        read_geom(tmp_path / "nothere.geom")
