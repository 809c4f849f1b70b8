"""Least-squares refinement of one still's crystal against observed spot positions (pixels).

The model is the stills model of :func:`sfxflow.algorithms.predict.predict_spots`: an indexed
reflection ``h`` lands where the ray along ``A @ h + s0`` meets the detector. Refinement adjusts

* the orientation ``U`` (a small rotation vector applied on the left of the starting ``U``),
* optionally the unit cell, within the constraints of the space group's lattice system
  (e.g. ``a = b, gamma = 120`` stays so for a hexagonal cell; see :func:`cell_parameters`),
* optionally the detector distance (all panels shifted together along the beam, ``+z``),
* optionally a lateral detector shift ``(x, y)`` (all panels together, perpendicular to the beam;
  the same as moving the beam centre the other way), bounded to a small range. CrystFEL refines
  the same per-crystal quantity (``predict_refine/det_shift`` in its streams): the nominal beam
  centre of an XFEL shot is uncertain by a fraction of a pixel to a few pixels (beam pointing
  jitter), which otherwise shows up as a common offset of all residuals and biases the
  orientation,

to minimise the pixel residuals ``(fs_pred - fs_obs, ss_pred - ss_obs)`` of the indexed spots,
with a weak term on the excitation errors ``|A h + s0| - 1/λ`` (lattice points should lie near the
Ewald sphere; this pins the rotations about axes perpendicular to the beam, which spot positions
alone determine poorly on a still). Between least-squares rounds every spot is re-assigned its
best Miller index along its observed ray (:func:`assign_hkl`) and outliers are dropped.

Pure numpy/numba; no I/O.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import gemmi
import numpy as np
from numba import njit

from sfxflow.algorithms.detector_tables import detector_tables
from sfxflow.algorithms.fused import fma, product3_into
from sfxflow.algorithms.robust import median_in_place
from sfxflow.models import Beam, Crystal, Detector
from sfxflow.settings import check_fields, refuse, setting

log = logging.getLogger(__name__)

__all__ = [
    "RefineParams",
    "RefineResult",
    "assign_hkl",
    "cell_parameters",
    "index_on_lattice",
    "predict_positions_px",
    "refine_still",
    "rotation_matrix",
]


@dataclass(frozen=True)
class RefineParams:
    """Options of :func:`refine_still`.

    Parameters
    ----------
    refine_cell : refine the cell within the lattice-system constraints.
    refine_distance : refine a common shift of the detector along the beam (mm); only with
        ``refine_cell = False``. On a single still the distance and the cell scale move the
        spots alike: in the joint fit's first round on the CrystFEL test stream the distance's
        Jacobian column is 99.6-99.98 % explained by the others on every frame (its variance inflated 250-5000
        times), so the fit trades one for the other and good solutions failed the cell test.
        Against a known cell the distance is determined.
    n_cycles : rounds of (re-assign hkl, reject outliers, least squares).
    outlier_px : a spot whose predicted position is further than this from its centroid is not
        indexed.
    outlier_nsigma : also reject residuals above this many robust standard deviations
        (never below ``min_outlier_px``).
    min_outlier_px : floor of the sigma-based outlier threshold.
    max_excitation_inv_a : largest expected distance (Å⁻¹) of an observed reflection's lattice
        point from the Ewald sphere (mosaicity, bandwidth, crystal size); used to search Miller
        indices along each observed ray.
    excitation_weight : weight of the excitation-error residuals relative to one pixel per
        ``max_excitation_inv_a``; 0 switches the term off.
    max_cell_change : largest relative change of any cell length accepted in one least-squares
        round (guards against a runaway fit on few spots).
    refine_detector_shift : refine a lateral shift ``(x, y)`` of the whole detector (mm). Off
        by default: it recovers a real beam-centre error (simulated 0.18 mm: misorientation
        0.09 -> 0.02 deg), but on the real CrystFEL stream, with 1.5-2 px centroid noise and
        ~20 spots, the per-frame shift (like CrystFEL's own ``det_shift``) is at the noise level
        and does not improve agreement with XGANDALF.
    max_detector_shift_mm : bound on each component of that shift.
    min_spots_detector_shift : refine the shift only when at least this many spots are indexed
        (two more parameters on very few spots mostly fit noise).
    """

    refine_cell: bool = True
    refine_distance: bool = False
    n_cycles: int = setting(3, ge=1, le=100)
    outlier_px: float = setting(4.0, gt=0, le=1000)
    outlier_nsigma: float = setting(3.0, gt=0, le=1000)
    min_outlier_px: float = setting(1.0, ge=0, le=1000)
    max_excitation_inv_a: float = setting(0.0015, gt=0, le=1)
    excitation_weight: float = setting(1.0, ge=0, le=1e6)
    max_cell_change: float = setting(0.05, gt=0, le=1)
    refine_detector_shift: bool = False
    max_detector_shift_mm: float = setting(0.2, gt=0, le=100)
    min_spots_detector_shift: int = setting(20, ge=0, le=100_000)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.refine_distance and self.refine_cell:
            refuse(self, "refine_distance", "False (refine_distance needs refine_cell = False: on "
                   "a single still the detector distance and the cell scale cannot be told apart)",
                   also="refine_cell")


@dataclass(frozen=True)
class RefineResult:
    """Outcome of :func:`refine_still`.

    ``miller_indices`` is ``(n, 3)`` with zeros where a spot is not indexed; ``residuals_px``
    is ``(n, 2)`` (predicted minus observed fs, ss; NaN where not indexed);
    ``excitation_inv_a`` holds ``|A h + s0| - 1/λ`` of the assigned index (NaN if none).
    ``detector_shift_mm`` is the refined lateral shift ``(x, y)`` of the detector (lab frame,
    mm; ``(0, 0)`` when not refined), ``distance_shift_mm`` the shift along the beam;
    ``outlier_threshold_px`` the distance within which a spot was called indexed.
    """

    crystal: Crystal
    miller_indices: np.ndarray = field(repr=False)
    indexed_mask: np.ndarray = field(repr=False)
    residuals_px: np.ndarray = field(repr=False)
    excitation_inv_a: np.ndarray = field(repr=False)
    rmsd_px: float
    distance_shift_mm: float = 0.0
    n_indexed: int = 0
    detector_shift_mm: tuple[float, float] = (0.0, 0.0)
    outlier_threshold_px: float = math.nan


def rotation_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (axis × angle in radians), Rodrigues' formula.

    >>> np.round(rotation_matrix(np.array([0.0, 0.0, np.pi / 2])) @ [1.0, 0.0, 0.0], 12)
    array([0., 1., 0.])
    """
    v = np.asarray(rotvec, dtype=float)
    theta = math.sqrt(float(v @ v))
    if theta < 1e-12:
        k = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
        return np.eye(3) + k
    x, y, z = v / theta
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(theta) * k + (1.0 - math.cos(theta)) * (k @ k)


def cell_parameters(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup):
    """Free cell parameters of the space group's lattice system.

    Returns ``(values, build)`` where ``values`` is a 1-D array of the free parameters of
    ``cell`` and ``build(values) -> gemmi.UnitCell`` rebuilds a cell obeying the constraints.

    >>> vals, build = cell_parameters(gemmi.UnitCell(93, 93, 130.5, 90, 90, 120),
    ...                               gemmi.SpaceGroup("P 61 2 2"))
    >>> vals.tolist(), build([94.0, 131.0]).parameters
    ([93.0, 130.5], (94.0, 94.0, 131.0, 90.0, 90.0, 120.0))
    """
    values, build, _ = _cell_layout(cell, space_group)
    return values, build


def _cell_layout(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup):
    """:func:`cell_parameters`' ``(values, build)`` and a key naming the parameterisation:
    which free value sets which cell parameter depends on the key alone (:func:`_cell_map`)."""
    system = space_group.crystal_system_str()
    a, b, c, al, be, ga = cell.parameters
    if system == "triclinic":
        return (np.array([a, b, c, al, be, ga]), lambda v: gemmi.UnitCell(*map(float, v)),
                system)
    if system == "monoclinic":
        # the free angle is the one that is not 90 in the target (b-unique by default)
        angles = [al, be, ga]
        k = int(np.argmax([abs(x - 90.0) for x in angles])) if any(
            abs(x - 90.0) > 1e-6 for x in angles
        ) else 1

        def build_mono(v):
            ang = [90.0, 90.0, 90.0]
            ang[k] = float(v[3])
            return gemmi.UnitCell(float(v[0]), float(v[1]), float(v[2]), *ang)

        return np.array([a, b, c, angles[k]]), build_mono, (system, k)
    if system == "orthorhombic":
        return np.array([a, b, c]), lambda v: gemmi.UnitCell(
            float(v[0]), float(v[1]), float(v[2]), 90.0, 90.0, 90.0
        ), system
    if system == "tetragonal":
        return np.array([a, c]), lambda v: gemmi.UnitCell(
            float(v[0]), float(v[0]), float(v[1]), 90.0, 90.0, 90.0
        ), system
    if system == "trigonal" and (
        space_group.ext == "R" or (abs(a - c) < 1e-6 and abs(al - 90.0) > 1e-6)
    ):
        return np.array([a, al]), lambda v: gemmi.UnitCell(
            float(v[0]), float(v[0]), float(v[0]), float(v[1]), float(v[1]), float(v[1])
        ), "rhombohedral"
    if system in ("trigonal", "hexagonal"):
        return np.array([a, c]), lambda v: gemmi.UnitCell(
            float(v[0]), float(v[0]), float(v[1]), 90.0, 90.0, 120.0
        ), "hexagonal"
    if system == "cubic":
        return np.array([a]), lambda v: gemmi.UnitCell(
            float(v[0]), float(v[0]), float(v[0]), 90.0, 90.0, 90.0
        ), system
    raise ValueError(f"unknown crystal system {system!r} of space group {space_group.hm}")


def _spot_matrices(
    detector: Detector,
    panel: np.ndarray,
    shift_mm: float = 0.0,
    shift_xy_mm: tuple[float, float] | np.ndarray = (0.0, 0.0),
):
    """Per-spot panel matrices ``(d, d_inv)`` with the detector moved by ``shift_xy_mm`` across
    and ``shift_mm`` along the beam (the panels' origins move; their axes do not). The panel
    matrices come from the detector's cached tables: rebuilding them (64 panels of a CSPAD)
    cost about half a millisecond per call, most of a still's refinement."""
    m = detector_tables(detector).matrices
    d = m.d[np.asarray(panel, dtype=np.int64)].copy()
    dx, dy = float(shift_xy_mm[0]), float(shift_xy_mm[1])
    if shift_mm or dx or dy:
        d[:, 0, 2] += dx
        d[:, 1, 2] += dy
        d[:, 2, 2] += shift_mm
        return d, np.linalg.inv(d)
    return d, m.d_inv[np.asarray(panel, dtype=np.int64)]


def predict_positions_px(
    a_matrix: np.ndarray,
    hkl: np.ndarray,
    panel: np.ndarray,
    detector: Detector,
    beam: Beam,
    distance_shift_mm: float = 0.0,
    detector_shift_mm: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``(fs_px, ss_px)`` of reflections ``hkl`` on the given panels (the spots' own).

    The ray is ``A @ h + s0`` as in :func:`~sfxflow.algorithms.predict.predict_spots`; the
    position is on the plane of ``panel`` even when it falls just outside the panel's edge.
    ``distance_shift_mm`` / ``detector_shift_mm`` move the detector as in
    :class:`RefineResult`.
    """
    panel = np.asarray(panel, dtype=np.int64)
    if distance_shift_mm or detector_shift_mm[0] or detector_shift_mm[1]:
        _, d_inv = _spot_matrices(detector, panel, distance_shift_mm, detector_shift_mm)
        row = np.arange(panel.size)
    else:  # the detector's own tables, indexed by panel (no per-spot copy)
        d_inv, row = detector_tables(detector).matrices.d_inv, panel
    fs = np.empty(panel.size)
    ss = np.empty(panel.size)
    _predicted_px_into(np.ascontiguousarray(a_matrix, dtype=float),
                       np.ascontiguousarray(hkl, dtype=float).reshape(-1, 3),
                       np.asarray(beam.s0_inv_a, dtype=float), d_inv, row, fs, ss)
    return fs, ss


@njit(cache=True, nogil=True, error_model="numpy")
def _predicted_px_into(a, h, s0, d_inv, row, fs, ss):  # pragma: no cover - compiled
    """:func:`predict_positions_px` in one compiled pass, rounded as its numpy steps were
    (``h @ a.T + s0`` as numpy's ``@``, :func:`_blas_rays_into`; ``d⁻¹ k`` in einsum's order,
    last term first), so the spots judged near a lattice are the same to the bit: ``d_inv[row[j]]`` is
    spot ``j``'s inverse panel matrix. The numpy steps cost 10 µs on the 9 spots a 60-spot
    hit leaves, most of :func:`~sfxflow.algorithms.index.spots_left_after`."""
    k = np.empty((h.shape[0], 3))
    _blas_rays_into(a, h, s0, k)
    for j in range(h.shape[0]):
        k0, k1, k2 = k[j, 0], k[j, 1], k[j, 2]
        m = d_inv[row[j]]
        v0 = (m[0, 2] * k2 + m[0, 0] * k0) + m[0, 1] * k1
        v1 = (m[1, 2] * k2 + m[1, 0] * k0) + m[1, 1] * k1
        v2 = (m[2, 2] * k2 + m[2, 0] * k0) + m[2, 1] * k1
        fs[j] = v0 / v2
        ss[j] = v1 / v2


def _read_only(cen: np.ndarray, rot: np.ndarray, tran: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The absence tables made read-only: they are shared (cached)."""
    for a in (cen, rot, tran):
        a.flags.writeable = False
    return cen, rot, tran


_NO_OPS = _read_only(np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3, 3), dtype=np.int64),
                     np.zeros((0, 1, 3), dtype=np.int64))


@functools.lru_cache(maxsize=64)
def _absence_ops(hall: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The space group's operations as :func:`_is_absent` reads them (gemmi's units, ``DEN``
    = 24): the centring translations but the first (zero), the rotations of the symmetry
    operations but the identity, and each such operation's translation plus every centring
    (``(n_ops, n_centrings, 3)``)."""
    ops = gemmi.symops_from_hall(hall)
    cen = np.array(ops.cen_ops, dtype=np.int64).reshape(-1, 3)
    sym = ops.sym_ops[1:]
    rot = np.array([op.rot for op in sym], dtype=np.int64).reshape(-1, 3, 3)
    tran = np.array([[np.add(op.tran, c) for c in ops.cen_ops] for op in sym],
                    dtype=np.int64).reshape(len(sym), len(ops.cen_ops), 3)
    return _read_only(np.ascontiguousarray(cen[1:]), rot, tran)


def _absences(space_group: gemmi.SpaceGroup | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _NO_OPS if space_group is None else _absence_ops(space_group.hall)


@njit(cache=True, nogil=True, error_model="numpy")
def _is_absent(h, k, l, cen, rot, tran):  # pragma: no cover - compiled
    """gemmi's ``GroupOps.is_systematically_absent`` of ``(h, k, l)`` (:func:`_absence_ops`):
    a centring, or an operation that maps the index onto itself, shifts its phase."""
    den = 24  # gemmi.Op.DEN
    for c in range(cen.shape[0]):
        if (h * cen[c, 0] + k * cen[c, 1] + l * cen[c, 2]) % den != 0:
            return True
    for o in range(rot.shape[0]):
        r = rot[o]
        if (r[0, 0] * h + r[1, 0] * k + r[2, 0] * l == den * h
                and r[0, 1] * h + r[1, 1] * k + r[2, 1] * l == den * k
                and r[0, 2] * h + r[1, 2] * k + r[2, 2] * l == den * l):
            for c in range(tran.shape[1]):
                if (h * tran[o, c, 0] + k * tran[o, c, 1] + l * tran[o, c, 2]) % den != 0:
                    return True
    return False


@njit(cache=True, nogil=True, error_model="numpy")
def _inverse3(a, out):  # pragma: no cover - compiled
    """``out = a⁻¹`` of a 3×3 matrix by cofactors (False when singular)."""
    c00 = a[1, 1] * a[2, 2] - a[1, 2] * a[2, 1]
    c01 = a[1, 2] * a[2, 0] - a[1, 0] * a[2, 2]
    c02 = a[1, 0] * a[2, 1] - a[1, 1] * a[2, 0]
    det = a[0, 0] * c00 + a[0, 1] * c01 + a[0, 2] * c02
    if det == 0.0 or not math.isfinite(det):
        return False
    out[0, 0] = c00 / det
    out[1, 0] = c01 / det
    out[2, 0] = c02 / det
    out[0, 1] = (a[0, 2] * a[2, 1] - a[0, 1] * a[2, 2]) / det
    out[1, 1] = (a[0, 0] * a[2, 2] - a[0, 2] * a[2, 0]) / det
    out[2, 1] = (a[0, 1] * a[2, 0] - a[0, 0] * a[2, 1]) / det
    out[0, 2] = (a[0, 1] * a[1, 2] - a[0, 2] * a[1, 1]) / det
    out[1, 2] = (a[0, 2] * a[1, 0] - a[0, 0] * a[1, 2]) / det
    out[2, 2] = (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]) / det
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _assign_rays(a, a_inv, dirs, s0, k0, offsets, max_exc, cen, rot, tran, check_absent,
                 hkl, ang, exc):  # pragma: no cover - compiled
    """:func:`assign_hkl` into ``hkl`` (n, 3), ``ang``, ``exc``: per ray, of the candidates
    in the order of ``offsets``, the first of the smallest angle wins (``np.argmin``'s choice,
    a NaN angle first of all); the first candidate, with angle inf, when none is admissible.
    A candidate equal to the one before has its angle, so cannot win and is skipped; the
    absence test runs on the would-be winner only, then on the next best if it is absent
    (about once per ray: testing every improving candidate was two thirds of the time)."""
    n_t = offsets.size
    ch = np.empty((n_t, 3), dtype=np.int64)
    ce = np.empty(n_t)
    cg = np.empty(n_t)
    for i in range(dirs.shape[0]):
        dx, dy, dz = dirs[i, 0], dirs[i, 1], dirs[i, 2]
        n_c = 0
        ph = pk = pl = 0
        for t in range(n_t):
            kk = k0 + offsets[t]
            qx = kk * dx - s0[0]
            qy = kk * dy - s0[1]
            qz = kk * dz - s0[2]
            h = np.int64(np.rint(a_inv[0, 0] * qx + a_inv[0, 1] * qy + a_inv[0, 2] * qz))
            k = np.int64(np.rint(a_inv[1, 0] * qx + a_inv[1, 1] * qy + a_inv[1, 2] * qz))
            l = np.int64(np.rint(a_inv[2, 0] * qx + a_inv[2, 1] * qy + a_inv[2, 2] * qz))
            if t > 0 and h == ph and k == pk and l == pl:
                continue
            ph, pk, pl = h, k, l
            kx = a[0, 0] * h + a[0, 1] * k + a[0, 2] * l + s0[0]
            ky = a[1, 0] * h + a[1, 1] * k + a[1, 2] * l + s0[1]
            kz = a[2, 0] * h + a[2, 1] * k + a[2, 2] * l + s0[2]
            k_len = math.sqrt(kx * kx + ky * ky + kz * kz)
            e = k_len - k0
            if t == 0:  # the answer when no candidate is admissible
                hkl[i, 0], hkl[i, 1], hkl[i, 2] = h, k, l
                ang[i] = math.inf
                exc[i] = e
            if (h == 0 and k == 0 and l == 0) or abs(e) > 2.0 * max_exc:
                continue
            c = (kx * dx + ky * dy + kz * dz) / k_len
            ch[n_c, 0], ch[n_c, 1], ch[n_c, 2] = h, k, l
            ce[n_c] = e
            cg[n_c] = math.acos(min(max(c, -1.0), 1.0)) if c == c else math.nan
            n_c += 1
        while n_c > 0:
            best = 0
            for c in range(n_c):
                if cg[c] != cg[c]:
                    best = c
                    break
                if cg[c] < cg[best]:
                    best = c
            if not (check_absent and _is_absent(ch[best, 0], ch[best, 1], ch[best, 2], cen,
                                                rot, tran)):
                hkl[i, 0], hkl[i, 1], hkl[i, 2] = ch[best, 0], ch[best, 1], ch[best, 2]
                ang[i] = cg[best]
                exc[i] = ce[best]
                break
            for c in range(best, n_c - 1):  # drop the absent one, keeping the order
                ch[c] = ch[c + 1]
                ce[c] = ce[c + 1]
                cg[c] = cg[c + 1]
            n_c -= 1


@njit(cache=True, nogil=True, error_model="numpy")
def _ray_dirs_into(d, row, fs, ss, out):  # pragma: no cover - compiled
    """Unit lab directions ``out`` (n, 3) of the pixel positions ``(fs, ss)`` on the panels
    whose matrices are ``d[row]``."""
    for i in range(fs.size):
        m = d[row[i]]
        x = m[0, 0] * fs[i] + m[0, 1] * ss[i] + m[0, 2]
        y = m[1, 0] * fs[i] + m[1, 1] * ss[i] + m[1, 2]
        z = m[2, 0] * fs[i] + m[2, 1] * ss[i] + m[2, 2]
        norm = math.sqrt(x * x + y * y + z * z)
        out[i, 0], out[i, 1], out[i, 2] = x / norm, y / norm, z / norm


@njit(cache=True, nogil=True, error_model="numpy")
def _assign_spots(a, dirs, d_inv, row, fs, ss, s0, k0, offsets, max_exc, cen, rot, tran,
                  check_absent, hkl, offset_px, dist_px):  # pragma: no cover - compiled
    """:func:`_assign`'s compiled part: each spot's index (:func:`_assign_rays`), where it is
    predicted on the spot's panel (``d_inv[row]``) minus where it was seen, and that distance
    (inf where no index is admissible or the prediction is not finite). False when ``a`` is
    singular."""
    n = fs.size
    a_inv = np.empty((3, 3))
    if not _inverse3(a, a_inv):
        return False
    ang = np.empty(n)
    exc = np.empty(n)
    _assign_rays(a, a_inv, dirs, s0, k0, offsets, max_exc, cen, rot, tran, check_absent,
                 hkl, ang, exc)
    for i in range(n):
        h, k, l = hkl[i, 0], hkl[i, 1], hkl[i, 2]
        kx = a[0, 0] * h + a[0, 1] * k + a[0, 2] * l + s0[0]
        ky = a[1, 0] * h + a[1, 1] * k + a[1, 2] * l + s0[1]
        kz = a[2, 0] * h + a[2, 1] * k + a[2, 2] * l + s0[2]
        m = d_inv[row[i]]
        v0 = m[0, 0] * kx + m[0, 1] * ky + m[0, 2] * kz
        v1 = m[1, 0] * kx + m[1, 1] * ky + m[1, 2] * kz
        v2 = m[2, 0] * kx + m[2, 1] * ky + m[2, 2] * kz
        offset_px[i, 0] = v0 / v2 - fs[i]
        offset_px[i, 1] = v1 / v2 - ss[i]
        dist = math.hypot(offset_px[i, 0], offset_px[i, 1])
        dist_px[i] = dist if math.isfinite(dist) and math.isfinite(ang[i]) else math.inf
    return True


@functools.lru_cache(maxsize=16)
def _candidate_offsets(max_excitation_inv_a: float) -> np.ndarray:
    """The five distances from the Ewald sphere :func:`assign_hkl` searches at (read-only)."""
    offsets = np.linspace(-max_excitation_inv_a, max_excitation_inv_a, 5)
    offsets.flags.writeable = False
    return offsets


def assign_hkl(
    a_matrix: np.ndarray,
    ray_dirs: np.ndarray,
    beam: Beam,
    max_excitation_inv_a: float,
    space_group: gemmi.SpaceGroup | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best Miller index of each observed ray, searching along the ray near the Ewald sphere.

    A spot only fixes the direction ``s1`` of its ray; its lattice point may lie up to
    ``max_excitation_inv_a`` off the Ewald sphere along that ray. The candidates are the
    nearest integer points to ``A⁻¹ (t s1 - s0)`` for five ``t`` in
    ``1/λ ± max_excitation_inv_a``; the one whose own ray is closest in angle wins.

    Returns ``(hkl (n, 3) int, angle_rad (n,), excitation_inv_a (n,))``. Systematically absent
    candidates (when ``space_group`` is given) and ``000`` are never chosen (angle = inf).
    Compiled (:func:`_assign_rays`): the numpy version's ~30 small-array calls were most of
    its time.
    """
    a = np.ascontiguousarray(a_matrix, dtype=float)
    a_inv = np.empty((3, 3))
    if a.shape != (3, 3) or not _inverse3(a, a_inv):
        raise np.linalg.LinAlgError("Singular matrix")
    dirs = np.ascontiguousarray(ray_dirs, dtype=float).reshape(-1, 3)
    n = dirs.shape[0]
    hkl = np.empty((n, 3), dtype=np.int32)
    ang = np.empty(n)
    exc = np.empty(n)
    cen, rot, tran = _absences(space_group)
    max_exc = float(max_excitation_inv_a)
    _assign_rays(a, a_inv, dirs, np.asarray(beam.s0_inv_a, dtype=float), 1.0 / beam.wavelength_a,
                 _candidate_offsets(max_exc), max_exc, cen, rot, tran, space_group is not None,
                 hkl, ang, exc)
    return hkl, ang, exc


class _SpotRays:
    """A frame's spots with their panel matrices and observed ray directions at the detector
    shift of the current cycle, recomputed only when the shift changes (never, unless the
    distance or the lateral shift is refined)."""

    def __init__(self, detector: Detector, panel: np.ndarray, fs_px: np.ndarray,
                 ss_px: np.ndarray) -> None:
        self.detector = detector
        self.panel = panel
        self.fs_px = fs_px
        self.ss_px = ss_px
        self._shift: tuple[float, float, float] | None = None

    def at(self, shift_mm: float, shift_xy_mm: tuple[float, float] | np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(d_inv, row, dirs)``: spot ``i``'s inverse panel matrix is ``d_inv[row[i]]``."""
        shift = (float(shift_mm), float(shift_xy_mm[0]), float(shift_xy_mm[1]))
        if shift != self._shift:
            if any(shift):  # as _spot_matrices: one moved matrix per spot
                d, self.d_inv = _spot_matrices(self.detector, self.panel, shift[0], shift[1:])
                self.row = np.arange(self.panel.size)
            else:  # the detector's own tables, indexed by panel
                m = detector_tables(self.detector).matrices
                d, self.d_inv, self.row = m.d, m.d_inv, self.panel
            self.dirs = np.empty((self.panel.size, 3))
            _ray_dirs_into(d, self.row, self.fs_px, self.ss_px, self.dirs)
            self._shift = shift
        return self.d_inv, self.row, self.dirs


def index_on_lattice(
    crystal: Crystal,
    panel: np.ndarray,
    fs_px: np.ndarray,
    ss_px: np.ndarray,
    detector: Detector,
    beam: Beam,
    *,
    threshold_px: float,
    max_excitation_inv_a: float,
    distance_shift_mm: float = 0.0,
    detector_shift_mm: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miller indices of the spots that lie on ``crystal``'s lattice, without refining it.

    A spot is indexed when the prediction of its best index (:func:`assign_hkl`) falls within
    ``threshold_px`` of it, the test :func:`refine_still` applies in its last cycle; the detector
    is moved as in :class:`RefineResult`. Returns ``(hkl (n, 3) int32, indexed (n,) bool,
    residuals_px (n, 2))``, zeros and NaN where a spot is not indexed.
    """
    rays = _SpotRays(detector, np.ascontiguousarray(panel, dtype=np.int64),
                     np.ascontiguousarray(fs_px, dtype=float),
                     np.ascontiguousarray(ss_px, dtype=float))
    asg = _assign(crystal.a_matrix, crystal.space_group, rays, beam, max_excitation_inv_a,
                  distance_shift_mm, detector_shift_mm)
    indexed = np.isfinite(asg.dist_px) & (asg.dist_px <= threshold_px)
    return (np.where(indexed[:, None], asg.hkl, 0).astype(np.int32), indexed,
            np.where(indexed[:, None], asg.offset_px, np.nan))


@njit(cache=True, nogil=True, error_model="numpy")
def _rotation_into(vx, vy, vz, r):  # pragma: no cover - compiled
    """``r`` = :func:`rotation_matrix` of the rotation vector ``(vx, vy, vz)``."""
    theta = math.sqrt(vx * vx + vy * vy + vz * vz)
    if theta < 1e-12:  # first order: I + [v]x
        s, c1, x, y, z = 1.0, 0.0, vx, vy, vz
        c = 1.0
    else:
        s, c = math.sin(theta), math.cos(theta)
        c1 = 1.0 - c
        x, y, z = vx / theta, vy / theta, vz / theta
    r[0, 0] = c + c1 * x * x
    r[0, 1] = c1 * x * y - s * z
    r[0, 2] = c1 * x * z + s * y
    r[1, 0] = c1 * y * x + s * z
    r[1, 1] = c + c1 * y * y
    r[1, 2] = c1 * y * z - s * x
    r[2, 0] = c1 * z * x - s * y
    r[2, 1] = c1 * z * y + s * x
    r[2, 2] = c + c1 * z * z


@njit(cache=True, nogil=True, error_model="numpy")
def _product_into(p, q, out):  # pragma: no cover - compiled
    """``out = p @ q`` (3×3), each entry summed from 0 in the order of the inner index."""
    for i in range(3):
        for k in range(3):
            acc = 0.0
            for m in range(3):
                acc += p[i, m] * q[m, k]
            out[i, k] = acc


@njit(cache=True, nogil=True, error_model="numpy")
def _still_residuals(a, h, s0, d_inv, t, fs_o, ss_o, k0, exc_scale, out):  # pragma: no cover
    """Residuals of :func:`refine_still` for each of ``m`` models: ``a`` (m, 3, 3) orientation
    matrices, ``t`` (m, 3) detector shifts from the one ``d_inv`` (n, 3, 3) describes. Row ``j``
    of ``out``: fs residuals, ss residuals, then (``exc_scale > 0``) the scaled excitation
    errors ``(|A h + s0| - 1/λ) exc_scale``.

    The ray ``k = A h + s0`` meets the spot's panel at ``v = d⁻¹ k`` (pixels ``v0/v2, v1/v2``);
    when the panels' origins move by ``t`` (``d' = d + t e3ᵀ``), Sherman-Morrison gives
    ``d'⁻¹ k = v - w v2 / (1 + w2)`` with ``w = d⁻¹ t``.
    """
    n = h.shape[0]
    for j in range(a.shape[0]):
        moved = t[j, 0] != 0.0 or t[j, 1] != 0.0 or t[j, 2] != 0.0
        for i in range(n):
            kx = a[j, 0, 0] * h[i, 0] + a[j, 0, 1] * h[i, 1] + a[j, 0, 2] * h[i, 2] + s0[0]
            ky = a[j, 1, 0] * h[i, 0] + a[j, 1, 1] * h[i, 1] + a[j, 1, 2] * h[i, 2] + s0[1]
            kz = a[j, 2, 0] * h[i, 0] + a[j, 2, 1] * h[i, 1] + a[j, 2, 2] * h[i, 2] + s0[2]
            v0 = d_inv[i, 0, 0] * kx + d_inv[i, 0, 1] * ky + d_inv[i, 0, 2] * kz
            v1 = d_inv[i, 1, 0] * kx + d_inv[i, 1, 1] * ky + d_inv[i, 1, 2] * kz
            v2 = d_inv[i, 2, 0] * kx + d_inv[i, 2, 1] * ky + d_inv[i, 2, 2] * kz
            if moved:
                w0 = d_inv[i, 0, 0] * t[j, 0] + d_inv[i, 0, 1] * t[j, 1] + d_inv[i, 0, 2] * t[j, 2]
                w1 = d_inv[i, 1, 0] * t[j, 0] + d_inv[i, 1, 1] * t[j, 1] + d_inv[i, 1, 2] * t[j, 2]
                w2 = d_inv[i, 2, 0] * t[j, 0] + d_inv[i, 2, 1] * t[j, 1] + d_inv[i, 2, 2] * t[j, 2]
                f = v2 / (1.0 + w2)
                v0 -= w0 * f
                v1 -= w1 * f
                v2 -= w2 * f
            out[j, i] = v0 / v2 - fs_o[i]
            out[j, n + i] = v1 / v2 - ss_o[i]
            if exc_scale > 0.0:
                out[j, 2 * n + i] = (math.sqrt(kx * kx + ky * ky + kz * kz) - k0) * exc_scale


@njit(cache=True, nogil=True, error_model="numpy")
def _reciprocal_basis_of(p, b):  # pragma: no cover - compiled
    """``b`` = :func:`~sfxflow.models.reciprocal_basis` of the cell ``p`` (a, b, c in Å,
    angles in degrees): gemmi's orthogonalisation (a along x, b in the xy plane) inverted, its
    exact cosines of right angles included."""
    ca = 0.0 if p[3] == 90.0 else math.cos(math.radians(p[3]))
    cb = 0.0 if p[4] == 90.0 else math.cos(math.radians(p[4]))
    cg = 0.0 if p[5] == 90.0 else math.cos(math.radians(p[5]))
    sb = 1.0 if p[4] == 90.0 else math.sin(math.radians(p[4]))
    sg = 1.0 if p[5] == 90.0 else math.sin(math.radians(p[5]))
    car = (cb * cg - ca) / (sb * sg)  # cos(alpha*)
    sar = math.sqrt(1.0 - car * car)
    o11 = p[1] * sg
    o22 = p[2] * sb * sar
    # columns of B are the rows of the upper-triangular fractionalisation matrix
    b[0, 0] = 1.0 / p[0]
    b[1, 0] = -cg / (sg * p[0])
    b[2, 0] = -(cg * car * sb + cb * sg) / (sar * sb * sg * p[0])
    b[0, 1] = 0.0
    b[1, 1] = 1.0 / o11
    b[2, 1] = car / (sar * sg * p[1])
    b[0, 2] = 0.0
    b[1, 2] = 0.0
    b[2, 2] = 1.0 / o22


@njit(cache=True, nogil=True, error_model="numpy")
def _model_workspace():  # pragma: no cover - compiled
    """The buffers of :func:`_model_residuals`: the cell parameters, ``B``, the rotation
    vector, ``R`` and ``U0 B`` of the last evaluation (NaN: none yet), ``A`` and the shift."""
    return (np.full(6, np.nan), np.empty((3, 3)), np.full(3, np.nan), np.empty((3, 3)),
            np.empty((3, 3)), np.empty((1, 3, 3)), np.zeros((1, 3)))


@njit(cache=True, nogil=True, error_model="numpy")
def _same(v, w):  # pragma: no cover - compiled
    """``v`` and ``w`` are the same float (signed zeros told apart; NaN never the same)."""
    return v == w and (v != 0.0 or math.copysign(1.0, v) == math.copysign(1.0, w))


@njit(cache=True, nogil=True, error_model="numpy")
def _model_residuals(x, model, out, ws):  # pragma: no cover - compiled
    """Residuals of :func:`_still_residuals` at parameters ``x`` (rotation vector, free cell
    parameters, distance and lateral shifts) of the still ``model`` (see :func:`_fit_still`).

    ``ws`` (:func:`_model_workspace`) keeps ``B`` and ``R`` of the last call: a Jacobian
    column moves either the rotation or the cell, so one of them is reused, computed as
    before to the bit; with the buffers (no allocation per call) this took a quarter off a
    fit."""
    u0, cell6, cell_idx, i_dist, i_xy, sh0, xy0, h, s0, d_inv, fs_o, ss_o, k0, exc_scale = model
    p, b, rv, r, ub, a, t = ws
    new_b = False
    for i in range(6):
        v = x[cell_idx[i]] if cell_idx[i] >= 0 else cell6[i]
        if not _same(v, p[i]):
            p[i] = v
            new_b = True
    if new_b:
        _reciprocal_basis_of(p, b)
        _product_into(u0, b, ub)
    new_r = False
    for i in range(3):
        if not _same(x[i], rv[i]):
            rv[i] = x[i]
            new_r = True
    if new_r:
        _rotation_into(rv[0], rv[1], rv[2], r)
    if new_r or new_b:
        _product_into(r, ub, a[0])
    t[0, 0] = x[i_xy] - xy0[0] if i_xy >= 0 else 0.0
    t[0, 1] = x[i_xy + 1] - xy0[1] if i_xy >= 0 else 0.0
    t[0, 2] = x[i_dist] - sh0 if i_dist >= 0 else 0.0
    _still_residuals(a, h, s0, d_inv, t, fs_o, ss_o, k0, exc_scale, out.reshape(1, -1))


@njit(cache=True, nogil=True, error_model="numpy")
def _soft_l1_cost(f, f_scale):  # pragma: no cover - compiled
    """scipy's ``loss='soft_l1'`` cost: ``f_scale² Σ (sqrt(1 + (f/f_scale)²) - 1)``."""
    c = 0.0
    for r in range(f.size):
        z = f[r] / f_scale
        c += math.sqrt(1.0 + z * z) - 1.0
    c *= f_scale * f_scale
    return c if math.isfinite(c) else math.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _solve_small(a, y, out):  # pragma: no cover - compiled
    """``out = a⁻¹ y`` by Gaussian elimination with partial pivoting (a few parameters),
    overwriting ``a`` and ``y``; False when ``a`` is singular (an exactly zero pivot, as
    LAPACK's)."""
    n = y.size
    for c in range(n):
        piv = c
        for r in range(c + 1, n):
            if abs(a[r, c]) > abs(a[piv, c]):
                piv = r
        if a[piv, c] == 0.0:
            return False
        if piv != c:
            for k in range(n):
                a[c, k], a[piv, k] = a[piv, k], a[c, k]
            y[c], y[piv] = y[piv], y[c]
        for r in range(c + 1, n):
            f = a[r, c] / a[c, c]
            for k in range(c, n):
                a[r, k] -= f * a[c, k]
            y[r] -= f * y[c]
    for c in range(n - 1, -1, -1):
        s = y[c]
        for k in range(c + 1, n):
            s -= a[c, k] * out[k]
        out[c] = s / a[c, c]
    return True


_FD_STEP = math.sqrt(np.finfo(float).eps)  # scipy's relative step for '2-point' differences


@njit(cache=True, nogil=True, error_model="numpy")
def _normal_equations(x, f, lower, upper, f_scale, model, jac, a, g, xj, fj,
                      ws):  # pragma: no cover - compiled
    """Forward-difference Jacobian ``jac`` (scipy's ``'2-point'`` steps: relative
    ``sqrt(eps)``, signed like ``x``, reversed where a bound is in the way) and the reweighted
    normal equations ``a = Jᵀ W J``, ``g = Jᵀ W f`` with ``w = (1 + (f/f_scale)²)^-1/2``;
    ``xj``, ``fj`` and ``ws`` are work space."""
    n_p, n_res = x.size, f.size
    xj[:] = x
    for j in range(n_p):
        sign = 1.0 if x[j] >= 0.0 else -1.0
        step = _FD_STEP * sign * max(1.0, abs(x[j]))
        if x[j] + step > upper[j] or x[j] + step < lower[j]:
            step = -step
        xj[j] = x[j] + step
        dx = xj[j] - x[j]
        _model_residuals(xj, model, fj, ws)
        xj[j] = x[j]
        for r in range(n_res):
            jac[r, j] = (fj[r] - f[r]) / dx
    a[:, :] = 0.0
    g[:] = 0.0
    for r in range(n_res):
        z = f[r] / f_scale
        w = 1.0 / math.sqrt(1.0 + z * z)
        for i in range(n_p):
            jw = jac[r, i] * w
            g[i] += jw * f[r]
            for k in range(n_p):
                a[i, k] += jw * jac[r, k]


@njit(cache=True, nogil=True, error_model="numpy")
def _clip(v, lo, hi):  # pragma: no cover - compiled
    """``np.minimum(np.maximum(v, lo), hi)`` of one value (NaN stays NaN)."""
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


@njit(cache=True, nogil=True, error_model="numpy")
def _all_finite(a):  # pragma: no cover - compiled
    for v in a.flat:
        if not math.isfinite(v):
            return False
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _max_abs(g):  # pragma: no cover - compiled
    """``np.max(np.abs(g))`` (NaN if any is NaN)."""
    m = -math.inf
    for v in g:
        if v != v:
            return math.nan
        m = max(m, abs(v))
    return m


@njit(cache=True, nogil=True, error_model="numpy")
def _fit_still(x0, lower, upper, f_scale, model, n_res, max_iterations, ftol, xtol,
               gtol):  # pragma: no cover - compiled
    """Minimise the soft-L1 cost of the still ``model``'s residuals (as
    ``scipy.optimize.least_squares`` with ``loss='soft_l1'``, ``x_scale='jac'``, box bounds) by
    Levenberg-Marquardt on the iteratively reweighted normal equations: damping proportional to
    their diagonal (scale invariance, like ``x_scale='jac'``), steps clipped into the bounds,
    scipy's ``ftol``/``xtol``/``gtol`` stopping tests. The stationary points are scipy's; one
    compiled call per fit (the numpy version's per-iteration Python calls were most of a
    still's refinement time). Returns ``(x, f(x))``.

    ``model`` is ``(u0, cell6, cell_idx, i_dist, i_xy, sh0, xy0, h, s0, d_inv, fs_o, ss_o, k0,
    exc_scale)``: the starting ``U``, the cell's six parameters with ``cell_idx[i]`` the entry
    of ``x`` that sets parameter ``i`` (-1: fixed), where ``x`` holds the distance and the
    lateral shift (-1: not refined) and their starting values, then the data of
    :func:`_still_residuals`.
    """
    n_p = x0.size
    ws = _model_workspace()
    # every buffer once per fit (a dozen small arrays per iteration were a fifth of a fit);
    # the arithmetic is the numpy expressions' it replaced, element by element
    x = np.empty(n_p)
    x_new = np.empty(n_p)
    for i in range(n_p):
        x[i] = _clip(x0[i], lower[i], upper[i])
    f = np.empty(n_res)
    f_new = np.empty(n_res)
    _model_residuals(x, model, f, ws)
    cost = _soft_l1_cost(f, f_scale)
    if not math.isfinite(cost):
        return x, f
    lam = 1e-3
    jac = np.empty((n_res, n_p))
    a = np.empty((n_p, n_p))
    g = np.empty(n_p)
    dx = np.empty(n_p)
    damped = np.empty((n_p, n_p))
    rhs = np.empty(n_p)
    diag = np.empty(n_p)
    xj = np.empty(n_p)
    fj = np.empty(n_res)
    for _ in range(max_iterations):
        _normal_equations(x, f, lower, upper, f_scale, model, jac, a, g, xj, fj, ws)
        if not _all_finite(a) or _max_abs(g) < gtol:
            break
        d_max = -math.inf
        for i in range(n_p):
            diag[i] = a[i, i]
            d_max = max(d_max, diag[i])
        floor = 1e-12 * max(d_max, 1e-300)
        for i in range(n_p):
            diag[i] = max(diag[i], floor)
        accepted = False
        cost_new = cost
        while lam <= 1e12:
            damped[:, :] = a
            for i in range(n_p):
                damped[i, i] += lam * diag[i]
                rhs[i] = -g[i]
            if not _solve_small(damped, rhs, dx):
                lam *= 10.0
                continue
            for i in range(n_p):
                x_new[i] = _clip(x[i] + dx[i], lower[i], upper[i])
            _model_residuals(x_new, model, f_new, ws)
            cost_new = _soft_l1_cost(f_new, f_scale)
            if cost_new < cost:
                accepted = True
                lam = max(lam * 0.1, 1e-12)
                break
            lam *= 10.0
        if not accepted:
            break
        step = 0.0
        for i in range(n_p):
            step += (x_new[i] - x[i]) ** 2
        step = math.sqrt(step)
        decrease = cost - cost_new
        x, x_new = x_new, x
        f, f_new = f_new, f
        cost = cost_new
        norm = 0.0
        for i in range(n_p):
            norm += x[i] * x[i]
        if decrease < ftol * cost or step < xtol * (xtol + math.sqrt(norm)):
            break
    return x, f


@njit(cache=True, nogil=True, error_model="numpy")
def _fit_spots(x0, lower, upper, f_scale, u0, cell6, cell_idx, i_dist, i_xy, sh0, xy0, hkl,
               sel, s0, d_inv, row, fs, ss, k0, exc_scale, n_cell,
               max_cell_change):  # pragma: no cover - compiled
    """:func:`_fit_still` on the spots ``sel`` (their indices ``hkl``, panels ``d_inv[row]``,
    positions ``fs, ss``), gathered here, with the starting cell (``x0[3 : 3 + n_cell]``)
    restored when any free cell value moved by more than ``max_cell_change`` (relative) or
    is not finite. Returns ``(x, f(x), h)``, ``h`` the spots' indices as floats."""
    n = sel.size
    h = np.empty((n, 3))
    d_sel = np.empty((n, 3, 3))
    fs_sel = np.empty(n)
    ss_sel = np.empty(n)
    for j in range(n):
        i = sel[j]
        for c in range(3):
            h[j, c] = hkl[i, c]
        d_sel[j] = d_inv[row[i]]
        fs_sel[j] = fs[i]
        ss_sel[j] = ss[i]
    model = (u0, cell6, cell_idx, i_dist, i_xy, sh0, xy0, h, s0, d_sel, fs_sel, ss_sel, k0,
             exc_scale)
    n_res = (3 if exc_scale > 0 else 2) * n
    x, f = _fit_still(x0, lower, upper, f_scale, model, n_res, 100, 1e-8, 1e-8, 1e-8)
    runaway = False
    for j in range(3, 3 + n_cell):
        scale = abs(x0[j])
        if scale < 1e-9:  # np.maximum(|v|, 1e-9), NaN kept
            scale = 1e-9
        rel = abs(x[j] - x0[j]) / scale
        if not math.isfinite(rel) or rel > max_cell_change:
            runaway = True
    if runaway:
        for j in range(3, 3 + n_cell):
            x[j] = x0[j]
    return x, f, h


@njit(cache=True, nogil=True, error_model="numpy")
def _residual_sigmas(f, k, k0, with_exc):  # pragma: no cover - compiled
    """Robust standard deviations (1.4826 × the median absolute value) of a fit's residuals
    ``f`` of ``n`` spots: of the spots' distances from their predictions, then (``with_exc``,
    else NaN) of their excitation errors ``|k| - k0`` (``k`` (n, 3) the rays ``A h + s0``) and
    of the fs and ss residuals together."""
    n = k.shape[0]
    dist = np.empty(n)
    for i in range(n):
        dist[i] = math.hypot(f[i], f[n + i])
    sigma = 1.4826 * median_in_place(dist)
    if not with_exc:
        return sigma, math.nan, math.nan
    exc = np.empty(n)
    both = np.empty(2 * n)
    for i in range(n):
        exc[i] = abs(math.sqrt(k[i, 0] * k[i, 0] + k[i, 1] * k[i, 1] + k[i, 2] * k[i, 2]) - k0)
        both[i] = abs(f[i])
        both[n + i] = abs(f[n + i])
    return sigma, 1.4826 * median_in_place(exc), 1.4826 * median_in_place(both)


_CELL_INDEX: dict[object, np.ndarray] = {}  # _cell_map's index per parameterisation


def _cell_map(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup):
    """The free cell parameters of :func:`cell_parameters` as the compiled fit sees them:
    ``(values, build, cell6, index)``, ``cell6`` the six parameters ``build(values)`` gives
    and ``index[i]`` which free value sets parameter ``i`` (-1: fixed by the lattice system),
    found by moving each free value in turn, once per parameterisation (it depends on
    nothing else; finding it took 4 cell builds, ~20 µs, every cycle)."""
    values, build, key = _cell_layout(cell, space_group)
    cell6 = np.array(build(values).parameters, dtype=float)
    index = _CELL_INDEX.get(key)
    if index is None:
        index = np.full(6, -1, dtype=np.int64)
        for j in range(values.size):
            moved = values.copy()
            moved[j] += 1.0
            index[np.abs(np.array(build(moved).parameters) - cell6) > 1e-9] = j
        if np.all(np.isfinite(values)):
            index.flags.writeable = False
            _CELL_INDEX[key] = index
    return values, build, cell6, index


@dataclass(frozen=True)
class _Assignment:
    """One cycle's Miller indices, predicted minus observed ``(fs, ss)`` and distances from
    the spots (inf where a spot has no admissible index), and the panel matrices used (spot
    ``i``'s is ``d_inv[row[i]]``)."""

    hkl: np.ndarray
    offset_px: np.ndarray  # (n, 2)
    dist_px: np.ndarray
    d_inv: np.ndarray
    row: np.ndarray


def _assign(a_matrix: np.ndarray, space_group: gemmi.SpaceGroup | None, rays: _SpotRays,
            beam: Beam, max_excitation_inv_a: float, shift_mm: float,
            shift_xy_mm: tuple[float, float] | np.ndarray) -> _Assignment:
    """Best index of every spot along its ray (:func:`assign_hkl`) and its prediction, the
    detector moved as in :class:`RefineResult`; one compiled call (:func:`_assign_spots`)."""
    d_inv, row, dirs = rays.at(shift_mm, shift_xy_mm)
    n = row.size
    hkl = np.empty((n, 3), dtype=np.int32)
    offset = np.empty((n, 2))
    dist = np.empty(n)
    cen, rot, tran = _absences(space_group)
    max_exc = float(max_excitation_inv_a)
    if not _assign_spots(np.ascontiguousarray(a_matrix, dtype=float), dirs, d_inv, row,
                         rays.fs_px, rays.ss_px, np.asarray(beam.s0_inv_a, dtype=float),
                         1.0 / beam.wavelength_a, _candidate_offsets(max_exc), max_exc, cen,
                         rot, tran, space_group is not None, hkl, offset, dist):
        raise np.linalg.LinAlgError("Singular matrix")
    return _Assignment(hkl, offset, dist, d_inv, row)




@njit(cache=True, nogil=True, error_model="numpy")
def _blas_rays_into(a, h, s0, out):  # pragma: no cover - compiled
    """``out = h @ a.T + s0`` (``h`` (n, 3)) as numpy rounds it."""
    for j in range(h.shape[0]):
        for c in range(3):
            q = fma(h[j, 2], a[c, 2], fma(h[j, 1], a[c, 1], h[j, 0] * a[c, 0]))
            out[j, c] = q + s0[c]


@njit(cache=True, nogil=True, error_model="numpy")
def _numpy_rotation_into(vx, vy, vz, r):  # pragma: no cover - compiled
    """``r`` = :func:`rotation_matrix` of ``(vx, vy, vz)`` to the bit: its ``v @ v`` and
    ``k @ k`` as numpy rounds them, then ``(I + sin k) + (1 - cos) k²`` entry by entry."""
    theta = math.sqrt(fma(vz, vz, fma(vy, vy, vx * vx)))
    k = np.empty((3, 3))
    if theta < 1e-12:
        x, y, z = vx, vy, vz
    else:
        x, y, z = vx / theta, vy / theta, vz / theta
    k[0, 0], k[0, 1], k[0, 2] = 0.0, -z, y
    k[1, 0], k[1, 1], k[1, 2] = z, 0.0, -x
    k[2, 0], k[2, 1], k[2, 2] = -y, x, 0.0
    if theta < 1e-12:
        for i in range(3):
            for j in range(3):
                r[i, j] = (1.0 if i == j else 0.0) + k[i, j]
        return
    kk = np.empty((3, 3))
    product3_into(k, k, kk)
    s, c1 = math.sin(theta), 1.0 - math.cos(theta)
    for i in range(3):
        for j in range(3):
            r[i, j] = ((1.0 if i == j else 0.0) + s * k[i, j]) + c1 * kk[i, j]


@njit(cache=True, nogil=True, error_model="numpy")
def _gemmi_basis_into(p, b):  # pragma: no cover - compiled
    """``b`` = :func:`~sfxflow.models.reciprocal_basis` of the cell ``p`` to the bit: gemmi's
    own expressions (``UnitCell::calculate_properties``; :func:`_reciprocal_basis_of`, the
    fit's, rounds ``cos(alpha*)`` another way and differs in the last bits for general
    angles)."""
    ca = 0.0 if p[3] == 90.0 else math.cos(math.radians(p[3]))
    cb = 0.0 if p[4] == 90.0 else math.cos(math.radians(p[4]))
    cg = 0.0 if p[5] == 90.0 else math.cos(math.radians(p[5]))
    sb = 1.0 if p[4] == 90.0 else math.sin(math.radians(p[4]))
    sg = 1.0 if p[5] == 90.0 else math.sin(math.radians(p[5]))
    car_sb = (cb * cg - ca) / sg
    car = car_sb / sb
    sar = math.sqrt(1.0 - car * car)
    b[0, 0] = 1.0 / p[0]
    b[1, 0] = -cg / (sg * p[0])
    b[2, 0] = -(cg * car_sb + cb * sg) / (sar * sb * sg * p[0])
    b[0, 1] = 0.0
    b[1, 1] = 1.0 / (p[1] * sg)
    b[2, 1] = car / (sar * sg * p[1])
    b[0, 2] = 0.0
    b[1, 2] = 0.0
    b[2, 2] = 1.0 / (p[2] * sb * sar)


@njit(cache=True, nogil=True, error_model="numpy")
def _block_sum(a, lo, n):  # pragma: no cover - compiled
    """numpy's sum of a block of ``n <= 128`` values ``a[lo : lo + n]``: eight running sums
    (one for short blocks), paired, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r = np.empty(8)
    for j in range(8):
        r[j] = a[lo + j]
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True, error_model="numpy")
def _pairwise_sum(a, n):  # pragma: no cover - compiled
    """numpy's pairwise sum of ``a[:n]`` (``np.sum``/``np.mean``'s rounding): blocks of at most
    128 (:func:`_block_sum`), halves split at a multiple of 8, left plus right. With a stack,
    not recursion: a cached recursive numba function crashed when loaded from the cache."""
    if n <= 128:
        return _block_sum(a, 0, n)
    todo = np.empty((200, 3), dtype=np.int64)  # (first, count, 1 = add the last two sums)
    sums = np.empty(100)
    n_todo, n_sums = 1, 0
    todo[0, 0], todo[0, 1], todo[0, 2] = 0, n, 0
    while n_todo:
        n_todo -= 1
        lo, m, add = todo[n_todo, 0], todo[n_todo, 1], todo[n_todo, 2]
        if add:
            sums[n_sums - 2] += sums[n_sums - 1]
            n_sums -= 1
        elif m <= 128:
            sums[n_sums] = _block_sum(a, lo, m)
            n_sums += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            todo[n_todo, 0], todo[n_todo, 1], todo[n_todo, 2] = 0, 0, 1
            todo[n_todo + 1, 0], todo[n_todo + 1, 1], todo[n_todo + 1, 2] = lo + m2, m - m2, 0
            todo[n_todo + 2, 0], todo[n_todo + 2, 1], todo[n_todo + 2, 2] = lo, m2, 0
            n_todo += 3
    return sums[0]


@njit(cache=True, nogil=True, error_model="numpy")
def _moved_rays(d_tab, d_inv_tab, panel, fs, ss, sh, sx, sy):  # pragma: no cover - compiled
    """``(d_inv, row, dirs)`` of :class:`_SpotRays` with the detector moved by ``(sx, sy)``
    across and ``sh`` along the beam: the tables by panel when unmoved, else one moved matrix
    per spot (inverted by cofactors; LAPACK's inverse differs in the last bits)."""
    n = panel.size
    dirs = np.empty((n, 3))
    d_inv = np.empty((n, 3, 3))
    row = np.arange(n)
    if sh == 0.0 and sx == 0.0 and sy == 0.0:  # the tables' own inverses, gathered per spot
        for i in range(n):
            d_inv[i] = d_inv_tab[panel[i]]
        _ray_dirs_into(d_tab, panel, fs, ss, dirs)
        return d_inv, row, dirs
    d = np.empty((n, 3, 3))
    for i in range(n):
        d[i] = d_tab[panel[i]]
        d[i, 0, 2] += sx
        d[i, 1, 2] += sy
        d[i, 2, 2] += sh
        if not _inverse3(d[i], d_inv[i]):
            d_inv[i] = np.nan
    _ray_dirs_into(d, row, fs, ss, dirs)
    return d_inv, row, dirs


@njit(cache=True, nogil=True, error_model="numpy")
def _refine_cycles(a, u, cell6, index, vals, refine_dist, refine_xy, min_spots_xy, lim_xy,
                   n_cycles, outlier_px, outlier_nsigma, min_outlier_px, exc_weight, max_exc,
                   max_cell_change, d_tab, d_inv_tab, panel, fs, ss, s0, k0, offsets, cen, rot,
                   tran, check_absent, hkl, offset, exc, mask, a_out,
                   state):  # pragma: no cover - compiled
    """:func:`refine_still`'s cycles and result in one compiled call: assign (:func:`_assign_spots`),
    keep the spots within the threshold, fit them (:func:`_fit_spots`), update ``U``, the free
    cell values ``vals`` (``cell6[i] = vals[index[i]]`` where ``index[i] >= 0``) and the shifts,
    rebuild ``A = U B`` and reweight (:func:`_residual_sigmas`), ``n_cycles`` times, then a last
    assignment. Fills the result's ``hkl``, ``offset`` (residuals), ``exc``, ``mask``, ``a_out``
    and ``state`` (threshold, rmsd, distance shift, lateral shift, number of fits); False when ``A`` turns
    singular. The Python this replaced between the compiled steps (~25 µs a cycle) was most of
    a call left after the steps themselves."""
    n = panel.size
    n_cell = vals.size
    a = a.copy()
    u = u.copy()
    sh, sx, sy = 0.0, 0.0, 0.0
    d_inv, row, dirs = _moved_rays(d_tab, d_inv_tab, panel, fs, ss, sh, sx, sy)
    exc_scale = exc_weight / max_exc
    threshold = outlier_px
    dist = np.empty(n)
    cell_idx = np.full(6, -1, dtype=np.int64)
    for i in range(6):
        if index[i] >= 0:
            cell_idx[i] = index[i] + 3
    r = np.empty((3, 3))
    b = np.empty((3, 3))
    ub = np.empty((3, 3))
    xy0 = np.zeros(2)
    n_sel = 0
    n_fits = 0
    for cycle in range(n_cycles + 1):
        if not _assign_spots(a, dirs, d_inv, row, fs, ss, s0, k0, offsets, max_exc, cen, rot,
                             tran, check_absent, hkl, offset, dist):
            return False
        n_sel = 0
        for i in range(n):
            mask[i] = dist[i] <= threshold
            if mask[i]:
                n_sel += 1
        if cycle == n_cycles or n_sel < 4:
            break
        sel = np.flatnonzero(mask)
        use_xy = refine_xy and n_sel >= min_spots_xy
        n_free = 3 + n_cell + int(refine_dist) + 2 * int(use_xy)
        if 2 * n_sel < n_free + 2:
            break
        i_dist = 3 + n_cell
        i_xy = i_dist + int(refine_dist)
        x0 = np.zeros(n_free)
        lower = np.full(n_free, -np.inf)
        upper = np.full(n_free, np.inf)
        x0[3 : 3 + n_cell] = vals
        if refine_dist:
            x0[i_dist] = sh
        xy0[0], xy0[1] = sx, sy
        if use_xy:
            for c in range(2):
                x0[i_xy + c] = min(max(xy0[c], -0.999 * lim_xy), 0.999 * lim_xy)
                lower[i_xy + c] = -lim_xy
                upper[i_xy + c] = lim_xy
        n_fits += 1
        x, f_fit, h_sel = _fit_spots(
            x0, lower, upper, max(0.5, threshold / 3.0), u, cell6, cell_idx,
            i_dist if refine_dist else -1, i_xy if use_xy else -1, sh, xy0, hkl, sel, s0,
            d_inv, row, fs, ss, k0, exc_scale, n_cell, max_cell_change)
        if n_cell:
            vals[:] = x[3 : 3 + n_cell]
            for i in range(6):
                if index[i] >= 0:
                    cell6[i] = vals[index[i]]
        _numpy_rotation_into(x[0], x[1], x[2], r)
        product3_into(r, u, ub)
        u[:, :] = ub
        moved = False
        if refine_dist and x[i_dist] != sh:
            sh, moved = x[i_dist], True
        if use_xy and (x[i_xy] != sx or x[i_xy + 1] != sy):
            sx, sy, moved = x[i_xy], x[i_xy + 1], True
        if moved:
            d_inv, row, dirs = _moved_rays(d_tab, d_inv_tab, panel, fs, ss, sh, sx, sy)
        _gemmi_basis_into(cell6, b)
        product3_into(u, b, a)
        k = np.empty((n_sel, 3))
        _blas_rays_into(a, h_sel, s0, k)
        sigma, exc_sigma, px_sigma = _residual_sigmas(f_fit, k, k0, exc_weight > 0)
        if exc_weight > 0 and exc_sigma > 0 and px_sigma > 0:
            # weight the excitation residuals by their observed scatter relative to the pixel
            # residuals' (both robust): each kind then counts by its own precision
            exc_scale = exc_weight * px_sigma / exc_sigma
        threshold = min(outlier_px, max(min_outlier_px, outlier_nsigma * sigma))
    if n_sel < 4:
        mask[:] = False
    sq_px2 = np.empty(n)
    h_one = np.empty((1, 3))
    k_one = np.empty((1, 3))
    n_in = 0
    for i in range(n):
        if mask[i]:
            for c in range(3):
                h_one[0, c] = hkl[i, c]
            _blas_rays_into(a, h_one, s0, k_one)
            kx, ky, kz = k_one[0, 0], k_one[0, 1], k_one[0, 2]
            exc[i] = math.sqrt(kx * kx + ky * ky + kz * kz) - k0
            sq_px2[n_in] = offset[i, 0] * offset[i, 0] + offset[i, 1] * offset[i, 1]
            n_in += 1
        else:
            hkl[i, 0] = hkl[i, 1] = hkl[i, 2] = 0
            offset[i, 0] = offset[i, 1] = math.nan
            exc[i] = math.nan
    a_out[:, :] = a
    state[0] = threshold
    state[1] = math.sqrt(_pairwise_sum(sq_px2, n_in) / n_in) if n_in else math.inf
    state[2], state[3], state[4] = sh, sx, sy
    state[5] = n_fits
    return True


def refine_still(
    crystal: Crystal,
    panel: np.ndarray,
    fs_px: np.ndarray,
    ss_px: np.ndarray,
    detector: Detector,
    beam: Beam,
    params: RefineParams | None = None,
) -> RefineResult:
    """Refine a still's crystal (orientation, cell, detector shift) against spot centroids.

    Each cycle assigns every spot its best index along its ray (:func:`_assign`), keeps those
    predicted within the outlier threshold, fits the parameters to them (:func:`_fit_cycle`)
    and sets the next cycle's threshold and excitation weight from the fit's residuals
    (:func:`_reweight`); a last assignment decides which spots are indexed.

    Parameters
    ----------
    crystal : starting crystal; its space group sets the cell constraints.
    panel, fs_px, ss_px : all spots of the frame (pixel centres at +0.5); which ones are
        indexed is decided here, cycle by cycle.
    detector, beam : the frame's geometry.
    params : :class:`RefineParams`.

    Returns
    -------
    RefineResult
        With ``n_indexed == 0`` and ``rmsd_px = inf`` when fewer than 4 spots fit.

    Notes
    -----
    Cost: 0.17 ms CPU per call (median of the 597 calls ``index_lattices`` makes on 200
    simulated hits and the 18 real frames; 0.13/0.15/0.20/0.19 ms on 15/30/60/100-spot hits;
    0.33 ms with Python between the compiled steps, 1.12 ms when only the fit was
    compiled). The cycles and the result are one compiled call
    (:func:`_refine_cycles`); Python keeps the starting ``U`` (``crystal.u_matrix``, an SVD)
    and the cell object. ``A``'s updates are numpy's to the bit: the rotation, ``U B`` and
    the rays of the excitation sigma are summed by fused multiply-adds in numpy's BLAS order,
    ``B`` by gemmi's expressions, the rmsd by numpy's pairwise sum (a plain compiled product
    moved later fits by up to 1.8e-6 deg). So with the detector fixed (the default) every
    output is what the numpy steps gave, to the bit (all 1725 calls on 600 simulated hits and
    the 18 real frames); with the distance or the lateral shift refined, the moved panels'
    inverses (by cofactors, not LAPACK) differ in the last bits (orientations by up to 2.1e-7
    deg, distance 5e-7 mm; indices, masks and indexed counts the same on all 1725).
    Tried without gain: a register-blocked ``Jᵀ W J``.
    """
    params = params or RefineParams()
    panel = np.ascontiguousarray(panel, dtype=np.int64)
    n = panel.size
    cen, rot, tran = _absences(crystal.space_group)
    max_exc = float(params.max_excitation_inv_a)
    if params.refine_cell:
        values, build, cell6, index = _cell_map(crystal.cell, crystal.space_group)
        vals = np.array(values, dtype=float)
    else:
        cell6 = np.array(crystal.cell.parameters, dtype=float)
        index, vals = np.full(6, -1, dtype=np.int64), np.zeros(0)
    tables = detector_tables(detector).matrices
    hkl = np.empty((n, 3), dtype=np.int32)
    offset = np.empty((n, 2))
    exc = np.empty(n)
    mask = np.empty(n, dtype=bool)
    a_out = np.empty((3, 3))
    state = np.empty(6)  # threshold, rmsd, distance shift, lateral shift x, y, fits made
    ok = _refine_cycles(
        np.ascontiguousarray(crystal.a_matrix, dtype=float),
        np.ascontiguousarray(crystal.u_matrix, dtype=float), cell6.copy(), index, vals,
        params.refine_distance, params.refine_detector_shift, params.min_spots_detector_shift,
        float(params.max_detector_shift_mm), params.n_cycles, float(params.outlier_px),
        float(params.outlier_nsigma), float(params.min_outlier_px),
        float(params.excitation_weight), max_exc, float(params.max_cell_change), tables.d,
        tables.d_inv, panel, np.ascontiguousarray(fs_px, dtype=float),
        np.ascontiguousarray(ss_px, dtype=float), np.asarray(beam.s0_inv_a, dtype=float),
        1.0 / beam.wavelength_a, _candidate_offsets(max_exc), cen, rot, tran,
        crystal.space_group is not None, hkl, offset, exc, mask, a_out, state)
    if not ok:
        raise np.linalg.LinAlgError("Singular matrix")
    cell = build(vals) if params.refine_cell and state[5] > 0 else crystal.cell
    return RefineResult(
        crystal=Crystal(cell, crystal.space_group, a_out),
        miller_indices=hkl,
        indexed_mask=mask,
        residuals_px=offset,
        excitation_inv_a=exc,
        rmsd_px=float(state[1]),
        distance_shift_mm=float(state[2]),
        n_indexed=int(np.count_nonzero(mask)),
        detector_shift_mm=(float(state[3]), float(state[4])),
        outlier_threshold_px=float(state[0]),
    )
