"""Domain models shared by every layer: beam, detector panels, crystals, spots, per-image results.

Lab frame (the one frame every algorithm sees)
-----------------------------------------------
sfxflow uses the CrystFEL laboratory frame, right-handed, lengths in millimetres:

* ``+z`` points along the X-ray beam, from the source through the sample to the detector;
* ``+y`` points vertically up;
* ``+x`` completes the right-handed set (``x = y × z``), horizontal.

The interaction point (sample) is the origin. A pixel position ``(fs, ss)`` is continuous, in
pixels, with the *corner* of the first pixel at ``(0, 0)`` and its centre at ``(0.5, 0.5)``
(CrystFEL's convention). The lab position of ``(fs, ss)`` on a panel is::

    origin_mm + fs * pixel_size_mm * fast_axis + ss * pixel_size_mm * slow_axis

Mapping of other conventions into this frame (done only in ``sfxflow.io``):

* **CrystFEL** ``.geom``: identical axes. ``corner_x``/``corner_y`` are in pixels and
  ``clen + coffset`` in metres; the reader multiplies by the pixel size / 1000 into millimetres.
* **imgCIF/CBF and DIALS/dxtbx**: their ``+Z`` points from the sample *towards the source* (the
  beam travels along ``-Z``) and ``+Y`` is up, so ``(x, y, z)_sfxflow = (-X, Y, -Z)_cbf``, a 180°
  rotation about ``y``. DIALS pixel coordinates put the first pixel's corner at ``(0, 0)`` too.

Reciprocal space: for a crystal, ``A = U @ B`` where ``B`` holds the reciprocal basis vectors
``a*, b*, c*`` as columns in a crystal-fixed Cartesian frame (the transpose of gemmi's
fractionalisation matrix) and ``U`` is a proper rotation. A Miller index ``h`` (column vector)
has scattering vector ``q = A @ h`` in Å⁻¹, ``|q| = 1/d``. A ray scattered to the lab point ``r``
has ``s1 = r / (|r| λ)`` and ``q = s1 - s0`` with ``s0 = beam.direction / λ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import gemmi
import numpy as np

Vector3 = tuple[float, float, float]

HC_EV_A = 12398.419843320026  # h*c in eV·Å: E[eV] = HC_EV_A / λ[Å]

#: FWHM of a Gaussian in units of its standard deviation (CrystFEL's ``bandwidth`` is a sigma).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: standard deviation of a Gaussian per unit of its FWHM (beam bandwidths are FWHM here).
FWHM_TO_SIGMA = 1.0 / FWHM_PER_SIGMA


def photon_energy_ev_to_wavelength_a(energy_ev: float) -> float:
    """Convert a photon energy in eV to a wavelength in Å.

    >>> round(photon_energy_ev_to_wavelength_a(9742.6), 4)
    1.2726
    """
    if energy_ev <= 0:
        raise ValueError(f"photon energy must be positive, got {energy_ev} eV")
    return HC_EV_A / energy_ev


def wavelength_a_to_photon_energy_ev(wavelength_a: float) -> float:
    """Convert a wavelength in Å to a photon energy in eV."""
    if wavelength_a <= 0:
        raise ValueError(f"wavelength must be positive, got {wavelength_a} Å")
    return HC_EV_A / wavelength_a


def _unit(v: Sequence[float] | np.ndarray, what: str) -> Vector3:
    a = np.asarray(v, dtype=float)
    n = float(np.linalg.norm(a))
    if a.shape != (3,) or not math.isfinite(n) or n == 0.0:
        raise ValueError(f"{what} must be a finite non-zero 3-vector, got {list(v)}")
    a = a / n
    return (float(a[0]), float(a[1]), float(a[2]))


@dataclass(frozen=True)
class Beam:
    """The incident X-ray beam.

    Parameters
    ----------
    wavelength_a : mean wavelength in Å.
    bandwidth_fwhm : relative bandwidth Δλ/λ (full width at half maximum); XFEL SASE ~ 1e-3.
    direction : unit vector of propagation in the lab frame (``+z`` by convention).
    divergence_rad : full-angle beam divergence in radians.

    >>> Beam(wavelength_a=1.3).s0_inv_a
    (0.0, 0.0, 0.7692307692307692)
    """

    wavelength_a: float
    bandwidth_fwhm: float = 0.0
    direction: Vector3 = (0.0, 0.0, 1.0)
    divergence_rad: float = 0.0

    def __post_init__(self) -> None:
        if not (self.wavelength_a > 0 and math.isfinite(self.wavelength_a)):
            raise ValueError(f"wavelength_a must be positive, got {self.wavelength_a}")
        if self.bandwidth_fwhm < 0:
            raise ValueError(f"bandwidth_fwhm must be >= 0, got {self.bandwidth_fwhm}")
        object.__setattr__(self, "direction", _unit(self.direction, "beam direction"))

    @property
    def photon_energy_ev(self) -> float:
        return wavelength_a_to_photon_energy_ev(self.wavelength_a)

    @property
    def s0_inv_a(self) -> Vector3:
        """Incident wave vector ``direction / λ`` in Å⁻¹."""
        k = 1.0 / self.wavelength_a
        d = self.direction
        return (d[0] * k, d[1] * k, d[2] * k)


@dataclass(frozen=True)
class Panel:
    """One flat rectangular detector panel (an ASIC, a module, or a whole monolithic detector).

    Parameters
    ----------
    name : unique name (CrystFEL panel name, or CBF array/section id).
    origin_mm : lab position of the corner of pixel ``(fs, ss) = (0, 0)``.
    fast_axis, slow_axis : unit vectors in the lab frame along increasing fs and ss.
    pixel_size_mm : square pixel edge.
    shape : ``(n_ss, n_fs)`` pixels.
    data_index : fixed leading indices into the per-frame data array (empty for 2-D data;
        ``(module,)`` for a ``(n_modules, ss, fs)`` stack, as CrystFEL ``dim1 = 3``).
    data_origin : ``(ss0, fs0)`` of this panel's first pixel within the trailing 2-D data plane.
    mask : boolean ``shape`` array, ``True`` where a pixel is good; ``None`` means all good.
    adu_per_photon : gain; ``None`` when unknown.
    max_adu : saturation level; pixels at or above it are unreliable.
    """

    name: str
    origin_mm: Vector3
    fast_axis: Vector3
    slow_axis: Vector3
    pixel_size_mm: float
    shape: tuple[int, int]
    data_index: tuple[int, ...] = ()
    data_origin: tuple[int, int] = (0, 0)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    adu_per_photon: float | None = None
    max_adu: float = math.inf

    def __post_init__(self) -> None:
        object.__setattr__(self, "fast_axis", _unit(self.fast_axis, f"panel {self.name} fast axis"))
        object.__setattr__(self, "slow_axis", _unit(self.slow_axis, f"panel {self.name} slow axis"))
        object.__setattr__(self, "origin_mm", tuple(float(x) for x in self.origin_mm))
        if not self.pixel_size_mm > 0:
            raise ValueError(f"panel {self.name}: pixel_size_mm must be > 0, got {self.pixel_size_mm}")
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"panel {self.name}: shape must be (n_ss, n_fs) > 0, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.mask is not None:
            m = np.asarray(self.mask, dtype=bool)
            if m.shape != self.shape:
                raise ValueError(
                    f"panel {self.name}: mask shape {m.shape} differs from panel shape {self.shape}"
                )
            m.setflags(write=False)
            object.__setattr__(self, "mask", m)

    @property
    def normal(self) -> Vector3:
        n = np.cross(self.fast_axis, self.slow_axis)
        return _unit(n, f"panel {self.name} normal")

    def good_mask(self) -> np.ndarray:
        """Boolean mask of good pixels (all ``True`` when the panel has no mask)."""
        if self.mask is None:
            return np.ones(self.shape, dtype=bool)
        return self.mask

    def data_slices(self) -> tuple[Any, ...]:
        """Index expression selecting this panel from one frame's data array."""
        ss0, fs0 = self.data_origin
        n_ss, n_fs = self.shape
        return (*self.data_index, slice(ss0, ss0 + n_ss), slice(fs0, fs0 + n_fs))

    def lab_mm(self, fs: np.ndarray | float, ss: np.ndarray | float) -> np.ndarray:
        """Lab positions (mm), shape ``(..., 3)``, of continuous pixel coordinates."""
        fs_a = np.asarray(fs, dtype=float)[..., None]
        ss_a = np.asarray(ss, dtype=float)[..., None]
        p = self.pixel_size_mm
        return (
            np.asarray(self.origin_mm)
            + fs_a * p * np.asarray(self.fast_axis)
            + ss_a * p * np.asarray(self.slow_axis)
        )

    def with_mask(self, mask: np.ndarray | None) -> Panel:
        return replace(self, mask=mask)


@dataclass(frozen=True)
class Detector:
    """A detector: an ordered tuple of panels.

    ``rigid_groups`` maps a group name to the names of panels that move together (CrystFEL's
    ``rigid_group_*``), kept for refinement and for round-tripping geometry files.
    """

    panels: tuple[Panel, ...]
    rigid_groups: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "panels", tuple(self.panels))
        if not self.panels:
            raise ValueError("a detector needs at least one panel")
        names = [p.name for p in self.panels]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate panel names: {dup}")

    def __len__(self) -> int:
        return len(self.panels)

    def __iter__(self):
        return iter(self.panels)

    def __getitem__(self, i: int) -> Panel:
        return self.panels[i]

    def panel_index(self, name: str) -> int:
        for i, p in enumerate(self.panels):
            if p.name == name:
                return i
        raise KeyError(f"no panel named {name!r}; panels are {[p.name for p in self.panels][:8]}...")

    @property
    def n_pixels(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.panels)

    def with_gain(self, adu_per_photon: float) -> Detector:
        """This detector with every panel's gain set to ``adu_per_photon``."""
        return Detector(tuple(replace(p, adu_per_photon=adu_per_photon) for p in self.panels),
                        rigid_groups=dict(self.rigid_groups))

    def data_shape(self) -> tuple[int, ...]:
        """Smallest per-frame data array shape that holds every panel."""
        lead = max((len(p.data_index) for p in self.panels), default=0)
        dims = [0] * (lead + 2)
        for p in self.panels:
            for k, idx in enumerate(p.data_index):
                dims[k] = max(dims[k], idx + 1)
            dims[lead] = max(dims[lead], p.data_origin[0] + p.shape[0])
            dims[lead + 1] = max(dims[lead + 1], p.data_origin[1] + p.shape[1])
        return tuple(dims)

    def mean_distance_mm(self) -> float:
        """Mean of the panels' centre distances along z (the nominal detector distance)."""
        zs = [p.lab_mm(p.shape[1] / 2, p.shape[0] / 2)[2] for p in self.panels]
        return float(np.mean(zs))


@dataclass(frozen=True)
class Frame:
    """One still image: the raw per-frame array as stored, plus the geometry that describes it."""

    data: np.ndarray
    detector: Detector
    beam: Beam
    source_url: str = ""
    index: int = 0
    event_id: str = ""

    def panel_data(self, i: int) -> np.ndarray:
        """View (no copy) of panel ``i``'s pixels, shape ``panel.shape``."""
        return self.data[self.detector.panels[i].data_slices()]

    @property
    def frame_id(self) -> str:
        return f"{self.source_url}//{self.index}"


def as_unit_cell(cell: gemmi.UnitCell | Sequence[float] | str) -> gemmi.UnitCell:
    """Accept a gemmi cell, six numbers, or ``"a b c al be ga"``.

    >>> as_unit_cell("93 93 130.5 90 90 120").c
    130.5
    """
    if isinstance(cell, gemmi.UnitCell):
        return cell
    parts: list[str] | list[float]
    if isinstance(cell, str):
        parts = cell.replace(",", " ").split()
    else:
        parts = [float(x) for x in cell]
    if len(parts) != 6:
        raise ValueError(f"a unit cell needs 6 numbers (a b c alpha beta gamma), got {cell!r}")
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"a unit cell needs 6 numbers (a b c alpha beta gamma), got {cell!r}") from None
    cos = [math.cos(math.radians(x)) for x in vals[3:]]
    # gemmi silently replaces an impossible cell by 1 1 1 90 90 90, so check before it sees one;
    # metric = (V / abc)^2, and no real crystal has a volume under 0.1% of abc
    metric = 1 - sum(c * c for c in cos) + 2 * cos[0] * cos[1] * cos[2]
    if not (all(math.isfinite(v) for v in vals) and min(vals[:3]) > 0
            and all(0 < x < 180 for x in vals[3:]) and metric > 1e-6):
        raise ValueError(f"unit cell {' '.join(f'{v:g}' for v in vals)}: expected positive lengths "
                         "and angles between 0 and 180 degrees that form a real cell")
    return gemmi.UnitCell(*vals)


def as_space_group(sg: gemmi.SpaceGroup | str | int) -> gemmi.SpaceGroup:
    """Accept a gemmi space group, a Hermann–Mauguin symbol, or a number.

    >>> as_space_group("P6122").hm
    'P 61 2 2'
    """
    if isinstance(sg, gemmi.SpaceGroup):
        return sg
    try:
        number = str(sg).strip().isdigit()
        found = None if number else gemmi.find_spacegroup_by_name(str(sg))
        if found is None:
            if not 1 <= int(sg) <= 230:  # gemmi takes 0 (by name too) for P 1
                raise ValueError(f"space group number {sg!r} is not from 1 to 230")
            found = gemmi.find_spacegroup_by_number(int(sg))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"unknown space group {sg!r}") from exc
    if found is None:
        raise ValueError(f"unknown space group {sg!r}")
    return gemmi.SpaceGroup(found.xhm())  # xhm keeps the setting (R 3:R)


#: Table columns of an orientation matrix ``A`` (reciprocal space, Å⁻¹), row-major: ``a11`` is
#: ``A[0, 0]``, ``a12`` is ``A[0, 1]``... (frames.parquet, crystals.parquet, simulation truth).
A_MATRIX_COLUMNS = tuple(f"a{i}{j}" for i in (1, 2, 3) for j in (1, 2, 3))


def a_matrix_columns(a_matrix: np.ndarray | None) -> dict[str, float]:
    """``{"a11": A[0, 0], ..., "a33": A[2, 2]}``; NaN for every column when ``a_matrix`` is None.

    >>> a_matrix_columns(np.eye(3))["a22"], a_matrix_columns(None)["a13"]
    (1.0, nan)
    """
    values = np.full(9, np.nan) if a_matrix is None else np.asarray(a_matrix, float).ravel()
    return dict(zip(A_MATRIX_COLUMNS, (float(v) for v in values), strict=True))


def reciprocal_basis(cell: gemmi.UnitCell) -> np.ndarray:
    """``B``: columns are a*, b*, c* (Å⁻¹) in gemmi's crystal Cartesian frame."""
    return np.array(cell.frac.mat.tolist(), dtype=float).T


def cell_of_basis(a_matrix: np.ndarray) -> gemmi.UnitCell:
    """The unit cell (Å, degrees) of any reciprocal basis ``A`` (columns a*, b*, c*, Å⁻¹): the
    inverse of :func:`reciprocal_basis` up to orientation.

    >>> cell_of_basis(np.diag([0.1, 0.05, 0.02])).parameters
    (10.0, 20.0, 50.0, 90.0, 90.0, 90.0)
    """
    real = np.linalg.inv(np.asarray(a_matrix, dtype=float))  # rows a, b, c
    lengths = np.linalg.norm(real, axis=1)

    def angle(i: int, j: int) -> float:
        c = float(real[i] @ real[j]) / float(lengths[i] * lengths[j])
        return math.degrees(math.acos(min(1.0, max(-1.0, c))))

    a, b, c = (float(x) for x in lengths)
    return gemmi.UnitCell(a, b, c, angle(1, 2), angle(0, 2), angle(0, 1))


@dataclass(frozen=True)
class Crystal:
    """A crystal lattice: unit cell, space group and the orientation matrix ``A = U @ B``.

    ``a_matrix`` maps Miller indices to lab-frame scattering vectors (Å⁻¹).
    """

    cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup
    a_matrix: np.ndarray = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        a = np.array(self.a_matrix, dtype=float)
        if a.shape != (3, 3) or not np.all(np.isfinite(a)):
            raise ValueError(f"a_matrix must be a finite 3x3 matrix, got shape {a.shape}")
        a.setflags(write=False)
        object.__setattr__(self, "a_matrix", a)

    @classmethod
    def from_u(cls, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup, u: np.ndarray) -> Crystal:
        return cls(cell, space_group, np.asarray(u, dtype=float) @ reciprocal_basis(cell))

    @property
    def u_matrix(self) -> np.ndarray:
        """Rotation part of ``A`` (polar decomposition; exact when ``A`` was built from ``U B``)."""
        m = self.a_matrix @ np.linalg.inv(reciprocal_basis(self.cell))
        w, _, vt = np.linalg.svd(m)
        return w @ vt

    def real_space_vectors(self) -> np.ndarray:
        """Rows are the lab-frame real-space cell vectors a, b, c in Å."""
        return np.linalg.inv(self.a_matrix)


SPOT_COLUMNS: dict[str, str] = {
    "panel": "int32",
    "fs_px": "float64",
    "ss_px": "float64",
    "intensity": "float64",
    "background": "float64",
    "snr": "float64",
    "n_pixels": "int32",
    "d_a": "float64",
}


@dataclass(frozen=True)
class SpotTable:
    """Columnar table of spots found on one frame (pixel centres at +0.5, see module doc)."""

    panel: np.ndarray
    fs_px: np.ndarray
    ss_px: np.ndarray
    intensity: np.ndarray
    background: np.ndarray
    snr: np.ndarray
    n_pixels: np.ndarray
    d_a: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for name, dtype in SPOT_COLUMNS.items():
            a = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            if a.ndim != 1:
                raise ValueError(f"spot column {name} must be 1-D, got shape {a.shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"spot column {name} has {a.shape[0]} rows, expected {n}")
            object.__setattr__(self, name, a)

    def __len__(self) -> int:
        return int(self.panel.shape[0])

    @classmethod
    def empty(cls) -> SpotTable:
        return cls(**{k: np.zeros(0, dtype=v) for k, v in SPOT_COLUMNS.items()})

    def select(self, rows: np.ndarray) -> SpotTable:
        return SpotTable(**{k: getattr(self, k)[rows] for k in SPOT_COLUMNS})

    def to_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in SPOT_COLUMNS}


class FrameStatus(StrEnum):
    """Outcome of processing one frame. ``indexed`` implies a hit."""

    MISS = "miss"
    HIT = "hit"
    INDEXED = "indexed"
    FAILED = "failed"


REFLECTION_COLUMNS: dict[str, str] = {
    "h": "int32",
    "k": "int32",
    "l": "int32",
    "panel": "int32",
    "fs_px": "float64",
    "ss_px": "float64",
    "intensity": "float64",
    "sigma": "float64",
    "background": "float64",
    "peak": "float64",
    "peak_pixels": "int32",
    "partiality": "float64",
    "d_a": "float64",
    "excitation_error_inv_a": "float64",
    "lorentz": "float64",
    "polarisation": "float64",
    "flags": "int32",
}
"""Columns of :class:`ReflectionTable` (see ``docs/run-directory.md``, ``reflections.parquet``).

Intensities, sigmas, background (per pixel) and ``peak`` (the highest pixel of the peak
region) are in photons; intensities are background-subtracted and *not* corrected for
partiality, Lorentz or polarisation. ``flags`` is a bit mask of
:class:`sfxflow.algorithms.integrate.Flag`.
"""


@dataclass(frozen=True)
class ReflectionTable:
    """Columnar table of one crystal's predicted and integrated reflections."""

    columns: dict[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        n = None
        cols: dict[str, np.ndarray] = {}
        for name, dtype in REFLECTION_COLUMNS.items():
            if name not in self.columns:
                raise ValueError(f"reflection table lacks column {name!r}")
            a = np.ascontiguousarray(self.columns[name], dtype=dtype)
            if a.ndim != 1 or (n is not None and a.shape[0] != n):
                raise ValueError(f"reflection column {name} has shape {a.shape}, expected ({n},)")
            n = a.shape[0]
            cols[name] = a
        object.__setattr__(self, "columns", cols)

    def __len__(self) -> int:
        return int(self.columns["h"].shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def hkl(self) -> np.ndarray:
        return np.stack([self.columns["h"], self.columns["k"], self.columns["l"]], axis=1)

    @classmethod
    def empty(cls) -> ReflectionTable:
        return cls({k: np.zeros(0, dtype=v) for k, v in REFLECTION_COLUMNS.items()})

    def select(self, rows: np.ndarray) -> ReflectionTable:
        return ReflectionTable({k: v[rows] for k, v in self.columns.items()})


@dataclass(frozen=True)
class CrystalResult:
    """One lattice found on a frame, with its prediction and integration outcome.

    ``indexed_mask`` and ``miller_indices`` refer to the rows of the frame's spot table (the
    spots this lattice explains). ``status`` is ``integrated`` or ``failed`` (``reason`` says
    why: a prediction that leaves the detector, every peak masked, an error in the stage).
    ``profile_radius_inv_a`` is the crystal's refined reflection-profile width (Å⁻¹),
    ``resolution_limit_a`` where its strong reflections stop being observed.
    """

    crystal: Crystal = field(repr=False)
    indexed_mask: np.ndarray = field(repr=False)
    miller_indices: np.ndarray = field(repr=False)
    n_indexed: int = 0
    rmsd_px: float = math.nan
    detector_shift_mm: tuple[float, float] = (0.0, 0.0)
    profile_radius_inv_a: float = math.nan
    resolution_limit_a: float = math.nan
    n_predicted: int = 0
    reflections: ReflectionTable | None = field(default=None, repr=False)
    status: str = "indexed"
    reason: str = ""

    @property
    def n_integrated(self) -> int:
        return 0 if self.reflections is None else len(self.reflections)


@dataclass(frozen=True)
class ImageResult:
    """The one record every frame yields, whatever happened to it.

    ``stage`` names the stage that failed (``read``, ``spots``, ``hit``, ``index``, ...) when
    ``status`` is ``failed`` or indexing did not succeed; ``reason`` says why in words.
    ``timings_s`` maps stage name to seconds spent. ``crystals`` holds every lattice found
    on the frame (multi-crystal frames have several); ``crystal``, ``n_indexed`` and ``rmsd_px``
    describe the first lattice as before, and ``miller_indices`` gives every spot the indices of
    whichever lattice explains it (the first where two do).
    """

    source_url: str
    frame_index: int
    status: FrameStatus
    event_id: str = ""
    stage: str = ""
    reason: str = ""
    n_spots: int = 0
    spots: SpotTable | None = field(default=None, compare=False, repr=False)
    crystal: Crystal | None = field(default=None, compare=False, repr=False)
    miller_indices: np.ndarray | None = field(default=None, compare=False, repr=False)
    n_indexed: int = 0
    rmsd_px: float = math.nan
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)
    crystals: tuple[CrystalResult, ...] = field(default=(), compare=False, repr=False)
