"""Built-in detector layouts: CSPAD (Cheetah CXI data layout), Jungfrau 4M and a simple flat panel.

The layouts are built in code from a few nominal numbers (sensor sizes, gaps, placements), not read
from a file, so the simulator and the tests have realistic multi-panel geometry without any input.
All positions follow the lab frame of :mod:`sfxflow.models` (``+z`` along the beam, ``+y`` up, the
interaction point at the origin, the beam hitting the detector plane at ``x = y = 0``).

>>> det = by_name("cspad", distance_mm=120.0)
>>> len(det), det.data_shape(), round(det.mean_distance_mm(), 3)
(64, (1480, 1552), 120.0)
"""

from __future__ import annotations

import math

import numpy as np

from sfxflow.errors import InputError
from sfxflow.models import Detector, Panel

__all__ = [
    "CSPAD_ASIC_GAP_PX",
    "CSPAD_ASIC_SHAPE",
    "CSPAD_PIXEL_MM",
    "LAYOUT_NAMES",
    "by_name",
    "cspad",
    "jungfrau4m",
    "lab_extent_mm",
    "simple",
]

CSPAD_PIXEL_MM = 0.10992
"""CSPAD pixel edge (the 110 µm pixel, as calibrated)."""
CSPAD_ASIC_SHAPE = (185, 194)
"""One CSPAD ASIC, ``(n_ss, n_fs)`` pixels; a two-by-one sensor holds two of them side by side."""
CSPAD_ASIC_GAP_PX = 3
"""Gap between the two ASICs of a sensor along fs (stands in for the real sensor's wide middle
pixel columns)."""

# Quadrant 0 of the CSPAD in lab pixel units: for each two-by-one sensor, the lab (x, y) of the
# first pixel corner of its first ASIC, and its fast/slow directions as lab (x, y) unit steps.
# Nominal placements rounded to whole pixels; the pinwheel arrangement of the eight sensors leaves
# the central hole when the other quadrants are this one turned by 90 degree steps around the beam.
_CSPAD_Q0_SENSORS: tuple[tuple[float, float, tuple[int, int], tuple[int, int]], ...] = (
    (444.0, -50.0, (0, 1), (-1, 0)),
    (240.0, -50.0, (0, 1), (-1, 0)),
    (872.0, 342.0, (-1, 0), (0, -1)),
    (872.0, 136.0, (-1, 0), (0, -1)),
    (481.0, 770.0, (0, -1), (1, 0)),
    (689.0, 770.0, (0, -1), (1, 0)),
    (446.0, 752.0, (-1, 0), (0, -1)),
    (446.0, 541.0, (-1, 0), (0, -1)),
)

LAYOUT_NAMES: tuple[str, ...] = ("cspad", "jungfrau4m", "simple")


def _check_distance(distance_mm: float) -> float:
    if not (math.isfinite(distance_mm) and distance_mm > 0):
        raise InputError(f"detector distance {distance_mm!r} mm: expected a positive number of mm")
    return float(distance_mm)


def cspad(distance_mm: float = 130.0, pixel_size_mm: float = CSPAD_PIXEL_MM) -> Detector:
    """The CSPAD: 4 quadrants x 8 two-by-one sensors x 2 ASICs = 64 panels of 185 x 194 pixels.

    The frame data use the Cheetah CXI layout: one 2-D array of 1480 x 1552 pixels in which
    quadrant ``Q`` occupies fs columns ``388 Q .. 388 Q + 387`` and sensor ``s`` of it ss rows
    ``185 s .. 185 s + 184``; ASIC ``2 s`` is the left half of the sensor's block, ``2 s + 1`` the
    right half. Panels are named ``q{Q}a{A}`` as in CrystFEL's ``cspad-cxiformat.geom``.
    Quadrant ``Q`` is quadrant 0 rotated by ``Q x 90`` degrees around the beam. All panels lie in
    the plane ``z = distance_mm``.

    Parameters
    ----------
    distance_mm : sample-to-detector distance.
    pixel_size_mm : pixel edge.

    Returns
    -------
    Detector with rigid groups ``q0`` .. ``q3`` (quadrants).

    Examples
    --------
    >>> det = cspad()
    >>> det.panels[1].name, det.panels[1].shape, det.panels[1].data_origin
    ('q0a1', (185, 194), (0, 194))
    >>> det.n_pixels
    2296960
    """
    z = _check_distance(distance_mm)
    n_ss, n_fs = CSPAD_ASIC_SHAPE
    panels: list[Panel] = []
    groups: dict[str, tuple[str, ...]] = {}
    for q in range(4):
        c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][q]  # cos, sin of q * 90 deg

        def rot(x: float, y: float, c: int = c, s: int = s) -> tuple[float, float]:
            return c * x - s * y, s * x + c * y

        names = []
        for sensor, (cx, cy, fs_dir, ss_dir) in enumerate(_CSPAD_Q0_SENSORS):
            fx, fy = rot(*fs_dir)
            sx, sy = rot(*ss_dir)
            for half in range(2):
                asic = 2 * sensor + half
                step = half * (n_fs + CSPAD_ASIC_GAP_PX)
                ox, oy = rot(cx + step * fs_dir[0], cy + step * fs_dir[1])
                name = f"q{q}a{asic}"
                names.append(name)
                panels.append(
                    Panel(
                        name=name,
                        origin_mm=(ox * pixel_size_mm, oy * pixel_size_mm, z),
                        fast_axis=(fx, fy, 0.0),
                        slow_axis=(sx, sy, 0.0),
                        pixel_size_mm=pixel_size_mm,
                        shape=CSPAD_ASIC_SHAPE,
                        data_origin=(n_ss * sensor, 2 * n_fs * q + n_fs * half),
                    )
                )
        groups[f"q{q}"] = tuple(names)
    return Detector(tuple(panels), rigid_groups=groups)


def jungfrau4m(
    distance_mm: float = 100.0,
    pixel_size_mm: float = 0.075,
    column_gap_px: int = 12,
    row_gap_px: int = 36,
) -> Detector:
    """A Jungfrau 4M: 8 modules of 512 x 1024 pixels (75 µm) in two columns of four.

    Modules are horizontal (fs along ``+x``, ss along ``-y``, as an image read top to bottom),
    separated by ``column_gap_px`` between the columns and ``row_gap_px`` between rows; the beam
    passes through the middle of the central gaps. Data layout: ``(4096, 1024)``, module ``m`` at
    ss rows ``512 m .. 512 m + 511``; modules 0-3 form the left column (top to bottom), 4-7 the
    right one. Panels are named ``m0`` .. ``m7``.

    Examples
    --------
    >>> det = jungfrau4m()
    >>> det.data_shape(), det.n_pixels
    ((4096, 1024), 4194304)
    """
    z = _check_distance(distance_mm)
    n_ss, n_fs = 512, 1024
    height = 4 * n_ss + 3 * row_gap_px
    panels = []
    for m in range(8):
        col, row = divmod(m, 4)
        x0 = -(n_fs + column_gap_px / 2) if col == 0 else column_gap_px / 2
        y0 = height / 2 - row * (n_ss + row_gap_px)
        panels.append(
            Panel(
                name=f"m{m}",
                origin_mm=(x0 * pixel_size_mm, y0 * pixel_size_mm, z),
                fast_axis=(1.0, 0.0, 0.0),
                slow_axis=(0.0, -1.0, 0.0),
                pixel_size_mm=pixel_size_mm,
                shape=(n_ss, n_fs),
                data_origin=(n_ss * m, 0),
            )
        )
    groups = {"left": tuple(f"m{m}" for m in range(4)), "right": tuple(f"m{m}" for m in range(4, 8))}
    return Detector(tuple(panels), rigid_groups=groups)


def simple(distance_mm: float = 100.0, pixel_size_mm: float = 0.1, n_px: int = 1024) -> Detector:
    """One square monolithic panel of ``n_px`` x ``n_px`` pixels centred on the beam.

    Examples
    --------
    >>> det = simple()
    >>> det.panels[0].origin_mm
    (-51.2, 51.2, 100.0)
    """
    z = _check_distance(distance_mm)
    half = n_px * pixel_size_mm / 2
    panel = Panel(
        name="p0",
        origin_mm=(-half, half, z),
        fast_axis=(1.0, 0.0, 0.0),
        slow_axis=(0.0, -1.0, 0.0),
        pixel_size_mm=pixel_size_mm,
        shape=(n_px, n_px),
    )
    return Detector((panel,))


def by_name(name: str, distance_mm: float | None = None) -> Detector:
    """A built-in layout by name (``cspad``, ``jungfrau4m``, ``simple``).

    Parameters
    ----------
    name : layout name, case-insensitive.
    distance_mm : sample-to-detector distance; ``None`` keeps the layout's default.

    Raises
    ------
    InputError
        For an unknown name or a non-positive distance.
    """
    key = name.strip().lower()
    makers = {"cspad": cspad, "jungfrau4m": jungfrau4m, "simple": simple}
    if key not in makers:
        raise InputError(f"unknown detector layout {name!r}: expected one of {', '.join(LAYOUT_NAMES)}")
    if distance_mm is None:
        return makers[key]()
    return makers[key](distance_mm=distance_mm)


def lab_extent_mm(detector: Detector) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` of all panel corners in the lab frame (mm)."""
    pts = []
    for p in detector.panels:
        n_ss, n_fs = p.shape
        pts.append(p.lab_mm(np.array([0, n_fs, 0, n_fs]), np.array([0, 0, n_ss, n_ss])))
    a = np.concatenate(pts)
    return float(a[:, 0].min()), float(a[:, 0].max()), float(a[:, 1].min()), float(a[:, 1].max())
