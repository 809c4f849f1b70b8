"""Read and write CrystFEL detector geometry (``.geom``) files.

A ``.geom`` file describes the detector panels (position, orientation, pixel size, where each
panel's pixels live in the data array), the beam energy, bad regions and masks. CrystFEL's lab
frame is sfxflow's (see :mod:`sfxflow.models`), so no axes are flipped here; lengths are
converted to millimetres at parse time.

Semantics follow ``man crystfel_geometry``:

* ``key = value`` lines without a panel name set *defaults* that apply to the panels first
  mentioned **after** them; ``panel/key = value`` sets a key for one panel; a later line for
  the same key overrides an earlier one. Beam keys (``photon_energy``, ``wavelength``,
  ``electron_voltage``, ``bandwidth``), ``clen``, ``peak_list*``, ``detector_shift_*``,
  ``group_*`` and ``rigid_group*`` are global wherever they appear.
* ``res`` is pixels per metre (``pixel_size_mm = 1000 / res``); ``corner_x``/``corner_y`` are
  in pixels of the panel; ``clen`` and ``coffset`` are metres (``clen`` may carry ``m``/``mm``);
  a panel's corner sits at ``z = 1000 * (clen + coffset)`` mm.
* ``fs``/``ss`` vectors such as ``-0.0002x +1.0000y +0.01z`` are normalised (sfxflow panels
  carry unit axes and a square pixel of ``pixel_size_mm``); their z components are kept.
* ``dim0``/``dim1``/... give the data layout: ``%`` is the frame dimension, ``ss``/``fs`` the
  panel axes, an integer a fixed index (-> :attr:`sfxflow.models.Panel.data_index`); the panel
  occupies ``min_ss..max_ss`` x ``min_fs..max_fs`` (inclusive) of the trailing 2-D plane.
* A numeric value given as an HDF5 path (``clen = /LCLS/detector_1/EncoderValue``) is a
  *reference*: kept in :attr:`CrystfelGeometry.references` and supplied per frame to
  :meth:`CrystfelGeometry.resolve`. As in CrystFEL, a ``clen`` read from a data file is in
  millimetres unless the line says ``m`` (``clen = /path m``); ``photon_energy`` is in eV
  (or ``keV``), ``wavelength`` in ``m`` or ``A``, ``coffset`` in metres.
* Bad regions in fs/ss are inclusive data-array coordinates (optionally restricted to one
  ``panel``; without one they apply to every panel they overlap); in x/y they are lab-plane
  positions in pixel units, tested at pixel centres. ``no_index``/``ignore`` panels and
  ``mask_edge_pixels`` are folded into :attr:`sfxflow.models.Panel.mask` (``True`` = good).
  Per-frame mask datasets (``mask``, ``mask_file``, ``mask_good``, ``mask_bad`` and
  ``maskN_*``) are kept as :class:`MaskRef` for the image reader.

Errors in the file raise :class:`~sfxflow.errors.GeometryError` with one line
``FILE:LINE: problem (value ..., expected ...)``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sfxflow.errors import GeometryError, InputError
from sfxflow.models import (
    FWHM_PER_SIGMA,
    Beam,
    Detector,
    Panel,
    photon_energy_ev_to_wavelength_a,
)

__all__ = [
    "BadRegion",
    "CrystfelGeometry",
    "MaskRef",
    "format_geom",
    "parse_geom",
    "read_geom",
    "write_geom",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Keys that may appear for a panel (or as defaults before panels).
_PANEL_KEYS = frozenset(
    {
        "min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "fs", "ss", "res",
        "clen", "coffset", "adu_per_eV", "adu_per_photon", "max_adu", "data", "no_index",
        "ignore", "mask", "mask_file", "mask_good", "mask_bad", "mask_edge_pixels",
        "saturation_map", "saturation_map_file", "flag_lessthan", "flag_morethan",
        "flag_equal",
    }
)
#: Old keys CrystFEL itself ignores; accepted with a log message.
_IGNORED_KEYS = frozenset(
    {"badrow_direction", "rail_direction", "clen_for_centering", "peak_sep", "rigid_group"}
)
#: Global keys (apply to the whole file wherever they appear).
_GLOBAL_KEYS = frozenset(
    {
        "photon_energy", "wavelength", "electron_voltage", "bandwidth",
        "photon_energy_bandwidth", "photon_energy_scale", "peak_list", "peak_list_type",
        "detector_shift_x", "detector_shift_y",
    }
)
_RANGE_KEYS = frozenset({"min_fs", "max_fs", "min_ss", "max_ss"})
_MASK_N = re.compile(r"^mask(\d+)_(data|file|goodbits|badbits)$")
_DIM_N = re.compile(r"^dim(\d+)$")
_BAD_KEYS = frozenset(
    {"min_fs", "max_fs", "min_ss", "max_ss", "min_x", "max_x", "min_y", "max_y", "panel"}
)
_VECTOR_TERM = re.compile(r"([+-]?)\s*(\d*\.?\d*(?:[eE][+-]?\d+)?)\s*([xyz])")


#: Units and their factors to the internal unit of each referencable quantity.
_UNITS: dict[str, dict[str, float]] = {
    "clen": {"m": 1.0, "mm": 1e-3},  # -> metres
    "coffset": {"m": 1.0, "mm": 1e-3},
    "detector_shift_x": {"m": 1.0, "mm": 1e-3},
    "detector_shift_y": {"m": 1.0, "mm": 1e-3},
    "photon_energy": {"eV": 1.0, "keV": 1e3},  # -> eV
    "wavelength": {"m": 1e10, "A": 1.0},  # -> Å
    "electron_voltage": {"V": 1.0, "kV": 1e3},  # -> V
}
#: Unit assumed for a data-file reference without one (CrystFEL: header clen is in mm).
_REF_DEFAULT_UNIT = {
    "clen": "mm", "coffset": "m", "detector_shift_x": "m", "detector_shift_y": "m",
    "photon_energy": "eV",
}
_LITERAL_DEFAULT_UNIT = {
    "clen": "m", "coffset": "m", "detector_shift_x": "m", "detector_shift_y": "m",
    "photon_energy": "eV",
}


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRef:
    """A per-frame bad-pixel mask dataset, resolved by the image reader.

    A pixel is good when all ``good_bits`` are set and none of ``bad_bits`` is set (CrystFEL).

    Parameters
    ----------
    data_path : HDF5 dataset of the mask (same layout as the image data, ``%`` allowed).
    file : separate HDF5 file holding it, or ``None`` for the image file itself.
    good_bits, bad_bits : bit masks.
    panels : names of the panels this mask applies to.

    Examples
    --------
    >>> MaskRef("/mask", None, 0x1, 0x0).good_pixels(np.array([0, 1, 3])).tolist()
    [False, True, True]
    """

    data_path: str
    file: str | None = None
    good_bits: int = 0
    bad_bits: int = 0
    panels: tuple[str, ...] = ()

    def good_pixels(self, values: np.ndarray) -> np.ndarray:
        """Boolean array, ``True`` where mask ``values`` mark a good pixel."""
        v = np.asarray(values).astype(np.int64, copy=False)
        good = (v & self.good_bits) == self.good_bits
        if self.bad_bits:
            good &= (v & self.bad_bits) == 0
        return good


@dataclass(frozen=True)
class BadRegion:
    """A CrystFEL bad region: inclusive fs/ss data coordinates, or an x/y lab rectangle in pixels."""

    name: str
    kind: str  # "fsss" or "xy"
    min_fs: float = math.nan
    max_fs: float = math.nan
    min_ss: float = math.nan
    max_ss: float = math.nan
    min_x: float = math.nan
    max_x: float = math.nan
    min_y: float = math.nan
    max_y: float = math.nan
    panel: str | None = None


@dataclass(frozen=True)
class _PanelSpec:
    """Static, parsed description of one panel (everything except per-frame values)."""

    name: str
    line: int
    shape: tuple[int, int]
    data_origin: tuple[int, int]
    data_index: tuple[int, ...]
    data_path: str | None
    corner_px: tuple[float, float]
    fast_axis: tuple[float, float, float]
    slow_axis: tuple[float, float, float]
    pixel_size_mm: float
    clen: float | str | None  # metres, reference key, or missing
    coffset: float | str  # metres or reference key
    adu_per_ev: float | None
    adu_per_photon: float | None
    max_adu: float
    mask: np.ndarray | None = field(compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# The parsed file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrystfelGeometry:
    """A parsed CrystFEL geometry file.

    Attributes
    ----------
    source : file name or URL (used in error messages).
    text : the file's text as read.
    data_path : HDF5 dataset of the frames (``data``), or ``None`` when the file gives none.
    frame_dim : index of the ``%`` (frame) dimension in that dataset, or ``None``.
    references : per-frame values given as HDF5 paths, keyed ``clen``, ``coffset``,
        ``photon_energy``, ``wavelength``, ``detector_shift_x``/``_y`` (or ``"<panel>/clen"`` /
        ``"<panel>/coffset"`` when panels differ).
    reference_units : unit of each reference's value in the data file (``mm`` for ``clen``
        unless the file says otherwise, ``eV`` for ``photon_energy``...).
    mask_refs : per-frame mask datasets.
    bad_regions : the file's bad regions (already applied to the panel masks).
    rigid_groups, rigid_group_collections, groups : ``rigid_group_*``,
        ``rigid_group_collection_*`` and ``group_*`` lines (name without prefix -> members).
    """

    source: str
    text: str
    panel_specs: tuple[_PanelSpec, ...] = field(repr=False)
    data_path: str | None
    frame_dim: int | None
    references: dict[str, str]
    reference_units: dict[str, str]
    mask_refs: tuple[MaskRef, ...]
    bad_regions: tuple[BadRegion, ...]
    rigid_groups: dict[str, tuple[str, ...]]
    rigid_group_collections: dict[str, tuple[str, ...]]
    groups: dict[str, tuple[str, ...]]
    peak_list: str | None = None
    peak_list_type: str | None = None
    panel_data_paths: dict[str, str] = field(default_factory=dict)
    energy: tuple[str, float | str, str] | None = None  # (kind, value or ref key, unit)
    photon_energy_scale: float = 1.0
    bandwidth_sigma: float | None = None
    detector_shift_m: tuple[float | str, float | str] = (0.0, 0.0)

    # ---------------------------------------------------------------- convenience
    @property
    def panel_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.panel_specs)

    @property
    def n_panels(self) -> int:
        return len(self.panel_specs)

    def values_from_headers(self, headers: Mapping[str, float]) -> dict[str, float]:
        """Map values keyed by HDF5 path (e.g. a stream's ``hdf5/...`` lines) to reference keys.

        >>> g = parse_geom(_EXAMPLE, "ex.geom")
        >>> g.values_from_headers({"/LCLS/clen": 130.0})
        {'clen': 130.0}
        """
        out: dict[str, float] = {}
        for key, path in self.references.items():
            for cand in (path, path.lstrip("/"), "/" + path.lstrip("/")):
                if cand in headers:
                    out[key] = float(headers[cand])
                    break
        return out

    # ---------------------------------------------------------------- resolution
    def _value(self, spec: float | str | None, values: Mapping[str, float] | None,
               what: str) -> float:
        """A literal (already in internal units) or a reference looked up in ``values``."""
        if spec is None:
            raise GeometryError(f"{self.source}: {what} is not given (expected a value or "
                                f"an HDF5 path in the geometry file)")
        if not isinstance(spec, str):
            return float(spec)
        ref_key = spec
        path = self.references[ref_key]
        v = None
        if values is not None:
            if ref_key in values:
                v = values[ref_key]
            elif path in values:
                v = values[path]
        if v is None:
            raise GeometryError(
                f"{self.source}: {what} is read per frame from {path} (value missing, "
                f"expected resolve(values) with key {ref_key!r})"
            )
        return float(v) * self._reference_factor(ref_key)

    def _reference_factor(self, ref_key: str) -> float:
        """Factor from a reference's unit in the data file to the internal unit."""
        base = ref_key.rsplit("/", 1)[-1]
        unit = self.reference_units.get(ref_key, _REF_DEFAULT_UNIT.get(base, ""))
        return _UNITS.get(base, {}).get(unit, 1.0)

    def beam(self, values: Mapping[str, float] | None = None) -> Beam | None:
        """The beam (``None`` when the file gives no energy/wavelength)."""
        if self.energy is None:
            return None
        kind, spec, _unit = self.energy
        v = self._value(spec, values, kind)
        if kind == "photon_energy":
            e_ev = v * self.photon_energy_scale
            if not e_ev > 0:
                raise GeometryError(f"{self.source}: photon energy {e_ev} eV (expected > 0)")
            wl = photon_energy_ev_to_wavelength_a(e_ev)
        elif kind == "wavelength":
            wl = v
        else:  # electron_voltage, relativistic de Broglie wavelength
            wl = _electron_wavelength_a(v)
        if not (wl > 0 and math.isfinite(wl)):
            raise GeometryError(f"{self.source}: wavelength {wl} Å (expected > 0)")
        bw = 0.0 if self.bandwidth_sigma is None else self.bandwidth_sigma * FWHM_PER_SIGMA
        return Beam(wavelength_a=wl, bandwidth_fwhm=bw)

    def detector(self, values: Mapping[str, float] | None = None) -> Detector:
        """The detector, with per-frame ``values`` for any references it needs.

        ``adu_per_eV`` is turned into ``adu_per_photon`` when the photon energy is known
        (a literal, or given in ``values``); otherwise it is left ``None``.
        """
        beam_energy_ev: float | None = None
        if any(p.adu_per_ev is not None for p in self.panel_specs):
            try:
                b = self.beam(values)
                beam_energy_ev = None if b is None else b.photon_energy_ev
            except GeometryError:
                beam_energy_ev = None
        sx = self._value(self.detector_shift_m[0], values, "detector_shift_x") * 1000.0
        sy = self._value(self.detector_shift_m[1], values, "detector_shift_y") * 1000.0
        panels = []
        for p in self.panel_specs:
            clen = self._value(p.clen, values, f"clen of panel {p.name}")
            coff = self._value(p.coffset, values, f"coffset of panel {p.name}")
            pix = p.pixel_size_mm
            origin = (p.corner_px[0] * pix + sx, p.corner_px[1] * pix + sy,
                      1000.0 * (clen + coff))
            if p.adu_per_photon is not None:
                gain: float | None = p.adu_per_photon
            elif p.adu_per_ev is not None and beam_energy_ev is not None:
                gain = p.adu_per_ev * beam_energy_ev
            else:
                gain = None
            panels.append(
                Panel(
                    name=p.name, origin_mm=origin, fast_axis=p.fast_axis,
                    slow_axis=p.slow_axis, pixel_size_mm=pix, shape=p.shape,
                    data_index=p.data_index, data_origin=p.data_origin, mask=p.mask,
                    adu_per_photon=gain, max_adu=p.max_adu,
                )
            )
        return Detector(tuple(panels), rigid_groups=self._panel_rigid_groups())

    def resolve(
        self, values: Mapping[str, float] | None = None
    ) -> tuple[Detector, Beam | None]:
        """Detector and beam for one frame.

        Parameters
        ----------
        values : per-frame values of the :attr:`references`, keyed like ``references`` (or by
            the HDF5 path itself), in the data file's units (see :attr:`reference_units`).

        Raises
        ------
        GeometryError
            When a needed reference has no value, or a panel has no ``clen`` at all.
        """
        return self.detector(values), self.beam(values)

    def header_values(self, detector: Detector, beam: Beam | None) -> dict[str, float]:
        """The per-frame values a frame was resolved with, keyed by HDF5 path in the data
        file's units: the inverse of :meth:`resolve` for ``clen`` and the photon energy or
        wavelength (what a stream chunk must record as ``hdf5/<path> = value`` lines so that
        the stream can be read back with this geometry). Other references are left out.
        """
        out: dict[str, float] = {}
        by_name = {p.name: p for p in detector.panels}
        for key, path in self.references.items():
            base = key.rsplit("/", 1)[-1]
            value: float | None = None
            if base == "photon_energy" and beam is not None:
                value = beam.photon_energy_ev / self.photon_energy_scale
            elif base == "wavelength" and beam is not None:
                value = beam.wavelength_a
            elif base == "clen":
                spec = next((p for p in self.panel_specs if p.clen == key), None)
                if spec is not None and not isinstance(spec.coffset, str) \
                        and spec.name in by_name:
                    value = by_name[spec.name].origin_mm[2] / 1000.0 - float(spec.coffset)
            if value is not None:
                out[path] = value / self._reference_factor(key)
        return out

    def _panel_rigid_groups(self) -> dict[str, tuple[str, ...]]:
        """``rigid_group_*`` as given, plus ``group_*`` expanded to panel names."""
        out = dict(self.rigid_groups)
        names = set(self.panel_names)

        def leaves(member: str, seen: frozenset[str]) -> list[str]:
            if member in names:
                return [member]
            if member in self.groups and member not in seen:
                res: list[str] = []
                for m in self.groups[member]:
                    res.extend(leaves(m, seen | {member}))
                return res
            return []

        for g in self.groups:
            key = g if g not in out else f"group_{g}"
            out[key] = tuple(leaves(g, frozenset()))
        return out


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_EXAMPLE = """\
clen = /LCLS/clen
photon_energy = 9500
res = 10000
p0/min_fs = 0
p0/max_fs = 9
p0/min_ss = 0
p0/max_ss = 4
p0/corner_x = -5
p0/corner_y = -2.5
p0/fs = x
p0/ss = y
"""


class _Ctx:
    """Error helper bound to a file name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, line: int, problem: str, value: Any, expected: str) -> GeometryError:
        return GeometryError(
            f"{self.source}:{line}: {problem} (value {value!r}, expected {expected})"
        )

    def number(self, line: int, key: str, text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise self.error(line, f"cannot parse {key} as a number", text, "a number") from None
        if not math.isfinite(v):
            raise self.error(line, f"{key} is not finite", text, "a finite number")
        return v

    def integer(self, line: int, key: str, text: str) -> int:
        v = self.number(line, key, text)
        if v != int(v):
            raise self.error(line, f"{key} must be a whole number of pixels", text,
                             "an integer")
        return int(v)

    def bits(self, line: int, key: str, text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            pass
        v = self.number(line, key, text)
        if v != int(v) or v < 0:
            raise self.error(line, f"{key} must be a non-negative integer bit mask", text,
                             "e.g. 0x0001")
        return int(v)

    def boolean(self, line: int, key: str, text: str) -> bool:
        t = text.strip().lower()
        if t in ("true", "yes"):
            return True
        if t in ("false", "no"):
            return False
        return self.integer(line, key, text) != 0

    def vector(self, line: int, key: str, text: str) -> tuple[float, float, float]:
        compact = text.replace(" ", "").replace("\t", "")
        malformed = self.error(line, f"cannot parse {key} vector", text,
                               "terms like '-0.0002x +1.0000y +0.01z'")
        pos = 0
        comp = {"x": 0.0, "y": 0.0, "z": 0.0}
        while pos < len(compact):
            m = _VECTOR_TERM.match(compact, pos)
            if m is None or m.end() == pos or m.group(2) == ".":
                raise malformed
            sign, coef, axis = m.groups()
            c = float(coef) if coef else 1.0
            comp[axis] += -c if sign == "-" else c
            pos = m.end()
        if pos == 0:
            raise malformed
        v = np.array([comp["x"], comp["y"], comp["z"]])
        norm = float(np.linalg.norm(v))
        if not norm > 0:
            raise self.error(line, f"{key} vector has zero length", text, "a non-zero vector")
        v = v / norm
        return (float(v[0]), float(v[1]), float(v[2]))


def _split_unit(text: str) -> tuple[str, str | None]:
    """``"95.3 mm"`` -> ``("95.3", "mm")``; ``"/path m"`` -> ``("/path", "m")``."""
    parts = text.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    if len(parts) == 1:
        return parts[0], None
    return text, "?"


def _electron_wavelength_a(volts: float) -> float:
    """Relativistic de Broglie wavelength (Å) of electrons accelerated through ``volts``."""
    h = 6.62607015e-34
    m0 = 9.1093837015e-31
    e = 1.602176634e-19
    c = 299792458.0
    p = math.sqrt(2.0 * m0 * e * volts * (1.0 + e * volts / (2.0 * m0 * c * c)))
    return h / p * 1e10


def read_geom(path_or_url: str | Path, storage_options: dict | None = None) -> CrystfelGeometry:
    """Read a CrystFEL ``.geom`` file from a path or URL (``s3://...`` via fsspec).

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     f = os.path.join(d, "x.geom")
    ...     _ = Path(f).write_text(_EXAMPLE)
    ...     g = read_geom(f)
    >>> g.references
    {'clen': '/LCLS/clen'}
    """
    src = str(path_or_url)
    return parse_geom(read_text(src, storage_options, "geometry file", GeometryError), src)


def read_text(url: str, storage_options: Mapping[str, Any] | None, what: str,
              error: type[Exception]) -> str:
    """Whole text of a local file or an fsspec URL (via :mod:`sfxflow.io.storage`)."""
    try:
        if "://" in url and not url.startswith("file://"):
            from sfxflow.io.storage import read_bytes

            data = read_bytes(url, storage_options)
        else:
            data = Path(url.removeprefix("file://")).read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, InputError) as exc:
        from sfxflow.errors import redact_userinfo

        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(redact_userinfo(f"{url}: cannot read {what} ({msg})")) from exc


# --------------------------------------------------------------------------------------------
# Parsing: lines are collected by key (a table of top-level handlers), then each panel is built
# by a table of per-key-group handlers, then the file-wide values.
# --------------------------------------------------------------------------------------------

_Item = tuple[str, int]  # (value text, line number)


@dataclass
class _Lines:
    """The file's lines sorted by what they set (the first pass of :func:`parse_geom`)."""

    defaults: dict[str, _Item] = field(default_factory=dict)
    panels: dict[str, dict[str, _Item]] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)
    explicit: dict[str, dict[str, int]] = field(default_factory=dict)
    last_panel: str | None = None
    bad: dict[str, dict[str, _Item]] = field(default_factory=dict)
    glob: dict[str, _Item] = field(default_factory=dict)
    rigid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rigid_coll: dict[str, tuple[str, ...]] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unused_defaults: list[tuple[str, int]] = field(default_factory=list)


def _is_panel_key(key: str) -> bool:
    return key in _PANEL_KEYS or bool(_MASK_N.match(key) or _DIM_N.match(key))


#: group lines: key prefix (the longest first) -> the table of :class:`_Lines` they go to
_GROUP_PREFIXES = (("rigid_group_collection_", "rigid_coll"), ("rigid_group_", "rigid"),
                   ("group_", "groups"))


def _set_group(ls: _Lines, ctx: _Ctx, key: str, val: str, lineno: int) -> None:
    prefix, table = next((p, t) for p, t in _GROUP_PREFIXES if key.startswith(p))
    getattr(ls, table)[key[len(prefix):]] = _members(val)


def _set_global(ls: _Lines, ctx: _Ctx, key: str, val: str, lineno: int) -> None:
    ls.glob[key] = (val, lineno)


def _ignore(ls: _Lines, ctx: _Ctx, key: str, val: str, lineno: int) -> None:
    log.info("%s:%d: '%s' is ignored (as in CrystFEL)", ctx.source, lineno, key)


def _set_default(ls: _Lines, ctx: _Ctx, key: str, val: str, lineno: int) -> None:
    if key.startswith("dim"):
        _check_dim(ctx, lineno, key, val)
    ls.defaults[key] = (val, lineno)
    ls.unused_defaults.append((key, lineno))


#: Keys without a panel name: the first row whose test accepts the key handles it.
_TOP_LEVEL_HANDLERS = (
    (lambda k: k.startswith(tuple(p for p, _ in _GROUP_PREFIXES)), _set_group),
    (lambda k: k in _GLOBAL_KEYS or k == "clen", _set_global),
    (lambda k: k in _IGNORED_KEYS, _ignore),
    (_is_panel_key, _set_default),
)


def _set_bad_key(ls: _Lines, ctx: _Ctx, name: str, sub: str, val: str, lineno: int) -> None:
    if sub not in _BAD_KEYS:
        raise ctx.error(lineno, f"unknown bad-region key '{sub}'", val,
                        "min_fs/max_fs/min_ss/max_ss/panel or min_x/max_x/min_y/max_y")
    ls.bad.setdefault(name, {})[sub] = (val, lineno)


def _set_panel_key(ls: _Lines, ctx: _Ctx, name: str, sub: str, val: str, lineno: int) -> None:
    key = f"{name}/{sub}"
    if name.startswith(("group", "rigid_group")):
        raise ctx.error(lineno, f"panel name '{name}' is reserved", key,
                        "a panel name not starting with bad, group or rigid_group")
    if not (_is_panel_key(sub) or sub in _IGNORED_KEYS):
        raise ctx.error(lineno, f"unknown panel key '{sub}'", f"{key} = {val}",
                        "a CrystFEL panel key such as min_fs, corner_x, fs, res")
    if sub in _IGNORED_KEYS:
        _ignore(ls, ctx, sub, val, lineno)
        return
    if sub.startswith("dim"):
        _check_dim(ctx, lineno, sub, val)
    if name not in ls.panels:
        ls.panels[name] = dict(ls.defaults)
        ls.explicit[name] = {}
        ls.first_line[name] = lineno
        ls.unused_defaults.clear()
    elif ls.last_panel != name and sub in ls.explicit[name] and sub in _RANGE_KEYS:
        # The panel's block was left and its data range comes again: a second definition
        # of the same panel (a later corner_x, coffset... for it simply overrides).
        raise ctx.error(lineno, f"duplicate panel '{name}': {sub} was already set on line "
                        f"{ls.explicit[name][sub]}", f"{key} = {val}",
                        "each panel defined in one block")
    ls.panels[name][sub] = (val, lineno)
    ls.explicit[name][sub] = lineno
    ls.last_panel = name


def _read_lines(text: str, ctx: _Ctx) -> _Lines:
    ls = _Lines()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ctx.error(lineno, "line is not 'key = value'", line, "'key = value'")
        key, val = (s.strip() for s in line.split("=", 1))
        if not key:
            raise ctx.error(lineno, "empty key", line, "'key = value'")
        if "/" not in key:
            handler = next((h for test, h in _TOP_LEVEL_HANDLERS if test(key)), None)
            if handler is None:
                raise ctx.error(lineno, f"unknown key '{key}'", val,
                                "a CrystFEL geometry key such as res, clen, corner_x")
            handler(ls, ctx, key, val, lineno)
            continue
        name, sub = (s.strip() for s in key.split("/", 1))
        if not name or not sub or "/" in sub:
            raise ctx.error(lineno, "malformed key", key, "'panel/key' or 'bad_name/key'")
        (_set_bad_key if name.startswith("bad") else _set_panel_key)(ls, ctx, name, sub, val,
                                                                      lineno)
    return ls


@dataclass
class _Refs:
    """Values read per frame from the data file, and what the panels share."""

    ctx: _Ctx
    references: dict[str, str] = field(default_factory=dict)
    ref_units: dict[str, str] = field(default_factory=dict)
    clen_refs: dict[str, str] = field(default_factory=dict)
    coff_refs: dict[str, str] = field(default_factory=dict)
    mask_groups: dict[tuple[str, str | None, int, int], list[str]] = field(default_factory=dict)
    frame_dims: set[int | None] = field(default_factory=set)
    data_paths: dict[str, str] = field(default_factory=dict)

    def quantity(self, base: str, val: str, lineno: int, ref_key: str) -> float | str:
        """Parse a number with optional unit, or a reference; literals -> internal units."""
        ctx = self.ctx
        v, unit = _split_unit(val)
        units = _UNITS[base]
        if unit is not None and unit not in units:
            raise ctx.error(lineno, f"unknown unit for {base}", val,
                            f"one of {', '.join(units)}")
        if v.startswith("/"):
            self.references[ref_key] = v
            self.ref_units[ref_key] = unit or _REF_DEFAULT_UNIT.get(base, "")
            if unit is None and base in ("wavelength", "electron_voltage"):
                raise ctx.error(lineno, f"{base} from a data file needs a unit", val,
                                f"'{v} {next(iter(units))}'")
            return ref_key
        if unit is None:
            if base in ("wavelength", "electron_voltage"):
                raise ctx.error(lineno, f"{base} needs a unit", val,
                                f"e.g. '{v} {next(iter(units))}'")
            unit = _LITERAL_DEFAULT_UNIT[base]
        return ctx.number(lineno, base, v) * units[unit]


@dataclass
class _Panel:
    """One panel's lines while its :class:`_PanelSpec` is built."""

    name: str
    kv: dict[str, _Item]
    line: int
    glob: dict[str, _Item]

    def parse(self, how: Callable[[int, str, str], _T], key: str) -> _T:
        """The value of a key the panel has, read by ``how`` (a :class:`_Ctx` method)."""
        val, ln = self.kv[key]
        return how(ln, f"{self.name}/{key}", val)


def _panel_extent(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """min_fs/max_fs/min_ss/max_ss (and the required corner, fs and ss are present)."""
    for req in ("min_fs", "max_fs", "min_ss", "max_ss", "corner_x", "corner_y", "fs", "ss"):
        if req not in p.kv:
            what = "<pixel>" if req in _RANGE_KEYS else "..."
            raise ctx.error(p.line, f"panel '{p.name}' has no {req}", None,
                            f"a line '{p.name}/{req} = {what}'")
    lim = {k: p.parse(ctx.integer, k) for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
    for lo, hi in (("min_fs", "max_fs"), ("min_ss", "max_ss")):
        if lim[lo] < 0:
            v, ln = p.kv[lo]
            raise ctx.error(ln, f"{p.name}/{lo} is negative", v, "a pixel index >= 0")
        if lim[lo] > lim[hi]:
            v, ln = p.kv[hi]
            raise ctx.error(ln, f"{p.name}/{lo} > {p.name}/{hi}", f"{lo}={lim[lo]} {hi}={v}",
                            f"{hi} >= {lo}")
    out["shape"] = (lim["max_ss"] - lim["min_ss"] + 1, lim["max_fs"] - lim["min_fs"] + 1)
    out["data_origin"] = (lim["min_ss"], lim["min_fs"])


def _panel_axes(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """corner_x/corner_y (pixels) and the fs/ss direction vectors."""
    cx = p.parse(ctx.number, "corner_x")
    cy = p.parse(ctx.number, "corner_y")
    fsv = p.parse(ctx.vector, "fs")
    ssv = p.parse(ctx.vector, "ss")
    if abs(float(np.linalg.norm(np.cross(fsv, ssv)))) < 1e-6:
        v, ln = p.kv["ss"]
        raise ctx.error(ln, f"panel '{p.name}' fs and ss are parallel", v,
                        "ss not parallel to fs")
    out.update(corner_px=(cx, cy), fast_axis=fsv, slow_axis=ssv)


def _panel_pixel_size(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """res (pixels per metre)."""
    if "res" not in p.kv:
        raise ctx.error(p.line, f"panel '{p.name}' has no res (pixel size)", None,
                        "'res = <pixels per metre>' before the panel or for it")
    res = p.parse(ctx.number, "res")
    if not res > 0:
        res_v, res_ln = p.kv["res"]
        raise ctx.error(res_ln, f"{p.name}/res is not positive", res_v, "pixels per metre > 0")
    out["pixel_size_mm"] = 1000.0 / res


def _panel_distance(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """clen (global in CrystFEL >= 0.10 wherever it appears; older files set it per panel)
    and coffset, each a number or a per-frame reference."""
    clen_item = p.kv.get("clen", p.glob.get("clen"))
    clen: float | str | None = None
    if clen_item is not None:
        clen = refs.quantity("clen", clen_item[0], clen_item[1], f"{p.name}/clen")
        if isinstance(clen, str):
            refs.clen_refs[p.name] = refs.references[clen]
    coffset: float | str = 0.0
    if "coffset" in p.kv:
        val, ln = p.kv["coffset"]
        coffset = refs.quantity("coffset", val, ln, f"{p.name}/coffset")
        if isinstance(coffset, str):
            refs.coff_refs[p.name] = refs.references[coffset]
    out.update(clen=clen, coffset=coffset)


def _panel_gain(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """adu_per_eV / adu_per_photon (the later line wins) and max_adu."""
    adu_ev = adu_ph = None
    a_ev, a_ph = p.kv.get("adu_per_eV"), p.kv.get("adu_per_photon")
    if a_ev is not None and (a_ph is None or a_ev[1] > a_ph[1]):
        adu_ev = ctx.number(a_ev[1], f"{p.name}/adu_per_eV", a_ev[0])
    elif a_ph is not None:
        adu_ph = ctx.number(a_ph[1], f"{p.name}/adu_per_photon", a_ph[0])
    max_adu = p.parse(ctx.number, "max_adu") if "max_adu" in p.kv else math.inf
    out.update(adu_per_ev=adu_ev, adu_per_photon=adu_ph, max_adu=max_adu)


def _panel_layout(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """dimN (where the panel's pixels and the frame index sit in the data array) and data."""
    dims: dict[int, str] = {0: "ss", 1: "fs"}
    dim_items = {int(m.group(1)): item for k, item in p.kv.items() if (m := _DIM_N.match(k))}
    if dim_items:
        dims = {k: v for k, (v, _ln) in dim_items.items()}
    order = [dims.get(i) for i in range(max(dims) + 1)]
    last_line = max((ln for _v, ln in dim_items.values()), default=p.line)
    if None in order:
        raise ctx.error(last_line, f"panel '{p.name}' has no dim{order.index(None)}", None,
                        f"dim0..dim{len(order) - 1} all given")
    shown = " ".join(str(d) for d in order)
    if order.count("ss") != 1 or order.count("fs") != 1 or order.count("%") > 1:
        raise ctx.error(last_line, f"panel '{p.name}' data layout is invalid", shown,
                        "exactly one ss and one fs, at most one %")
    rest = [str(d) for d in order if d != "%"]
    if rest[-2:] != ["ss", "fs"]:
        raise ctx.error(last_line, f"panel '{p.name}': ss and fs must be the last two "
                        "dimensions", shown, "... ss fs")
    refs.frame_dims.add(order.index("%") if "%" in order else None)
    data_path = p.kv["data"][0] if "data" in p.kv else None
    if data_path is not None:
        refs.data_paths[p.name] = data_path
    out.update(data_index=tuple(int(d) for d in rest[:-2]), data_path=data_path)


#: mask/mask_file/mask_good/mask_bad are mask0_data/_file/_goodbits/_badbits.
_MASK_0 = {"mask": "data", "mask_file": "file", "mask_good": "goodbits", "mask_bad": "badbits"}


def _panel_mask_refs(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """Per-frame mask datasets (maskN_* and the unnumbered mask keys)."""
    slots: dict[int, dict[str, _Item]] = {}
    for k, item in p.kv.items():
        m = _MASK_N.match(k)
        if m:
            slots.setdefault(int(m.group(1)), {})[m.group(2)] = item
        elif k in _MASK_0:
            slots.setdefault(0, {})[_MASK_0[k]] = item
    for n, slot in sorted(slots.items()):
        if "data" not in slot:
            ln = min(ln for _v, ln in slot.values())
            raise ctx.error(ln, f"panel '{p.name}' mask {n} has no dataset",
                            {k: v for k, (v, _l) in slot.items()},
                            "'mask = /hdf5/path' (or maskN_data)")
        path, ln = slot["data"]
        if not path.startswith("/"):
            raise ctx.error(ln, "mask dataset is not an HDF5 path", path, "'/path/to/mask'")
        good = ctx.bits(slot["goodbits"][1], "mask_good", slot["goodbits"][0]) \
            if "goodbits" in slot else 0
        badb = ctx.bits(slot["badbits"][1], "mask_bad", slot["badbits"][0]) \
            if "badbits" in slot else 0
        mfile = slot["file"][0] if "file" in slot else None
        refs.mask_groups.setdefault((path, mfile, good, badb), []).append(p.name)


def _panel_static_mask(p: _Panel, ctx: _Ctx, refs: _Refs, out: dict[str, Any]) -> None:
    """no_index / ignore / mask_edge_pixels (bad regions are applied after every panel)."""
    shape = out["shape"]
    mask = None
    for k in ("no_index", "ignore"):
        if k in p.kv and ctx.boolean(p.kv[k][1], f"{p.name}/{k}", p.kv[k][0]):
            mask = np.zeros(shape, dtype=bool)
    if "mask_edge_pixels" in p.kv:
        n_edge = p.parse(ctx.integer, "mask_edge_pixels")
        if n_edge > 0:
            mask = np.ones(shape, dtype=bool) if mask is None else mask
            mask[:n_edge, :] = False
            mask[-n_edge:, :] = False
            mask[:, :n_edge] = False
            mask[:, -n_edge:] = False
    for k in ("flag_lessthan", "flag_morethan", "flag_equal", "saturation_map"):
        if k in p.kv:
            log.warning("%s:%d: %s/%s is not applied by sfxflow", ctx.source, p.kv[k][1],
                        p.name, k)
    out["mask"] = mask


#: A panel's spec is built by these handlers in turn, each reading its group of keys.
_PANEL_HANDLERS = (
    _panel_extent, _panel_axes, _panel_pixel_size, _panel_distance, _panel_gain,
    _panel_layout, _panel_mask_refs, _panel_static_mask,
)


def _beam_values(glob: Mapping[str, _Item], ctx: _Ctx, refs: _Refs) -> dict[str, Any]:
    """photon_energy/wavelength/electron_voltage (the later line wins), scale, bandwidth,
    detector shifts and peak lists: the file-wide keys."""
    energy: tuple[str, float | str, str] | None = None
    for kind in ("photon_energy", "wavelength", "electron_voltage"):
        if kind in glob:
            val, ln = glob[kind]
            spec = refs.quantity(kind, val, ln, kind)
            unit = refs.ref_units.get(kind, "")
            if energy is not None:
                log.warning("%s:%d: %s overrides %s", ctx.source, ln, kind, energy[0])
            energy = (kind, spec, unit)
    scale = 1.0
    if "photon_energy_scale" in glob:
        val, ln = glob["photon_energy_scale"]
        scale = ctx.number(ln, "photon_energy_scale", val)
    bandwidth = None
    for k in ("bandwidth", "photon_energy_bandwidth"):
        if k in glob:
            val, ln = glob[k]
            bandwidth = ctx.number(ln, k, val)
            if bandwidth < 0:
                raise ctx.error(ln, f"{k} is negative", val, "a fraction >= 0")
    shift: list[float | str] = [0.0, 0.0]
    for i, k in enumerate(("detector_shift_x", "detector_shift_y")):
        if k in glob:
            val, ln = glob[k]
            shift[i] = refs.quantity(k, val, ln, k)
    peak_list = glob["peak_list"][0] if "peak_list" in glob else None
    peak_list_type = glob["peak_list_type"][0] if "peak_list_type" in glob else None
    if peak_list_type is not None and peak_list_type not in ("auto", "cxi", "list3"):
        raise ctx.error(glob["peak_list_type"][1], "unknown peak_list_type", peak_list_type,
                        "auto, cxi or list3")
    return {"energy": energy, "photon_energy_scale": scale, "bandwidth_sigma": bandwidth,
            "detector_shift_m": (shift[0], shift[1]), "peak_list": peak_list,
            "peak_list_type": peak_list_type}


def _shared_references(specs: list[_PanelSpec], refs: _Refs) -> list[_PanelSpec]:
    """Collapse per-panel clen/coffset references into one when every panel reads the same."""
    for base, per in (("clen", refs.clen_refs), ("coffset", refs.coff_refs)):
        if not per:
            continue
        paths = set(per.values())
        units = {refs.ref_units[f"{pn}/{base}"] for pn in per}
        if len(paths) == 1 and len(units) == 1 and len(per) == len(specs):
            path = paths.pop()
            for pn in per:
                refs.references.pop(f"{pn}/{base}")
                refs.ref_units.pop(f"{pn}/{base}")
            refs.references[base] = path
            refs.ref_units[base] = units.pop()
            shared: dict[str, Any] = {base: base}  # the spec field names the shared reference
            specs = [replace(s, **shared) for s in specs]
    return specs


def parse_geom(text: str, source: str = "<geometry>") -> CrystfelGeometry:
    """Parse the text of a CrystFEL geometry file.

    Examples
    --------
    >>> g = parse_geom(_EXAMPLE, "ex.geom")
    >>> det, beam = g.resolve({"clen": 130.0})   # clen read from a data file is in mm
    >>> det[0].origin_mm, det[0].pixel_size_mm, round(beam.wavelength_a, 4)
    ((-0.5, -0.25, 130.0), 0.1, 1.3051)
    """
    ctx = _Ctx(source)
    ls = _read_lines(text, ctx)
    if not ls.panels:
        raise GeometryError(f"{source}:1: no panels in geometry file (value {len(text)} "
                            f"characters, expected lines like 'p0/min_fs = 0')")
    for key, lineno in ls.unused_defaults:
        log.warning("%s:%d: '%s' comes after every panel and has no effect", source,
                    lineno, key)
    refs = _Refs(ctx)
    beam = _beam_values(ls.glob, ctx, refs)
    specs: list[_PanelSpec] = []
    for name, kv in ls.panels.items():
        panel = _Panel(name, kv, ls.first_line[name], ls.glob)
        fields: dict[str, Any] = {}
        for handler in _PANEL_HANDLERS:
            handler(panel, ctx, refs, fields)
        specs.append(_PanelSpec(name=name, line=panel.line, **fields))
    _check_overlaps(ctx, specs)
    specs = _shared_references(specs, refs)
    bad_regions = [_bad_region(ctx, n, kv, {s.name for s in specs}) for n, kv in ls.bad.items()]
    specs = [_apply_bad_regions(s, bad_regions) for s in specs]

    if len(refs.frame_dims) > 1:
        raise GeometryError(f"{source}:{specs[0].line}: panels disagree on the frame dimension "
                            f"(value {sorted(refs.frame_dims, key=str)}, expected one '%' "
                            "position)")
    frame_dim = refs.frame_dims.pop()
    uniq_paths = list(dict.fromkeys(refs.data_paths.values()))
    data_path = uniq_paths[0] if uniq_paths else None
    panel_data_paths = dict(refs.data_paths) if len(uniq_paths) > 1 else {}
    if panel_data_paths:
        log.warning("%s: panels read from %d different datasets", source, len(uniq_paths))

    # rigid-group members must be panels (or, for collections, rigid groups)
    names = {s.name for s in specs}
    for g, members in ls.rigid.items():
        unknown = [m for m in members if m not in names]
        if unknown:
            raise GeometryError(f"{source}: rigid_group_{g} names unknown panels (value "
                                f"{unknown[:4]}, expected panel names)")

    return CrystfelGeometry(
        source=source, text=text, panel_specs=tuple(specs), data_path=data_path,
        frame_dim=frame_dim, references=refs.references, reference_units=refs.ref_units,
        mask_refs=tuple(MaskRef(p, f, g, b, tuple(ps)) for (p, f, g, b), ps in
                        refs.mask_groups.items()),
        bad_regions=tuple(bad_regions), rigid_groups=ls.rigid,
        rigid_group_collections=ls.rigid_coll, groups=ls.groups,
        panel_data_paths=panel_data_paths, **beam,
    )


def _members(val: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in val.split(",") if m.strip())


def _check_dim(ctx: _Ctx, lineno: int, key: str, val: str) -> None:
    if val not in ("%", "ss", "fs") and not val.isdigit():
        raise ctx.error(lineno, f"invalid {key}", val, "%, ss, fs or a non-negative integer")


def _check_overlaps(ctx: _Ctx, specs: list[_PanelSpec]) -> None:
    """Two panels reading the same data pixels is a duplicated panel definition."""
    by_plane: dict[tuple[str | None, tuple[int, ...]], list[_PanelSpec]] = {}
    for s in specs:
        by_plane.setdefault((s.data_path, s.data_index), []).append(s)
    for group in by_plane.values():
        if len(group) < 2:
            continue
        r = np.array([(s.data_origin[0], s.data_origin[0] + s.shape[0],
                       s.data_origin[1], s.data_origin[1] + s.shape[1]) for s in group])
        order = np.argsort(r[:, 0], kind="stable")
        for ii, i in enumerate(order):
            for j in order[ii + 1:]:
                if r[j, 0] >= r[i, 1]:
                    break
                if r[i, 2] < r[j, 3] and r[j, 2] < r[i, 3]:
                    a, b = group[i], group[j]
                    if a.line > b.line:
                        a, b = b, a
                    raise ctx.error(
                        b.line, f"duplicate panel '{b.name}': reads the same data pixels as "
                        f"'{a.name}' (line {a.line})",
                        f"ss {b.data_origin[0]}..{b.data_origin[0] + b.shape[0] - 1}, "
                        f"fs {b.data_origin[1]}..{b.data_origin[1] + b.shape[1] - 1}",
                        "panels covering disjoint data regions",
                    )


def _bad_region(ctx: _Ctx, name: str, kv: dict[str, tuple[str, int]],
                panel_names: set[str]) -> BadRegion:
    fl = min(ln for _v, ln in kv.values())
    fsss = {"min_fs", "max_fs", "min_ss", "max_ss"} & kv.keys()
    xy = {"min_x", "max_x", "min_y", "max_y"} & kv.keys()
    if fsss and xy:
        raise ctx.error(fl, f"bad region '{name}' mixes fs/ss and x/y limits",
                        sorted(fsss | xy), "either min_fs/max_fs/min_ss/max_ss or "
                        "min_x/max_x/min_y/max_y")
    keys = ("min_fs", "max_fs", "min_ss", "max_ss") if fsss else ("min_x", "max_x", "min_y",
                                                                  "max_y")
    missing = [k for k in keys if k not in kv]
    if missing:
        raise ctx.error(fl, f"bad region '{name}' has no {missing[0]}", None,
                        f"all of {', '.join(keys)}")
    vals = {k: ctx.number(kv[k][1], f"{name}/{k}", kv[k][0]) for k in keys}
    for lo, hi in zip(keys[::2], keys[1::2], strict=True):
        if vals[lo] > vals[hi]:
            raise ctx.error(kv[hi][1], f"{name}/{lo} > {name}/{hi}",
                            f"{lo}={vals[lo]:g} {hi}={vals[hi]:g}", f"{hi} >= {lo}")
    panel = None
    if "panel" in kv:
        panel = kv["panel"][0]
        if panel not in panel_names:
            raise ctx.error(kv["panel"][1], f"bad region '{name}' names an unknown panel",
                            panel, "one of the panels in the file")
    return BadRegion(name=name, kind="fsss" if fsss else "xy", panel=panel, **vals)


def _apply_bad_regions(spec: _PanelSpec, regions: list[BadRegion]) -> _PanelSpec:
    mask = None if spec.mask is None else spec.mask.copy()
    n_ss, n_fs = spec.shape
    ss0, fs0 = spec.data_origin
    centres = None
    for r in regions:
        if r.kind == "fsss":
            if r.panel is not None and r.panel != spec.name:
                continue
            a_ss = max(math.ceil(r.min_ss) - ss0, 0)
            b_ss = min(math.floor(r.max_ss) - ss0, n_ss - 1)
            a_fs = max(math.ceil(r.min_fs) - fs0, 0)
            b_fs = min(math.floor(r.max_fs) - fs0, n_fs - 1)
            if a_ss > b_ss or a_fs > b_fs:
                continue
            mask = np.ones(spec.shape, dtype=bool) if mask is None else mask
            mask[a_ss:b_ss + 1, a_fs:b_fs + 1] = False
        else:
            if centres is None:
                ss_i, fs_i = np.mgrid[0:n_ss, 0:n_fs]
                x = spec.corner_px[0] + (fs_i + 0.5) * spec.fast_axis[0] + \
                    (ss_i + 0.5) * spec.slow_axis[0]
                y = spec.corner_px[1] + (fs_i + 0.5) * spec.fast_axis[1] + \
                    (ss_i + 0.5) * spec.slow_axis[1]
                centres = (x, y)
            x, y = centres
            inside = (x >= r.min_x) & (x <= r.max_x) & (y >= r.min_y) & (y <= r.max_y)
            if inside.any():
                mask = np.ones(spec.shape, dtype=bool) if mask is None else mask
                mask &= ~inside
    return replace(spec, mask=mask)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """Shortest text that reads back as the same float."""
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r


def _vec(v: tuple[float, float, float]) -> str:
    """``(1, -0.5, -0.0)`` -> ``"+1x -0.5y +0z"``.

    Adding ``0.0`` turns a negative zero (from rotating CBF axes) into ``0.0``: ``"+-0z"`` is read
    by neither CrystFEL nor :func:`parse_geom`.
    """
    return " ".join(("+" if c >= 0 else "") + _num(c + 0.0) + ax
                    for c, ax in zip(v, "xyz", strict=True))


def _mask_rectangles(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Exact cover of the ``False`` pixels by rectangles ``(ss0, ss1, fs0, fs1)`` (inclusive)."""
    bad = ~np.asarray(mask, dtype=bool)
    done: list[tuple[int, int, int, int]] = []
    active: dict[tuple[int, int], int] = {}  # (fs0, fs1) -> first ss
    for ss in range(bad.shape[0] + 1):
        runs: set[tuple[int, int]] = set()
        if ss < bad.shape[0]:
            row = np.concatenate(([False], bad[ss], [False]))
            edges = np.flatnonzero(np.diff(row.astype(np.int8)))
            runs = {(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)}
        for run in list(active):
            if run not in runs:
                done.append((active.pop(run), ss - 1, run[0], run[1]))
        for run in runs:
            active.setdefault(run, ss)
    return done


def _panel_lines(p: Panel, fixed_dims: list[int], clen_m: float) -> tuple[list[str], list[str]]:
    """A panel's lines in a geometry file, and the ``bad_*`` regions of its mask."""
    lines: list[str] = []
    bad_lines: list[str] = []
    pix = p.pixel_size_mm
    n = p.name
    ss0, fs0 = p.data_origin
    lines += [
        f"{n}/min_fs = {fs0}",
        f"{n}/max_fs = {fs0 + p.shape[1] - 1}",
        f"{n}/min_ss = {ss0}",
        f"{n}/max_ss = {ss0 + p.shape[0] - 1}",
    ]
    for dim_no, idx in zip(fixed_dims, p.data_index, strict=True):
        lines.append(f"{n}/dim{dim_no} = {idx}")
    lines += [
        f"{n}/fs = {_vec(p.fast_axis)}",
        f"{n}/ss = {_vec(p.slow_axis)}",
        f"{n}/res = {_num(1000.0 / pix)}",
        f"{n}/corner_x = {_num(p.origin_mm[0] / pix)}",
        f"{n}/corner_y = {_num(p.origin_mm[1] / pix)}",
        f"{n}/coffset = {_num(p.origin_mm[2] / 1000.0 - clen_m)}",
    ]
    if p.adu_per_photon is not None:
        lines.append(f"{n}/adu_per_photon = {_num(p.adu_per_photon)}")
    if math.isfinite(p.max_adu):
        lines.append(f"{n}/max_adu = {_num(p.max_adu)}")
    if p.mask is not None and not p.mask.any():
        lines.append(f"{n}/no_index = 1")
    elif p.mask is not None and not p.mask.all():
        for k, (a_ss, b_ss, a_fs, b_fs) in enumerate(_mask_rectangles(p.mask)):
            bad_lines += [
                f"bad_{n}_{k}/min_fs = {a_fs + fs0}",
                f"bad_{n}_{k}/max_fs = {b_fs + fs0}",
                f"bad_{n}_{k}/min_ss = {a_ss + ss0}",
                f"bad_{n}_{k}/max_ss = {b_ss + ss0}",
                f"bad_{n}_{k}/panel = {n}",
                "",
            ]
    return lines, bad_lines


def format_geom(
    detector: Detector,
    *,
    beam: Beam | None = None,
    data_path: str | None = "/entry_1/data_1/data",
    references: Mapping[str, str] | None = None,
    frame_dim: int | None = 0,
    mask_refs: tuple[MaskRef, ...] | list[MaskRef] = (),
    rigid_group_collections: Mapping[str, tuple[str, ...]] | None = None,
    header: str = "",
) -> str:
    """Text of a CrystFEL geometry file describing ``detector`` (and ``beam``).

    Parameters
    ----------
    detector : the panels; ``Panel.mask`` is written as ``bad_*`` fs/ss rectangles (a fully
        masked panel as ``no_index = 1``), ``rigid_groups`` as ``rigid_group_*`` lines.
    beam : written as ``photon_energy`` (eV) and ``bandwidth`` (sigma = FWHM / 2.3548).
    data_path : HDF5 dataset of the frames, or ``None``.
    references : ``{"photon_energy": "/path"}`` and/or ``{"clen": "/path"}`` to read those per
        frame instead. With a ``clen`` reference, panel z is written as ``coffset`` relative to
        the panels' mean z and ``clen`` is declared in metres, so resolving with
        ``{"clen": mean_z_m}`` gives the detector back.
    frame_dim : position of the ``%`` frame dimension (``None``: one frame per dataset).
    mask_refs : per-frame mask datasets to declare (``mask``/``mask_file``/...).
    rigid_group_collections : ``rigid_group_collection_*`` lines.
    header : comment text for the top of the file.
    """
    references = dict(references or {})
    unknown = set(references) - {"clen", "photon_energy"}
    if unknown:
        raise ValueError(f"format_geom: references may be clen/photon_energy, got {unknown}")
    out: list[str] = []
    for line in (header or "Written by sfxflow").splitlines():
        out.append(f"; {line}".rstrip())
    out.append("")
    if "photon_energy" in references:
        out.append(f"photon_energy = {references['photon_energy']} eV")
    elif beam is not None:
        out.append(f"photon_energy = {_num(beam.photon_energy_ev)} eV")
    if beam is not None and beam.bandwidth_fwhm > 0:
        out.append(f"bandwidth = {_num(beam.bandwidth_fwhm / FWHM_PER_SIGMA)}")
    zs = np.array([p.origin_mm[2] for p in detector.panels]) / 1000.0
    clen_m = float(zs[0]) if np.all(zs == zs[0]) else float(np.mean(zs))
    if "clen" in references:
        out.append(f"clen = {references['clen']} m")
    else:
        out.append(f"clen = {_num(clen_m)} m")
    if data_path is not None:
        out.append(f"data = {data_path}")
    lead = max((len(p.data_index) for p in detector.panels), default=0)
    dims = ["?"] * lead + ["ss", "fs"]
    if frame_dim is not None:
        dims.insert(frame_dim, "%")
    for i, d in enumerate(dims):
        if d != "?":
            out.append(f"dim{i} = {d}")
    fixed_dims = [i for i, d in enumerate(dims) if d == "?"]
    for k_mask, m in enumerate(mask_refs):
        out.append(f"mask{k_mask}_data = {m.data_path}")
        if m.file is not None:
            out.append(f"mask{k_mask}_file = {m.file}")
        out.append(f"mask{k_mask}_goodbits = {m.good_bits:#x}")
        out.append(f"mask{k_mask}_badbits = {m.bad_bits:#x}")
    out.append("")
    for g, members in detector.rigid_groups.items():
        out.append(f"rigid_group_{g} = {','.join(members)}")
    for g, members in (rigid_group_collections or {}).items():
        out.append(f"rigid_group_collection_{g} = {','.join(members)}")
    if detector.rigid_groups or rigid_group_collections:
        out.append("")
    bad_lines: list[str] = []
    for p in detector.panels:
        if len(p.data_index) != lead:
            raise ValueError(f"format_geom: panel {p.name} has {len(p.data_index)} fixed "
                             f"indices, others {lead}; one layout per file")
        lines, bad = _panel_lines(p, fixed_dims, clen_m)
        out += lines
        bad_lines += bad
        out.append("")
    out += bad_lines
    return "\n".join(out).rstrip("\n") + "\n"


def write_geom(
    detector: Detector,
    path: str | Path,
    *,
    beam: Beam | None = None,
    data_path: str | None = "/entry_1/data_1/data",
    references: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> None:
    """Write :func:`format_geom` text to ``path`` (other keyword arguments as there)."""
    text = format_geom(detector, beam=beam, data_path=data_path, references=references,
                       **kwargs)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise GeometryError(f"{path}: cannot write geometry file ({exc})") from exc
