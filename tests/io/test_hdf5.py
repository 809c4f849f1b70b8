"""HDF5 sources: CXI/Cheetah files with a CrystFEL geometry, and NeXus NXmx master + data files."""

from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from sfxflow.errors import GeometryError, SourceError
from sfxflow.io.geometry import parse_geom
from sfxflow.io.hdf5 import CxiSource, NxmxSource, open_hdf5_source
from sfxflow.models import photon_energy_ev_to_wavelength_a

GEOM = """\
clen = /LCLS/detector_1/EncoderValue
photon_energy = /LCLS/photon_energy_eV
res = 10000
adu_per_photon = 1
coffset = 0.0
dim0 = %
dim1 = ss
dim2 = fs
data = /entry_1/data_1/data
mask = /entry_1/data_1/mask
mask_good = 0x0
mask_bad = 0x1

p0/min_fs = 0
p0/max_fs = 29
p0/min_ss = 0
p0/max_ss = 19
p0/corner_x = -30
p0/corner_y = -10
p0/fs = x
p0/ss = y

p1/min_fs = 0
p1/max_fs = 29
p1/min_ss = 20
p1/max_ss = 39
p1/corner_x = 0
p1/corner_y = -10
p1/fs = -y
p1/ss = x
"""
N_FRAMES = 7


def write_cxi(path: Path, n_frames: int = N_FRAMES, seed: int = 0, compress: bool = True,
              clen_per_frame: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.poisson(3.0, size=(n_frames, 40, 30)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        kw = dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4")) if compress else {}
        f.create_dataset("/entry_1/data_1/data", data=data, chunks=(1, 40, 30), **kw)
        mask = np.zeros((40, 30), np.uint16)
        mask[5, 6] = 1  # bad pixel in p0
        mask[25, 3] = 1 | 4  # bad pixel in p1 (other bits ignored)
        mask[30, 3] = 4  # not bad
        f["/entry_1/data_1/mask"] = mask
        clen = 100.0 + np.arange(n_frames) if clen_per_frame else np.float64(120.0)
        f["/LCLS/detector_1/EncoderValue"] = clen
        f["/LCLS/photon_energy_eV"] = (9000.0 + 10 * np.arange(n_frames) if clen_per_frame
                                       else np.array([9000.0]))
    return data


@pytest.fixture()
def geom():
    return parse_geom(GEOM, "two_panels.geom")


def test_cxi_frames_geometry_and_masks(tmp_path: Path, geom) -> None:
    path = tmp_path / "run_0001.cxi"
    data = write_cxi(path)
    with open_hdf5_source(str(path), geom) as src:
        assert isinstance(src, CxiSource) and src.kind == "cxi"
        assert src.n_frames == N_FRAMES
        frames = src.read_frames(2, 6)
        single = src.read_frame(4)
    assert [f.index for f in frames] == [2, 3, 4, 5]
    for f in frames:
        assert f.data.dtype == np.float32
        np.testing.assert_array_equal(f.data, data[f.index])
        # clen (mm in the file) and photon energy per frame
        assert f.detector[0].origin_mm[2] == pytest.approx(100.0 + f.index)
        assert f.beam.wavelength_a == pytest.approx(
            photon_energy_ev_to_wavelength_a(9000.0 + 10 * f.index))
        p0, p1 = f.detector.panels
        assert p0.origin_mm[:2] == pytest.approx((-3.0, -1.0))
        assert not p0.good_mask()[5, 6] and int((~p0.good_mask()).sum()) == 1
        assert not p1.good_mask()[5, 3] and int((~p1.good_mask()).sum()) == 1
        np.testing.assert_array_equal(f.panel_data(1), data[f.index, 20:40, :])
    np.testing.assert_array_equal(single.data, frames[2].data)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
@pytest.mark.parametrize("shuffle", [True, False])
def test_cxi_gzip_frames_decoded_without_the_filter_pipeline(tmp_path: Path, geom, dtype,
                                                             shuffle) -> None:
    """gzip frames (one chunk each) are inflated by sfxflow itself: same values as h5py."""
    import sfxflow.io.hdf5 as hdf5_mod

    path = tmp_path / "gzip.cxi"
    write_cxi(path, compress=False)
    rng = np.random.default_rng(3)
    data = rng.integers(-300 if dtype == np.int16 else 0, 40000 if dtype == np.uint16 else 300,
                        size=(N_FRAMES, 40, 30)).astype(dtype)
    with h5py.File(path, "a") as f:
        del f["/entry_1/data_1/data"]
        f.create_dataset("/entry_1/data_1/data", data=data, chunks=(1, 40, 30),
                         compression="gzip", compression_opts=6, shuffle=shuffle)
    calls = []
    real = hdf5_mod._read_deflate_frame
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5_mod, "_read_deflate_frame", lambda *a: calls.append(a) or real(*a))
        with open_hdf5_source(str(path), geom) as src:
            frames = src.read_frames(1, 5)
    assert len(calls) == 4
    for f in frames:
        assert f.data.dtype == np.float32
        np.testing.assert_array_equal(f.data, data[f.index].astype(np.float32))


def test_cxi_other_chunking_read_by_h5py(tmp_path: Path, geom) -> None:
    from sfxflow.io.hdf5 import _deflate_frames

    path = tmp_path / "chunks.cxi"
    data = np.arange(N_FRAMES * 40 * 30, dtype=np.uint16).reshape(N_FRAMES, 40, 30)
    with h5py.File(path, "w") as f:
        a = f.create_dataset("a", data=data, chunks=(2, 40, 30), compression="gzip")
        b = f.create_dataset("b", data=data, chunks=(1, 40, 30), compression="lzf")
        c = f.create_dataset("c", data=data.astype(np.float32), chunks=(1, 40, 30),
                             compression="gzip")
        d = f.create_dataset("d", data=data, chunks=(1, 40, 30), compression="gzip",
                             shuffle=True, fletcher32=True)
        assert [_deflate_frames(x, 0) for x in (a, b, c, d)] == [None] * 4


def test_cxi_scalar_reference_shares_one_detector(tmp_path: Path, geom) -> None:
    path = tmp_path / "run_0002.cxi"
    write_cxi(path, clen_per_frame=False, compress=False)
    with open_hdf5_source(str(path), geom) as src:
        a, b = src.read_frames(0, 2)
    assert a.detector[0].origin_mm[2] == pytest.approx(120.0)
    assert a.detector is b.detector  # same per-frame values -> one Detector object


def test_cxi_missing_dataset(tmp_path: Path, geom) -> None:
    path = tmp_path / "nodata.cxi"
    with h5py.File(path, "w") as f:
        f["/entry_1/other"] = np.zeros((2, 40, 30))
    with pytest.raises(SourceError, match=r"nodata\.cxi: no dataset /entry_1/data_1/data"):
        open_hdf5_source(str(path), geom)


def test_cxi_panels_outside_data(tmp_path: Path, geom) -> None:
    path = tmp_path / "small.cxi"
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = np.zeros((2, 30, 30), np.float32)
        f["/entry_1/data_1/mask"] = np.zeros((30, 30), np.uint16)
        f["/LCLS/detector_1/EncoderValue"] = 100.0
        f["/LCLS/photon_energy_eV"] = 9000.0
    with pytest.raises(GeometryError, match=r"small\.cxi: panel p1 .* outside the frame shape"):
        open_hdf5_source(str(path), geom)


def test_cxi_missing_reference(tmp_path: Path, geom) -> None:
    path = tmp_path / "noref.cxi"
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = np.zeros((2, 40, 30), np.float32)
        f["/entry_1/data_1/mask"] = np.zeros((40, 30), np.uint16)
        f["/LCLS/photon_energy_eV"] = 9000.0
    with pytest.raises(GeometryError, match="EncoderValue, which this file does not have"):
        open_hdf5_source(str(path), geom)


def test_hdf5_without_geometry_or_nxmx(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    write_cxi(path)
    with pytest.raises(GeometryError, match=r"plain\.h5: .*needs a CrystFEL geometry"):
        open_hdf5_source(str(path))


def test_not_hdf5(tmp_path: Path, geom) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not hdf5" * 100)
    with pytest.raises(SourceError, match=r"junk\.h5: not a readable HDF5 file"):
        open_hdf5_source(str(path), geom)


# ------------------------------------------------------------------------------ NXmx

PIX_M = 75e-6
DIST_MM = 150.0


def _tr(grp: h5py.Group, name: str, value, ttype: str, vector, depends_on: str,
        units: str, offset=None, offset_units: str = "mm") -> h5py.Dataset:
    ds = grp.create_dataset(name, data=value)
    ds.attrs["transformation_type"] = ttype
    ds.attrs["vector"] = np.asarray(vector, float)
    ds.attrs["depends_on"] = depends_on
    ds.attrs["units"] = units
    if offset is not None:
        ds.attrs["offset"] = np.asarray(offset, float)
        ds.attrs["offset_units"] = offset_units
    return ds


def write_nxmx(folder: Path, n_per_file: int = 4, n_files: int = 2) -> np.ndarray:
    """A 2-module detector (frames x 2 x 16 x 24 -> modules stacked along ss: 32 x 24)."""
    rng = np.random.default_rng(5)
    data = rng.poisson(2.0, size=(n_per_file * n_files, 32, 24)).astype(np.int32)
    for k in range(n_files):
        with h5py.File(folder / f"scan_data_{k + 1:06d}.h5", "w") as f:
            f.create_dataset("/entry/data/data", data=data[k * n_per_file:(k + 1) * n_per_file],
                             chunks=(1, 32, 24), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(folder / "scan_master.h5", "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXmx"
        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        beam = inst.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        wl = beam.create_dataset("incident_wavelength", data=0.1)  # nm
        wl.attrs["units"] = "nm"
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det["saturation_value"] = 50000
        pm = np.zeros((32, 24), np.uint32)
        pm[3, 4] = 1
        pm[20, 10] = 8
        det["pixel_mask"] = pm
        tr = det.create_group("transformations")
        tr.attrs["NX_class"] = "NXtransformations"
        _tr(tr, "det_z", DIST_MM / 1000, "translation", (0, 0, 1), ".", "m")
        _tr(tr, "det_rot", 90.0, "rotation", (0, 0, 1), "/entry/instrument/detector/transformations/det_z", "deg")
        for m in range(2):
            mod = det.create_group(f"module_{m}")
            mod.attrs["NX_class"] = "NXdetector_module"
            mod["data_origin"] = np.array([16 * m, 0])
            mod["data_size"] = np.array([16, 24])
            _tr(mod, "module_offset", 0.0, "translation", (1, 0, 0),
                "/entry/instrument/detector/transformations/det_rot", "mm",
                offset=(-10.0 + 12.0 * m, 5.0, 0.0))
            off = f"/entry/instrument/detector/module_{m}/module_offset"
            _tr(mod, "fast_pixel_direction", PIX_M, "translation", (-1, 0, 0), off, "m")
            _tr(mod, "slow_pixel_direction", PIX_M * 1e6, "translation", (0, -1, 0), off, "um")
        nxdata = entry.create_group("data")
        nxdata.attrs["NX_class"] = "NXdata"
        for k in range(n_files):
            nxdata[f"data_{k + 1:06d}"] = h5py.ExternalLink(f"scan_data_{k + 1:06d}.h5",
                                                            "/entry/data/data")
    return data


def test_nxmx_master_with_external_data(tmp_path: Path) -> None:
    data = write_nxmx(tmp_path)
    with open_hdf5_source(str(tmp_path / "scan_master.h5")) as src:
        assert isinstance(src, NxmxSource) and src.kind == "nxmx"
        assert src.n_frames == 8
        frames = src.read_frames(2, 7)  # spans both data files
    assert [f.index for f in frames] == [2, 3, 4, 5, 6]
    for f in frames:
        np.testing.assert_array_equal(f.data, data[f.index])
        assert f.beam.wavelength_a == pytest.approx(1.0)
    det = frames[0].detector
    assert len(det) == 2
    p0, p1 = det.panels
    # det_rot turns +x into +y: module offset (-10 + 12 m, 5, 0) -> (-5, -10 + 12 m, 0) + z
    np.testing.assert_allclose(p0.origin_mm, (-5.0, -10.0, DIST_MM), atol=1e-9)
    np.testing.assert_allclose(p1.origin_mm, (-5.0, 2.0, DIST_MM), atol=1e-9)
    np.testing.assert_allclose(p0.fast_axis, (0, -1, 0), atol=1e-12)
    np.testing.assert_allclose(p0.slow_axis, (1, 0, 0), atol=1e-12)
    assert p0.pixel_size_mm == pytest.approx(0.075)
    assert p1.data_origin == (16, 0) and p1.shape == (16, 24)
    assert p0.max_adu == 50000
    assert not p0.good_mask()[3, 4] and not p1.good_mask()[4, 10]
    assert int((~p0.good_mask()).sum()) == 1 and int((~p1.good_mask()).sum()) == 1
    np.testing.assert_array_equal(frames[0].panel_data(1), data[2, 16:32])


def test_nxmx_missing_data_file(tmp_path: Path) -> None:
    write_nxmx(tmp_path)
    (tmp_path / "scan_data_000002.h5").unlink()
    with pytest.raises(SourceError, match=r"scan_data_000002\.h5"):
        open_hdf5_source(str(tmp_path / "scan_master.h5"))


@pytest.mark.s3
def test_nxmx_external_links_resolved_on_s3(tmp_path: Path, s3_server: str, s3_bucket: str,
                                            s3_storage_options: dict) -> None:
    """External links name sibling files; on object storage they are fetched by URL too."""
    import boto3

    data = write_nxmx(tmp_path)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for p in tmp_path.glob("scan_*.h5"):
        client.upload_file(str(p), s3_bucket, f"nx/{p.name}")
    url = f"s3://{s3_bucket}/nx/scan_master.h5"
    with open_hdf5_source(url, storage_options=s3_storage_options) as src:
        assert src.n_frames == 8
        frames = src.read_frames(0, 8)
    with open_hdf5_source(str(tmp_path / "scan_master.h5")) as src:
        local_det = src.detector
    for f in frames:
        np.testing.assert_array_equal(f.data, data[f.index])
        assert f.detector == local_det and f.source_url == url
