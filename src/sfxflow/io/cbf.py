"""CBF images (imgCIF with an axis hierarchy, multi-panel; and Pilatus mini-CBF), via pycbf.

Full imgCIF files such as those written by cctbx.xfel for the LCLS CSPAD carry the complete
detector metrology as an axis hierarchy (``_axis`` with ``depends_on`` chains, settings in
``_diffrn_scan_frame_axis``), pixel axes per array or per array *section*
(``_array_structure_list``, ``_array_structure_list_axis``, ``_array_structure_list_section``).
This module walks those tables itself (pycbf is used to parse the file and decode the binary
sections) and converts the imgCIF frame into sfxflow's at this boundary:
``(x, y, z)_sfxflow = (-X, Y, -Z)_cbf`` (see :mod:`sfxflow.models`).

Conventions
-----------
* **Pixel origin.** The lab position CBFlib computes for pixel index ``(0, 0)`` (axis
  displacement of the first element) is taken as the *corner* of the first pixel, as dxtbx does
  for these files (cctbx.xfel wrote them from dxtbx models). So ``Panel.origin_mm`` equals
  CBFlib's ``get_pixel_coordinates(0, 0)`` converted to our frame.
* **Data layout.** Every array is flattened to 2-D ``(slow * mid, fast)`` and the arrays are put
  side by side along fast (padded with zeros when heights differ). For the CSPAD (four quadrant
  arrays of 8 x 185 x 388) this gives the Cheetah layout ``(1480, 1552)``, float32, identical to
  the layout of CSPAD CXI files and CrystFEL's ``cspad-cxiformat.geom``: quadrant ``q`` is columns
  ``388 q ..``, sensor ``s`` rows ``185 s ..``, ASIC ``a`` columns ``+194 a``.
* **Panels** are the sections when the file has sections (64 CSPAD ASICs, named by section id,
  e.g. ``ARRAY_D0Q0S0A0``), otherwise one panel per array.
* **Trusted range.** ``_array_intensities.overload`` becomes ``Panel.max_adu``; pixels whose value
  is ``<= undefined_value`` (or ``<= underload``) are masked in that frame's detector (each
  :class:`~sfxflow.models.Frame` carries its own masks only when such pixels exist).
* **Mini-CBF** (Pilatus header in ``_array_data.header_contents``, no axes): a flat detector
  normal to the beam at ``Detector_distance`` with the beam at ``Beam_xy``; negative pixels
  (Pilatus gaps and bad pixels) are masked, ``Count_cutoff`` is ``max_adu``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sfxflow.errors import GeometryError, SourceError
from sfxflow.io.axes import Axis, PixelAxis, pixel_geometry
from sfxflow.io.source_base import ImageSource
from sfxflow.models import Beam, Detector, Frame, Panel

__all__ = [
    "CbfSource",
    "cbf_geometry",
    "cbf_to_lab",
    "is_cbf",
    "read_cbf",
]

log = logging.getLogger(__name__)

CBF_MAGIC = b"###CBF"
_CBF_FLAGS = None  # set lazily: pycbf.MSG_DIGEST | pycbf.CBF_PARSE_WIDE


def is_cbf(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a CBF.

    >>> is_cbf(b"###CBF: VERSION 1.5"), is_cbf(b"\\x89HDF")
    (True, False)
    """
    return head.lstrip()[:6] == CBF_MAGIC


def cbf_to_lab(v: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Convert an imgCIF/CBF vector into the sfxflow lab frame: ``(-X, Y, -Z)``.

    >>> cbf_to_lab((1.0, 2.0, -130.0))
    (-1.0, 2.0, 130.0)
    """
    return (-float(v[0]), float(v[1]), -float(v[2]))


# --------------------------------------------------------------------------------------------
# reading imgCIF tables through pycbf


def _pycbf() -> Any:
    import pycbf

    global _CBF_FLAGS
    if _CBF_FLAGS is None:
        _CBF_FLAGS = pycbf.MSG_DIGEST | pycbf.CBF_PARSE_WIDE
    return pycbf


def _table(handle: Any, category: str) -> list[dict[str, str | None]]:
    """All rows of a category as dicts (values as str, ``None`` for null); [] when absent."""
    try:
        handle.find_category(category.encode())
    except Exception as exc:
        if "CBF_NOTFOUND" in str(exc):
            return []
        raise
    n_cols, n_rows = handle.count_columns(), handle.count_rows()
    cols = []
    for c in range(n_cols):
        handle.select_column(c)
        cols.append(handle.column_name().decode())
    rows = []
    for r in range(n_rows):
        handle.select_row(r)
        row: dict[str, str | None] = {}
        for c, name in enumerate(cols):
            handle.select_column(c)
            kind = handle.get_typeofvalue()
            if kind == b"null" or b"bnry" in kind:
                row[name] = None
            else:
                v = handle.get_value()
                row[name] = v.decode("latin-1") if isinstance(v, bytes) else v
        rows.append(row)
    return rows


def _val(v: str | None) -> str | None:
    return None if v is None or v in (".", "?", "") else v


def _num(v: str | None, default: float = 0.0) -> float:
    v = _val(v)
    return default if v is None else float(v)


@dataclass(frozen=True)
class _Header:
    """The geometry-relevant tables of one imgCIF file, hashable for caching."""

    axis: tuple[tuple[tuple[str, str | None], ...], ...]
    scan_frame_axis: tuple[tuple[tuple[str, str | None], ...], ...]
    scan_axis: tuple[tuple[tuple[str, str | None], ...], ...]
    structure_list: tuple[tuple[tuple[str, str | None], ...], ...]
    list_axis: tuple[tuple[tuple[str, str | None], ...], ...]
    sections: tuple[tuple[tuple[str, str | None], ...], ...]
    intensities: tuple[tuple[tuple[str, str | None], ...], ...]
    wavelength: tuple[tuple[tuple[str, str | None], ...], ...]
    array_order: tuple[str, ...]
    header_contents: str | None


def _frozen(rows: list[dict[str, str | None]]) -> tuple[tuple[tuple[str, str | None], ...], ...]:
    return tuple(tuple(sorted(r.items())) for r in rows)


def _read_header(handle: Any) -> _Header:
    data_rows = _table(handle, "array_data")
    array_order = tuple(str(r.get("array_id") or f"ARRAY{i}") for i, r in enumerate(data_rows))
    contents = next((r["header_contents"] for r in reversed(data_rows)
                     if r.get("header_contents")), None)
    return _Header(
        axis=_frozen(_table(handle, "axis")),
        scan_frame_axis=_frozen(_table(handle, "diffrn_scan_frame_axis")),
        scan_axis=_frozen(_table(handle, "diffrn_scan_axis")),
        structure_list=_frozen(_table(handle, "array_structure_list")),
        list_axis=_frozen(_table(handle, "array_structure_list_axis")),
        sections=_frozen(_table(handle, "array_structure_list_section")),
        intensities=_frozen(_table(handle, "array_intensities")),
        wavelength=_frozen(_table(handle, "diffrn_radiation_wavelength")),
        array_order=array_order,
        header_contents=contents,
    )


@dataclass(frozen=True)
class _ArrayLayout:
    array_id: str
    dims: tuple[int, int, int]  # (fast, mid, slow) element counts
    col0: int
    undefined: float | None
    overload: float


@dataclass(frozen=True)
class CbfGeometry:
    """Detector and beam of a CBF file plus how its arrays map into the 2-D data plane."""

    detector: Detector
    beam: Beam
    arrays: tuple[_ArrayLayout, ...]
    data_shape: tuple[int, int]
    minicbf: bool = False


def _dicts(rows: tuple[tuple[tuple[str, str | None], ...], ...]) -> list[dict[str, str | None]]:
    return [dict(r) for r in rows]


def _wavelength(rows: Sequence[Mapping[str, str | None]]) -> float:
    for r in rows:
        w = _num(r.get("wavelength"), math.nan)
        if w > 0:
            return w
    raise GeometryError("no _diffrn_radiation_wavelength.wavelength in the CBF header")


def _settings(h: _Header, axes: Mapping[str, Axis]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in _dicts(h.scan_axis):
        aid = r.get("axis_id")
        if aid is not None and aid in axes:
            key = "angle_start" if axes[aid].kind == "rotation" else "displacement_start"
            out[aid] = _num(r.get(key))
    frame_rows = _dicts(h.scan_frame_axis)
    frame_ids = [r.get("frame_id") for r in frame_rows]
    first = frame_ids[0] if frame_ids else None
    for r in frame_rows:
        aid = r.get("axis_id")
        if aid is not None and aid in axes and r.get("frame_id") == first:
            key = "angle" if axes[aid].kind == "rotation" else "displacement"
            out[aid] = _num(r.get(key))
    return out


def _parse_axes(h: _Header) -> dict[str, Axis]:
    axes: dict[str, Axis] = {}
    for r in _dicts(h.axis):
        aid = r.get("id")
        if not aid:
            continue
        kind = (r.get("type") or "general").lower()
        axes[aid] = Axis(
            id=aid,
            kind=kind,
            vector=(_num(r.get("vector[1]")), _num(r.get("vector[2]")), _num(r.get("vector[3]"))),
            offset=(_num(r.get("offset[1]")), _num(r.get("offset[2]")), _num(r.get("offset[3]"))),
            depends_on=_val(r.get("depends_on")),
        )
    return axes


def _beam_direction(axes: Mapping[str, Axis], h: _Header) -> tuple[float, float, float]:
    # The imgCIF source axis points from the sample towards the source.
    equipment = {dict(r).get("id"): (dict(r).get("equipment") or "") for r in h.axis}
    for aid, ax in axes.items():
        if equipment.get(aid, "").lower() == "source" and any(ax.vector):
            v = np.asarray(ax.vector, dtype=float)
            return cbf_to_lab(-v / np.linalg.norm(v))
    return (0.0, 0.0, 1.0)


def _axis_sets(h: _Header) -> dict[str, list[PixelAxis]]:
    """The pixel axes of each axis set (``_array_structure_list_axis``)."""
    axis_sets: dict[str, list[PixelAxis]] = {}
    for r in _dicts(h.list_axis):
        sid = r.get("axis_set_id")
        if sid:
            axis_sets.setdefault(sid, []).append(
                PixelAxis(str(r.get("axis_id")), _num(r.get("displacement")),
                           _num(r.get("displacement_increment"), math.nan))
            )
    return axis_sets


_ArrayDims = dict[str, dict[int, tuple[int, int, str | None]]]


def _array_structure(h: _Header) -> tuple[_ArrayDims, dict[str, dict[int, tuple[int, str | None]]],
                                          dict[str, str]]:
    """From ``_array_structure_list``: each array's dimensions by index ``(size, precedence,
    axis set)`` (rows without a section id), each section's axis sets by precedence
    ``(index, axis set)``, and the array of each section."""
    array_dims: _ArrayDims = {}
    section_axes: dict[str, dict[int, tuple[int, str | None]]] = {}
    section_array: dict[str, str] = {}
    for r in _dicts(h.structure_list):
        aid = str(r.get("array_id"))
        idx = int(_num(r.get("index")))
        prec = int(_num(r.get("precedence"), idx))
        if (r.get("direction") or "increasing").lower() != "increasing":
            raise GeometryError(f"array {aid} dimension {idx} is not 'increasing' "
                                "(decreasing pixel directions are not supported)")
        sec = _val(r.get("array_section_id"))
        if sec is None or sec == aid:
            array_dims.setdefault(aid, {})[idx] = (int(_num(r.get("dimension"))), prec,
                                                   _val(r.get("axis_set_id")))
        else:
            section_axes.setdefault(sec, {})[prec] = (idx, _val(r.get("axis_set_id")))
            section_array[sec] = aid
    return array_dims, section_axes, section_array


def _sections(h: _Header, section_array: dict[str, str]
              ) -> tuple[dict[str, dict[int, tuple[int, int]]], list[str]]:
    """Each section's pixel ranges by dimension index (1-based, inclusive) and the sections in
    file order; ``section_array`` gains the array of sections named only here."""
    section_ranges: dict[str, dict[int, tuple[int, int]]] = {}
    section_order: list[str] = []
    for r in _dicts(h.sections):
        sid = str(r.get("id"))
        if sid not in section_ranges:
            section_order.append(sid)
        section_ranges.setdefault(sid, {})[int(_num(r.get("index")))] = (
            int(_num(r.get("start"))), int(_num(r.get("end"))))
        section_array.setdefault(sid, str(r.get("array_id")))
    return section_ranges, section_order


def _array_layouts(h: _Header, array_dims: _ArrayDims, intens: Mapping[Any, Mapping[str, Any]]
                   ) -> tuple[list[_ArrayLayout], int, int]:
    """The arrays side by side in the frame's pixel array (in ``_array_data`` order): their
    layouts, the frame's rows and columns."""
    arrays: list[_ArrayLayout] = []
    col = 0
    n_rows = 0
    for aid in list(h.array_order) or list(array_dims):
        dims = array_dims.get(aid)
        if not dims:
            raise GeometryError(f"no _array_structure_list rows for array {aid}")
        by_prec = {prec: (idx, n) for idx, (n, prec, _) in dims.items()}
        if sorted(by_prec) not in ([1, 2], [1, 2, 3]):
            raise GeometryError(f"array {aid} has precedences {sorted(by_prec)}, "
                                "expected 2 or 3 dimensions")
        nf, nm = by_prec[1][1], by_prec[2][1]
        ns = by_prec[3][1] if 3 in by_prec else 1
        it = intens.get(aid, {})
        undefined = None
        for key in ("undefined_value", "underload"):
            if _val(it.get(key)) is not None:
                v = _num(it.get(key))
                undefined = v if undefined is None else max(undefined, v)
        arrays.append(_ArrayLayout(aid, (nf, nm, ns), col, undefined,
                                   _num(it.get("overload"), math.inf)))
        col += nf
        n_rows = max(n_rows, nm * ns)
    return arrays, n_rows, col


def _geometry_from_header(h: _Header) -> CbfGeometry:
    """Geometry from the header tables (cached: files of one run share their header)."""
    if not h.axis:
        return _minicbf_geometry(h)
    axes = _parse_axes(h)
    settings = _settings(h, axes)
    beam = Beam(wavelength_a=_wavelength(_dicts(h.wavelength)),
                direction=_beam_direction(axes, h))

    axis_sets = _axis_sets(h)
    intens = {r.get("array_id"): r for r in _dicts(h.intensities)}
    array_dims, section_axes, section_array = _array_structure(h)
    section_ranges, section_order = _sections(h, section_array)
    arrays, n_rows, col = _array_layouts(h, array_dims, intens)
    layout = {a.array_id: a for a in arrays}

    def make_panel(name: str, aid: str, fast_set: str | None, slow_set: str | None,
                   origin_px: tuple[int, int], shape: tuple[int, int]) -> Panel:
        if not fast_set or not slow_set or fast_set not in axis_sets or slow_set not in axis_sets:
            raise GeometryError(f"panel {name} has no pixel axes in "
                                "_array_structure_list_axis")
        fa, sa = axis_sets[fast_set], axis_sets[slow_set]
        if len(fa) != 1 or len(sa) != 1:
            raise GeometryError(f"panel {name}: axis sets with several axes are not "
                                "supported")
        o, f, s, pf, ps = pixel_geometry(axes, settings, fa[0], sa[0], f"panel {name}")
        if abs(pf - ps) > 1e-6 * max(pf, ps):
            raise GeometryError(f"panel {name} has non-square pixels {pf} x {ps} mm")
        lay = layout[aid]
        it = intens.get(aid, {})
        gain = _num(it.get("gain"), math.nan)
        return Panel(
            name=name,
            origin_mm=cbf_to_lab(o),
            fast_axis=cbf_to_lab(f),
            slow_axis=cbf_to_lab(s),
            pixel_size_mm=pf,
            shape=shape,
            data_origin=(origin_px[0], lay.col0 + origin_px[1]),
            adu_per_photon=gain if gain > 0 else None,
            max_adu=lay.overload,
        )

    panels: list[Panel] = []
    sections_by_array: dict[str, list[str]] = {}
    for sid in section_order:
        sections_by_array.setdefault(section_array[sid], []).append(sid)
    for lay in arrays:
        aid = lay.array_id
        nf, nm, _ns = lay.dims
        dims = array_dims[aid]
        idx_of_prec = {prec: idx for idx, (_, prec, _) in dims.items()}
        secs = sections_by_array.get(aid, [])
        if not secs:
            if len(dims) != 2:
                raise GeometryError(f"3-D array {aid} without sections is not supported")
            fast_set = dims[idx_of_prec[1]][2]
            slow_set = dims[idx_of_prec[2]][2]
            panels.append(make_panel(aid, aid, fast_set, slow_set, (0, 0), (nm, nf)))
            continue
        for sid in secs:
            rng = section_ranges[sid]
            sax = section_axes.get(sid, {})
            f_rng = rng.get(idx_of_prec[1], (1, nf))
            s_rng = rng.get(idx_of_prec[2], (1, nm))
            t_rng = rng.get(idx_of_prec.get(3, -1), (1, 1))
            if t_rng[0] != t_rng[1]:
                raise GeometryError(f"section {sid} spans several planes {t_rng}")
            if f_rng[1] > nf or s_rng[1] > nm or min(f_rng[0], s_rng[0]) < 1:
                raise GeometryError(f"section {sid} ranges {f_rng}, {s_rng} fall outside "
                                    f"array {aid} of {nf} x {nm}")
            shape = (s_rng[1] - s_rng[0] + 1, f_rng[1] - f_rng[0] + 1)
            origin = ((t_rng[0] - 1) * nm + s_rng[0] - 1, f_rng[0] - 1)
            panels.append(make_panel(sid, aid, sax.get(1, (0, None))[1],
                                     sax.get(2, (0, None))[1], origin, shape))
    detector = Detector(tuple(panels))
    return CbfGeometry(detector, beam, tuple(arrays), (n_rows, col))


_MINI_KEYS = {
    "pixel": re.compile(r"#\s*Pixel_size\s+([-+\d.eE]+)\s*m\s*x\s*([-+\d.eE]+)\s*m"),
    "distance": re.compile(r"#\s*Detector_distance\s+([-+\d.eE]+)\s*m"),
    "wavelength": re.compile(r"#\s*Wavelength\s+([-+\d.eE]+)\s*A"),
    "beam": re.compile(r"#\s*Beam_xy\s*\(\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*\)"),
    "cutoff": re.compile(r"#\s*Count_cutoff\s+([-+\d.eE]+)"),
}


def _minicbf_geometry(h: _Header) -> CbfGeometry:
    text = h.header_contents or ""
    m = {k: rx.search(text) for k, rx in _MINI_KEYS.items()}
    missing = [k for k in ("pixel", "distance", "wavelength", "beam") if m[k] is None]
    if missing:
        raise GeometryError(
            f"CBF has no axis hierarchy and its mini-CBF header lacks {missing} "
            "(expected '# Pixel_size', '# Detector_distance', '# Wavelength', '# Beam_xy')"
        )
    px_x, px_y = float(m["pixel"].group(1)) * 1e3, float(m["pixel"].group(2)) * 1e3  # type: ignore[union-attr]
    if abs(px_x - px_y) > 1e-9:
        raise GeometryError(f"non-square pixels {px_x} x {px_y} mm")
    dist_mm = float(m["distance"].group(1)) * 1e3  # type: ignore[union-attr]
    wl = float(m["wavelength"].group(1))  # type: ignore[union-attr]
    bx, by = float(m["beam"].group(1)), float(m["beam"].group(2))  # type: ignore[union-attr]
    cutoff = float(m["cutoff"].group(1)) if m["cutoff"] else math.inf
    dims = _dicts(h.structure_list)
    sizes = {int(_num(r.get("precedence"), _num(r.get("index")))): int(_num(r.get("dimension")))
             for r in dims}
    arrays_order = h.array_order or ("ARRAY1",)
    # mini-CBF has no _array_structure_list: the binary header gives the size, filled in later
    nf, ns = sizes.get(1, 0), sizes.get(2, 0)
    layout = _ArrayLayout(arrays_order[0], (nf, ns, 1), 0, -1.0, cutoff)
    # dxtbx convention for Pilatus mini-CBF: fast = +X, slow = -Y (imgCIF), beam at Beam_xy
    panel = Panel(
        name="panel0",
        origin_mm=cbf_to_lab((-bx * px_x, by * px_x, -dist_mm)),
        fast_axis=cbf_to_lab((1.0, 0.0, 0.0)),
        slow_axis=cbf_to_lab((0.0, -1.0, 0.0)),
        pixel_size_mm=px_x,
        shape=(max(ns, 1), max(nf, 1)),
        max_adu=cutoff,
    )
    return CbfGeometry(Detector((panel,)), Beam(wavelength_a=wl), (layout,), (ns, nf),
                       minicbf=True)


# --------------------------------------------------------------------------------------------
# decoding


def _open_handle(data: bytes, url: str) -> Any:
    pycbf = _pycbf()
    if not is_cbf(data[:64]):
        raise SourceError(url, "not a CBF file (no '###CBF' magic at the start)")
    handle = pycbf.cbf_handle_struct()
    try:
        handle.read_buffer(data, _CBF_FLAGS)
    except Exception as exc:
        raise SourceError(url, f"unreadable CBF ({_cbf_error(exc)})") from exc
    handle._sfxflow_buffer = data  # keep the bytes alive while CBFlib may read them lazily
    return handle


def _cbf_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.replace("CBFlib Error(s):", "CBFlib error").strip() or type(exc).__name__


_INT_DTYPES = {(1, True): np.int8, (1, False): np.uint8, (2, True): np.int16,
               (2, False): np.uint16, (4, True): np.int32, (4, False): np.uint32,
               (8, True): np.int64, (8, False): np.uint64}


def _decode_arrays(handle: Any, url: str) -> dict[str, np.ndarray]:
    """Decode every binary array; keyed by array id; shape (slow, mid, fast)."""
    out: dict[str, np.ndarray] = {}
    try:
        handle.find_category(b"array_data")
        n = handle.count_rows()
    except Exception as exc:
        raise SourceError(url, f"CBF has no _array_data ({_cbf_error(exc)})") from exc
    for r in range(n):
        try:
            handle.find_category(b"array_data")
            handle.find_column(b"data")  # CBFlib needs a current column before select_row
            handle.select_row(r)
            try:
                handle.find_column(b"array_id")
                aid = handle.get_value().decode("latin-1")
            except Exception:
                aid = f"ARRAY{r}"
            handle.find_column(b"data")
            if b"bnry" not in handle.get_typeofvalue():
                continue
            dtype: Any
            try:
                p = handle.get_integerarrayparameters_wdims_fs()
                raw = handle.get_integerarray_as_string()
                dtype = _INT_DTYPES[(int(p[2]), bool(p[3]))]
                n_el, dims = int(p[5]), (int(p[9]), int(p[10]), int(p[11]))
            except Exception as exc:
                if "CBF_ARGUMENT" not in str(exc) and "CBF_FORMAT" not in str(exc):
                    raise
                p = handle.get_realarrayparameters_wdims_fs()
                raw = handle.get_realarray_as_string()
                dtype = np.float32 if int(p[2]) == 4 else np.float64
                n_el, dims = int(p[3]), (int(p[5]), int(p[6]), int(p[7]))
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(url, f"corrupt or truncated CBF binary section {r + 1} "
                                   f"({_cbf_error(exc)})") from exc
        a = np.frombuffer(raw, dtype=dtype)
        nf, nm, ns = (max(d, 1) for d in dims)
        if a.size != n_el or a.size != nf * nm * ns:
            raise SourceError(url, f"CBF binary section {r + 1} decoded to {a.size} values, "
                                   f"header says {n_el} ({nf} x {nm} x {ns})")
        out[aid] = a.reshape(ns, nm, nf)
    if not out:
        raise SourceError(url, "CBF contains no binary image data")
    return out


def cbf_geometry(data: bytes, url: str = "") -> tuple[Detector, Beam]:
    """Detector and beam described by a CBF file's header (no pixel decoding).

    Parameters
    ----------
    data : the CBF file's bytes.
    url : where they came from, for messages.
    """
    handle = _open_handle(data, url)
    geom = _geometry(handle, url, data)
    if geom.minicbf:
        arrays = _decode_arrays(handle, url)
        geom = _fill_minicbf(geom, arrays)
    return geom.detector, geom.beam


_BINARY_MARK = b"--CIF-BINARY-FORMAT-SECTION--"
#: Header lines that change from shot to shot without changing the detector: the data block
#: name, the time stamp and a single wavelength (read per file, see ``_geometry``).
_VOLATILE_LINE = re.compile(
    rb"^\s*(data_|_diffrn_scan_frame\.date\s|_diffrn_radiation_wavelength\.wavelength\s)"
)
_GEOMETRY_CACHE: OrderedDict[str, CbfGeometry] = OrderedDict()
_GEOMETRY_CACHE_SIZE = 32


def _header_key(handle: Any, data: bytes) -> str:
    """Digest of the text header minus per-shot lines, plus the order of the arrays."""
    end = data.find(_BINARY_MARK)
    text = data[: end if end > 0 else len(data)]
    kept = b"\n".join(ln for ln in text.splitlines() if not _VOLATILE_LINE.match(ln))
    order = [str(r.get("array_id")) for r in _table(handle, "array_data")]
    return hashlib.sha1(kept + "|".join(order).encode()).hexdigest()


def _geometry(handle: Any, url: str, data: bytes) -> CbfGeometry:
    """Detector (cached across files with the same metrology) and this file's beam."""
    try:
        key = _header_key(handle, data)
        geom = _GEOMETRY_CACHE.get(key)
        if geom is None:
            header = _read_header(handle)
        wavelength_rows = _table(handle, "diffrn_radiation_wavelength")
    except Exception as exc:
        raise SourceError(url, f"unreadable CBF header ({_cbf_error(exc)})") from exc
    try:
        if geom is None:
            geom = _geometry_from_header(header)
            _GEOMETRY_CACHE[key] = geom
            while len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
                _GEOMETRY_CACHE.popitem(last=False)
        else:
            _GEOMETRY_CACHE.move_to_end(key)
        if not geom.minicbf:
            w = _wavelength(wavelength_rows)
            if w != geom.beam.wavelength_a:
                geom = replace(geom, beam=replace(geom.beam, wavelength_a=w))
        return geom
    except GeometryError as exc:
        msg = str(exc)
        raise GeometryError(f"{url}: {msg}" if url else msg) from None
    except (KeyError, ValueError) as exc:
        raise GeometryError(f"{url}: inconsistent CBF detector description ({exc})") from exc


def _fill_minicbf(geom: CbfGeometry, arrays: dict[str, np.ndarray]) -> CbfGeometry:
    (a,) = list(arrays.values())[:1]
    ns, nf = a.shape[-2], a.shape[-1]
    p = replace(geom.detector[0], shape=(ns, nf))
    lay = replace(geom.arrays[0], dims=(nf, ns, 1), array_id=next(iter(arrays)))
    return replace(geom, detector=Detector((p,)), arrays=(lay,), data_shape=(ns, nf))


def _with_frame_masks(geom: CbfGeometry, plane: np.ndarray,
                      raw: dict[str, np.ndarray]) -> Detector:
    bad = np.zeros(plane.shape, dtype=bool)
    any_bad = False
    for lay in geom.arrays:
        a = raw.get(lay.array_id)
        if a is None or lay.undefined is None:
            continue
        b = a.reshape(-1, a.shape[-1]) <= lay.undefined
        if b.any():
            any_bad = True
            bad[: b.shape[0], lay.col0 : lay.col0 + b.shape[1]] |= b
    if not any_bad:
        return geom.detector
    panels = []
    for p in geom.detector.panels:
        pb = bad[p.data_slices()]
        if pb.any():
            p = p.with_mask(p.good_mask() & ~pb)
        panels.append(p)
    return Detector(tuple(panels), dict(geom.detector.rigid_groups))


def read_cbf(data: bytes, url: str = "", index: int = 0) -> Frame:
    """Decode a CBF file's bytes into a :class:`~sfxflow.models.Frame`.

    Parameters
    ----------
    data : the whole file.
    url : its URL (kept in the frame and named in errors).
    index : frame index to record (CBF files hold one frame).

    Returns
    -------
    Frame whose ``data`` is float32 in the layout described in the module docstring.

    Raises
    ------
    SourceError
        Not a CBF, truncated file, corrupt binary section (checked against its MD5 digest).
    GeometryError
        A header whose detector description cannot be turned into panels.
    """
    handle = _open_handle(data, url)
    raw = _decode_arrays(handle, url)  # first: a truncated file fails here with a clear message
    geom = _geometry(handle, url, data)
    if geom.minicbf:
        geom = _fill_minicbf(geom, raw)
    plane = np.zeros(geom.data_shape, dtype=np.float32) if len(
        {lay.dims[1] * lay.dims[2] for lay in geom.arrays}) > 1 else np.empty(
        geom.data_shape, dtype=np.float32)
    for lay in geom.arrays:
        a = raw.get(lay.array_id)
        if a is None:
            raise SourceError(url, f"CBF has no binary data for array {lay.array_id}")
        nf, nm, ns = lay.dims
        if a.shape != (ns, nm, nf):
            raise SourceError(url, f"CBF array {lay.array_id} has shape {a.shape}, header "
                                   f"says {(ns, nm, nf)}")
        plane[: nm * ns, lay.col0 : lay.col0 + nf] = a.reshape(nm * ns, nf)
    detector = _with_frame_masks(geom, plane, raw)
    if geom.minicbf:
        bad = plane < 0
        if bad.any():
            p = detector[0]
            detector = Detector((p.with_mask(p.good_mask() & ~bad),))
    try:
        event = handle.datablock_name().decode("latin-1")
    except Exception:
        event = ""
    return Frame(data=plane, detector=detector, beam=geom.beam, source_url=url, index=index,
                 event_id=event)


class CbfSource(ImageSource):
    """One CBF file (one frame) as an :class:`~sfxflow.io.source_base.ImageSource`.

    The file is fetched (one request) only when a frame is read.
    """

    kind = "cbf"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 data: bytes | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.n_frames = 1
        self._data = data

    def _bytes(self) -> bytes:
        if self._data is None:
            from sfxflow.io.storage import read_bytes

            return read_bytes(self.url, self.storage_options)
        return self._data

    def read_frame(self, i: int) -> Frame:
        self._check_index(i)
        return read_cbf(self._bytes(), self.url, index=i)

    def geometry(self) -> tuple[Detector, Beam]:
        """Detector and beam from the header (fetches the file)."""
        return cbf_geometry(self._bytes(), self.url)

    def close(self) -> None:
        self._data = None
