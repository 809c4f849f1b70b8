"""HDF5 images: CXI/Cheetah files described by a CrystFEL geometry, and NeXus NXmx master files.

CXI / Cheetah
-------------
Frames live in one dataset (``geometry.data_path``, e.g. ``/entry_1/data_1/data``) with the
frame axis at ``geometry.frame_dim``. Per-frame geometry values named by HDF5 path in the
geometry (``clen``, ``photon_energy``, ...) are read from the file once per source (scalar or
one value per frame) and passed to :meth:`CrystfelGeometry.resolve`; frames that share values
share one :class:`~sfxflow.models.Detector`. Mask datasets (``mask``, ``mask_file``) are applied
to the panels' masks, statically when the mask has no frame axis, per frame otherwise.

NeXus NXmx
----------
The master file's ``NXentry`` / ``NXinstrument`` / ``NXdetector`` / ``NXdetector_module`` groups
give ``data_origin``, ``data_size`` and the pixel axes (``fast_pixel_direction``,
``slow_pixel_direction``, ``module_offset``) whose ``depends_on`` chain of NXtransformations
places each module. NeXus uses the McStas frame (z along the beam, y up): the same as sfxflow's,
so only units are converted (lengths to mm, angles to degrees). The module origin (pixel
displacements 0) is taken as the corner of the first pixel, as in dxtbx models. The frames are in
``NXdata`` fields ``data`` / ``data_000001``..., usually external links to data files; links
are resolved by this module (relative to the master's URL), so they also work on object storage.
``NXbeam/incident_wavelength`` gives the wavelength (one value, or one per frame);
``NXdetector/pixel_mask`` (0 = good) and ``saturation_value`` give masks and ``max_adu``.

Compressed data (bitshuffle-LZ4, LZ4, Blosc, Zstd, ...) is decoded through ``hdf5plugin``.
Remote files are read by h5py through an fsspec file object (see :mod:`sfxflow.io.storage`).
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters with HDF5)
import numpy as np
from numba import njit

try:  # ISA-L's inflate: the same zlib streams, decoded 2-3x faster than zlib's
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - optional
    import zlib as _zlib  # type: ignore[no-redef]

from sfxflow.errors import GeometryError, SourceError
from sfxflow.io import storage
from sfxflow.io.axes import Axis, transform_chain
from sfxflow.io.source_base import ImageSource
from sfxflow.models import Beam, Detector, Frame, Panel

if TYPE_CHECKING:
    from sfxflow.io.geometry import CrystfelGeometry

__all__ = ["CxiSource", "NxmxSource", "open_hdf5", "open_hdf5_source"]

log = logging.getLogger(__name__)

DEFAULT_DATA_PATHS = ("/entry_1/data_1/data", "/entry/data/data", "/data/data")
_METADATA_BLOCK_SIZE = 1 << 20
_MAX_CACHED_GEOMETRIES = 256


# --------------------------------------------------------------------------------------------
# opening


class _H5Handle:
    """An open h5py.File plus the file object underneath it (remote) and the URL."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None,
                 metadata_only: bool = False) -> None:
        self.url = url
        self.fobj: Any = None
        self.local = storage.is_local(url)
        try:
            if self.local:
                self.file = h5py.File(storage.local_path(url), "r")
            else:
                # Always ranged reads: measured on a local S3 server with a 28 MB CSPAD file,
                # 8 MiB blocks read all 20 frames ~2x faster than one whole-object GET, and a
                # block of 5 frames fetched 8 MB instead of the whole 28 MB.
                block = _METADATA_BLOCK_SIZE if metadata_only else storage.DEFAULT_BLOCK_SIZE
                self.fobj = storage.open_url(url, "rb", storage_options, block_size=block,
                                             whole_object_max_bytes=0)
                self.file = h5py.File(self.fobj, "r")
        except FileNotFoundError as exc:
            raise SourceError(url, "no such file") from exc
        except OSError as exc:
            self._close_fobj()
            raise SourceError(url, f"not a readable HDF5 file ({_h5_error(exc)})") from exc

    def _close_fobj(self) -> None:
        if self.fobj is not None:
            try:
                self.fobj.close()
            finally:
                self.fobj = None

    def close(self) -> None:
        try:
            if getattr(self, "file", None) is not None:
                self.file.close()
        finally:
            self._close_fobj()


def _h5_error(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def open_hdf5(url: str, storage_options: Mapping[str, Any] | None = None) -> h5py.File:
    """Open a local or remote HDF5 file read-only (the caller closes it).

    Remote files keep their fsspec file object referenced by the returned file.
    """
    h = _H5Handle(url, storage_options)
    f = h.file
    f._sfxflow_handle = h  # type: ignore[attr-defined]  # keep the file object alive
    return f


def _nx_class(obj: Any) -> str:
    v = obj.attrs.get("NX_class", b"")
    return v.decode() if isinstance(v, bytes) else str(v)


def _nx_groups(group: h5py.Group, nx_class: str) -> list[h5py.Group]:
    """The subgroups of ``group`` whose ``NX_class`` is ``nx_class``."""
    return [g for g in group.values() if isinstance(g, h5py.Group) and _nx_class(g) == nx_class]


def _find_nxmx_entry(f: h5py.File) -> h5py.Group | None:
    return next((e for e in _nx_groups(f, "NXentry") if _nx_groups(e, "NXinstrument")), None)


def open_hdf5_source(
    url: str,
    geometry: CrystfelGeometry | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    metadata_only: bool = False,
) -> ImageSource:
    """A :class:`CxiSource` when a CrystFEL geometry is given, else an :class:`NxmxSource`."""
    h = _H5Handle(url, storage_options, metadata_only)
    try:
        if geometry is not None:
            return CxiSource(h, geometry)
        entry = _find_nxmx_entry(h.file)
        if entry is None:
            raise GeometryError(
                f"{url}: HDF5 file without NXmx metadata needs a CrystFEL geometry "
                "(expected --geometry FILE.geom for CXI/Cheetah files)"
            )
        return NxmxSource(h, entry, storage_options, metadata_only)
    except BaseException:
        h.close()
        raise


_H5Z_DEFLATE = 1
_H5Z_SHUFFLE = 2
_FAST_DTYPES = (np.dtype("<u2"), np.dtype("<i2"))


@njit(cache=True, nogil=True)
def _unshuffle16_f32(b, signed, out):  # pragma: no cover - compiled
    """HDF5's byte shuffle undone for 2-byte little-endian values, written as float32."""
    o = out.reshape(-1)
    n = o.size
    for i in range(n):
        u = np.int32(b[i]) | (np.int32(b[n + i]) << 8)
        if signed and u >= 32768:
            u -= 65536
        o[i] = np.float32(u)


def _deflate_frames(ds: h5py.Dataset, frame_dim: int | None) -> tuple[int, ...] | None:
    """The frame shape when ``ds``'s frames can be decoded chunk by chunk without HDF5's filter
    pipeline: 2-byte integers, one chunk per frame (or one chunk holding the only frame), filters
    exactly (shuffle,) deflate; None otherwise (h5py reads those)."""
    if ds.chunks is None or ds.dtype not in _FAST_DTYPES or ds.ndim < 2:
        return None
    shape = tuple(ds.shape)
    frame_shape = tuple(n for k, n in enumerate(shape) if k != frame_dim)
    want = tuple(1 if k == frame_dim else n for k, n in enumerate(shape))
    if tuple(ds.chunks) != want or ds.fillvalue not in (0, None):
        return None
    plist = ds.id.get_create_plist()
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if codes not in ([_H5Z_SHUFFLE, _H5Z_DEFLATE], [_H5Z_DEFLATE]):
        return None
    return frame_shape


def _read_deflate_frame(ds: h5py.Dataset, frame_dim: int | None, i: int,
                        frame_shape: tuple[int, ...]) -> np.ndarray | None:
    """One frame of a dataset accepted by :func:`_deflate_frames`, as float32: its chunk read
    as stored and inflated here (one pass to undo the shuffle and convert). None when the chunk
    is not what the dataset's filters say (then h5py reads it)."""
    offset = tuple(i if k == frame_dim else 0 for k in range(ds.ndim))
    try:
        filter_mask, raw = ds.id.read_direct_chunk(offset)
    except (OSError, KeyError, ValueError):  # e.g. an unwritten chunk
        return None
    if filter_mask != 0:
        return None
    try:
        buf = _zlib.decompress(raw)
    except Exception:  # any decoding problem: h5py decides
        return None
    out = np.empty(frame_shape, np.float32)
    if len(buf) != 2 * out.size:
        return None
    plist = ds.id.get_create_plist()
    if plist.get_nfilters() == 2:
        _unshuffle16_f32(np.frombuffer(buf, np.uint8), ds.dtype.kind == "i", out)
    else:
        out[...] = np.frombuffer(buf, ds.dtype).reshape(frame_shape)
    return out


def _frames_from(block: np.ndarray) -> list[np.ndarray]:
    if block.dtype == np.float32:
        return [np.ascontiguousarray(block[k]) for k in range(block.shape[0])]
    return [block[k].astype(np.float32) for k in range(block.shape[0])]


# --------------------------------------------------------------------------------------------
# CXI / Cheetah with a CrystFEL geometry


class CxiSource(ImageSource):
    """Frames of a CXI/Cheetah HDF5 file described by a :class:`CrystfelGeometry`."""

    kind = "cxi"

    def __init__(self, handle: _H5Handle, geometry: CrystfelGeometry) -> None:
        self._h = handle
        self.url = handle.url
        self.geometry = geometry
        f = handle.file
        self.data_path = self._data_path(f)
        ds = f.get(self.data_path)
        if not isinstance(ds, h5py.Dataset):
            raise SourceError(self.url, f"no dataset {self.data_path} (named by geometry "
                                        f"{geometry.source})")
        self._ds = ds
        self.frame_dim: int | None = geometry.frame_dim
        if self.frame_dim is not None and not 0 <= self.frame_dim < ds.ndim:
            raise GeometryError(f"{self.url}: geometry {geometry.source} puts the frame axis at "
                                f"dim{self.frame_dim} but {self.data_path} has shape {ds.shape}")
        if self.frame_dim is None:
            self.n_frames = 1
            self.frame_shape = tuple(ds.shape)
        else:
            self.n_frames = int(ds.shape[self.frame_dim])
            self.frame_shape = tuple(s for k, s in enumerate(ds.shape) if k != self.frame_dim)
        self._ref_values = self._read_references(f)
        self._extra_files: list[h5py.File] = []
        self._static_masks, self._frame_masks = self._mask_datasets(f)
        self._cache: dict[tuple[float, ...], tuple[Detector, Beam]] = {}
        if self.n_frames > 0:
            det, _ = self._detector_beam(0)
            check_fit(det, self.frame_shape, self.url, self.data_path, geometry.source)
        self._bytes_per_frame = (
            ds.id.get_storage_size() / max(self.n_frames, 1) if handle.local else 0.0
        )
        # gzip frames with one chunk each: inflated here, faster than HDF5's filter pipeline
        self._deflate_shape = _deflate_frames(ds, self.frame_dim)

    # -- setup
    def _data_path(self, f: h5py.File) -> str:
        g = self.geometry
        if g.data_path:
            return g.data_path
        paths = set(getattr(g, "panel_data_paths", {}).values())
        if len(paths) == 1:
            return paths.pop()
        if len(paths) > 1:
            raise GeometryError(f"{g.source}: panels in several datasets {sorted(paths)} are not "
                                "supported (expected one 'data' path)")
        for p in DEFAULT_DATA_PATHS:
            if p in f:
                return p
        raise SourceError(self.url, f"geometry {g.source} names no data path and none of "
                                    f"{list(DEFAULT_DATA_PATHS)} exists")

    def _read_references(self, f: h5py.File) -> dict[str, np.ndarray | float]:
        out: dict[str, np.ndarray | float] = {}
        for key, path in self.geometry.references.items():
            obj = f.get(path)
            if not isinstance(obj, h5py.Dataset):
                raise GeometryError(f"{self.url}: geometry {self.geometry.source} reads {key} "
                                    f"from {path}, which this file does not have")
            try:
                arr = np.asarray(obj[()], dtype=float).ravel()
            except (TypeError, ValueError) as exc:
                raise GeometryError(f"{self.url}: {path} ({key}) is not numeric") from exc
            if arr.size == 1:
                out[key] = float(arr[0])
            elif arr.size == self.n_frames:
                out[key] = arr
            else:
                raise GeometryError(f"{self.url}: {path} ({key}) has {arr.size} values, expected "
                                    f"1 or one per frame ({self.n_frames})")
        return out

    def _mask_datasets(self, f: h5py.File) -> tuple[list[tuple[Any, np.ndarray]],
                                                     list[tuple[Any, h5py.Dataset]]]:
        static: list[tuple[Any, np.ndarray]] = []
        per_frame: list[tuple[Any, h5py.Dataset]] = []
        for ref in getattr(self.geometry, "mask_refs", ()):
            mf = f
            if ref.file:
                murl = storage.join_url(self.url, ref.file)
                mf = open_hdf5(murl)
                self._extra_files.append(mf)
            obj = mf.get(ref.data_path)
            if not isinstance(obj, h5py.Dataset):
                raise GeometryError(f"{self.url}: geometry {self.geometry.source} names mask "
                                    f"{ref.data_path}" + (f" in {ref.file}" if ref.file else "")
                                    + ", which does not exist")
            if self.frame_dim is not None and obj.ndim == self._ds.ndim:
                per_frame.append((ref, obj))
            elif obj.ndim == len(self.frame_shape):
                static.append((ref, obj[()]))
            else:
                raise GeometryError(f"{self.url}: mask {ref.data_path} has shape {obj.shape}, "
                                    f"data {self.data_path} has {self._ds.shape}")
        return static, per_frame

    def _values(self, i: int) -> dict[str, float]:
        return {k: (float(v[i]) if isinstance(v, np.ndarray) else v)
                for k, v in self._ref_values.items()}

    def _detector_beam(self, i: int) -> tuple[Detector, Beam]:
        values = self._values(i)
        key = tuple(values[k] for k in sorted(values))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        det, beam = self.geometry.resolve(values or None)
        if beam is None:
            raise GeometryError(f"{self.url}: geometry {self.geometry.source} gives no photon "
                                "energy or wavelength (expected photon_energy = ... )")
        if self._static_masks:
            det = _apply_masks(det, self._static_masks)
        if len(self._cache) >= _MAX_CACHED_GEOMETRIES:
            self._cache.clear()
        self._cache[key] = (det, beam)
        return det, beam

    # -- reading
    def _slab(self, ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        if self.frame_dim is None:
            return ds[()][None, ...]
        sel: list[Any] = [slice(None)] * ds.ndim
        sel[self.frame_dim] = slice(start, stop)
        return np.moveaxis(ds[tuple(sel)], self.frame_dim, 0)

    def read_frames(self, start: int, stop: int) -> list[Frame]:
        self._check_range(start, stop)
        if start == stop:
            return []
        try:
            datas = self._fast_frames(start, stop)
            if datas is None:
                datas = _frames_from(self._slab(self._ds, start, stop))
            masks = [(ref, self._slab(ds, start, stop)) for ref, ds in self._frame_masks]
        except OSError as exc:
            raise SourceError(self.url, f"cannot read frames {start}..{stop} of "
                                        f"{self.data_path} ({_h5_error(exc)})") from exc
        if self._bytes_per_frame:
            storage.add_bytes_read(int(self._bytes_per_frame * (stop - start)))
        frames = []
        for k, data in enumerate(datas):
            i = start + k
            det, beam = self._detector_beam(i)
            if masks:
                det = _apply_masks(det, [(ref, m[k]) for ref, m in masks])
            frames.append(Frame(data=data, detector=det, beam=beam, source_url=self.url,
                                index=i, event_id=f"//{i}"))
        return frames

    def _fast_frames(self, start: int, stop: int) -> list[np.ndarray] | None:
        if self._deflate_shape is None:
            return None
        out = []
        for i in range(start, stop):
            data = _read_deflate_frame(self._ds, self.frame_dim, i, self._deflate_shape)
            if data is None:
                return None
            out.append(data)
        return out

    def close(self) -> None:
        for mf in self._extra_files:
            mf.close()
            mf._sfxflow_handle.close()
        self._extra_files.clear()
        self._h.close()


def check_fit(det: Detector, frame_shape: tuple[int, ...], url: str, data_path: str,
               geom_source: str) -> None:
    for p in det.panels:
        lead = len(p.data_index)
        if len(frame_shape) != lead + 2:
            raise GeometryError(f"{url}: panel {p.name} of {geom_source} expects "
                                f"{lead + 2}-D frames but {data_path} frames have shape "
                                f"{frame_shape}")
        ss0, fs0 = p.data_origin
        ok = all(0 <= idx < frame_shape[k] for k, idx in enumerate(p.data_index))
        ok = ok and ss0 + p.shape[0] <= frame_shape[-2] and fs0 + p.shape[1] <= frame_shape[-1]
        if not ok:
            raise GeometryError(
                f"{url}: panel {p.name} of {geom_source} (ss {ss0}..{ss0 + p.shape[0] - 1}, "
                f"fs {fs0}..{fs0 + p.shape[1] - 1}) falls outside the frame shape {frame_shape} "
                f"of {data_path}"
            )


def _apply_masks(det: Detector, masks: list[tuple[Any, np.ndarray]]) -> Detector:
    panels = []
    for p in det.panels:
        good = None
        for ref, values in masks:
            if ref.panels and p.name not in ref.panels:
                continue
            g = ref.good_pixels(values[p.data_slices()])
            good = g if good is None else good & g
        if good is not None and not good.all():
            p = p.with_mask(p.good_mask() & good)
        panels.append(p)
    return Detector(tuple(panels), dict(det.rigid_groups))


# --------------------------------------------------------------------------------------------
# NeXus NXmx


_LENGTH_MM = {"m": 1e3, "metre": 1e3, "meter": 1e3, "mm": 1.0, "millimetre": 1.0,
              "millimeter": 1.0, "cm": 10.0, "um": 1e-3, "µm": 1e-3, "micron": 1e-3,
              "microns": 1e-3, "nm": 1e-6}
_ANGLE_DEG = {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / math.pi,
              "radian": 180.0 / math.pi, "radians": 180.0 / math.pi}
_WAVELENGTH_A = {"angstrom": 1.0, "a": 1.0, "å": 1.0, "nm": 10.0, "m": 1e10, "pm": 1e-2}


def _chain_ids(axes: Mapping[str, Axis], axis_id: str) -> list[str]:
    out: list[str] = []
    cur: str | None = axis_id
    while cur is not None and cur in axes and cur not in out:
        out.append(cur)
        cur = axes[cur].depends_on
    return out


def _module_origin(axes: Mapping[str, Axis], settings: Mapping[str, float], fp: str, sp: str,
                   f0: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """Lab position of pixel (0, 0) given both pixel axes at displacement 0."""
    if sp in _chain_ids(axes, fp):
        return f0  # fast depends on slow: its chain already contains the slow axis
    if fp in _chain_ids(axes, sp):
        return s0
    parent = axes[sp].depends_on
    base = (transform_chain(axes, settings, parent) @ [0, 0, 0, 1.0])[:3] if parent else 0.0
    return f0 + (s0 - base)  # both hang from a common parent: add slow's own offset


def _attr_str(obj: Any, name: str, default: str = "") -> str:
    v = obj.attrs.get(name, default)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
        return v.decode() if isinstance(v, bytes) else str(v)
    return str(v)


def _unit_factor(table: Mapping[str, float], unit: str, what: str, url: str) -> float:
    u = unit.strip()
    for cand in (u, u.lower()):
        if cand in table:
            return table[cand]
    raise GeometryError(f"{url}: {what} has unit {unit!r}, expected one of {sorted(table)}")


class NxmxSource(ImageSource):
    """Frames of a NeXus NXmx master file (data usually in externally linked files)."""

    kind = "nxmx"

    def __init__(self, handle: _H5Handle, entry: h5py.Group,
                 storage_options: Mapping[str, Any] | None, metadata_only: bool = False) -> None:
        self._h = handle
        self.url = handle.url
        self._opts = storage_options
        self._metadata_only = metadata_only
        self._linked: dict[str, _H5Handle] = {}
        self.entry = entry
        self._datasets = self._find_data(entry)
        self._starts = np.cumsum([0] + [int(d.shape[0]) for d in self._datasets])
        self.n_frames = int(self._starts[-1])
        shapes = {tuple(d.shape[1:]) for d in self._datasets}
        if len(shapes) > 1:
            raise SourceError(self.url, f"NXmx data files have different frame shapes {shapes}")
        self.frame_shape = shapes.pop() if shapes else ()
        self.detector = self._build_detector(entry)
        check_fit(self.detector, self.frame_shape, self.url, "NXdata", "NXmx")
        self._wavelengths = self._read_wavelengths(entry)

    # -- data links
    def _open_linked(self, filename: str) -> h5py.File:
        url = storage.join_url(self.url, filename)
        if url not in self._linked:
            self._linked[url] = _H5Handle(url, self._opts, self._metadata_only)
        return self._linked[url].file

    def _resolve(self, group: h5py.Group, name: str) -> h5py.Dataset | None:
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            f = self._open_linked(link.filename)
            obj = f.get(link.path)
        else:
            try:
                obj = group[name]
            except KeyError:
                obj = None
        return obj if isinstance(obj, h5py.Dataset) else None

    def _find_data(self, entry: h5py.Group) -> list[h5py.Dataset]:
        for g in _nx_groups(entry, "NXdata"):
            names = sorted(n for n in g if n == "data" or n.startswith("data_"))
            out = []
            for n in names:
                ds = self._resolve(g, n)
                if ds is None:
                    link = g.get(n, getlink=True)
                    target = (f"{link.filename}:{link.path}"
                              if isinstance(link, h5py.ExternalLink) else n)
                    raise SourceError(self.url, f"NXdata field {n} points to missing {target}")
                if ds.ndim < 3:
                    raise SourceError(self.url, f"NXdata field {n} has shape {ds.shape}, "
                                                "expected (frames, slow, fast)")
                out.append(ds)
            if out:
                return out
        raise SourceError(self.url, "NXmx entry has no NXdata group with a data field")

    # -- geometry
    def _nx_axis(self, ds: h5py.Dataset, axes: dict[str, Axis],
                 settings: dict[str, float]) -> None:
        path = ds.name
        while path not in (None, ".", "") and path not in axes:
            obj = self.entry.file.get(path)
            if not isinstance(obj, h5py.Dataset):
                raise GeometryError(f"{self.url}: transformation {path} does not exist")
            kind = _attr_str(obj, "transformation_type", "translation").lower()
            vec = tuple(float(x) for x in np.asarray(obj.attrs.get("vector", (0, 0, 1))).ravel())
            off = np.asarray(obj.attrs.get("offset", (0.0, 0.0, 0.0)), dtype=float).ravel()
            if np.any(off):
                off = off * _unit_factor(_LENGTH_MM, _attr_str(obj, "offset_units", "m"),
                                         f"{path}@offset_units", self.url)
            raw = np.asarray(obj[()], dtype=float).ravel()
            if raw.size == 0:
                raise GeometryError(f"{self.url}: transformation {path} has no value")
            if raw.size > 1 and not np.allclose(raw, raw[0]):
                raise GeometryError(f"{self.url}: transformation {path} changes between frames "
                                    "(per-frame detector motion is not supported)")
            unit = _attr_str(obj, "units", "m" if kind == "translation" else "deg")
            table = _LENGTH_MM if kind == "translation" else _ANGLE_DEG
            value = float(raw[0]) * _unit_factor(table, unit, f"{path}@units", self.url)
            dep = _attr_str(obj, "depends_on", ".")
            if dep not in (".", "") and not dep.startswith("/"):
                dep = posixpath.normpath(posixpath.join(posixpath.dirname(path), dep))
            axes[path] = Axis(path, kind if kind in ("rotation", "translation") else "general",
                                 (vec[0], vec[1], vec[2]), (float(off[0]), float(off[1]),
                                                            float(off[2])),
                                 None if dep in (".", "") else dep)
            settings[path] = value
            path = axes[path].depends_on

    def _build_detector(self, entry: h5py.Group) -> Detector:
        panels: list[Panel] = []
        for inst in _nx_groups(entry, "NXinstrument"):
            for det in _nx_groups(inst, "NXdetector"):
                mask = det.get("pixel_mask")
                mask_arr = mask[()] if isinstance(mask, h5py.Dataset) else None
                sat = det.get("saturation_value")
                max_adu = float(np.asarray(sat[()]).ravel()[0]) if isinstance(
                    sat, h5py.Dataset) else math.inf
                for name, mod in det.items():
                    if isinstance(mod, h5py.Group) and _nx_class(mod) == "NXdetector_module":
                        panels.append(self._module_panel(det.name, name, mod, mask_arr, max_adu))
        if not panels:
            raise GeometryError(f"{self.url}: NXmx file has no NXdetector_module")
        names = [p.name for p in panels]
        if len(set(names)) != len(names):
            panels = [replace(p, name=f"{p.name}_{k}") for k, p in enumerate(panels)]
        return Detector(tuple(panels))

    def _module_panel(self, det_name: str, name: str, mod: h5py.Group,
                      mask_arr: np.ndarray | None, max_adu: float) -> Panel:
        where = f"{mod.name}"
        for field in ("data_origin", "data_size", "fast_pixel_direction",
                      "slow_pixel_direction"):
            if field not in mod:
                raise GeometryError(f"{self.url}: NXdetector_module {where} lacks {field}")
        origin_idx = [int(x) for x in np.asarray(mod["data_origin"][()]).ravel()]
        size = [int(x) for x in np.asarray(mod["data_size"][()]).ravel()]
        if len(origin_idx) != len(size) or len(size) not in (2, 3):
            raise GeometryError(f"{self.url}: {where} data_origin {origin_idx} / data_size "
                                f"{size} must both have 2 or 3 values")
        n_ss, n_fs = size[-2], size[-1]
        lead = tuple(origin_idx[:-2])
        if len(size) == 3 and size[0] != 1:
            raise GeometryError(f"{self.url}: {where} data_size {size} spans several modules")
        axes: dict[str, Axis] = {}
        settings: dict[str, float] = {}
        fast_ds, slow_ds = mod["fast_pixel_direction"], mod["slow_pixel_direction"]
        self._nx_axis(fast_ds, axes, settings)
        self._nx_axis(slow_ds, axes, settings)
        fp, sp = fast_ds.name, slow_ds.name
        pf, ps = settings[fp], settings[sp]
        if abs(pf - ps) > 1e-9 * max(pf, ps):
            raise GeometryError(f"{self.url}: {where} has non-square pixels {pf} x {ps} mm")

        def at(axis: str, value: float) -> np.ndarray:
            return (transform_chain(axes, settings, axis, {axis: value}) @ [0, 0, 0, 1.0])[:3]

        f0, f1 = at(fp, 0.0), at(fp, pf)
        s0, s1 = at(sp, 0.0), at(sp, ps)
        origin = _module_origin(axes, settings, fp, sp, f0, s0)
        fast = (f1 - f0) / pf
        slow = (s1 - s0) / ps
        pmask = None
        if mask_arr is not None:
            sl: tuple[Any, ...] = (*lead, slice(origin_idx[-2], origin_idx[-2] + n_ss),
                  slice(origin_idx[-1], origin_idx[-1] + n_fs))
            try:
                pmask = np.asarray(mask_arr[sl]) == 0
            except IndexError as exc:
                raise GeometryError(f"{self.url}: pixel_mask shape {mask_arr.shape} does not "
                                    f"cover module {where}") from exc
            if pmask.all():
                pmask = None
        return Panel(
            name=f"{posixpath.basename(det_name)}/{name}",
            origin_mm=tuple(origin.tolist()),
            fast_axis=tuple(fast.tolist()),
            slow_axis=tuple(slow.tolist()),
            pixel_size_mm=pf,
            shape=(n_ss, n_fs),
            data_index=lead,
            data_origin=(origin_idx[-2], origin_idx[-1]),
            mask=pmask,
            max_adu=max_adu,
        )

    def _read_wavelengths(self, entry: h5py.Group) -> np.ndarray:
        found: list[h5py.Dataset] = []

        def visit(_name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and _nx_class(obj) == "NXbeam":
                w = obj.get("incident_wavelength")
                if isinstance(w, h5py.Dataset):
                    found.append(w)

        entry.visititems(visit)
        if not found:
            raise GeometryError(f"{self.url}: NXmx file has no NXbeam/incident_wavelength")
        w = found[0]
        factor = _unit_factor(_WAVELENGTH_A, _attr_str(w, "units", "angstrom"),
                              f"{w.name}@units", self.url)
        arr = np.asarray(w[()], dtype=float).ravel() * factor
        if arr.size not in (1, self.n_frames):
            raise GeometryError(f"{self.url}: {w.name} has {arr.size} values, expected 1 or "
                                f"{self.n_frames}")
        if not np.all(arr > 0):
            raise GeometryError(f"{self.url}: {w.name} has non-positive wavelengths")
        return arr

    def beam(self, i: int = 0) -> Beam:
        w = self._wavelengths
        return Beam(wavelength_a=float(w[i] if w.size > 1 else w[0]))

    # -- reading
    def read_frames(self, start: int, stop: int) -> list[Frame]:
        self._check_range(start, stop)
        frames: list[Frame] = []
        beams: dict[float, Beam] = {}
        i = start
        while i < stop:
            d = int(np.searchsorted(self._starts, i, side="right") - 1)
            ds = self._datasets[d]
            local0 = i - int(self._starts[d])
            local1 = min(stop - int(self._starts[d]), ds.shape[0])
            try:
                block = ds[local0:local1]
            except OSError as exc:
                raise SourceError(self.url, f"cannot read frames {i}..{i + local1 - local0} "
                                            f"({_h5_error(exc)})") from exc
            for data in _frames_from(block):
                b = self.beam(i)
                b = beams.setdefault(b.wavelength_a, b)
                frames.append(Frame(data=data, detector=self.detector, beam=b,
                                    source_url=self.url, index=i, event_id=f"//{i}"))
                i += 1
        return frames

    def close(self) -> None:
        for h in self._linked.values():
            h.close()
        self._linked.clear()
        self._h.close()
