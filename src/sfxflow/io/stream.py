"""Read and write CrystFEL streams (format 2.3), the per-frame output of ``indexamajig``.

A stream is a header (format line, generator, command line, the geometry file between
``----- Begin/End geometry file -----`` markers, optionally the target cell) followed by one
``----- Begin chunk -----`` ... ``----- End chunk -----`` block per frame: file name, event,
serial number, ``hit``, ``indexed_by``, photon energy, the peak list and, for each crystal
found, its cell, reciprocal basis ``astar``/``bstar``/``cstar`` and reflection list.

Conventions converted at this boundary
--------------------------------------
* **Pixel coordinates.** CrystFEL measures peak and reflection positions as continuous
  distances from the panel corner in pixels (first pixel centre at 0.5), exactly sfxflow's
  convention, so no half-pixel shift applies. But stream 2.3 writes them in the coordinates
  of the *data array* (the panel's ``min_fs``/``min_ss`` added; e.g. a peak at
  ``fs = 1030.81`` on ``q2a1`` whose ``min_fs = 970``), while a :class:`~sfxflow.models.SpotTable`
  holds panel-relative positions plus a panel index. The reader subtracts, and the writer adds,
  each panel's data origin.
* **Reciprocal basis.** CrystFEL's lab frame is sfxflow's and its scattering vector is
  ``q = k_out - k_in`` as ours, so ``astar``/``bstar``/``cstar`` (nm⁻¹) become the columns of
  the ``A`` matrix divided by 10 (Å⁻¹), without rotation.
* ``(1/d)/nm^-1`` -> ``d_a = 10 / (1/d)``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import gemmi
import numpy as np

from sfxflow import __version__
from sfxflow.algorithms.geometry import pixels_to_q
from sfxflow.algorithms.integrate import BAD_FLAGS, Flag
from sfxflow.errors import GeometryError, InputError
from sfxflow.io.cellfile import (
    CellFile,
    LatticeInfo,
    default_space_group,
    format_cell_file,
    lattice_from_space_group,
    parse_cell_file,
)
from sfxflow.io.geometry import CrystfelGeometry, parse_geom, read_text
from sfxflow.models import (
    FWHM_PER_SIGMA,
    Beam,
    Crystal,
    CrystalResult,
    Detector,
    FrameStatus,
    ImageResult,
    ReflectionTable,
    SpotTable,
    as_space_group,
    cell_of_basis,
    photon_energy_ev_to_wavelength_a,
)

__all__ = [
    "Chunk",
    "Reflections",
    "Stream",
    "StreamCrystal",
    "StreamError",
    "StreamWriter",
    "format_chunk",
    "format_stream_header",
    "parse_stream",
    "read_stream",
    "reflections_from_spots",
]

log = logging.getLogger(__name__)

STREAM_FORMAT = "2.3"
BEGIN_GEOM = "----- Begin geometry file -----"
END_GEOM = "----- End geometry file -----"
BEGIN_CELL = "----- Begin unit cell -----"
END_CELL = "----- End unit cell -----"
BEGIN_CHUNK = "----- Begin chunk -----"
END_CHUNK = "----- End chunk -----"
BEGIN_CRYSTAL = "--- Begin crystal"
END_CRYSTAL = "--- End crystal"
PEAKS_START = "Peaks from peak search"
PEAKS_HEADER = "  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel"
PEAKS_END = "End of peak list"
REFL_START = "Reflections measured after indexing"
REFL_HEADER = "   h    k    l          I   sigma(I)       peak background  fs/px  ss/px panel"
REFL_END = "End of reflections"
#: Reflections neither written to a stream nor merged from a run directory: a masked pixel in
#: the peak or the peak past a panel edge (``BAD_FLAGS``), or a saturated pixel, as indexamajig
#: leaves them out (without ``--integrate-saturated``)
UNUSABLE_FLAGS = BAD_FLAGS | Flag.SATURATED
#: How sfxflow records the space group in the stream's unit cell block (a cell-file comment)
SPACE_GROUP_COMMENT = "; sfxflow space_group ="
_SPACE_GROUP_LINE = re.compile(r"^;\s*sfxflow\s+space_group\s*=\s*(\S.*?)\s*$")
#: CrystFEL's default beam bandwidth (σ, a fraction) when the geometry gives none
_CRYSTFEL_MIN_BANDWIDTH = 1e-8

_EVENT_INDEX = re.compile(r"^(?:.*//)?(\d+)$")


class StreamError(InputError):
    """A stream file that cannot be read."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

_REFL_COLUMNS = {
    "intensity": "float64", "sigma": "float64", "peak": "float64", "background": "float64",
    "fs_px": "float64", "ss_px": "float64", "panel": "int32",
}


@dataclass(frozen=True)
class Reflections:
    """A crystal's reflection list: Miller indices, intensities and panel positions.

    ``fs_px``/``ss_px`` are panel-relative (sfxflow convention), ``panel`` indexes the detector.
    Unmeasured columns hold NaN.
    """

    hkl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    peak: np.ndarray
    background: np.ndarray
    fs_px: np.ndarray
    ss_px: np.ndarray
    panel: np.ndarray

    def __post_init__(self) -> None:
        hkl = np.asarray(self.hkl, dtype=np.int32).reshape(-1, 3)
        object.__setattr__(self, "hkl", hkl)
        for name, dtype in _REFL_COLUMNS.items():
            a = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            if a.shape != (hkl.shape[0],):
                raise ValueError(f"reflection column {name} has shape {a.shape}, expected "
                                 f"({hkl.shape[0]},)")
            object.__setattr__(self, name, a)

    def __len__(self) -> int:
        return int(self.hkl.shape[0])

    @classmethod
    def empty(cls) -> Reflections:
        return cls(np.zeros((0, 3), np.int32), *[np.zeros(0) for _ in range(7)])


@dataclass(frozen=True)
class StreamCrystal:
    """One crystal of a chunk.

    ``a_matrix`` has columns a*, b*, c* in the sfxflow lab frame, Å⁻¹; ``cell`` is the
    ``Cell parameters`` line (Å, degrees); ``info`` keeps the other ``key = value`` lines.
    """

    cell: gemmi.UnitCell
    a_matrix: np.ndarray = field(repr=False)
    lattice: LatticeInfo
    reflections: Reflections = field(repr=False)
    info: dict[str, str] = field(default_factory=dict, repr=False)

    def to_crystal(self, space_group: gemmi.SpaceGroup | None = None) -> Crystal:
        """As a :class:`~sfxflow.models.Crystal` (cell from ``A``; space group defaults to the
        lowest-symmetry group of the lattice, see :func:`~sfxflow.io.cellfile.default_space_group`)."""
        sg = space_group
        if sg is None:
            try:
                sg = default_space_group(*self.lattice)
            except ValueError:
                sg = gemmi.SpaceGroup("P 1")
        return Crystal(cell_of_basis(self.a_matrix), sg, self.a_matrix)


@dataclass(frozen=True)
class Chunk:
    """One frame of a stream.

    ``peaks`` positions are panel-relative (panel = index into the stream geometry's
    detector); ``background``/``snr`` are NaN and ``n_pixels`` 0 (streams do not record them).
    ``header_values`` holds the ``hdf5/...`` (or ``header/.../...``) lines keyed by HDF5 path,
    ``info`` every other ``key = value`` line.
    """

    filename: str
    event: str
    serial: int | None
    hit: bool | None
    indexed_by: str
    photon_energy_ev: float | None
    peaks: SpotTable = field(repr=False)
    crystals: tuple[StreamCrystal, ...] = field(repr=False)
    header_values: dict[str, float] = field(default_factory=dict, repr=False)
    info: dict[str, str] = field(default_factory=dict, repr=False)
    line: int = 0

    @property
    def wavelength_a(self) -> float | None:
        if self.photon_energy_ev is None:
            return None
        return photon_energy_ev_to_wavelength_a(self.photon_energy_ev)

    @property
    def indexed(self) -> bool:
        return bool(self.crystals)

    @property
    def frame_index(self) -> int | None:
        """Frame number from an event like ``//12`` (``None`` when there is none)."""
        m = _EVENT_INDEX.match(self.event.strip())
        return int(m.group(1)) if m else None


@dataclass
class Stream:
    """A parsed stream: header fields, geometry, target cell and chunks."""

    source: str
    version: str
    generator: str
    command_line: str
    indexing_methods: str
    geometry: CrystfelGeometry | None
    geometry_text: str
    target_cell: CellFile | None
    chunks: list[Chunk]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def resolve(self, chunk: Chunk) -> tuple[Detector, Beam | None]:
        """Detector and beam of one chunk: the geometry resolved with the chunk's header values
        (e.g. ``hdf5/LCLS/detector0-EncoderValue``) and its ``photon_energy_eV``."""
        if self.geometry is None:
            raise StreamError(f"{self.source}: the stream has no geometry block (value None, "
                              f"expected '{BEGIN_GEOM}')")
        values = self.geometry.values_from_headers(chunk.header_values)
        if chunk.photon_energy_ev is not None:
            values["photon_energy"] = chunk.photon_energy_ev
            values.pop("wavelength", None)
        det = self.geometry.detector(values)
        if chunk.photon_energy_ev is None:
            return det, self.geometry.beam(values)
        return det, Beam(wavelength_a=photon_energy_ev_to_wavelength_a(chunk.photon_energy_ev))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Lines:
    """Line cursor with file:line error messages."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.replace("\r\n", "\n").split("\n")
        self.lineno = 0  # lines read so far: the number of the last one
        self.source = source

    def next(self) -> str | None:
        if self.lineno >= len(self.lines):
            return None
        self.lineno += 1
        return self.lines[self.lineno - 1]

    def error(self, problem: str, value: Any, expected: str, line: int | None = None
              ) -> StreamError:
        return StreamError(f"{self.source}:{self.lineno if line is None else line}: {problem} "
                           f"(value {value!r}, expected {expected})")

    def until(self, end: str, what: str) -> list[str]:
        return list(self.lines_until(end, what, strip=False))

    def lines_until(self, end: str, what: str, strip: bool = True) -> Iterator[str]:
        """The lines up to the line ``end`` (consumed, not yielded), read lazily so that the
        caller can hand the cursor to a nested parser between two lines."""
        start = self.lineno
        while True:
            s = self.next()
            if s is None:
                raise self.error(f"{what} is not terminated", f"end of file after line {start}",
                                 f"'{end}'", line=start)
            if s.strip() == end:
                return
            yield s.strip() if strip else s


def _float(cur: _Lines, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise cur.error(f"cannot parse {what}", text, "a number") from None


def _panel_lookup(geometry: CrystfelGeometry | None) -> dict[str, tuple[int, int, int]]:
    if geometry is None:
        return {}
    return {s.name: (i, s.data_origin[0], s.data_origin[1])
            for i, s in enumerate(geometry.panel_specs)}


def _panel_of(panels: dict[str, tuple[int, int, int]], name: str, cur: _Lines
              ) -> tuple[int, int, int]:
    try:
        return panels[name]
    except KeyError:
        if not panels:
            raise cur.error("panel names need a geometry", name,
                            "a geometry block in the stream or read_stream(..., geometry=...)"
                            ) from None
        raise cur.error("unknown panel", name, "a panel of the stream's geometry") from None


def _parse_peaks(cur: _Lines, panels: dict[str, tuple[int, int, int]]) -> SpotTable:
    rows = cur.until(PEAKS_END, "peak list")
    start = cur.lineno - len(rows)
    data: list[tuple[int, float, float, float, float]] = []
    for k, row in enumerate(rows):
        parts = row.split()
        if not parts or parts[0] == "fs/px":
            continue
        if len(parts) != 5:
            raise cur.error("bad peak line", row.strip(), "'fs/px ss/px (1/d)/nm^-1 Intensity "
                            "Panel'", line=start + k)
        try:
            fs, ss, inv_d, inten = (float(x) for x in parts[:4])
        except ValueError:
            raise cur.error("bad peak line", row.strip(), "four numbers and a panel name",
                            line=start + k) from None
        idx, ss0, fs0 = _panel_of(panels, parts[4], cur)
        data.append((idx, fs - fs0, ss - ss0, inv_d, inten))
    if not data:
        return SpotTable.empty()
    arr = np.array([d[1:] for d in data], dtype=float)
    n = len(data)
    with np.errstate(divide="ignore"):
        d_a = np.where(arr[:, 2] > 0, 10.0 / np.where(arr[:, 2] > 0, arr[:, 2], 1.0), np.inf)
    return SpotTable(
        panel=np.array([d[0] for d in data], dtype=np.int32), fs_px=arr[:, 0], ss_px=arr[:, 1],
        intensity=arr[:, 3], background=np.full(n, np.nan), snr=np.full(n, np.nan),
        n_pixels=np.zeros(n, dtype=np.int32), d_a=d_a,
    )


def _parse_reflections(cur: _Lines, panels: dict[str, tuple[int, int, int]]) -> Reflections:
    rows = cur.until(REFL_END, "reflection list")
    start = cur.lineno - len(rows)
    hkl, vals, pan = [], [], []
    for k, row in enumerate(rows):
        parts = row.split()
        if not parts or parts[0] == "h":
            continue
        if len(parts) != 10:
            raise cur.error("bad reflection line", row.strip(),
                            "'h k l I sigma(I) peak background fs/px ss/px panel'",
                            line=start + k)
        try:
            h, kk, ll = (int(x) for x in parts[:3])
            nums = [float(x) for x in parts[3:9]]
        except ValueError:
            raise cur.error("bad reflection line", row.strip(), "3 integers, 6 numbers and a "
                            "panel name", line=start + k) from None
        idx, ss0, fs0 = _panel_of(panels, parts[9], cur)
        hkl.append((h, kk, ll))
        nums[4] -= fs0
        nums[5] -= ss0
        vals.append(nums)
        pan.append(idx)
    if not hkl:
        return Reflections.empty()
    v = np.array(vals)
    return Reflections(np.array(hkl), v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4], v[:, 5],
                       np.array(pan))


def _vector_nm(cur: _Lines, value: str, key: str) -> np.ndarray:
    parts = value.split()
    if len(parts) != 4 or parts[3] != "nm^-1":
        raise cur.error(f"bad {key}", value, "three numbers and 'nm^-1'")
    return np.array([_float(cur, p, key) for p in parts[:3]])


def _parse_crystal(cur: _Lines, panels: dict[str, tuple[int, int, int]]) -> StreamCrystal:
    start = cur.lineno
    info: dict[str, str] = {}
    cell = None
    vecs: dict[str, np.ndarray] = {}
    refl = Reflections.empty()
    for t in cur.lines_until(END_CRYSTAL, "crystal"):
        if t.startswith("Cell parameters"):
            m = re.match(r"Cell parameters\s+(\S+)\s+(\S+)\s+(\S+)\s+nm,\s+(\S+)\s+(\S+)\s+(\S+)"
                         r"\s+deg$", t)
            if m is None:
                raise cur.error("bad Cell parameters line", t,
                                "'Cell parameters a b c nm, al be ga deg'")
            p = [_float(cur, x, "cell parameter") for x in m.groups()]
            cell = gemmi.UnitCell(p[0] * 10, p[1] * 10, p[2] * 10, p[3], p[4], p[5])
        elif t == REFL_START:
            refl = _parse_reflections(cur, panels)
        elif " = " in t:
            key, val = (x.strip() for x in t.split(" = ", 1))
            if key in ("astar", "bstar", "cstar"):
                vecs[key] = _vector_nm(cur, val, key)
            else:
                info[key] = val
        elif t:
            info[t] = ""
    missing = [k for k in ("astar", "bstar", "cstar") if k not in vecs]
    if missing:
        raise cur.error(f"crystal has no {missing[0]}", None, f"'{missing[0]} = x y z nm^-1'",
                        line=start)
    a_matrix = np.column_stack([vecs["astar"], vecs["bstar"], vecs["cstar"]]) / 10.0
    if cell is None:
        cell = cell_of_basis(a_matrix)
    lattice = LatticeInfo(info.pop("lattice_type", "triclinic"), info.pop("centering", "P"),
                          info.pop("unique_axis", "*"))
    return StreamCrystal(cell, a_matrix, lattice, refl, info)


def _parse_chunk(cur: _Lines, panels: dict[str, tuple[int, int, int]]) -> Chunk:
    start = cur.lineno
    filename = event = ""
    serial: int | None = None
    hit: bool | None = None
    indexed_by = ""
    energy: float | None = None
    peaks = SpotTable.empty()
    crystals: list[StreamCrystal] = []
    headers: dict[str, float] = {}
    info: dict[str, str] = {}
    for t in cur.lines_until(END_CHUNK, "chunk"):
        if t == BEGIN_CHUNK:
            raise cur.error("chunk is not terminated", t, f"'{END_CHUNK}' first", line=start)
        if t.startswith("Image filename:"):
            filename = t[len("Image filename:"):].strip()
        elif t.startswith("Event:"):
            event = t[len("Event:"):].strip()
        elif t.startswith("Image serial number:"):
            v = t[len("Image serial number:"):].strip()
            try:
                serial = int(v)
            except ValueError:
                raise cur.error("bad serial number", v, "an integer") from None
        elif t == PEAKS_START:
            peaks = _parse_peaks(cur, panels)
        elif t == BEGIN_CRYSTAL:
            crystals.append(_parse_crystal(cur, panels))
        elif " = " in t or t.endswith(" ="):
            key, val = (x.strip() for x in (t.split(" = ", 1) if " = " in t else (t[:-2], "")))
            if key == "hit":
                hit = val.strip() not in ("0", "")
            elif key == "indexed_by":
                indexed_by = val
            elif key == "photon_energy_eV":
                energy = _float(cur, val, "photon_energy_eV")
            elif key.startswith("hdf5/") or key.startswith("header/"):
                path = key[len("hdf5"):] if key.startswith("hdf5/") else \
                    "/" + key.split("/", 2)[-1]
                try:
                    headers[path] = float(val)
                except ValueError:
                    info[key] = val
            else:
                info[key] = val
        elif t:
            info[t] = ""
    return Chunk(filename=filename, event=event, serial=serial, hit=hit,
                 indexed_by=indexed_by, photon_energy_ev=energy, peaks=peaks,
                 crystals=tuple(crystals), header_values=headers, info=info, line=start)


def parse_stream(text: str, source: str = "<stream>",
                 geometry: CrystfelGeometry | None = None) -> Stream:
    """Parse the text of a CrystFEL stream (see :func:`read_stream`)."""
    cur = _Lines(text, source)
    first = cur.next()
    if first is None or not first.startswith("CrystFEL stream format"):
        raise cur.error("not a CrystFEL stream", (first or "")[:60],
                        "'CrystFEL stream format 2.x'", line=1)
    version = first.rsplit(" ", 1)[-1]
    if not version.startswith("2."):
        raise cur.error("unsupported stream format", version, "2.x", line=1)
    generator = command_line = methods = geom_text = ""
    geom = geometry
    target = None
    chunks: list[Chunk] = []
    panels = _panel_lookup(geom)
    while (s := cur.next()) is not None:
        t = s.strip()
        if t == BEGIN_CHUNK:
            chunks.append(_parse_chunk(cur, panels))
        elif t == BEGIN_GEOM:
            start = cur.lineno + 1
            body = "\n".join(cur.until(END_GEOM, "geometry block")) + "\n"
            if not geom_text:
                geom_text = body
                if geometry is None:
                    try:
                        # line numbers in errors refer to the stream file
                        geom = parse_geom("\n" * (start - 1) + body, source)
                    except GeometryError as exc:
                        raise StreamError(str(exc)) from exc
                    geom = replace(geom, text=body)
                    panels = _panel_lookup(geom)
        elif t == BEGIN_CELL:
            start = cur.lineno
            body = "\n".join(cur.until(END_CELL, "unit cell block")) + "\n"
            if target is None:
                try:
                    target = parse_cell_file(body, f"{source}:{start}(unit cell block)")
                except InputError as exc:
                    raise StreamError(str(exc)) from exc
                target = _with_space_group(target, body, source, start)
        elif t.startswith("Generated by"):
            generator = generator or t[len("Generated by"):].strip()
        elif t.startswith("Indexing methods selected:"):
            methods = methods or t.split(":", 1)[1].strip()
        elif t.startswith("CrystFEL stream format") or not t:
            continue
        elif not chunks and not command_line:
            command_line = t
    return Stream(source=source, version=version, generator=generator,
                  command_line=command_line, indexing_methods=methods, geometry=geom,
                  geometry_text=geom_text, target_cell=target, chunks=chunks)


def _with_space_group(target: CellFile, body: str, source: str, start: int) -> CellFile:
    """The space group an sfxflow stream records in its unit cell block (see
    :func:`format_stream_header`); CrystFEL's own streams record none."""
    for n, line in enumerate(body.splitlines(), start=start + 1):
        m = _SPACE_GROUP_LINE.match(line.strip())
        if m is None:
            continue
        try:
            return target._replace(space_group=as_space_group(m.group(1)))
        except ValueError:
            raise StreamError(f"{source}:{n}: unknown space group in the unit cell block "
                              f"(value {m.group(1)!r}, expected a Hermann-Mauguin symbol such "
                              "as P 61 2 2)") from None
    return target


def read_stream(path_or_url: str | Path, storage_options: Mapping[str, Any] | None = None,
                geometry: CrystfelGeometry | None = None) -> Stream:
    """Read a CrystFEL stream from a path or URL.

    Parameters
    ----------
    path_or_url : local path or fsspec URL.
    storage_options : for remote URLs.
    geometry : overrides the stream's own geometry block (needed only when it has none).

    Examples
    --------
    >>> import tempfile, os
    >>> from sfxflow.io.geometry import _EXAMPLE
    >>> text = format_stream_header(_EXAMPLE) + BEGIN_CHUNK + "\\nImage filename: a.h5\\n" \\
    ...     + "Event: //3\\nhit = 0\\n" + END_CHUNK + "\\n"
    >>> with tempfile.TemporaryDirectory() as d:
    ...     f = os.path.join(d, "x.stream")
    ...     _ = Path(f).write_text(text)
    ...     s = read_stream(f)
    >>> len(s), s.chunks[0].frame_index, s.geometry.panel_names
    (1, 3, ('p0',))
    """
    src = str(path_or_url)
    return parse_stream(read_text(src, storage_options, "stream", StreamError), src, geometry)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def format_stream_header(
    geometry_text: str,
    *,
    target_cell: CellFile | tuple[gemmi.UnitCell, LatticeInfo] | None = None,
    command_line: str = "sfxflow",
    indexing_methods: str = "file",
) -> str:
    """Stream header: format line, generator, command line, geometry and target cell blocks.

    A :class:`~sfxflow.io.cellfile.CellFile` target with a space group adds the line
    ``; sfxflow space_group = P 61 2 2`` to the cell block: a comment to CrystFEL (whose stream
    reader skips the block and whose cell-file reader skips ``;`` lines), read back by
    :func:`parse_stream` into ``Stream.target_cell.space_group``.
    """
    out = [f"CrystFEL stream format {STREAM_FORMAT}", f"Generated by sfxflow {__version__}",
           command_line.replace("\n", " "), f"Indexing methods selected: {indexing_methods}",
           BEGIN_GEOM, geometry_text.rstrip("\n"), END_GEOM]
    if target_cell is not None:
        sg = None
        if isinstance(target_cell, CellFile):
            cell, lattice, sg = target_cell.cell, target_cell.lattice, target_cell.space_group
            if sg is not None and lattice is None:
                lattice = lattice_from_space_group(sg)
        else:
            cell, lattice = target_cell
        out += [BEGIN_CELL, format_cell_file(cell, lattice).rstrip("\n")]
        if sg is not None:
            # CrystFEL's cell files and streams have no space group; a comment keeps the block
            # a cell file CrystFEL reads (it skips ';' lines) while our reader gets the group
            out.append(f"{SPACE_GROUP_COMMENT} {sg.xhm()}")
        out.append(END_CELL)
    return "\n".join(out) + "\n"


def reflections_from_spots(result: ImageResult) -> Reflections:
    """Indexed spots of a result as a reflection list: ``I`` = spot intensity, ``sigma(I)`` =
    ``I / snr`` (NaN when the SNR is unknown), ``background`` = spot background, ``peak`` NaN
    (the spot finder does not keep the maximum pixel)."""
    spots, hkl = result.spots, result.miller_indices
    if spots is None or hkl is None or len(spots) == 0:
        return Reflections.empty()
    hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
    sel = np.any(hkl != 0, axis=1)
    s = spots.select(sel)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where((s.snr > 0) & np.isfinite(s.snr), s.intensity / s.snr, np.nan)
    return Reflections(hkl[sel], s.intensity, sigma, np.full(len(s), np.nan), s.background,
                       s.fs_px, s.ss_px, s.panel)


def reflections_from_integrated(table: ReflectionTable) -> Reflections:
    """An integrated :class:`~sfxflow.models.ReflectionTable` as a stream reflection list:
    only the reflections without a bad flag (masked pixel in the peak, peak past the panel
    edge; see :data:`sfxflow.algorithms.integrate.BAD_FLAGS`) or a saturated pixel, as
    indexamajig leaves out the reflections it could not integrate and (without
    ``--integrate-saturated``) the saturated ones; merging a run directory leaves out the same
    (:data:`UNUSABLE_FLAGS`)."""
    good = np.flatnonzero((table["flags"] & int(UNUSABLE_FLAGS)) == 0)
    t = table.select(good)
    return Reflections(t.hkl, t["intensity"], t["sigma"], t["peak"], t["background"],
                       t["fs_px"], t["ss_px"], t["panel"])


def _integrated_info(rec: CrystalResult, reflections: Reflections) -> dict[str, str]:
    """The lines of indexamajig's crystal block that describe prediction and integration."""
    info: dict[str, str] = {}
    if math.isfinite(rec.profile_radius_inv_a):
        info["profile_radius"] = f"{rec.profile_radius_inv_a * 10.0:.5f} nm^-1"
    dx, dy = rec.detector_shift_mm
    info["predict_refine/det_shift"] = f"x = {dx:.3f} y = {dy:.3f} mm"
    if math.isfinite(rec.resolution_limit_a) and rec.resolution_limit_a > 0:
        info["diffraction_resolution_limit"] = (f"{10.0 / rec.resolution_limit_a:.2f} nm^-1 or "
                                                f"{rec.resolution_limit_a:.2f} A")
    n_sat = n_bad = 0
    if rec.reflections is not None and len(rec.reflections):
        flags = rec.reflections["flags"]
        n_sat = int(np.count_nonzero(flags & int(Flag.SATURATED)))
    if len(reflections):
        with np.errstate(invalid="ignore"):
            n_bad = int(np.count_nonzero(reflections.intensity < -5.0 * reflections.sigma))
    info["num_saturated_reflections"] = str(n_sat)
    info["num_implausible_reflections"] = str(n_bad)
    if math.isfinite(rec.rmsd_px):
        info["sfxflow/rmsd_px"] = f"{rec.rmsd_px:.4f}"
    info["sfxflow/n_indexed_peaks"] = str(rec.n_indexed)
    info["sfxflow/status"] = rec.status
    if rec.reason:
        info["sfxflow/reason"] = " ".join(rec.reason.split())
    return info


_NUM_KEYS = ("num_saturated_reflections", "num_implausible_reflections")


def _crystal_block(crystal: Crystal, reflections: Reflections, detector: Detector,
                   extra: Mapping[str, str] | None) -> list[str]:
    a = np.asarray(crystal.a_matrix, dtype=float)
    cell = cell_of_basis(a)
    lat = lattice_from_space_group(crystal.space_group)
    p = cell.parameters
    out = [BEGIN_CRYSTAL,
           f"Cell parameters {p[0] / 10:.5f} {p[1] / 10:.5f} {p[2] / 10:.5f} nm, "
           f"{p[3]:.5f} {p[4]:.5f} {p[5]:.5f} deg"]
    for name, col in (("astar", 0), ("bstar", 1), ("cstar", 2)):
        vec = a[:, col] * 10.0
        out.append(f"{name} = {vec[0]:+10.7f} {vec[1]:+10.7f} {vec[2]:+10.7f} nm^-1")
    out += [f"lattice_type = {lat.lattice_type}", f"centering = {lat.centering}",
            f"unique_axis = {lat.unique_axis}"]
    extra = dict(extra or {})
    tail = {k: extra.pop(k) for k in _NUM_KEYS if k in extra}
    for key, val in extra.items():
        # indexamajig writes this one without '=' after the key
        out.append(f"{key} {val}" if key == "predict_refine/det_shift" else f"{key} = {val}")
    out.append(f"num_reflections = {len(reflections)}")
    for key, val in tail.items():  # indexamajig's order: after num_reflections
        out.append(f"{key} = {val}")
    out += [REFL_START, REFL_HEADER]
    if len(reflections):
        # one bound format over plain Python values: integrated crystals have hundreds of lines
        panels = detector.panels
        origin = np.array([p.data_origin for p in panels], dtype=float)
        names = [p.name for p in panels]
        pan = reflections.panel.astype(np.int64)
        rows = zip(reflections.hkl.tolist(), reflections.intensity.tolist(),
                   reflections.sigma.tolist(), reflections.peak.tolist(),
                   reflections.background.tolist(),
                   (reflections.fs_px + origin[pan, 1]).tolist(),
                   (reflections.ss_px + origin[pan, 0]).tolist(), pan.tolist(), strict=True)
        line = "{:4d} {:4d} {:4d} {:10.2f} {:10.2f} {:10.2f} {:10.2f} {:6.1f} {:6.1f} {}".format
        out.extend(line(h, k, l, i, sg, pk, bg, fs, ss, names[p])
                   for (h, k, l), i, sg, pk, bg, fs, ss, p in rows)
    out += [REFL_END, END_CRYSTAL]
    return out


def _beam_lines(beam: Beam) -> list[str]:
    # partialator takes each shot's bandwidth from its chunk, not from the geometry, and
    # aborts on a zero one (CrystFEL's own default is 1e-8); its bandwidth is the σ
    sigma = max(beam.bandwidth_fwhm / FWHM_PER_SIGMA, _CRYSTFEL_MIN_BANDWIDTH)
    return [f"photon_energy_eV = {beam.photon_energy_ev:.6f}",
            f"beam_divergence = {beam.divergence_rad:.2e} rad",
            f"beam_bandwidth = {sigma:.2e} (fraction)"]


def _peak_lines(spots: SpotTable, detector: Detector, beam: Beam | None) -> list[str]:
    """The rows of a chunk's peak list: positions in the data's pixels (panel origin added),
    1/d in nm^-1 (from the spots' ``d_a``, else from their position and ``beam``)."""
    if not len(spots):
        return []
    inv_d_nm = np.zeros(len(spots))
    with np.errstate(divide="ignore"):
        known = np.isfinite(spots.d_a) & (spots.d_a > 0)
        inv_d_nm[known] = 10.0 / spots.d_a[known]
    if beam is not None and not known.all():
        q = pixels_to_q(detector, beam, spots.panel[~known], spots.fs_px[~known],
                        spots.ss_px[~known])
        inv_d_nm[~known] = 10.0 * np.linalg.norm(q, axis=1)
    lines = []
    for i in range(len(spots)):
        pn = detector.panels[int(spots.panel[i])]
        lines.append(f"{spots.fs_px[i] + pn.data_origin[1]:7.2f} "
                     f"{spots.ss_px[i] + pn.data_origin[0]:7.2f} {inv_d_nm[i]:10.2f}  "
                     f"{spots.intensity[i]:10.2f}   {pn.name}")
    return lines


def format_chunk(
    result: ImageResult,
    detector: Detector,
    *,
    beam: Beam | None = None,
    serial: int | None = None,
    filename: str | None = None,
    indexed_by: str = "file",
    reflections: Reflections | None = None,
    header_values: Mapping[str, float] | None = None,
    crystal_info: Mapping[str, str] | None = None,
) -> str:
    """One stream chunk for a processed frame.

    Parameters
    ----------
    result : the frame's result (spots, crystal, Miller indices).
    detector : the detector the spots refer to (panel names, data origins).
    beam : gives the ``photon_energy_eV`` line and, when spots lack ``d_a``, their 1/d.
    serial : ``Image serial number`` (omitted when ``None``).
    filename : ``Image filename`` (default ``result.source_url``); the event is
        ``result.event_id`` or ``//<frame_index>`` as CrystFEL writes for multi-frame files.
    indexed_by : method name written for indexed frames (``none`` otherwise). CrystFEL's
        tools accept only CrystFEL's own method names (partialator rejects a chunk naming any
        other: "Bad list of indexing methods"); ``file`` is CrystFEL's name for solutions
        computed outside indexamajig, which ours are.
    reflections : the crystal's reflection list; by default, for each crystal of
        ``result.crystals``, its integrated reflections (:func:`reflections_from_integrated`,
        one crystal block each), or for a result without them its indexed spots
        (:func:`reflections_from_spots`).
    header_values : extra per-frame values written as ``hdf5/<path> = value``.
    crystal_info : extra ``key = value`` lines for the crystal block.

    Examples
    --------
    >>> from sfxflow.models import FrameStatus
    >>> from sfxflow.io.geometry import parse_geom, _EXAMPLE
    >>> det = parse_geom(_EXAMPLE).detector({"clen": 100.0})
    >>> r = ImageResult("run.h5", 7, FrameStatus.MISS)
    >>> print(format_chunk(r, det, serial=1), end="")
    ----- Begin chunk -----
    Image filename: run.h5
    Event: //7
    Image serial number: 1
    hit = 0
    indexed_by = none
    num_peaks = 0
    Peaks from peak search
      fs/px   ss/px (1/d)/nm^-1   Intensity  Panel
    End of peak list
    ----- End chunk -----
    """
    hit = result.status in (FrameStatus.HIT, FrameStatus.INDEXED)
    crystal = result.crystal if result.status == FrameStatus.INDEXED else None
    out = [BEGIN_CHUNK, f"Image filename: {filename or result.source_url}",
           f"Event: {result.event_id or f'//{result.frame_index}'}"]
    if serial is not None:
        out.append(f"Image serial number: {serial}")
    out += [f"hit = {int(hit)}", f"indexed_by = {indexed_by if crystal is not None else 'none'}"]
    if beam is not None:
        out += _beam_lines(beam)
    for path, v in (header_values or {}).items():
        out.append(f"hdf5{'' if path.startswith('/') else '/'}{path} = {float(v):.6f}")
    if result.status == FrameStatus.FAILED or result.reason:
        out.append(f"sfxflow/status = {result.status.value}")
        if result.stage:
            out.append(f"sfxflow/stage = {result.stage}")
        if result.reason:
            out.append(f"sfxflow/reason = {' '.join(result.reason.split())}")
    spots = result.spots if result.spots is not None else SpotTable.empty()
    out += [f"num_peaks = {len(spots)}", PEAKS_START, PEAKS_HEADER,
            *_peak_lines(spots, detector, beam)]
    out.append(PEAKS_END)
    if crystal is not None:
        out += _crystal_lines(result, crystal, detector, reflections, crystal_info)
    out.append(END_CHUNK)
    return "\n".join(out) + "\n"


def _crystal_lines(result: ImageResult, crystal: Crystal, detector: Detector,
                   reflections: Reflections | None, crystal_info: Mapping[str, str] | None
                   ) -> list[str]:
    """The crystal blocks of an indexed frame: one per integrated crystal, or one of the
    given (else the indexed spots') reflections."""
    out: list[str] = []
    if result.crystals and reflections is None:
        for rec in result.crystals:
            refl = (reflections_from_integrated(rec.reflections)
                    if rec.reflections is not None else Reflections.empty())
            info = {**_integrated_info(rec, refl), **dict(crystal_info or {})}
            out += _crystal_block(rec.crystal, refl, detector, info)
        return out
    refl = reflections if reflections is not None else reflections_from_spots(result)
    info = dict(crystal_info or {})
    if math.isfinite(result.rmsd_px):
        info.setdefault("sfxflow/rmsd_px", f"{result.rmsd_px:.4f}")
    info.setdefault("sfxflow/n_indexed_peaks", str(result.n_indexed))
    return _crystal_block(crystal, refl, detector, info)


class StreamWriter:
    """Write a stream: the header on open, then one chunk per :meth:`write` call.

    Serial numbers count from 1 unless given. Use as a context manager.

    Parameters
    ----------
    target : path, or an open text file.
    geometry_text : the geometry block (e.g. ``CrystfelGeometry.text`` or ``format_geom(...)``).
    detector : the detector chunks refer to.
    other keyword arguments : as :func:`format_stream_header`.
    """

    def __init__(self, target: str | Path | IO[str], geometry_text: str, detector: Detector,
                 **header: Any) -> None:
        if isinstance(target, (str, Path)):
            try:
                self._fh: IO[str] = open(target, "w", encoding="utf-8")
            except OSError as exc:
                raise StreamError(f"{target}: cannot write stream ({exc})") from exc
            self._own = True
        else:
            self._fh, self._own = target, False
        self.detector = detector
        self.serial = 0
        self._fh.write(format_stream_header(geometry_text, **header))

    def write(self, result: ImageResult, **kwargs: Any) -> None:
        """Append the chunk of ``result`` (keyword arguments as :func:`format_chunk`)."""
        if kwargs.get("serial") is None:
            self.serial += 1
            kwargs["serial"] = self.serial
        else:
            self.serial = int(kwargs["serial"])
        self._fh.write(format_chunk(result, self.detector, **kwargs))

    def close(self) -> None:
        if self._own:
            self._fh.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
