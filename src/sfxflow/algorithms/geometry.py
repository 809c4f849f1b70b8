"""Diffraction geometry on the sfxflow lab frame: pixels <-> rays <-> reciprocal space.

Shared by the simulator, spot finder (resolution of spots), indexer and refinement. Pure numpy;
the ray-panel intersection is a numba kernel.
See :mod:`sfxflow.models` for the frame and pixel conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import gemmi
import numpy as np
from numba import njit

from sfxflow.models import Beam, Detector

__all__ = [
    "PanelMatrices",
    "d_spacing_a",
    "lab_to_q",
    "miller_indices",
    "panel_matrices",
    "panel_point_mm",
    "pixels_to_lab_mm",
    "pixels_to_q",
    "rays_to_pixels",
]


@dataclass(frozen=True)
class PanelMatrices:
    """Per-panel affine maps as stacked arrays, for vectorised work over many spots.

    ``d[p]`` is the 3x3 matrix with columns ``fast*pix, slow*pix, origin`` so that
    ``lab = d @ (fs, ss, 1)``; ``d_inv[p]`` maps a lab direction back (CrystFEL/DIALS "D matrix").
    """

    d: np.ndarray  # (n_panels, 3, 3)
    d_inv: np.ndarray  # (n_panels, 3, 3)
    shape: np.ndarray  # (n_panels, 2) as (n_ss, n_fs)


def panel_matrices(detector: Detector) -> PanelMatrices:
    d = np.empty((len(detector), 3, 3))
    shapes = np.empty((len(detector), 2), dtype=np.int64)
    for i, p in enumerate(detector.panels):
        d[i, :, 0] = np.asarray(p.fast_axis) * p.pixel_size_mm
        d[i, :, 1] = np.asarray(p.slow_axis) * p.pixel_size_mm
        d[i, :, 2] = p.origin_mm
        shapes[i] = p.shape
    return PanelMatrices(d=d, d_inv=np.linalg.inv(d), shape=shapes)


def pixels_to_lab_mm(
    detector: Detector, panel: np.ndarray, fs_px: np.ndarray, ss_px: np.ndarray,
    matrices: PanelMatrices | None = None,
) -> np.ndarray:
    """Lab positions (mm), shape ``(n, 3)``, of continuous pixel coordinates on given panels.

    ``matrices``: the detector's :func:`panel_matrices` when the caller holds them (the cached
    ones of :mod:`sfxflow.algorithms.detector_tables`, which imports this module); rebuilt
    otherwise (0.24 ms for the 64 panels of a CSPAD, per call).
    """
    m = matrices if matrices is not None else panel_matrices(detector)
    panel = np.asarray(panel, dtype=np.int64)
    v = np.stack([np.asarray(fs_px, float), np.asarray(ss_px, float), np.ones(panel.shape)], -1)
    return np.einsum("nij,nj->ni", m.d[panel], v)


@njit(cache=True, nogil=True, inline="always")
def panel_point_mm(d, panel, fs_px, ss_px):  # pragma: no cover - compiled
    """The lab position (mm) ``(x, y, z)`` of one pixel point, ``d[panel] @ (fs, ss, 1)`` for
    panel matrices ``d`` (:attr:`PanelMatrices.d`), summed in the order
    :func:`pixels_to_lab_mm`'s einsum sums it, ``(origin + fast fs) + slow ss``, so compiled
    kernels see the same bits as the numpy callers (the order ``fast fs + slow ss + origin``
    differs in the last bit for most points)."""
    m = d[panel]
    return ((m[0, 2] + m[0, 0] * fs_px) + m[0, 1] * ss_px,
            (m[1, 2] + m[1, 0] * fs_px) + m[1, 1] * ss_px,
            (m[2, 2] + m[2, 0] * fs_px) + m[2, 1] * ss_px)


def pixels_to_q(
    detector: Detector, beam: Beam, panel: np.ndarray, fs_px: np.ndarray, ss_px: np.ndarray
) -> np.ndarray:
    """Scattering vectors ``q = s1 - s0`` (Å⁻¹), shape ``(n, 3)``, of pixel coordinates."""
    return lab_to_q(pixels_to_lab_mm(detector, panel, fs_px, ss_px), beam)


def lab_to_q(lab_mm: np.ndarray, beam: Beam) -> np.ndarray:
    """Scattering vectors ``q = s1 - s0`` (Å⁻¹) of rays from the sample to lab points (n, 3)."""
    s1 = lab_mm / (np.linalg.norm(lab_mm, axis=1, keepdims=True) * beam.wavelength_a)
    return s1 - np.asarray(beam.s0_inv_a)


def d_spacing_a(q: np.ndarray) -> np.ndarray:
    """Resolution ``d = 1/|q|`` in Å (``inf`` for q = 0)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.linalg.norm(np.atleast_2d(q), axis=1)


@njit(cache=True)
def _project(k_vecs, d_inv, shapes, panel, fs, ss):  # pragma: no cover - numba
    """Intersect rays along ``k_vecs`` with the panels (nearest panel wins)."""
    for i in range(k_vecs.shape[0]):
        best_t = np.inf
        panel[i] = -1
        kx, ky, kz = k_vecs[i, 0], k_vecs[i, 1], k_vecs[i, 2]
        for p in range(d_inv.shape[0]):
            w = d_inv[p, 2, 0] * kx + d_inv[p, 2, 1] * ky + d_inv[p, 2, 2] * kz
            if w <= 0.0:
                continue
            f = (d_inv[p, 0, 0] * kx + d_inv[p, 0, 1] * ky + d_inv[p, 0, 2] * kz) / w
            s = (d_inv[p, 1, 0] * kx + d_inv[p, 1, 1] * ky + d_inv[p, 1, 2] * kz) / w
            if f < 0.0 or s < 0.0 or f >= shapes[p, 1] or s >= shapes[p, 0]:
                continue
            t = 1.0 / w
            if t < best_t:
                best_t = t
                panel[i] = p
                fs[i] = f
                ss[i] = s


def rays_to_pixels(
    detector: Detector, directions: np.ndarray, matrices: PanelMatrices | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersect rays from the sample along ``directions`` (n, 3) with the panels.

    Returns ``(panel, fs_px, ss_px)``; ``panel`` is -1 (and ``fs_px``, ``ss_px`` NaN) where a
    ray hits no panel. When panels overlap along a ray (they should not), the nearest panel
    wins. ``matrices``: as for :func:`pixels_to_lab_mm` (prediction passes the cached ones,
    shifted by the refined detector shift).
    """
    m = matrices if matrices is not None else panel_matrices(detector)
    directions = np.ascontiguousarray(np.atleast_2d(np.asarray(directions, dtype=float)))
    n = directions.shape[0]
    panel = np.empty(n, dtype=np.int64)
    fs = np.full(n, np.nan)
    ss = np.full(n, np.nan)
    _project(directions, np.ascontiguousarray(m.d_inv), m.shape, panel, fs, ss)
    return panel, fs, ss


def plane_grid_to_pixels(
    matrices: PanelMatrices, panel: int, x_mm: np.ndarray, y_mm: np.ndarray, z_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the rays from the sample through the grid of points ``(x_mm[col], y_mm[row], z_mm)``
    hit one panel: ``(hit, fs_px, ss_px)``, each of shape ``(len(y_mm), len(x_mm))``; ``hit``
    is False where a ray misses the panel.

    What :func:`rays_to_pixels` gives for that panel alone, without building the
    ``(rows * cols, 3)`` directions and their matrix product: ``d_inv @ (x, y, z)`` is a column
    term plus a row term, added by broadcasting (the frame picture's grid, ~1 Mpx).

    >>> from sfxflow.algorithms.layouts import simple
    >>> det = simple(n_px=64)
    >>> hit, fs, ss = plane_grid_to_pixels(panel_matrices(det), 0, np.array([0.0]),
    ...                                    np.array([0.0, 1e3]), det.mean_distance_mm())
    >>> hit.tolist(), rays_to_pixels(det, [[0.0, 0.0, det.mean_distance_mm()]])[0].tolist()
    ([[True], [False]], [0])
    """
    a = matrices.d_inv[panel]
    x = np.asarray(x_mm, dtype=float)[None, :]
    y = np.asarray(y_mm, dtype=float)[:, None]
    fs_w, ss_w, w = (a[k, 0] * x + (a[k, 1] * y + a[k, 2] * z_mm) for k in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        fs = fs_w / w
        ss = ss_w / w
    n_ss, n_fs = matrices.shape[panel]
    hit = (w > 0) & (fs >= 0) & (fs < n_fs) & (ss >= 0) & (ss < n_ss)
    return hit, fs, ss


def miller_indices(
    cell: gemmi.UnitCell,
    space_group: gemmi.SpaceGroup,
    d_min_a: float,
    d_max_a: float = np.inf,
) -> np.ndarray:
    """All Miller indices (not only unique ones) with ``d_min <= d <= d_max``, systematic absences
    removed, as an ``(n, 3)`` int array.

    >>> hkl = miller_indices(gemmi.UnitCell(93, 93, 130.5, 90, 90, 120),
    ...                      gemmi.SpaceGroup("P 61 2 2"), 20.0)
    >>> bool(np.any(np.all(hkl == [0, 0, 1], axis=1)))  # 00l needs l = 6n
    False
    """
    # |h| <= |a| / d_min bounds the sphere of radius 1/d_min for any cell shape.
    b = np.array(cell.frac.mat.tolist(), dtype=float).T  # columns are a*, b*, c*
    hmax = [int(np.floor(x / d_min_a)) + 1 for x in (cell.a, cell.b, cell.c)]
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in hmax], indexing="ij")
    hkl = np.stack([g.ravel() for g in grids], axis=1)
    q = hkl @ b.T
    q_len = np.linalg.norm(q, axis=1)
    with np.errstate(divide="ignore"):
        d = 1.0 / q_len
    keep = (q_len > 0) & (d >= d_min_a) & (d <= d_max_a)
    hkl = hkl[keep]
    hkl = hkl.astype(np.int32)
    absent = np.asarray(space_group.operations().systematic_absences(hkl), dtype=bool)
    return hkl[~absent]

