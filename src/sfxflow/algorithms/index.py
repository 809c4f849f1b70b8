"""Indexing of serial-crystallography stills against a known unit cell.

Method (pair-vector matching with a known cell, the idea of TakeTwo / TORO):

1. Spots -> scattering vectors ``q`` (:func:`~sfxflow.algorithms.geometry.lab_to_q`).
2. For the target cell and space group a table of all symmetry-allowed Miller indices, sorted by
   ``|q|``, is built once and cached (:func:`target_table`). The first index of a pair is taken
   only among one representative per orbit of the point group's rotations (every other choice
   gives an equivalent orientation), the second among all indices.
3. Pairs of low-resolution spots are tried, fewest candidate pairs first. For each spot the
   candidate indices are those whose ``|q|`` matches within tolerance; for a pair, candidate
   ``(h1, h2)`` must also reproduce the observed angle between the two vectors. The angle
   tolerance grows with the expected excitation error, which tilts a low-resolution ``q`` the
   most. Each surviving pair gives a rotation (two-vector alignment).
4. Every rotation is scored, in one compiled step per pair with the angle test
   (:func:`_pair_top_candidates`, a few hundred rotations at a time), by the number of spots
   whose fractional Miller indices lie within ``hkl_tolerance`` of integers; the
   ``n_polish_per_pair`` best of the pair go on. The search stops early when a candidate
   indexes ``early_exit_fraction`` of the spots.
5. The best distinct candidates are polished (Kabsch fit of ``U B h`` to ``q``) and refined in
   pixel space by :func:`sfxflow.algorithms.refine.refine_still` (orientation, cell within the
   lattice constraints, optionally the distance), with Miller indices re-assigned along each
   observed ray and outliers rejected. A solution is accepted only if enough spots index, the
   fraction indexed is high enough, the RMSD is small, the refined cell is close to the
   target and the match is statistically significant (below); otherwise the frame fails with
   the reason.
6. The accepted crystal is put into a canonical setting (:func:`canonical_crystal`): among the
   orientations related by the rotations of the space group's point group (which predict the
   same spots), the one whose ``U`` is the smallest rotation from the identity (largest trace)
   is reported.

False solutions (:func:`solution_significance`). With a large cell (dense reciprocal lattice),
centroids a couple of pixels off and the freedom of orientation and cell, a wrong lattice can
place points near a dozen spots by chance: on the CrystFEL 5-HT2B stream, cells scaled by
0.9-1.1 "indexed" 2-5 of 70 frames in orientations 30-100 degrees from the true one, sharing
no Miller index with it. So the count of matched spots is tested against chance:

* a spot is *matched* when its refined prediction is within ``significance_tolerance_px`` and
  its lattice point within ``e`` of the Ewald sphere, where ``e`` follows the solution's own
  profile model: ``profile_nsigma`` widths of the profile refined from the excitation errors of
  the spots it indexes (:func:`profile_depth_inv_a`; a fixed ``significance_excitation_inv_a``
  when ``profile_acceptance`` is off). A small crystal's broad profile is accepted for what it
  is, and a false lattice that needs a broad profile to reach the spots pays for the depth;
* the probability that a random spot is matched by a lattice in a fixed orientation is the
  expected number of allowed lattice points in that acceptance region,
  ``p = (V / n_centring) * k² * Ω * 2 e`` (``V`` real-cell volume, ``k = 1/λ``, ``Ω`` the solid
  angle of the pixel tolerance disc seen from the sample, ``2 e`` the depth of the region
  across the sphere), see :func:`chance_match_probability`;
* the binomial tail ``P(X >= n_matched | n_spots, p)`` (:func:`binomial_log10_tail`) is the
  chance for one orientation; the search and refinement effectively try every distinguishable
  orientation, cell and detector shift, so it is multiplied by their number
  (:func:`log10_independent_trials`: the rotation group volume ``8 π²`` over ``|G|`` times a
  ball of the angular resolution ``δ = tolerance / |q|``, and the cell and shift ranges over
  the same resolution);
* a solution is accepted when the corrected probability is at most ``max_false_probability``.

Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import gemmi
import numpy as np
from numba import njit
from numba.extending import register_jitable

from sfxflow.algorithms.detector_tables import detector_tables
from sfxflow.algorithms.diffraction import _profile_sigma2
from sfxflow.algorithms.fused import fma, product3_into, product3_t_into
from sfxflow.algorithms.geometry import miller_indices, panel_point_mm
from sfxflow.algorithms.predict import PredictParams, ProfileModel, refine_profile
from sfxflow.algorithms.refine import (
    RefineParams,
    RefineResult,
    _pairwise_sum,
    assign_hkl,
    cell_parameters,
    index_on_lattice,
    predict_positions_px,
    refine_still,
)
from sfxflow.models import (
    Beam,
    Crystal,
    Detector,
    SpotTable,
    as_space_group,
    as_unit_cell,
    cell_of_basis,
    reciprocal_basis,
)
from sfxflow.settings import check_fields, section, setting

log = logging.getLogger(__name__)

#: the profile model a solution is judged by (:func:`profile_depth_inv_a`)
_PROFILE_PARAMS = PredictParams(detection_bias=1.0, min_spots=3)

__all__ = [
    "IndexParams",
    "IndexResult",
    "Significance",
    "TargetCell",
    "binomial_log10_tail",
    "canonical_crystal",
    "cell_symmetry_problem",
    "chance_match_probability",
    "index_lattices",
    "index_q_candidates",
    "index_spots",
    "log10_independent_trials",
    "misorientation_deg",
    "point_group_rotations",
    "reason_kind",
    "solution_significance",
    "spots_left_after",
    "target_table",
]


@dataclass(frozen=True)
class IndexParams:
    """Options of :func:`index_spots`.

    Parameters
    ----------
    q_tolerance_rel, q_tolerance_abs_inv_a : a spot may carry a Miller index whose ``|q|``
        differs by at most ``rel * |q| + abs`` (detector distance, wavelength and cell errors).
    angle_tolerance_deg : base tolerance on the angle between the two vectors of a pair.
    max_excitation_inv_a : largest expected distance of an observed reflection's lattice point
        from the Ewald sphere (Å⁻¹); widens the angle tolerance and sets the ray search in
        refinement.
    hkl_tolerance : a spot indexes a candidate rotation when all three fractional indices are
        within this of integers (scoring only; the final test is in pixels).
    n_pair_spots : the lowest-resolution spots (after ``max_d_a``) from which pairs are formed.
    max_pairs : pairs tried at most.
    max_pair_candidates : a pair whose ``n(h1) * n(h2)`` exceeds this is skipped.
    max_d_a : spots at lower resolution (larger d) than this are not used to form pairs
        (beam-stop shadows, diffuse scatter); they are still indexed.
    min_spots : fewer spots than this: not attempted.
    max_spots : find and refine the solution on the strongest this many spots only (by
        ``snr``, else ``intensity``); the other spots are then indexed on the refined lattice
        and count in ``fraction_indexed``. ``None``: all.
    min_indexed : least number of spots a solution must index.
    min_fraction_indexed : least fraction of the spots the solution was found on (the
        ``max_spots`` strongest) that it must index. Weaker spots do not count here: they
        include noise and other lattices, which say nothing against this one.
    max_rmsd_px : largest RMSD (px) of an accepted solution.
    max_median_excitation_inv_a : largest median distance (Å⁻¹) of the indexed lattice points
        from the Ewald sphere: only a bound beyond any real crystal's profile (a 100 nm crystal
        gives about 3e-4). Solutions are judged against their own profile model instead (see
        ``profile_acceptance``): a fixed bound of 3.5e-4 rejected small crystals and frames
        that CrystFEL indexes correctly (5-HT2B test stream: 44 frames indexed instead of 41,
        among them one XGANDALF indexes that the fixed bound rejected (median 4.75e-4); cells
        scaled by 0.9-1.1 still index none in a wrong orientation. The margin is thin: with 2.5
        widths a cell 3 % short indexes one frame 53 degrees off, with 3.5 too).
    early_exit_fraction : stop searching pairs once a candidate indexes this fraction.
    n_polish_per_pair : best raw rotations of each pair that are polished (Kabsch fit) and
        scored strictly.
    strict_tolerance_px : in the strict score, how far across its ray (in pixels) a spot may
        be from its lattice point's ray.
    n_solutions_refined : distinct best candidates refined before giving up.
    cell_length_tolerance : relative deviation of each refined cell length from the target
        accepted.
    cell_angle_tolerance_deg : deviation of each refined cell angle from the target accepted.
    significance_tolerance_px, significance_excitation_inv_a : a spot counts as matched in the
        false-solution test when its refined prediction is within this many pixels and its
        lattice point within this distance (Å⁻¹) of the Ewald sphere.
    max_false_probability : largest accepted probability (corrected for the number of
        distinguishable orientations, cells and shifts tried) that a lattice of the target cell
        matches as many spots by chance; 1 disables the test (see
        :func:`solution_significance`).
    profile_acceptance : judge a solution against its own profile model: a spot counts as
        matched in the false-solution test when its lattice point is within ``profile_nsigma``
        profile widths of the Ewald sphere (:func:`profile_depth_inv_a`), and the chance of a
        match is computed for that depth, instead of ``significance_excitation_inv_a``.
    profile_nsigma : see ``profile_acceptance``.
    max_crystals : lattices sought per frame (CrystFEL's ``--multi``): after one is found, the
        spots it does not explain are indexed again, until this many crystals or no further
        solution. 1 switches multi-lattice indexing off.
    further_min_indexed : least number of spots a lattice after the first must index
        (``None``: ``min_indexed``). Raised, it skips the search on the few false spots a
        single-crystal hit leaves (~0.2 ms a hit) at the price of small second lattices;
        ``sfxflow bench index --multi --further-min-indexed N`` prints both.
    refine : :class:`~sfxflow.algorithms.refine.RefineParams`.
    """

    q_tolerance_rel: float = setting(0.01, gt=0, le=0.5)
    q_tolerance_abs_inv_a: float = setting(0.0005, ge=0, le=0.1)
    angle_tolerance_deg: float = setting(1.0, gt=0, le=45)
    max_excitation_inv_a: float = setting(0.0008, ge=0, le=0.1)
    hkl_tolerance: float = setting(0.3, gt=0, lt=0.5)
    n_pair_spots: int = setting(12, ge=2, le=1000)
    max_pairs: int = setting(45, ge=1, le=1_000_000)
    max_pair_candidates: int = setting(1_000_000, ge=1, le=10**12)
    max_d_a: float = setting(100.0, gt=0, le=1e4)
    min_spots: int = setting(6, ge=0, le=100_000)
    max_spots: int | None = setting(100, ge=1, le=10_000_000)
    min_indexed: int = setting(8, ge=3, le=100_000)
    min_fraction_indexed: float = setting(0.3, ge=0, le=1)
    max_rmsd_px: float = setting(2.5, gt=0, le=1000)
    max_median_excitation_inv_a: float = setting(1e-3, gt=0, le=1)
    early_exit_fraction: float = setting(0.75, ge=0, le=1)
    n_polish_per_pair: int = setting(8, ge=1, le=1000)
    strict_tolerance_px: float = setting(3.0, gt=0, le=1000)
    n_solutions_refined: int = setting(4, ge=1, le=1000)
    cell_length_tolerance: float = setting(0.03, gt=0, le=1)
    cell_angle_tolerance_deg: float = setting(2.0, gt=0, le=90)
    significance_tolerance_px: float = setting(2.5, gt=0, le=1000)
    significance_excitation_inv_a: float = setting(0.001, gt=0, le=1)
    max_false_probability: float = setting(1e-3, gt=0, le=1)
    profile_acceptance: bool = setting(True)
    profile_nsigma: float = setting(3.0, gt=0, le=100)
    max_crystals: int = setting(4, ge=1, le=100)
    further_min_indexed: int | None = setting(None, ge=3, le=100_000)
    refine: RefineParams = section(RefineParams, flag_prefix="refine-")

    def __post_init__(self) -> None:
        check_fields(self)


def cell_symmetry_problem(cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup,
                          tolerance: float = 0.02) -> str:
    """Why ``cell`` cannot have the symmetry of ``space_group`` (empty string when it can).

    Every rotation of the point group must leave the cell's metric tensor unchanged, to within
    ``tolerance`` of ``|a_i| |a_j|`` per element (about 1 % in a length, 0.6 deg in an angle): a
    hexagonal cell with an orthorhombic space group would otherwise index nothing, silently.

    >>> cell_symmetry_problem(gemmi.UnitCell(93, 93, 130.5, 90, 90, 120),
    ...                       gemmi.SpaceGroup("P 61 2 2"))
    ''
    >>> cell_symmetry_problem(gemmi.UnitCell(93, 93, 130.5, 90, 90, 120),
    ...                       gemmi.SpaceGroup("P 21 21 21"))[:31]
    'cell 93 93 130.5 90 90 120 does'
    """
    a = np.asarray(cell.orth.mat, dtype=float)  # columns: the cell vectors (Å)
    g = a.T @ a
    scale = np.sqrt(np.outer(np.diag(g), np.diag(g)))
    for op in space_group.operations():
        r = np.asarray(op.rot, dtype=float) / gemmi.Op.DEN
        if np.any(np.abs(r.T @ g @ r - g) > tolerance * scale):
            params = " ".join(f"{x:g}" for x in cell.parameters)
            return (f"cell {params} does not have the symmetry of space group "
                    f"{space_group.hm} ({space_group.crystal_system_str()}); expected a cell of "
                    "that crystal system (check the space group)")
    return ""


@dataclass(frozen=True)
class TargetCell:
    """The known unit cell and space group to index against.

    Accepts gemmi objects, ``"a b c al be ga"`` / six numbers and a symbol or number.

    >>> TargetCell("93 93 130.5 90 90 120", "P 61 2 2").space_group.hm
    'P 61 2 2'
    """

    cell: gemmi.UnitCell
    space_group: gemmi.SpaceGroup

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", as_unit_cell(self.cell))
        object.__setattr__(self, "space_group", as_space_group(self.space_group))
        problem = cell_symmetry_problem(self.cell, self.space_group)
        if problem:
            raise ValueError(problem)

    @property
    def key(self) -> tuple:
        return (tuple(round(x, 6) for x in self.cell.parameters), self.space_group.xhm())

    def __getstate__(self) -> dict:
        # without the search constants: a worker rebuilds them once, read-only (unpickled
        # arrays are writable, and the compiled steps would be compiled again for them)
        return {k: v for k, v in self.__dict__.items() if k != "_fixed"}

    @functools.cached_property
    def _fixed(self) -> _TargetFixed:
        """What every search on this target derives from it alone (:class:`_TargetFixed`),
        once per object: a cached property of a frozen dataclass lives in its ``__dict__``."""
        return _TargetFixed.of(self.cell, self.space_group)


@dataclass(frozen=True)
class _TargetFixed:
    """A target's constants of a search, computed once (:attr:`TargetCell._fixed`): rebuilding
    the table key, ``B``, ``B⁻¹`` and the cell freedom from the gemmi objects cost 15 µs a search,
    a tenth of a search for a further lattice that finds no pair."""

    cell_params: tuple  # the table cache's key: the cell parameters and the space group's xhm
    xhm: str
    b: np.ndarray  # reciprocal_basis(cell), read-only
    b_inv: np.ndarray  # np.linalg.inv(b), read-only
    volume_a3: float
    n_centring: int
    n_rotations: int  # |point group|
    n_cell_lengths: int  # free cell lengths and angles of the refinement (refine_cell)
    n_cell_angles: int

    @classmethod
    def of(cls, cell: gemmi.UnitCell, space_group: gemmi.SpaceGroup) -> _TargetFixed:
        b = reciprocal_basis(cell)
        b_inv = np.linalg.inv(b)
        b.setflags(write=False)
        b_inv.setflags(write=False)
        vals, build = cell_parameters(cell, space_group)
        # free angles: triclinic 3, monoclinic 1, rhombohedral axes 1 (a, alpha); others none
        n_ang = {"triclinic": 3, "monoclinic": 1}.get(space_group.crystal_system_str(), 0)
        if vals.size == 2 and abs(build(vals).alpha - 90.0) > 1e-6:
            n_ang = 1
        return cls(tuple(cell.parameters), space_group.xhm(), b, b_inv, cell.volume,
                   len(space_group.operations().cen_ops), len(point_group_rotations(space_group)),
                   vals.size - n_ang, n_ang)


@dataclass(frozen=True)
class IndexResult:
    """Outcome of indexing one frame (see :func:`index_spots`).

    ``miller_indices`` is ``(n_spots, 3)`` with zeros for unindexed spots; ``rmsd_px`` is the
    RMS distance between predicted and observed positions of the indexed spots;
    ``rmsd_inv_a`` the RMS of ``|q_obs - A h|`` (includes the excitation error).
    ``fraction_indexed`` is ``n_indexed / n_spots``: the spots on the lattice among all the spots
    given (the figure frames.parquet, streams and ``sfxflow index`` report); with
    ``IndexParams.max_spots`` the solution is found and refined on the strongest spots, then
    every other spot within the refinement's final pixel threshold of its prediction is indexed
    too. ``rmsd_px`` is over the indexed spots the refinement used.
    ``reason`` says why indexing failed (empty on success).
    ``log10_false_probability`` is the log10 of the trials-corrected probability that the
    solution's spot matches happened by chance (see :func:`solution_significance`; NaN when no
    solution was refined); ``detector_shift_mm`` the refined lateral detector shift ``(x, y)``,
    ``distance_shift_mm`` the shift along the beam; ``outlier_threshold_px`` the distance within
    which a spot counts as indexed.
    """

    success: bool
    crystal: Crystal | None = field(default=None, repr=False)
    miller_indices: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32),
                                       repr=False)
    indexed_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    n_indexed: int = 0
    fraction_indexed: float = 0.0
    rmsd_px: float = math.nan
    rmsd_inv_a: float = math.nan
    reason: str = ""
    n_spots: int = 0
    n_candidates: int = 0
    log10_false_probability: float = math.nan
    detector_shift_mm: tuple[float, float] = (0.0, 0.0)
    distance_shift_mm: float = 0.0
    outlier_threshold_px: float = math.nan


# --------------------------------------------------------------------------- symmetry helpers


@functools.lru_cache(maxsize=64)
def _point_group_rotations_cached(hm: str) -> np.ndarray:
    sg = gemmi.SpaceGroup(hm)
    mats = []
    seen = set()
    for op in sg.operations().sym_ops:
        r = np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN
        if round(np.linalg.det(r)) != 1:
            continue
        m = r.T.copy()  # acts on Miller indices (column vectors): h' = R^T h
        key = m.tobytes()
        if key not in seen:
            seen.add(key)
            mats.append(m)
    out = np.array(mats, dtype=np.int64)
    out.setflags(write=False)
    return out


def point_group_rotations(space_group: gemmi.SpaceGroup | str) -> np.ndarray:
    """Proper rotations of the space group's point group acting on Miller indices, ``(m, 3, 3)``.

    Two orientation matrices ``A`` and ``A @ M`` (``M`` in this set) predict identical spot
    patterns; they are the lattice-symmetry equivalents of one solution.

    >>> point_group_rotations("P 61 2 2").shape
    (12, 3, 3)
    >>> point_group_rotations("P 1").shape
    (1, 3, 3)
    """
    return _point_group_rotations_cached(as_space_group(space_group).xhm())


@njit(cache=True, nogil=True)
def _polar_rotation(m):  # pragma: no cover - compiled
    """The proper rotation nearest ``m`` by its SVD ``W Vᵀ``, the weakest axis flipped for a
    reflection (numba's LAPACK call gives numpy's bits)."""
    w, _, vt = np.linalg.svd(m)
    r = w @ vt
    if np.linalg.det(r) < 0:
        w[:, -1] *= -1
        r = w @ vt
    return r


def _rotation_angle_deg(r: np.ndarray) -> float:
    # atan2(sin, cos) rather than acos(cos): acos loses half the digits near 0 degrees.
    c = (float(np.trace(r)) - 1.0) / 2.0
    s = 0.5 * math.hypot(r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1])
    return math.degrees(math.atan2(s, c))


def _setting_cell(cell: gemmi.UnitCell, m: np.ndarray) -> gemmi.UnitCell:
    """Cell of the lattice ``A @ m`` where ``A`` belongs to ``cell``.

    For a cell whose angles are not exactly those of its lattice's symmetry (a refined cell)
    this setting's cell, and so its ``B``, differs from ``cell``'s, and reusing ``cell``'s ``B``
    would add a spurious strain.
    """
    return cell_of_basis(reciprocal_basis(cell) @ m.astype(float))


def misorientation_deg(a: Crystal, b: Crystal, space_group: gemmi.SpaceGroup | None = None) -> float:
    """Smallest rotation angle (degrees) between two crystals' lattices, modulo symmetry.

    ``F = A_b M A_a⁻¹`` maps ``a``'s reciprocal basis onto ``b``'s in the setting ``A_b @ M``
    (``M`` from :func:`point_group_rotations` of ``space_group``, default ``a``'s); its rotation
    part (polar decomposition) is the lattice rotation, and the angle is the smallest over the
    settings. Unlike comparing ``U = A B⁻¹`` of each crystal, this needs no ``B``: a ``B`` from
    ``b.cell`` reused in every setting strains non-orthogonal (refined) cells, and even one ``B``
    per setting makes the angle depend on the convention that puts ``a`` along ``x`` (about a
    degree for a cell whose angles are a degree off 90). Equal cells give ``angle(U_b U_aᵀ)``.

    >>> from scipy.spatial.transform import Rotation
    >>> cell, sg = gemmi.UnitCell(93, 93, 130.5, 90, 90, 120), gemmi.SpaceGroup("P 61 2 2")
    >>> x = Crystal.from_u(cell, sg, Rotation.from_euler("z", 10, degrees=True).as_matrix())
    >>> y = Crystal(cell, sg, x.a_matrix @ point_group_rotations(sg)[3])
    >>> round(misorientation_deg(x, y), 6)
    0.0
    """
    sg = space_group or a.space_group
    a_inv = np.linalg.inv(a.a_matrix)
    return min(_rotation_angle_deg(_polar_rotation(b.a_matrix @ m @ a_inv))
               for m in point_group_rotations(sg))


@functools.lru_cache(maxsize=64)
def _lab_symmetry_rotations(cell_params: tuple, hm: str) -> np.ndarray:
    """``(m, 3, 3)``: the rotation part of ``B M B⁻¹`` for each ``M`` of
    :func:`point_group_rotations`, ``B`` the cell's reciprocal basis: ``U B M = (U R) B`` up to
    the strain of a cell a little off its symmetry, so two candidates ``U_a``, ``U_b`` of one
    cell are ``min over R`` of ``angle(U_b R U_aᵀ)`` apart, the angle
    :func:`misorientation_deg` gives (the polar decomposition commutes with the rotations)."""
    b = reciprocal_basis(gemmi.UnitCell(*cell_params))
    b_inv = np.linalg.inv(b)
    out = np.array([_polar_rotation(b @ m @ b_inv) for m in point_group_rotations(hm)])
    out.setflags(write=False)
    return out


def _within_deg_of_any(u: np.ndarray, others: list[np.ndarray], sym: np.ndarray,
                       angle_deg: float) -> bool:
    """Whether the rotation ``u`` lies within ``angle_deg`` of one of ``others`` modulo the
    lab-frame symmetry rotations ``sym`` (:func:`_lab_symmetry_rotations`): the trace of
    ``U_b R U_aᵀ`` is ``1 + 2 cos(angle)``, so one matrix product per candidate replaces
    :func:`misorientation_deg`'s SVD per setting (0.4 ms a comparison; 20 of a real two-lattice
    CSPAD frame's 64 ms went there)."""
    if not others:
        return False
    prod = np.matmul(u.T, np.stack(others))  # (k, 3, 3): U_aᵀ U_b
    traces = np.einsum("gij,kji->kg", sym, prod)  # trace(R U_aᵀ U_b) = trace(U_b R U_aᵀ)
    return bool(traces.max() > 1.0 + 2.0 * math.cos(math.radians(angle_deg)))


def canonical_crystal(crystal: Crystal) -> Crystal:
    """The symmetry-equivalent setting of ``crystal`` whose ``U`` is closest to the identity.

    Among ``A @ M`` for ``M`` in :func:`point_group_rotations` (all predict the same spots),
    picks the one maximising ``trace(U)``, i.e. the smallest rotation from the crystal frame to
    the lab frame; ties (measure zero) go to the first operator in gemmi's order. The cell
    returned is that setting's (it differs from ``crystal.cell`` when the angles are off the
    symmetry's by refinement).
    """
    ops = point_group_rotations(crystal.space_group)
    traces = _setting_traces(crystal.a_matrix, reciprocal_basis(crystal.cell), ops)
    best_m, best_tr = np.eye(3, dtype=np.int64), -math.inf
    for m, tr in zip(ops, traces.tolist(), strict=True):
        if tr > best_tr + 1e-9:
            best_m, best_tr = m, tr
    return Crystal(_setting_cell(crystal.cell, best_m), crystal.space_group,
                   crystal.a_matrix @ best_m)


@njit(cache=True, nogil=True)
def _setting_traces(a, b, ops):  # pragma: no cover - compiled
    """``trace(U)`` of each symmetry setting ``A @ M`` of a crystal (``b``: the ``B`` of its
    cell, ``ops``: :func:`point_group_rotations`), ``U`` the rotation part of ``A M B_M⁻¹`` with
    ``B_M`` the setting cell's own ``B`` (:func:`_setting_cell`). ``B_M`` is the lower-triangular
    basis of the metric of ``B M`` (``B_Mᵀ B_M = Mᵀ Bᵀ B M``, the form
    :func:`~sfxflow.models.reciprocal_basis` takes), so no gemmi cell is built: a gemmi cell and
    an SVD per setting cost 0.08-0.46 ms a crystal."""
    out = np.empty(ops.shape[0])
    for k in range(ops.shape[0]):
        mk = ops[k].astype(np.float64)
        bm = b @ mk
        g = bm.T @ bm
        l22 = math.sqrt(g[2, 2])
        l21 = g[1, 2] / l22
        l20 = g[0, 2] / l22
        l11 = math.sqrt(g[1, 1] - l21 * l21)
        l10 = (g[0, 1] - l20 * l21) / l11
        l00 = math.sqrt(g[0, 0] - l10 * l10 - l20 * l20)
        b_m = np.array([[l00, 0.0, 0.0], [l10, l11, 0.0], [l20, l21, l22]])
        u = _nearest_rotation(a @ mk @ np.linalg.inv(b_m))
        out[k] = u[0, 0] + u[1, 1] + u[2, 2]
    return out


# --------------------------------------------------------------------------- candidate table


@dataclass(frozen=True)
class _Table:
    """Symmetry-allowed Miller indices of a target to ``d_min``, sorted by ``|q|``."""

    hkl: np.ndarray  # (n, 3) int
    qc: np.ndarray  # (n, 3) crystal-frame vectors B h, Å⁻¹
    qc_unit: np.ndarray  # (n, 3) the same, normalised
    q_len: np.ndarray  # (n,) sorted ascending
    rep_idx: np.ndarray  # indices into the arrays above of one member per rotation orbit
    rep_q_len: np.ndarray  # q_len[rep_idx] (sorted)
    d_min_a: float
    # one of each Friedel pair (h, -h) whose unit vectors are exact negatives, and every index
    # without such a mate; ascending. mate: the index of -h for those, -1 for the others
    half_idx: np.ndarray
    mate: np.ndarray
    # what the pair step reads of those in a window, contiguous (gathering them, with the
    # dispatch of a call included, cost 4.5 µs a leftover-search call): their unit vectors
    # as rows x, y, z (3, n_half), and mate[half_idx]
    half_unit: np.ndarray
    half_mate: np.ndarray
    half_unit32: np.ndarray  # half_unit in float32, for the pair step's first pass


@functools.lru_cache(maxsize=32)
def _table_cached(cell_params: tuple, hm: str, d_min_a: float) -> _Table:
    cell = gemmi.UnitCell(*cell_params)
    sg = gemmi.SpaceGroup(hm)
    hkl = miller_indices(cell, sg, d_min_a).astype(np.int64)
    b = reciprocal_basis(cell)
    qc = hkl @ b.T
    q_len = np.linalg.norm(qc, axis=1)
    order = np.argsort(q_len, kind="stable")
    hkl, qc, q_len = hkl[order], qc[order], q_len[order]
    # one representative per orbit under the point group's rotations: the lexicographic maximum
    ops = point_group_rotations(sg)
    big = int(np.abs(hkl).max(initial=0)) + 1
    base = 2 * big + 1

    def code(h: np.ndarray) -> np.ndarray:
        return ((h[..., 0] + big) * base + (h[..., 1] + big)) * base + (h[..., 2] + big)

    orbit_codes = code(np.einsum("mij,nj->mni", ops, hkl))
    rep_idx = np.flatnonzero(code(hkl) == orbit_codes.max(axis=0))
    qc_unit = qc / q_len[:, None]
    half_idx, mate = _friedel_halves(hkl, code, qc_unit, q_len)
    half_unit = np.ascontiguousarray(qc_unit[half_idx].T)
    half_mate = mate[half_idx]
    half_unit32 = half_unit.astype(np.float32)
    for arr in (hkl, qc, qc_unit, q_len, rep_idx, half_idx, mate, half_unit, half_mate,
                half_unit32):
        arr.setflags(write=False)
    return _Table(hkl, qc, qc_unit, q_len, rep_idx, q_len[rep_idx], d_min_a, half_idx, mate,
                  half_unit, half_mate, half_unit32)


def _friedel_halves(hkl: np.ndarray, code: Callable[[np.ndarray], np.ndarray],
                    qc_unit: np.ndarray, q_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:attr:`_Table.half_idx` and :attr:`_Table.mate`: the pair step computes the cosines of
    one of each Friedel pair only, ``cos(u, -w) = -cos(u, w)`` exactly when the unit vectors
    are exact negatives (the same ``|q|`` too, so both lie in every window or neither)."""
    codes = code(hkl)
    order = np.argsort(codes, kind="stable")
    pos = np.searchsorted(codes[order], code(-hkl))
    pos = np.minimum(pos, codes.size - 1)
    other = order[pos]
    found = codes[other] == code(-hkl)
    other = np.where(found, other, -1)
    mine = np.maximum(other, 0)
    exact = found & np.all(qc_unit[mine] == -qc_unit, axis=1) & (q_len[mine] == q_len)
    mate = np.where(exact, other, -1).astype(np.int64)
    # keep the first of each exact pair (and every unpaired index)
    half_idx = np.flatnonzero((mate < 0) | (np.arange(hkl.shape[0]) < mate)).astype(np.int64)
    return half_idx, mate


def target_table(target: TargetCell, d_min_a: float) -> _Table:
    """Cached candidate table of ``target`` down to (at least) resolution ``d_min_a``.

    ``d_min_a`` is rounded down on a coarse logarithmic grid so that frames share tables.
    """
    d_q = 2.0 ** (math.floor(math.log2(max(d_min_a, 0.5)) * 4.0) / 4.0)
    fixed = target._fixed
    return _table_cached(fixed.cell_params, fixed.xhm, round(d_q, 6))


# --------------------------------------------------------------------------- candidate search


@njit(cache=True, nogil=True, inline="always")
def _pair_frame(u0, u1, u2, w0, w1, w2):  # pragma: no cover - compiled
    """Orthonormal frame of two unit vectors ``u``, ``w``: ``e1`` along their bisector, ``e3``
    normal to their plane, ``e2 = e3 x e1``, as ``(e1, e2, e3)`` components. Aligning the
    bisector and the difference of a pair, rather than one vector and then the other, spreads
    the error over both."""
    s0, s1, s2 = u0 + w0, u1 + w1, u2 + w2
    d0, d1, d2 = u0 - w0, u1 - w1, u2 - w2
    ns = math.sqrt(s0 * s0 + s1 * s1 + s2 * s2)
    x0, x1, x2 = s0 / ns, s1 / ns, s2 / ns
    z0, z1, z2 = s1 * d2 - s2 * d1, s2 * d0 - s0 * d2, s0 * d1 - s1 * d0
    nz = math.sqrt(z0 * z0 + z1 * z1 + z2 * z2)
    z0, z1, z2 = z0 / nz, z1 / nz, z2 / nz
    return x0, x1, x2, z1 * x2 - z2 * x1, z2 * x0 - z0 * x2, z0 * x1 - z1 * x0, z0, z1, z2


@njit(cache=True, nogil=True)
def _nearest_rotation(m):  # pragma: no cover - compiled
    """The proper rotation nearest ``m`` (3x3; the Kabsch fit of ``Σ q (B h)ᵀ``): its polar
    factor, by Higham's scaled Newton iteration ``X ← (γ X + X⁻ᵀ / γ) / 2`` (quadratic; 6-9
    rounds of a 3x3 adjugate), which agrees with the SVD's ``W Vᵀ`` to rounding at a tenth of
    its cost (LAPACK's 3x3 SVD: 1.9 µs, 24 of them for a pair's 8 candidates: most of their
    polishing). A reflection or a nearly singular ``m`` (spots in a plane through the origin)
    goes to the SVD (:func:`_polar_rotation`), which flips the weakest axis.

    The rounds keep ``X`` in scalars (row-major ``x0..x8``), each sum in row-major order from
    0 as numpy's ``sum`` of the 3x3 array adds: the bits of the array version, which made five
    3x3 temporaries a round, on 20000 random matrices (0.80 -> 0.17 µs a call with the
    determinant below; 8-24 calls a pair's polishing)."""
    x0, x1, x2 = m[0, 0], m[0, 1], m[0, 2]
    x3, x4, x5 = m[1, 0], m[1, 1], m[1, 2]
    x6, x7, x8 = m[2, 0], m[2, 1], m[2, 2]
    scale = math.sqrt(_sum9_sq(x0, x1, x2, x3, x4, x5, x6, x7, x8))
    for it in range(30):
        d = (x0 * (x4 * x8 - x5 * x7)
             - x1 * (x3 * x8 - x5 * x6)
             + x2 * (x3 * x7 - x4 * x6))
        # the cofactor determinant, not LAPACK's LU one (0.2 µs): they differ by rounding,
        # which moves this test's threshold by a relative 1e-15
        if it == 0 and not d > 1e-9 * scale**3:
            return _polar_rotation(m)
        # X⁻ᵀ = cofactor(X) / det(X)
        c0 = (x4 * x8 - x5 * x7) / d
        c1 = (x5 * x6 - x3 * x8) / d
        c2 = (x3 * x7 - x4 * x6) / d
        c3 = (x2 * x7 - x1 * x8) / d
        c4 = (x0 * x8 - x2 * x6) / d
        c5 = (x1 * x6 - x0 * x7) / d
        c6 = (x1 * x5 - x2 * x4) / d
        c7 = (x2 * x3 - x0 * x5) / d
        c8 = (x0 * x4 - x1 * x3) / d
        gamma = math.sqrt(math.sqrt(_sum9_sq(c0, c1, c2, c3, c4, c5, c6, c7, c8)
                                    / _sum9_sq(x0, x1, x2, x3, x4, x5, x6, x7, x8)))
        n0 = 0.5 * (gamma * x0 + c0 / gamma)
        n1 = 0.5 * (gamma * x1 + c1 / gamma)
        n2 = 0.5 * (gamma * x2 + c2 / gamma)
        n3 = 0.5 * (gamma * x3 + c3 / gamma)
        n4 = 0.5 * (gamma * x4 + c4 / gamma)
        n5 = 0.5 * (gamma * x5 + c5 / gamma)
        n6 = 0.5 * (gamma * x6 + c6 / gamma)
        n7 = 0.5 * (gamma * x7 + c7 / gamma)
        n8 = 0.5 * (gamma * x8 + c8 / gamma)
        change = math.sqrt(_sum9_sq(n0 - x0, n1 - x1, n2 - x2, n3 - x3, n4 - x4, n5 - x5,
                                    n6 - x6, n7 - x7, n8 - x8))
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = n0, n1, n2, n3, n4, n5, n6, n7, n8
        if change <= 1e-15:
            break
    out = np.empty((3, 3))
    out[0, 0], out[0, 1], out[0, 2] = x0, x1, x2
    out[1, 0], out[1, 1], out[1, 2] = x3, x4, x5
    out[2, 0], out[2, 1], out[2, 2] = x6, x7, x8
    return out


@njit(cache=True, nogil=True, inline="always")
def _sum9_sq(a0, a1, a2, a3, a4, a5, a6, a7, a8):  # pragma: no cover - compiled
    """``(a * a).sum()`` of a 3x3 array ``a`` given row-major, added in numpy's order."""
    s = 0.0
    for v in (a0, a1, a2, a3, a4, a5, a6, a7, a8):
        s += v * v
    return s


@njit(cache=True, nogil=True)
def _polish_and_score(rots, q, rays, perp_tol, b, tol, exc_tol,
                      n_iter):  # pragma: no cover - compiled
    """Polish each raw rotation ``U`` (k, 3, 3) and score it in the stills sense.

    Polishing: ``n_iter`` rounds of a Kabsch re-fit of ``U`` to the spots it indexes (all three
    fractional indices ``B⁻¹ Uᵀ q`` within ``tol`` of integers, not ``000``), in q space; a
    round with fewer than 3 such spots keeps ``U``; a round that would fit the same spots with
    the same indices as the last one (the same sum, so the same ``U``) ends the rounds.
    Scoring: a spot is indexed when the nearest
    lattice point ``U B h`` lies within ``exc_tol`` of it along its ray and ``perp_tol`` across
    (one compiled loop: the numpy version, a dozen array steps for 8 candidates, cost 0.3 ms a
    pair, about what the pair's thousands of raw rotations cost).

    The spot loops keep their matrices and sums in scalars and have no branches: a spot that a
    candidate does not use (or score) adds an exact 0 to its sums, which still run in spot
    order, so the results are those of skipping it, bit for bit. Its 3x3 products are
    :func:`~sfxflow.algorithms.fused.product3_into` and ``product3_t_into`` (numba's ``@`` calls BLAS: 0.2-0.4 µs each, two or three
    a round), with :func:`_nearest_rotation` in scalars: on the leftover searches' 219 calls
    0.024 -> 0.009 ms a call, bit for bit.

    Returns (polished rotations (k, 3, 3), counts (k,), sum of squared normalised distances).
    """
    k_n = rots.shape[0]
    n = q.shape[0]
    b_inv = np.linalg.inv(b)
    b00, b01, b02 = b[0, 0], b[0, 1], b[0, 2]
    b10, b11, b12 = b[1, 0], b[1, 1], b[1, 2]
    b20, b21, b22 = b[2, 0], b[2, 1], b[2, 2]
    out = np.empty_like(rots)
    counts = np.zeros(k_n, np.int64)
    err = np.zeros(k_n)
    # each spot's index in the last round (a 4th column: used), to see a round repeat it
    last = np.empty((n, 4))
    hm = np.empty((3, 3))
    m = np.empty((3, 3))
    ub = np.empty((3, 3))
    for k in range(k_n):
        u = rots[k].copy()
        m_of_u = False  # whether m is B⁻¹ Uᵀ of this U (then the score reuses it)
        for it in range(n_iter):
            product3_t_into(b_inv, u, m)  # B⁻¹ Uᵀ: fractional indices of a spot, m q
            m_of_u = True
            m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
            m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
            m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = 0.0  # Σ q (B h)ᵀ
            n_ok = 0
            # whether this round fits the same spots with the same indices as the last,
            # tested spot by spot
            same = it > 0
            for i in range(n):
                q0, q1, q2 = q[i, 0], q[i, 1], q[i, 2]
                f0 = m00 * q0 + m01 * q1 + m02 * q2
                f1 = m10 * q0 + m11 * q1 + m12 * q2
                f2 = m20 * q0 + m21 * q1 + m22 * q2
                h0, h1, h2 = np.rint(f0), np.rint(f1), np.rint(f2)
                dev = max(abs(f0 - h0), abs(f1 - h1), abs(f2 - h2))
                used = not (dev > tol or (h0 == 0.0 and h1 == 0.0 and h2 == 0.0))
                u_f = 1.0 if used else 0.0
                same &= (u_f == last[i, 3]) & ((not used) | (
                    (h0 == last[i, 0]) & (h1 == last[i, 1]) & (h2 == last[i, 2])))
                last[i, 0], last[i, 1], last[i, 2], last[i, 3] = h0, h1, h2, u_f
                n_ok += used
                bh0 = b00 * h0 + b01 * h1 + b02 * h2
                bh1 = b10 * h0 + b11 * h1 + b12 * h2
                bh2 = b20 * h0 + b21 * h1 + b22 * h2
                s00 += q0 * bh0 if used else 0.0
                s01 += q0 * bh1 if used else 0.0
                s02 += q0 * bh2 if used else 0.0
                s10 += q1 * bh0 if used else 0.0
                s11 += q1 * bh1 if used else 0.0
                s12 += q1 * bh2 if used else 0.0
                s20 += q2 * bh0 if used else 0.0
                s21 += q2 * bh1 if used else 0.0
                s22 += q2 * bh2 if used else 0.0
            if same:
                break  # the same fit as the last round: U is its outcome already
            if n_ok >= 3:
                hm[0, 0], hm[0, 1], hm[0, 2] = s00, s01, s02
                hm[1, 0], hm[1, 1], hm[1, 2] = s10, s11, s12
                hm[2, 0], hm[2, 1], hm[2, 2] = s20, s21, s22
                u = _nearest_rotation(hm)
                m_of_u = False
        out[k] = u
        if not m_of_u:
            product3_t_into(b_inv, u, m)
        m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
        m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
        m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
        product3_into(u, b, ub)
        a00, a01, a02 = ub[0, 0], ub[0, 1], ub[0, 2]
        a10, a11, a12 = ub[1, 0], ub[1, 1], ub[1, 2]
        a20, a21, a22 = ub[2, 0], ub[2, 1], ub[2, 2]
        c_k = 0
        e_k = 0.0
        for i in range(n):
            q0, q1, q2 = q[i, 0], q[i, 1], q[i, 2]
            f0 = m00 * q0 + m01 * q1 + m02 * q2
            f1 = m10 * q0 + m11 * q1 + m12 * q2
            f2 = m20 * q0 + m21 * q1 + m22 * q2
            h0, h1, h2 = np.rint(f0), np.rint(f1), np.rint(f2)
            d0 = q0 - (a00 * h0 + a01 * h1 + a02 * h2)
            d1 = q1 - (a10 * h0 + a11 * h1 + a12 * h2)
            d2 = q2 - (a20 * h0 + a21 * h1 + a22 * h2)
            par = d0 * rays[i, 0] + d1 * rays[i, 1] + d2 * rays[i, 2]
            perp2 = max(d0 * d0 + d1 * d1 + d2 * d2 - par * par, 0.0)
            dist2 = (par / exc_tol) ** 2 + perp2 / perp_tol[i] ** 2
            ok = (dist2 <= 1.0) & ((h0 != 0.0) | (h1 != 0.0) | (h2 != 0.0))
            c_k += ok
            e_k += dist2 if ok else 0.0
        counts[k] = c_k
        err[k] = e_k
    return out, counts, err


#: matched rotations of a pair step scored together (:func:`_pair_top_candidates`)
_CHUNK = 256
#: how far the pair step's float32 first pass widens the cosine band: its rounding is below
#: 3e-7 (unit vectors rounded to 2^-24 each, three products and two sums); every entry it
#: flags is tested again in float64, the test the band always had
_MARGIN = 1e-5
#: the lowest set bit of a uint64 ``x``: ``_BIT_OF[(x & -x) * _DE_BRUIJN >> _SHIFT]``
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_SHIFT = np.uint64(58)
_ONE = np.uint64(1)
_BIT_OF = np.zeros(64, np.int64)
_BIT_OF[[((1 << b) * 0x03F79D71B4CB0A89 % 2**64) >> 58 for b in range(64)]] = np.arange(64)


@njit(cache=True, nogil=True, inline="always")
def _frac_distance(m00, m01, m02, m10, m11, m12, m20, m21, m22, p0, p1, p2):  # pragma: no cover
    """How far the fractional indices ``m p`` (3x3 ``m`` row-major) are from integers: the
    largest of the three distances (in the precision of its arguments)."""
    f0 = m00 * p0 + m01 * p1 + m02 * p2
    f1 = m10 * p0 + m11 * p1 + m12 * p2
    f2 = m20 * p0 + m21 * p1 + m22 * p2
    return max(abs(f0 - np.rint(f0)), abs(f1 - np.rint(f1)), abs(f2 - np.rint(f2)))


@njit(cache=True, nogil=True, inline="always")
def _lattice_matrix(u0, u1, u2, w0, w1, w2, bi00, bi01, bi02, bi10, bi11, bi12, bi20, bi21,
                    bi22):  # pragma: no cover - compiled
    """``B⁻¹ T_lat`` (row-major) of the table pair ``u``, ``w``: the fractional indices of a
    spot ``p`` in the observed pair's frame are ``B⁻¹ T_lat p`` (in the arguments' precision)."""
    x0, x1, x2, y0, y1, y2, z0, z1, z2 = _pair_frame(u0, u1, u2, w0, w1, w2)
    return (bi00 * x0 + bi01 * x1 + bi02 * x2, bi00 * y0 + bi01 * y1 + bi02 * y2,
            bi00 * z0 + bi01 * z1 + bi02 * z2, bi10 * x0 + bi11 * x1 + bi12 * x2,
            bi10 * y0 + bi11 * y1 + bi12 * y2, bi10 * z0 + bi11 * z1 + bi12 * z2,
            bi20 * x0 + bi21 * x1 + bi22 * x2, bi20 * y0 + bi21 * y1 + bi22 * y2,
            bi20 * z0 + bi21 * z1 + bi22 * z2)


@njit(cache=True, nogil=True, error_model="numpy")
def _score_exactly(idx, n_idx, vec, b_inv, q_obs, tol, count, err):  # pragma: no cover
    """The float64 scores of the matches ``idx[:n_idx]`` of :func:`_pair_top_candidates`
    (``u``, ``w`` of each in the rows of ``vec`` (6, k)): their ``B⁻¹ T_lat`` in float64, then
    into ``count`` and ``err`` each spot in order, the operations of scoring in float64.

    The float32 pass it backs computes ``T_lat`` (:func:`_pair_frame`) from ``u``, ``w``
    rounded to float32, then ``m = B⁻¹ T_lat`` and ``f = m p``. With ``ε = 2^-24``: the sum
    ``s`` and difference ``d`` of the unit vectors are within ``4ε`` and ``s ⊥ d``, so the
    frame's columns are within ``ε (16/|s| + 8/|d| + 26)``; a row of ``m`` within
    ``|B⁻¹ row| (that + 4ε)`` a component, and ``f`` within ``|B⁻¹ row| |p| (√3 (that + 4ε) +
    5ε)``, below ``ε |B⁻¹ row| |p| (42 / min(|s|, |d|) + 57)``; the pass takes
    ``ε max |B⁻¹ row| |p| (64 / min(|s|, |d|) + 96)`` as unsure, ``min(|s|, |d|)`` over the
    band of angles. The distance to the nearest integer moves no more than ``f``."""
    bi00, bi01, bi02 = b_inv[0, 0], b_inv[0, 1], b_inv[0, 2]
    bi10, bi11, bi12 = b_inv[1, 0], b_inv[1, 1], b_inv[1, 2]
    bi20, bi21, bi22 = b_inv[2, 0], b_inv[2, 1], b_inv[2, 2]
    for t in range(n_idx):
        k = idx[t]
        m00, m01, m02, m10, m11, m12, m20, m21, m22 = _lattice_matrix(
            vec[0, k], vec[1, k], vec[2, k], vec[3, k], vec[4, k], vec[5, k],
            bi00, bi01, bi02, bi10, bi11, bi12, bi20, bi21, bi22)
        c_k = 0
        e_k = 0.0
        for i in range(q_obs.shape[0]):
            worst = _frac_distance(m00, m01, m02, m10, m11, m12, m20, m21, m22,
                                   q_obs[i, 0], q_obs[i, 1], q_obs[i, 2])
            hit = worst <= tol
            c_k += hit
            e_k += hit * (worst * worst)
        count[k] = c_k
        err[k] = e_k


@njit(cache=True, nogil=True, error_model="numpy")
def _pair_top_candidates(unit, half_idx, half_unit, half_unit32, half_mate, rep, lo2, hi2,
                         cos_lo, cos_hi, q, i_obs, j_obs, b_inv, tol,
                         n_keep):  # pragma: no cover - compiled
    """The raw rotations of one spot pair that :func:`index_q_candidates` polishes: the
    ``n_keep`` best by the number of spots they index (all three fractional indices within
    ``tol`` of integers; ties: the smaller sum of squared fractional errors, then the earlier
    candidate), among those indexing at least 3.

    The candidates are the index pairs ``(rep[a], lo2 + b)`` whose angle's cosine lies in
    ``[cos_lo, cos_hi]``, in row order (the cosines of half the window computed:
    ``half_idx``, ``half_unit`` (``half_unit32``), ``half_mate``, :func:`_friedel_halves`);
    each gives the rotation that carries the bisector frame of its two table vectors onto that
    of the observed pair ``q[i_obs], q[j_obs]`` (:func:`_pair_frame`): ``U = T_obs T_latᵀ``,
    and with the spots in the observed pair's frame (``q_obs = q T_obs``) the fractional
    indices are ``B⁻¹ T_lat q_obs``.

    The matches are gathered ``_CHUNK`` at a time and scored together, in loops without a
    branch on the outcome that the compiler vectorises across the rotations (4 doubles a step:
    LLVM keeps to 256-bit vectors here): their frames and ``B⁻¹ T_lat``, then every spot
    against all of them; then the kept ones are chosen with the full order (count, error,
    ``a``, ``b``), so the matches of a row need not be put back in window order, and only the
    few that the chunk's counts leave in reach of the kept ones (a histogram of the counts:
    5 % of them on a leftover search) are compared one by one. Each rotation is scored on
    every spot: the old loop, one rotation at a time and dropping it as soon as its misses kept
    it below the ``n_keep``-th best, scored 3-4 of the 8-9 spots of a leftover search but was
    bound by the latency of each rotation's frame (two square roots, six divisions) and its
    branches. A row's matches are listed from its flag words by their set bits, the words with
    a match first listed without a branch. On the 99 pair steps of 58 leftover searches
    (4342 matches, ~10^5 cosines a call) this took a call 0.32 -> 0.15 ms: the cosines
    0.04 ms (float32 first pass), listing 0.03, frames 0.025, scoring 0.04, choosing 0.01
    (the 3x3 products by hand: numba's matrix product costs 1 µs a call). The same kept
    rotations, to rounding. Tried and not kept: the frames from per-table ``B⁻¹ u`` (two
    divisions, not six, but other rounding) 0.003 ms; the frames gathering their vectors
    (not vectorised) 0.03 ms slower.

    The frames and the scoring run in float32 (8 a step, not 4; the frames' six divisions and
    two square roots bound their loop): a spot whose float32 distance to the integers is within
    a bound of its rounding (:func:`_score_exactly`'s note; 28 times what 240000 matches of the
    leftover searches reach) of ``tol`` is unsure, and the matches with an unsure spot (1.3 %
    on leftover searches) and those whose counts leave them in reach of being kept (1.4 %) are
    framed and scored again in float64, which alone gives the errors: the counts and errors
    that choose are those of doing all in float64, bit for bit. On 220 pair steps of the
    leftover searches (4552 matches a call) 0.160 -> 0.146 ms a call (float32 scoring); 0.135
    (two spots a step, and the float64 angle test of the listed matches moved to a vectorised
    loop before the frames); 0.129 (float32 frames). Tried and not kept: the float32 copies of
    ``B⁻¹ T_lat`` stored in the frames' loop (18 arrays stored: the compiler no longer
    vectorises it, 0.191 ms); the sure and unsure counts packed in one integer (no faster);
    three spots a step (no faster than two); listing the first two set bits of a word without
    a branch (0.166 ms: 84 % of the words with a match have one); gathering ``w`` from the
    table's rows (``qc_unit``: one cache line, not three; slower); the set bits by
    ``trailing_zeros`` (internal to numba, 1 %). Binning the window by one coordinate would
    leave 79 % of the cosines to compute (the bands of a row and its mates span most ``z``).

    Returns ``(rotations (k, 3, 3), n_matched)``: the kept candidates best first and how many
    index pairs passed the angle test (each a raw rotation considered).
    """
    n = q.shape[0]
    nq_i = math.sqrt(q[i_obs, 0] ** 2 + q[i_obs, 1] ** 2 + q[i_obs, 2] ** 2)
    nq_j = math.sqrt(q[j_obs, 0] ** 2 + q[j_obs, 1] ** 2 + q[j_obs, 2] ** 2)
    t_obs = np.array(_pair_frame(q[i_obs, 0] / nq_i, q[i_obs, 1] / nq_i, q[i_obs, 2] / nq_i,
                                 q[j_obs, 0] / nq_j, q[j_obs, 1] / nq_j, q[j_obs, 2] / nq_j)
                     ).reshape(3, 3).T  # columns e1, e2, e3
    q_obs = q @ t_obs
    keep_a = np.empty(n_keep, np.int64)
    keep_b = np.empty(n_keep, np.int64)
    keep_c = np.empty(n_keep, np.int64)
    keep_e = np.empty(n_keep)
    n_kept = 0
    n_matched = 0
    # the cosines of one of each Friedel pair of the window only (``cos(u, -w) = -cos(u, w)``
    # exactly, :func:`_friedel_halves`), from the table's copies of their unit vectors as
    # rows: a row of cosines computed apart from the tests (a loop the compiler vectorises;
    # in float32, 8 a step, with the band widened: 0.057 -> 0.037 ms a leftover call), then
    # its matches listed, either member of the pair, to be tested again in float64
    h_lo = np.searchsorted(half_idx, lo2)
    h_hi = np.searchsorted(half_idx, hi2)
    n_h = h_hi - h_lo
    hx = half_unit[0, h_lo:h_hi]
    hy = half_unit[1, h_lo:h_hi]
    hz = half_unit[2, h_lo:h_hi]
    hm = half_mate[h_lo:h_hi]
    n_words = (n_h + 7) // 8
    flags = np.zeros(8 * n_words, np.uint8)
    words = flags.view(np.uint64)
    lo_m, hi_m = -cos_hi, -cos_lo  # the band of cos(u, w) for which -w matches
    # a first pass in float32 with the bands widened by far more than its rounding (3e-7)
    gx = half_unit32[0, h_lo:h_hi]
    gy = half_unit32[1, h_lo:h_hi]
    gz = half_unit32[2, h_lo:h_hi]
    lo32, hi32 = np.float32(cos_lo - _MARGIN), np.float32(cos_hi + _MARGIN)
    lo_m32, hi_m32 = np.float32(lo_m - _MARGIN), np.float32(hi_m + _MARGIN)
    paired = np.empty(n_h, np.uint8)  # whether -w is in the window too
    for s in range(n_h):
        paired[s] = (hm[s] >= lo2) & (hm[s] < hi2)
    nz_w = np.empty(n_words, np.int64)
    nz_x = np.empty(n_words, np.uint64)
    cap = _CHUNK + 2 * n_h + 1
    buf_a = np.empty(cap, np.int64)  # each match: its row,
    buf_s = np.empty(cap, np.int64)  # its entry of the half window,
    buf_neg = np.empty(cap, np.bool_)  # whether its mate
    vec = np.empty((6, cap))  # u, w of each match
    ux, uy, uz, wx, wy, wz = vec[0], vec[1], vec[2], vec[3], vec[4], vec[5]
    vec32 = np.empty((6, cap), np.float32)  # the same in float32
    vx, vy, vz, vw0, vw1, vw2 = vec32[0], vec32[1], vec32[2], vec32[3], vec32[4], vec32[5]
    mat32 = np.empty((9, cap), np.float32)  # B⁻¹ T_lat of each match (float32), row-major
    n00, n01, n02, n10, n11, n12, n20, n21, n22 = (mat32[0], mat32[1], mat32[2], mat32[3],
                                                   mat32[4], mat32[5], mat32[6], mat32[7],
                                                   mat32[8])
    q_obs32 = q_obs.astype(np.float32)
    ci00, ci01, ci02 = np.float32(b_inv[0, 0]), np.float32(b_inv[0, 1]), np.float32(b_inv[0, 2])
    ci10, ci11, ci12 = np.float32(b_inv[1, 0]), np.float32(b_inv[1, 1]), np.float32(b_inv[1, 2])
    ci20, ci21, ci22 = np.float32(b_inv[2, 0]), np.float32(b_inv[2, 1]), np.float32(b_inv[2, 2])
    # each spot's unsure band in the float32 pass (:func:`_score_exactly`'s note): the bound
    # there, with the shortest bisector or difference of a match's unit vectors, whose angle
    # lies in [acos(cos_hi), acos(cos_lo)] (a mate's too: u . (-w) is tested in that band)
    row_max = 0.0
    for i in range(3):
        row_max = max(row_max, math.sqrt(b_inv[i, 0] ** 2 + b_inv[i, 1] ** 2 + b_inv[i, 2] ** 2))
    sd_min = min(2.0 * math.sin(0.5 * math.acos(min(1.0, cos_hi))),
                 2.0 * math.cos(0.5 * math.acos(max(-1.0, cos_lo))))
    tol_lo32 = np.empty(n, np.float32)
    tol_hi32 = np.empty(n, np.float32)
    for i in range(n):
        p_len = math.sqrt(q[i, 0] ** 2 + q[i, 1] ** 2 + q[i, 2] ** 2)
        slack = 2.0**-24 * row_max * p_len * (64.0 / max(sd_min, 1e-30) + 96.0)
        tol_lo32[i], tol_hi32[i] = np.float32(tol - slack), np.float32(tol + slack)
    sure = np.empty(cap, np.int32)
    maybe = np.empty(cap, np.int32)
    ex = np.empty(cap, np.int64)
    count = np.empty(cap, np.int64)
    valid = np.empty(cap, np.bool_)  # whether a match passes the float64 test
    can = np.empty(cap, np.int64)
    hist = np.empty(n + 1, np.int64)
    err = np.empty(cap)
    n_buf = 0
    for a in range(rep.size + 1):
        if a < rep.size:
            r = rep[a]
            u0, u1, u2 = unit[r, 0], unit[r, 1], unit[r, 2]
            v0, v1, v2 = np.float32(u0), np.float32(u1), np.float32(u2)
            for s in range(n_h):  # no branch: the compiler vectorises it, 8 a step
                c32 = v0 * gx[s] + v1 * gy[s] + v2 * gz[s]
                flags[s] = ((c32 >= lo32) & (c32 <= hi32)) | (
                    (c32 >= lo_m32) & (c32 <= hi_m32) & paired[s]) << 1
            # the words with a match (a fifth of them), listed without a branch
            n_nz = 0
            for w in range(n_words):
                x = words[w]
                nz_w[n_nz] = w
                nz_x[n_nz] = x
                n_nz += x != 0
            start = n_buf
            for v in range(n_nz):  # each set bit: 8 s + 0 (``w``) or 8 s + 1 (``-w``)
                x, w = nz_x[v], nz_w[v]
                while True:  # mostly one match a word: the exit is predicted
                    low = x & (~x + _ONE)
                    x ^= low
                    bit = _BIT_OF[(low * _DE_BRUIJN) >> _SHIFT]
                    s = 8 * w + (bit >> 3)
                    neg = bit & 1
                    sign = 1.0 - 2.0 * neg  # -w exactly for a mate (its unit vector)
                    buf_s[n_buf] = s
                    buf_neg[n_buf] = neg
                    wx[n_buf], wy[n_buf], wz[n_buf] = hx[s] * sign, hy[s] * sign, hz[s] * sign
                    n_buf += 1
                    if x == 0:
                        break
            buf_a[start:n_buf] = a
            ux[start:n_buf] = u0
            uy[start:n_buf] = u1
            uz[start:n_buf] = u2
            if n_buf < _CHUNK:
                continue
        if n_buf == 0:
            continue
        # fractional indices of a spot p (observed pair's frame): B⁻¹ (x p0 + y p1 + z p2)
        # the test in float64, here in a loop the compiler vectorises, not as they are listed:
        # u . (-w) is -(u . w) exactly, so a mate's band is the band of the -w kept
        for k in range(n_buf):
            c = ux[k] * wx[k] + uy[k] * wy[k] + uz[k] * wz[k]
            valid[k] = (c >= cos_lo) & (c <= cos_hi)
        for j in range(6):  # float32 copies: a loop on float64 ones vectorises 4 a step, not 8
            for k in range(n_buf):
                vec32[j, k] = vec[j, k]
        for k in range(n_buf):  # vectorised (b_inv's entries held apart: stores could alias)
            (n00[k], n01[k], n02[k], n10[k], n11[k], n12[k], n20[k], n21[k],
             n22[k]) = _lattice_matrix(vx[k], vy[k], vz[k], vw0[k], vw1[k], vw2[k], ci00, ci01,
                                       ci02, ci10, ci11, ci12, ci20, ci21, ci22)
        # every match on every spot in float32 (8 a step, not 4): a spot whose float32 distance
        # lies in its unsure band (tol_lo32, tol_hi32] is unsure; the matches with an unsure
        # spot, and then the ones the counts leave in reach of being kept, are scored again in
        # float64 (:func:`_score_exactly`), which alone gives the errors
        sure[:n_buf] = 0
        maybe[:n_buf] = 0  # sure or unsure hits
        for i in range(0, n, 2):
            # two spots a step (the last one twice when n is odd, counted once): each match's
            # matrix loaded once for both (0.138 -> 0.133 ms a leftover call)
            i2 = min(i + 1, n - 1)
            two = np.int32(i2 > i)
            p0, p1, p2 = q_obs32[i, 0], q_obs32[i, 1], q_obs32[i, 2]
            r0, r1, r2 = q_obs32[i2, 0], q_obs32[i2, 1], q_obs32[i2, 2]
            lo_p, hi_p, lo_r, hi_r = tol_lo32[i], tol_hi32[i], tol_lo32[i2], tol_hi32[i2]
            for k in range(n_buf):  # no branch: the compiler vectorises it
                a00, a01, a02 = n00[k], n01[k], n02[k]
                a10, a11, a12 = n10[k], n11[k], n12[k]
                a20, a21, a22 = n20[k], n21[k], n22[k]
                d_p = _frac_distance(a00, a01, a02, a10, a11, a12, a20, a21, a22, p0, p1, p2)
                d_r = _frac_distance(a00, a01, a02, a10, a11, a12, a20, a21, a22, r0, r1, r2)
                sure[k] += np.int32(d_p <= lo_p) + two * np.int32(d_r <= lo_r)
                maybe[k] += np.int32(d_p <= hi_p) + two * np.int32(d_r <= hi_r)
        n_ex = 0
        for k in range(n_buf):
            count[k] = sure[k]
            ex[n_ex] = k
            n_ex += maybe[k] != sure[k]
        _score_exactly(ex, n_ex, vec, b_inv, q_obs, tol, count, err)
        for k in range(n_buf):  # those that fail the float64 test are not kept, nor counted
            n_matched += valid[k]
            count[k] = count[k] if valid[k] else 0
        # the matches that could be kept by the last kept one so far (it only gets better),
        # listed without a branch; then each of them in order
        c_l, e_l = 3, np.inf
        if n_kept == n_keep:
            c_l, e_l = max(3, keep_c[n_keep - 1]), keep_e[n_keep - 1]
        # and at least the count that n_keep of these and the kept ones reach
        hist[:] = 0
        for k in range(n_buf):
            hist[count[k]] += 1
        for k in range(n_kept):
            hist[keep_c[k]] += 1
        c_t, n_above = n, hist[n]
        while n_above < n_keep and c_t > c_l:
            c_t -= 1
            n_above += hist[c_t]
        if c_t > c_l:
            c_l, e_l = c_t, np.inf
        n_ex = 0
        for k in range(n_buf):
            ex[n_ex] = k
            n_ex += count[k] >= c_l
        _score_exactly(ex, n_ex, vec, b_inv, q_obs, tol, count, err)
        n_can = 0
        for v in range(n_ex):
            k = ex[v]
            can[n_can] = k
            n_can += (count[k] > c_l) | ((count[k] == c_l) & (err[k] <= e_l))
        for v in range(n_can):
            k = can[v]
            c_k, e_k = count[k], err[k]
            if n_kept == n_keep:
                c_l, e_l = keep_c[n_keep - 1], keep_e[n_keep - 1]
                if (c_k < c_l) | ((c_k == c_l) & (e_k > e_l)):
                    continue
            a_k, s = buf_a[k], buf_s[k]
            b_k = (hm[s] if buf_neg[k] else half_idx[h_lo + s]) - lo2
            if n_kept == n_keep and c_k == c_l and e_k == e_l and (
                    a_k > keep_a[n_keep - 1] or (a_k == keep_a[n_keep - 1]
                                                 and b_k > keep_b[n_keep - 1])):
                continue
            # insert after every kept candidate that is better (more spots, less error, earlier)
            pos = n_kept if n_kept < n_keep else n_keep - 1
            while pos > 0:
                c_l, e_l = keep_c[pos - 1], keep_e[pos - 1]
                if c_l > c_k or (c_l == c_k and (e_l < e_k or (e_l == e_k and (
                        keep_a[pos - 1] < a_k or (keep_a[pos - 1] == a_k
                                                  and keep_b[pos - 1] < b_k))))):
                    break
                keep_a[pos] = keep_a[pos - 1]
                keep_b[pos] = keep_b[pos - 1]
                keep_c[pos] = keep_c[pos - 1]
                keep_e[pos] = keep_e[pos - 1]
                pos -= 1
            keep_a[pos] = a_k
            keep_b[pos] = b_k
            keep_c[pos] = c_k
            keep_e[pos] = e_k
            if n_kept < n_keep:
                n_kept += 1
        n_buf = 0
    rots = np.empty((n_kept, 3, 3))
    for k in range(n_kept):  # U = T_obs T_latᵀ (numba's matrix product of 3x3 costs 1 µs)
        r, t = rep[keep_a[k]], lo2 + keep_b[k]
        t_lat = _pair_frame(unit[r, 0], unit[r, 1], unit[r, 2],
                            unit[t, 0], unit[t, 1], unit[t, 2])  # rows e1, e2, e3: T_latᵀ
        for i in range(3):
            for j in range(3):
                rots[k, i, j] = (t_obs[i, 0] * t_lat[j] + t_obs[i, 1] * t_lat[3 + j]
                                 + t_obs[i, 2] * t_lat[6 + j])
    return rots, n_matched


#: pairs within this angle (8 degrees) of collinear are not tried: orientation undetermined
_COS_COLLINEAR = math.cos(math.radians(8.0))


def _candidate_pairs(q: np.ndarray, q_len: np.ndarray, sel: np.ndarray, table: _Table,
                     params: IndexParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table windows ``[lo, hi)`` of the pair spots ``sel`` (``|q|`` within tolerance; among
    the orbit representatives and among all indices), as rows of ``(n, 2)`` arrays by spot
    (-1 for the others: a dict of the few a search reads cost 3 µs to build), and their pairs,
    rows ``(n(h1) n(h2), i, j)``, that are not nearly collinear, fewest candidates first
    (:func:`_pair_windows`)."""
    return _pair_windows(  # type: ignore[no-any-return]
        q, q_len, np.ascontiguousarray(sel, dtype=np.int64), table.rep_q_len, table.q_len,
        params.q_tolerance_rel, params.q_tolerance_abs_inv_a, _COS_COLLINEAR)


@njit(cache=True, nogil=True)
def _pair_windows(q, q_len, sel, rep_q_len, all_q_len, tol_rel, tol_abs,
                  collinear):  # pragma: no cover - compiled
    """:func:`_candidate_pairs` in one compiled pass (its dozen numpy steps and the Python loop
    over the 66 pairs of 12 spots cost 25 µs, a tenth of a search for a further lattice): each
    spot's windows ``[lo, hi)`` among the representatives and among all indices, then the pairs
    ``(cost, i, j)`` that are not nearly collinear (``|cos| > collinear``) and have candidates,
    sorted as tuples are (cost, then ``i``, then ``j``), as the rows of one array (three arrays
    and their tuples cost 3 µs more); the lower-resolution spot of a pair (the earlier in
    ``sel``) takes the representative role: fewer candidates."""
    k = sel.size
    lo_r = np.empty(k, np.int64)
    hi_r = np.empty(k, np.int64)
    lo_a = np.empty(k, np.int64)
    hi_a = np.empty(k, np.int64)
    win_rep = np.full((q.shape[0], 2), -1, np.int64)
    win_all = np.full((q.shape[0], 2), -1, np.int64)
    unit = np.empty((k, 3))
    for a in range(k):
        x = q_len[sel[a]]
        tol = tol_rel * x + tol_abs
        lo_r[a] = np.searchsorted(rep_q_len, x - tol)
        hi_r[a] = np.searchsorted(rep_q_len, x + tol)
        lo_a[a] = np.searchsorted(all_q_len, x - tol)
        hi_a[a] = np.searchsorted(all_q_len, x + tol)
        win_rep[sel[a], 0], win_rep[sel[a], 1] = lo_r[a], hi_r[a]
        win_all[sel[a], 0], win_all[sel[a], 1] = lo_a[a], hi_a[a]
        for c in range(3):
            unit[a, c] = q[sel[a], c] / x
    n_max = k * (k - 1) // 2
    cost = np.empty(n_max, np.int64)
    first = np.empty(n_max, np.int64)
    second = np.empty(n_max, np.int64)
    m = 0
    for a in range(k):
        n1 = hi_r[a] - lo_r[a]
        for b in range(a + 1, k):
            c = unit[a, 0] * unit[b, 0] + unit[a, 1] * unit[b, 1] + unit[a, 2] * unit[b, 2]
            if abs(c) > collinear:
                continue  # nearly collinear pair: orientation undetermined
            n2 = hi_a[b] - lo_a[b]
            if n1 * n2 > 0:
                cost[m], first[m], second[m] = n1 * n2, sel[a], sel[b]
                m += 1
    cost, first, second = cost[:m], first[:m], second[:m]
    order = np.argsort(second, kind="mergesort")  # stable sorts, last key first
    order = order[np.argsort(first[order], kind="mergesort")]
    order = order[np.argsort(cost[order], kind="mergesort")]
    pairs = np.empty((m, 3), np.int64)
    for p in range(m):
        pairs[p, 0], pairs[p, 1], pairs[p, 2] = cost[order[p]], first[order[p]], second[order[p]]
    return win_rep, win_all, pairs


#: the most sets of off-lattice spots :func:`_pairs_tried` enumerates: beyond (many pair spots,
#: several off) it tries every pair, as it does once all but two spots may be off
_MAX_OFF_LATTICE_SETS = 4096


@njit(cache=True, nogil=True)
def _n_off_lattice_sets(n_spots, n_off, cap):  # pragma: no cover - compiled
    """How many sets of at most ``n_off`` of ``n_spots`` spots there are, or ``cap + 1`` once
    more than ``cap`` (no overflow on the way)."""
    total = 0
    n_r = 1  # C(n_spots, r)
    for r in range(min(n_off, n_spots) + 1):
        if r:
            n_r = n_r * (n_spots - r + 1) // r
        total += n_r
        if total > cap:
            return cap + 1
    return total


@njit(cache=True, nogil=True)
def _subset_masks(n_spots, n_off, n_sets):  # pragma: no cover - compiled
    """The ``n_sets`` sets of at most ``n_off`` of ``n_spots`` spots as bit masks, smallest sets
    first, each size in :func:`itertools.combinations` order. Listed set by set, not filtered
    from all ``2**n_spots`` masks, which a setting of 30 pair spots made 8 GB."""
    out = np.empty(n_sets, np.int64)
    chosen = np.empty(max(n_off, 1), np.int64)
    m = 0
    for r in range(min(n_off, n_spots) + 1):
        for a in range(r):
            chosen[a] = a
        while True:
            mask = 0
            for a in range(r):
                mask |= 1 << chosen[a]
            out[m] = mask
            m += 1
            a = r - 1  # the next combination: raise the last index that can still rise
            while a >= 0 and chosen[a] == n_spots - r + a:
                a -= 1
            if a < 0:
                break
            chosen[a] += 1
            for b in range(a + 1, r):
                chosen[b] = chosen[b - 1] + 1
    return out


@njit(cache=True, nogil=True)
def _tried_positions(pairs, max_pairs, max_candidates, cover, n_off,
                     try_sets):  # pragma: no cover - compiled
    """The rows of ``pairs`` (``(cost, i, j)``, in order) to try: among the first
    ``max_pairs``, those of at most ``max_candidates``; with ``cover``, of those the positions
    :func:`_cover_search` chooses when at most ``n_off`` spots may be off a lattice, except
    where the pairs' spots are all but two or fewer (any pair finds what it can), more than 62,
    or have more than ``_MAX_OFF_LATTICE_SETS`` sets of ``n_off`` off: then every one. One
    compiled pass (the pairs as tuples, their spots' bit masks and the set listing cost 10 µs
    a search in Python)."""
    k = min(max_pairs, pairs.shape[0])
    keep = np.empty(k, np.int64)
    m = 0
    for p in range(k):
        if pairs[p, 0] <= max_candidates:
            keep[m] = p
            m += 1
    keep = keep[:m]
    if not cover or m == 0:
        return keep
    ends = np.empty(2 * m, np.int64)
    for p in range(m):
        ends[2 * p], ends[2 * p + 1] = pairs[keep[p], 1], pairs[keep[p], 2]
    spots = np.unique(ends)
    n_spots = spots.size
    if n_off >= n_spots - 1 or n_spots > 62:
        return keep
    n_sets = _n_off_lattice_sets(n_spots, n_off, _MAX_OFF_LATTICE_SETS)
    if n_sets > _MAX_OFF_LATTICE_SETS:
        return keep
    bits = np.empty(m, np.int64)
    cost = np.empty(m, np.int64)
    for p in range(m):
        bits[p] = ((1 << np.searchsorted(spots, pairs[keep[p], 1]))
                   | (1 << np.searchsorted(spots, pairs[keep[p], 2])))
        cost[p] = pairs[keep[p], 0]
    return keep[_cover_search(bits, cost, _subset_masks(n_spots, n_off, n_sets), try_sets)]


def _pairs_tried(pairs: np.ndarray, params: IndexParams, n_off: int | None) -> np.ndarray:
    """The rows ``(cost, i, j)`` of ``pairs`` that :func:`index_q_candidates` tries: the first
    ``max_pairs`` of at most ``max_pair_candidates``, and when at most ``n_off`` spots may be
    off a lattice (not None) the cheapest of them that find every lattice those could find.

    The pair search finds a lattice from a pair of its spots (the pair test accepts their two
    indices), so a lattice whose off-lattice spots ``S`` touch every pair tried is not found,
    and no pair can find one whose ``S`` touches them all. Once each set ``S`` of at most
    ``n_off`` spots that some pair misses is missed by a pair tried, the others can only find
    again what those found. Tried are the fewest first pairs that do so, or, with at most two
    off, the set of two or three of the 16 first pairs of the fewest candidates in all that
    does (:func:`_tried_positions`, :func:`_cover_search`). With ``n_off`` at least the number
    of spots less one every pair is tried (all spots but two miss only their pair).

    This ends the search for a further lattice (:func:`index_lattices`) on the 8 or 9 false
    spots a 60-spot hit leaves: at high resolution, their 26-36 pairs hold 10^4 to 10^5
    candidate orientations; with 8 spots every one must be on the lattice and the first pair
    is enough; with 9, two disjoint pairs or three pairs on three spots are (the first pairs
    share the lowest-resolution spot, the one with the fewest candidates: on the 9 false spots
    a triclinic 60-spot hit leaves the cheapest set halves the candidates of the first pairs
    needed, 3.7 10^7 index pairs over 37 searches -> 2.0 10^7). A search on 19 spots or more
    with the default settings tries every pair (12 pair spots, 11 off). The cover search is one
    compiled pass: the boolean matrices and bit words it replaced cost 55-70 µs a search.
    """
    if pairs.shape[0] == 0 or pairs[0, 0] > params.max_pair_candidates:
        return pairs[:0]  # cheapest first: none to try (28 of the 155 bench leftover searches)
    pos = _tried_positions(pairs, params.max_pairs, params.max_pair_candidates,
                           n_off is not None, -1 if n_off is None else n_off,
                           n_off is not None and n_off <= 2)
    return pairs[pos]


@njit(cache=True, nogil=True)
def _cover_search(pair_bits, cost, off_sets, try_sets):  # pragma: no cover - compiled
    """:func:`_pairs_tried`' choice on bit masks: the indices of the pairs to try, ascending.

    A pair misses the set ``S`` of off-lattice spots when neither of its spots is in ``S``; the
    sets some pair misses must each be missed by a pair tried. First the fewest first pairs
    that do so; then, with ``try_sets`` and more than two of those, the cheapest
    set of two, then of three, of the first 16 pairs (first in
    :func:`itertools.combinations` order among the cheapest) if cheaper still."""
    n_pairs = pair_bits.size
    n_sets = off_sets.size
    must = np.empty(n_sets, np.int64)  # the sets some pair misses
    n_must = 0
    t = 0
    for s in range(n_sets):
        for p in range(n_pairs):
            if off_sets[s] & pair_bits[p] == 0:
                must[n_must] = off_sets[s]
                n_must += 1
                t = max(t, p + 1)
                break
    best = np.arange(t)
    if t <= 2 or not try_sets:
        return best
    best_cost = cost[:t].sum()
    k = min(n_pairs, 16)
    n_words = (n_must + 63) // 64
    covers = np.zeros((k, n_words), np.uint64)  # the must sets each of the first k misses
    want = np.zeros(n_words, np.uint64)
    for m in range(n_must):
        bit = np.uint64(1) << np.uint64(m % 64)
        want[m // 64] |= bit
        for p in range(k):
            if must[m] & pair_bits[p] == 0:
                covers[p, m // 64] |= bit
    found = np.empty(0, np.int64)
    for a in range(k):
        for b in range(a + 1, k):
            total = cost[a] + cost[b]
            if total >= best_cost:
                continue
            ok = True
            for w in range(n_words):
                if covers[a, w] | covers[b, w] != want[w]:
                    ok = False
                    break
            if ok:
                best_cost = total
                found = np.array([a, b])
    for a in range(k):
        for b in range(a + 1, k):
            for c in range(b + 1, k):
                total = cost[a] + cost[b] + cost[c]
                if total >= best_cost:
                    continue
                ok = True
                for w in range(n_words):
                    if covers[a, w] | covers[b, w] | covers[c, w] != want[w]:
                        ok = False
                        break
                if ok:
                    best_cost = total
                    found = np.array([a, b, c])
    return found if found.size else best


def index_q_candidates(
    q: np.ndarray,
    rays: np.ndarray,
    perp_tol_inv_a: np.ndarray,
    target: TargetCell,
    params: IndexParams,
    pair_order: np.ndarray,
    least_indexed: int = 0,
    *,
    q_len_inv_a: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate orientations ``U`` of a frame from pairs of its scattering vectors.

    Parameters
    ----------
    q : ``(n, 3)`` observed scattering vectors (Å⁻¹, lab frame).
    rays : ``(n, 3)`` unit vectors along the observed diffracted rays.
    perp_tol_inv_a : ``(n,)`` how far (Å⁻¹) across its ray a spot may be from its lattice point.
    target, params : target cell and options.
    pair_order : indices of the spots eligible for pairs, most promising first.
    least_indexed : the least number of the ``n`` spots a solution must index to be accepted
        (:func:`_least_indexed`; 0: no bound). At most ``n - least_indexed`` spots are off
        its lattice, so only pairs that have one on any lattice the others could find are
        tried: the cheapest such set (:func:`_pairs_tried`).
    q_len_inv_a : ``|q|`` when the caller has it (:func:`index_spots`), as ``np.linalg.norm``
        gives it; computed here otherwise.

    Returns
    -------
    (rotations (k, 3, 3), counts (k,), n_tested)
        Polished candidates sorted best first by the number of spots they index in the stills
        sense (see :func:`_polish_and_score`), and how many raw pair rotations were scored.
    """
    q = np.ascontiguousarray(q, dtype=float)
    q_len = np.linalg.norm(q, axis=1) if q_len_inv_a is None else q_len_inv_a
    sel = pair_order[: params.n_pair_spots]
    d_min = 1.0 / (q_len[sel].max() * (1 + params.q_tolerance_rel) + params.q_tolerance_abs_inv_a)
    table = target_table(target, d_min)
    b, b_inv = target._fixed.b, target._fixed.b_inv
    n = q.shape[0]
    early = max(params.min_indexed, math.ceil(params.early_exit_fraction * n))
    exc_tol = 1.5 * params.max_excitation_inv_a

    win_rep, win_all, pairs = _candidate_pairs(q, q_len, sel, table, params)
    tried = _pairs_tried(pairs, params, n - least_indexed if least_indexed > 0 else None)
    if tried.shape[0] == 0:
        return np.zeros((0, 3, 3)), np.zeros(0, dtype=np.int64), 0
    rots, counts, err, n_tested = _search_pairs(
        np.ascontiguousarray(tried[:, 1:]), win_rep, win_all, table.rep_idx, table.qc_unit, table.half_idx,
        table.half_unit, table.half_unit32, table.half_mate, q, q_len, rays, perp_tol_inv_a, b,
        b_inv, math.radians(params.angle_tolerance_deg), params.max_excitation_inv_a,
        params.hkl_tolerance, params.n_polish_per_pair, exc_tol, early)
    order = np.lexsort((err, -counts))
    return rots[order], counts[order], n_tested


@njit(cache=True, nogil=True)
def _search_pairs(spots_ij, win_rep, win_all, rep_idx, unit, half_idx, half_unit, half_unit32,
                  half_mate, q, q_len, rays, perp_tol, b, b_inv, angle_tol_rad, max_exc,
                  hkl_tol, n_keep, exc_tol, early):  # pragma: no cover - compiled
    """:func:`index_q_candidates`' loop over the pairs tried (rows ``(i, j)`` of ``spots_ij``)
    in one compiled call: each pair's angle band, its raw rotations
    (:func:`_pair_top_candidates`) and their polishing (:func:`_polish_and_score`), until a
    candidate indexes ``early`` spots. Returns the polished rotations, their counts and errors
    in the order found, and how many raw rotations were scored. The Python loop cost 13 µs a
    pair around the two calls (their dispatch, the angle's arithmetic): a tenth of a search
    for a further lattice. The pair's cosine is summed as numpy's ``q_i @ q_j`` (a fused chain,
    :func:`~sfxflow.algorithms.fused.fma`), so the band is the same to the bit."""
    n_pairs = spots_ij.shape[0]
    rots = np.empty((n_pairs * n_keep, 3, 3))
    counts = np.empty(n_pairs * n_keep, np.int64)
    err = np.empty(n_pairs * n_keep)
    n_out = 0
    n_tested = 0
    for p in range(n_pairs):
        i, j = spots_ij[p, 0], spots_ij[p, 1]
        dot = fma(q[i, 2], q[j, 2], fma(q[i, 1], q[j, 1], q[i, 0] * q[j, 0]))
        obs_ang = math.acos(max(-1.0, min(1.0, dot / (q_len[i] * q_len[j]))))
        tol = angle_tol_rad + max_exc * (1.0 / q_len[i] + 1.0 / q_len[j])
        cos_hi = math.cos(max(0.0, obs_ang - tol))
        cos_lo = math.cos(min(math.pi, obs_ang + tol))
        top_rots, n_matched = _pair_top_candidates(
            unit, half_idx, half_unit, half_unit32, half_mate,
            rep_idx[win_rep[i, 0]:win_rep[i, 1]], win_all[j, 0], win_all[j, 1], cos_lo, cos_hi,
            q, i, j, b_inv, hkl_tol, n_keep)
        n_tested += n_matched
        k = top_rots.shape[0]
        if k == 0:
            continue
        pol, c2, e2 = _polish_and_score(top_rots, q, rays, perp_tol, b, hkl_tol, exc_tol, 3)
        rots[n_out:n_out + k] = pol
        counts[n_out:n_out + k] = c2
        err[n_out:n_out + k] = e2
        n_out += k
        if c2.max() >= early:
            break
    return rots[:n_out], counts[:n_out], err[:n_out], n_tested


# --------------------------------------------------------------------------- false solutions


@dataclass(frozen=True)
class Significance:
    """Outcome of :func:`solution_significance`.

    ``n_matched`` of ``n_spots`` spots are matched; ``p_chance`` is the mean probability that
    one random spot is matched by a lattice in a fixed orientation; ``log10_tail`` the log10
    binomial tail of that count; ``log10_trials`` the log10 number of distinguishable
    solutions the search could have produced.
    """

    n_spots: int
    n_matched: int
    p_chance: float
    log10_tail: float
    log10_trials: float

    @property
    def log10_false_probability(self) -> float:
        """log10 of the trials-corrected chance probability (at most 0)."""
        return min(0.0, self.log10_tail + self.log10_trials)


def chance_match_probability(
    cell_volume_a3: float,
    n_centring: int,
    wavelength_a: float,
    solid_angle_sr: np.ndarray | float,
    excitation_inv_a: np.ndarray | float,
) -> np.ndarray:
    """Probability that a random spot is matched by a lattice in a fixed orientation.

    The acceptance region of a spot is the part of reciprocal space whose points project within
    the tolerance of the spot: the solid angle ``Ω`` of the tolerance disc on the detector, seen
    from the sample, scaled to the Ewald sphere (area ``k² Ω``, ``k = 1/λ``) and ``2 e`` deep
    across it. The lattice has ``V / n_centring`` allowed points per Å⁻³ (``V`` the real-cell
    volume; centring removes ``1 - 1/n`` of the general reflections), so the expected number of
    lattice points in the region, a small number, is the probability (capped at 1).

    >>> round(float(chance_match_probability(1e6, 2, 1.0, 1e-5, 1e-3)), 6)
    0.01
    """
    return _capped_match_probability(
        _lattice_points_per_sr(cell_volume_a3, n_centring, wavelength_a),
        np.asarray(solid_angle_sr, float), np.asarray(excitation_inv_a, float))


def _lattice_points_per_sr(cell_volume_a3: float, n_centring: int, wavelength_a: float) -> float:
    """``(V / n_centring) k²``: :func:`chance_match_probability`'s factor of ``Ω 2 e``."""
    k = 1.0 / wavelength_a
    return (cell_volume_a3 / n_centring) * k * k


@register_jitable
def _capped_match_probability(points_per_sr, solid_angle_sr, excitation_inv_a):
    """:func:`chance_match_probability` from :func:`_lattice_points_per_sr`, on arrays (numpy)
    or one spot (compiled, :func:`_least_indexed_bound`): one formula for both."""
    return np.minimum(points_per_sr * solid_angle_sr * (2.0 * excitation_inv_a), 1.0)


def binomial_log10_tail(k: int, n: int, p: float) -> float:
    """``log10 P(X >= k)`` for ``X ~ Binomial(n, p)``, accurate far into the tail.

    >>> binomial_log10_tail(0, 5, 0.1)
    0.0
    >>> round(binomial_log10_tail(2, 2, 0.1), 12)
    -2.0
    >>> round(10 ** binomial_log10_tail(1, 3, 0.5), 12)
    0.875
    """
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    if n - k < 32:  # a short tail (a search for a further lattice): no arrays, 12 -> 2 µs
        terms_short = [_log_binomial_term(n, j, log_p, log_q, math.lgamma)
                       for j in range(k, n + 1)]
        top_short = max(terms_short)
        log_sum = top_short + math.log(sum(math.exp(t - top_short) for t in terms_short))
        return float(min(0.0, log_sum / math.log(10.0)))
    from scipy.special import gammaln

    terms = _log_binomial_term(n, np.arange(k, n + 1, dtype=float), log_p, log_q, gammaln)
    # log-sum-exp about the largest term (scipy's logsumexp costs 0.2 ms a call in checks)
    top = float(terms.max())
    log_sum = top + math.log(float(np.exp(terms - top).sum()))
    return float(min(0.0, log_sum / math.log(10.0)))


def _log_binomial_term(n: int, j: Any, log_p: float, log_q: float,
                       lgamma: Callable[[Any], Any]) -> Any:
    """``log (C(n, j) p^j q^(n-j))`` for a number ``j`` (``math.lgamma``) or an array of them
    (``scipy.special.gammaln``): :func:`binomial_log10_tail`'s terms, one formula for both."""
    return (lgamma(n + 1.0) - lgamma(j + 1.0) - lgamma(n - j + 1.0)
            + j * log_p + (n - j) * log_q)


def log10_independent_trials(
    resolution_rad: float,
    n_rotations: int,
    n_cell_lengths: int = 0,
    cell_length_tolerance: float = 0.0,
    n_cell_angles: int = 0,
    cell_angle_tolerance_deg: float = 0.0,
    n_shift_steps: float = 1.0,
) -> float:
    """log10 of the number of distinguishable solutions a search can produce.

    Orientations: the rotation group has volume ``8 π²``; ``n_rotations`` of them (the point
    group) are the same solution; two orientations give different matches when they differ by
    more than ``resolution_rad`` (the matching tolerance over the typical ``|q|``), i.e. one
    solution per ball of that radius: ``6 π / (|G| δ³)``. A free cell length may take
    ``2 tol / δ`` distinguishable values (a relative change ``ε`` moves a lattice point by
    ``ε |q|``), a free angle ``2 tol_rad / δ``; ``n_shift_steps`` counts the distinguishable
    detector shifts. Each factor is at least 1.

    >>> round(log10_independent_trials(0.01, 1), 3)  # 6 pi / 1e-6
    7.275
    >>> round(log10_independent_trials(0.01, 1, 1, 0.05), 3)  # x 10
    8.275
    """
    d = max(float(resolution_rad), 1e-9)
    log_n = math.log10(6.0 * math.pi / max(1, n_rotations)) - 3.0 * math.log10(d)
    log_n += n_cell_lengths * math.log10(max(1.0, 2.0 * cell_length_tolerance / d))
    log_n += n_cell_angles * math.log10(
        max(1.0, 2.0 * math.radians(cell_angle_tolerance_deg) / d))
    log_n += math.log10(max(1.0, n_shift_steps))
    return max(0.0, log_n)


def solution_significance(
    refined: RefineResult,
    spots: SpotTable,
    detector: Detector,
    beam: Beam,
    target: TargetCell,
    params: IndexParams,
) -> Significance:
    """How unlikely it is that a refined solution's spot matches are chance coincidences.

    Counts the spots matched within ``params.significance_tolerance_px`` and
    ``params.significance_excitation_inv_a``, computes the per-spot chance probability of
    each (:func:`chance_match_probability`, with the solid angle of the tolerance disc at that
    spot: ``π (t·pixel)² cos φ / L²`` for a spot at distance ``L`` and incidence ``φ``), the
    binomial tail of the count with their mean (:func:`binomial_log10_tail`) and the number of
    distinguishable solutions tried (:func:`log10_independent_trials`, resolution: the
    tolerance radius in Å⁻¹ over the median ``|q|`` of the matched spots; cell freedom as
    refined; the detector-shift range over the tolerance).
    """
    n = len(spots)
    omega, q_len, r_inv_a, pix = _acceptance_geometry(spots, detector, beam, params)
    depth = np.full(n, params.significance_excitation_inv_a)
    if params.profile_acceptance and n:
        depth = profile_depth_inv_a(refined, q_len, beam, params)
    p_i = chance_match_probability(target.cell.volume, _n_centring(target), beam.wavelength_a,
                                   omega, depth)
    p = float(np.mean(p_i)) if n else 1.0
    tol = params.significance_tolerance_px
    res = np.hypot(refined.residuals_px[:, 0], refined.residuals_px[:, 1])
    with np.errstate(invalid="ignore"):
        matched = (refined.indexed_mask & (res <= tol)
                   & (np.abs(refined.excitation_inv_a) <= depth))
    k = int(matched.sum())
    # angular resolution: the tolerance radius in reciprocal space over a typical |q|
    sel = matched if k else np.ones(n, bool)
    delta = float(np.median(r_inv_a[sel]) / max(np.median(q_len[sel]), 1e-9)) if n else 1.0
    rp = params.refine
    shift_steps = 1.0
    if rp.refine_detector_shift and refined.n_indexed >= rp.min_spots_detector_shift:
        steps_1d = 2.0 * rp.max_detector_shift_mm / (tol * float(np.median(pix)))
        shift_steps = max(1.0, steps_1d) ** 2
    return Significance(n, k, p, binomial_log10_tail(k, n, p),
                        _log10_trials(delta, target, params, shift_steps))


def _n_centring(target: TargetCell) -> int:
    return target._fixed.n_centring


def _acceptance_geometry(spots: SpotTable, detector: Detector, beam: Beam, params: IndexParams
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per spot: the solid angle (sr) of the significance tolerance disc seen from the sample,
    ``|q|`` (Å⁻¹), the disc's radius in reciprocal space (Å⁻¹) and the pixel size (mm)
    (one compiled loop: the dozen numpy steps on the 8 or 9 spots of a search for a further
    lattice cost 40 µs, twice a search)."""
    s0 = np.asarray(beam.s0_inv_a, dtype=float)
    return _acceptance_kernel(
        detector_tables(detector).d, np.asarray(spots.panel, dtype=np.int64),
        np.asarray(spots.fs_px, dtype=float), np.asarray(spots.ss_px, dtype=float),
        float(params.significance_tolerance_px), float(beam.wavelength_a), s0[0], s0[1], s0[2])


@njit(cache=True, nogil=True)
def _acceptance_kernel(d, panel, fs, ss, tol_px, wavelength_a, s0x, s0y,
                       s0z):  # pragma: no cover - compiled
    """:func:`_acceptance_geometry` for panel matrices ``d`` (lab = d @ (fs, ss, 1)): the spot's
    lab position, its distance, the incidence on its panel (the panel normal: fs x ss axes)."""
    n = panel.size
    omega = np.empty(n)
    q_len = np.empty(n)
    r_inv_a = np.empty(n)
    pix = np.empty(n)
    for i in range(n):
        omega[i], q_len[i], r_inv_a[i], pix[i] = _acceptance_point(
            d, panel[i], fs[i], ss[i], tol_px, wavelength_a, s0x, s0y, s0z)
    return omega, q_len, r_inv_a, pix


@njit(cache=True, nogil=True, inline="always")
def _lab_point_q(x, y, z, wavelength_a, s0x, s0y, s0z):  # pragma: no cover - compiled
    """The scattering vector ``q`` (Å⁻¹) of a lab point (mm), ``|q|`` and the point's distance
    from the sample, as :func:`~sfxflow.algorithms.geometry.lab_to_q` and the norms round them
    (what :func:`_spot_vectors` and :func:`_acceptance_point` both need, to the same bits)."""
    dist = math.sqrt(x * x + y * y + z * z)
    scale = dist * wavelength_a
    qx, qy, qz = x / scale - s0x, y / scale - s0y, z / scale - s0z
    return qx, qy, qz, math.sqrt(qx * qx + qy * qy + qz * qz), dist


@njit(cache=True, nogil=True, inline="always")
def _acceptance_point(d, panel, fs, ss, tol_px, wavelength_a, s0x, s0y,
                      s0z):  # pragma: no cover - compiled
    """One spot of :func:`_acceptance_kernel`: the solid angle, ``|q|`` (:func:`lab_to_q`'s and
    :func:`_spot_vectors`' to the bit), the disc's radius in reciprocal space and the pixel
    size along the fast axis."""
    m = d[panel]
    x, y, z = panel_point_mm(d, panel, fs, ss)
    _, _, _, q_len, dist = _lab_point_q(x, y, z, wavelength_a, s0x, s0y, s0z)
    p = math.sqrt(m[0, 0] ** 2 + m[1, 0] ** 2 + m[2, 0] ** 2)
    nx = (m[1, 0] * m[2, 1] - m[2, 0] * m[1, 1]) / (p * p)
    ny = (m[2, 0] * m[0, 1] - m[0, 0] * m[2, 1]) / (p * p)
    nz = (m[0, 0] * m[1, 1] - m[1, 0] * m[0, 1]) / (p * p)
    cos_inc = abs(nx * x + ny * y + nz * z) / dist
    omega = math.pi * (tol_px * p) ** 2 * cos_inc / dist**2
    r_inv_a = math.sqrt(omega) / math.sqrt(math.pi) / wavelength_a
    return omega, q_len, r_inv_a, p


@njit(cache=True, nogil=True)
def _least_indexed_bound(d, panel, fs, ss, tol_px, wavelength_a, s0x, s0y, s0z, profile,
                         nsigma, radius, angular, bandwidth_term, fixed_depth,
                         points_per_sr):  # pragma: no cover - compiled
    """:func:`_least_indexed`'s chance probability ``p`` (the mean over the spots, summed as
    ``np.mean`` sums) and angular resolution ``delta``, in one pass over the spots: the
    acceptance geometry (:func:`_acceptance_point`), the narrowest profile's depth
    (``profile``; else ``fixed_depth``) and the capped probability
    (:func:`_capped_match_probability`), numpy's bits (the dozen numpy steps and calls cost
    40 µs a search for a further lattice)."""
    n = panel.size
    p_i = np.empty(n)
    r_max = -math.inf
    q_min = math.inf
    for i in range(n):
        omega, q_len, r_inv_a, _ = _acceptance_point(d, panel[i], fs[i], ss[i], tol_px,
                                                     wavelength_a, s0x, s0y, s0z)
        depth = fixed_depth
        if profile:
            depth = nsigma * np.sqrt(_profile_sigma2(q_len * q_len, radius, angular,
                                                     bandwidth_term))
        p_i[i] = _capped_match_probability(points_per_sr, omega, depth)
        if i == 0 or r_inv_a > r_max or r_inv_a != r_inv_a:  # np.max / np.min: NaN wins
            r_max = r_inv_a if r_max == r_max else r_max
        if i == 0 or q_len < q_min or q_len != q_len:
            q_min = q_len if q_min == q_min else q_min
    q_floor = q_min if not 1e-9 > q_min else 1e-9  # Python's max(q_min, 1e-9), NaN kept
    return _pairwise_sum(p_i, n) / n, r_max / q_floor


def _log10_trials(delta: float, target: TargetCell, params: IndexParams,
                  shift_steps: float) -> float:
    """:func:`log10_independent_trials` of a search at angular resolution ``delta`` with the
    cell freedom the refinement has."""
    fixed = target._fixed
    n_len, n_ang = ((fixed.n_cell_lengths, fixed.n_cell_angles) if params.refine.refine_cell
                    else (0, 0))
    return log10_independent_trials(
        delta, fixed.n_rotations, n_len,
        params.cell_length_tolerance, n_ang, params.cell_angle_tolerance_deg, shift_steps)


def profile_depth_inv_a(refined: RefineResult, q_len: np.ndarray, beam: Beam,
                        params: IndexParams) -> np.ndarray:
    """Half-depth (Å⁻¹) of each spot's acceptance region across the Ewald sphere under the
    solution's own profile model: ``profile_nsigma`` profile widths ``σ(|q|)``, with the profile
    radius refined from the excitation errors of the spots the solution indexes
    (:func:`sfxflow.algorithms.predict.refine_profile`).

    A true lattice of a small crystal has broad, but consistent, excitation errors; a false
    lattice fitted to spots needs a broad profile too, and pays for it: the chance that a random
    spot falls in a deeper region is larger, so its matches are less significant.
    """
    mask = refined.indexed_mask & np.isfinite(refined.excitation_inv_a)
    model = refine_profile(refined.excitation_inv_a[mask], q_len[mask], beam, _PROFILE_PARAMS)
    return params.profile_nsigma * model.width_inv_a(q_len)


# --------------------------------------------------------------------------- main entry point


def _search_vectors(panel: np.ndarray, fs_px: np.ndarray, ss_px: np.ndarray, detector: Detector,
                    beam: Beam, params: IndexParams
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_spot_vectors` of spot columns (a :class:`SpotTable`'s: int32 and float64,
    contiguous, passed as they are): ``q``, ``|q|``, rays, the strict tolerance across each ray
    and the spots eligible for pairs, by ascending ``|q|``."""
    tables = detector_tables(detector)
    s0 = beam.s0_inv_a
    return _spot_vectors(  # type: ignore[no-any-return]
        tables.d, tables.memo("pixel_size_mm", lambda: _pixel_sizes_mm(detector)), panel,
        fs_px, ss_px, float(beam.wavelength_a), float(s0[0]), float(s0[1]), float(s0[2]),
        float(params.strict_tolerance_px), 1.0 / params.max_d_a)


def _pixel_sizes_mm(detector: Detector) -> np.ndarray:
    """Each panel's pixel size (mm), read-only (cached per detector in :func:`index_spots`)."""
    pix = np.array([p.pixel_size_mm for p in detector.panels], dtype=float)
    pix.setflags(write=False)
    return pix


@njit(cache=True, nogil=True)
def _spot_vectors(d, pixel_mm, panel, fs, ss, wavelength_a, s0x, s0y, s0z, strict_px,
                  min_q_len):  # pragma: no cover - compiled
    """What :func:`index_spots` searches with, in one pass over the spots: their scattering
    vectors ``q`` (Å⁻¹), their lengths, unit rays, the strict score's tolerance across each ray
    (``strict_px`` pixels, Å⁻¹) and the spots eligible for pairs (``|q| >= min_q_len``, not 0)
    by ascending ``|q|`` (stable). Each value to the bit as the numpy steps it replaced give it
    (the lab position as :func:`panel_point_mm` sums it, :func:`lab_to_q`, the norms summed in
    order), which with their calls cost 25 µs a search for a further lattice."""
    n = panel.size
    q = np.empty((n, 3))
    q_len = np.empty(n)
    rays = np.empty((n, 3))
    perp_tol = np.empty(n)
    for i in range(n):
        x, y, z = panel_point_mm(d, panel[i], fs[i], ss[i])
        q[i, 0], q[i, 1], q[i, 2], q_len[i], dist = _lab_point_q(x, y, z, wavelength_a, s0x,
                                                                 s0y, s0z)
        rays[i, 0], rays[i, 1], rays[i, 2] = x / dist, y / dist, z / dist
        perp_tol[i] = strict_px * pixel_mm[panel[i]] / dist / wavelength_a
    eligible = np.flatnonzero((q_len > 0) & (q_len >= min_q_len))
    return q, q_len, rays, perp_tol, eligible[np.argsort(q_len[eligible], kind="mergesort")]


def reason_kind(reason: str) -> str:
    """The kind of a failure reason, without its numbers: what tables count.

    >>> reason_kind("not significant: 9 of 40 spots matched, chance probability 10^-1.2 > 0.001")
    'not significant'
    >>> reason_kind("rmsd too high (2.31 px > 2.0 px)")
    'rmsd too high'
    """
    return re.split(r"\s*[(:]", reason, maxsplit=1)[0].strip() or reason


def _fail(reason: str, n: int, n_cand: int = 0) -> IndexResult:
    return IndexResult(
        success=False,
        miller_indices=np.zeros((n, 3), np.int32),
        indexed_mask=np.zeros(n, bool),
        reason=reason,
        n_spots=n,
        n_candidates=n_cand,
    )


def _cell_ok(cell: gemmi.UnitCell, target: gemmi.UnitCell, params: IndexParams) -> bool:
    p, t = np.array(cell.parameters), np.array(target.parameters)
    rel = np.abs(p[:3] - t[:3]) / t[:3]
    return bool(
        np.all(rel <= params.cell_length_tolerance)
        and np.all(np.abs(p[3:] - t[3:]) <= params.cell_angle_tolerance_deg)
    )


def _index_strongest(spots: SpotTable, detector: Detector, beam: Beam, target: TargetCell,
                     params: IndexParams) -> IndexResult:
    """:func:`index_spots` on the ``max_spots`` strongest spots (by ``snr``, else
    ``intensity``), then every other spot indexed on the refined lattice."""
    n_all = len(spots)
    assert params.max_spots is not None
    strength = np.where(np.isfinite(spots.snr) & (spots.snr > 0), spots.snr, -np.inf)
    if not np.isfinite(strength).any():
        strength = np.nan_to_num(spots.intensity, nan=-np.inf)
    keep = np.sort(np.argsort(-strength, kind="stable")[: params.max_spots])
    sub = index_spots(spots.select(keep), detector, beam, target,
                      replace(params, max_spots=None))
    if sub.success and sub.crystal is not None:
        hkl, mask, _ = index_on_lattice(
            sub.crystal, spots.panel, spots.fs_px, spots.ss_px, detector, beam,
            threshold_px=sub.outlier_threshold_px,
            max_excitation_inv_a=params.refine.max_excitation_inv_a,
            distance_shift_mm=sub.distance_shift_mm, detector_shift_mm=sub.detector_shift_mm)
    else:
        hkl, mask = np.zeros((n_all, 3), np.int32), np.zeros(n_all, bool)
    hkl[keep] = sub.miller_indices  # the refinement's own verdict on the spots it used
    mask[keep] = sub.indexed_mask
    n_indexed = int(mask.sum()) if sub.success else sub.n_indexed
    return replace(sub, miller_indices=hkl, indexed_mask=mask, n_spots=n_all,
                   n_indexed=n_indexed, fraction_indexed=n_indexed / n_all)


def _refine_candidates(rots: np.ndarray, counts: np.ndarray, spots: SpotTable,
                       detector: Detector, beam: Beam, target: TargetCell,
                       params: IndexParams) -> list[RefineResult]:
    """Refine the best distinct candidates (more than a degree apart), best first, until
    ``n_solutions_refined``, a candidate too weak to become a solution, or one clearly right."""
    # a candidate must index most of what a solution needs before refinement may add spots
    min_candidate = max(3, math.ceil(0.75 * params.min_indexed))
    early = max(params.min_indexed, math.ceil(params.early_exit_fraction * len(spots)))
    sym = _lab_symmetry_rotations(tuple(target.cell.parameters), target.space_group.xhm())
    tried: list[np.ndarray] = []
    refined = []
    for u, count in zip(rots, counts, strict=True):
        if len(tried) >= params.n_solutions_refined or count < min_candidate:
            break
        if _within_deg_of_any(u, tried, sym, 1.0):
            continue
        tried.append(u)
        cand = Crystal.from_u(target.cell, target.space_group, u)
        ref = refine_still(cand, spots.panel, spots.fs_px, spots.ss_px, detector, beam,
                           params.refine)
        refined.append(ref)
        if ref.n_indexed >= early and ref.rmsd_px <= 0.5 * params.max_rmsd_px:
            break  # clearly right: no need to look further
    return refined


def _rejection(ref: RefineResult, sig: Significance, n: int, target: TargetCell,
               params: IndexParams) -> str:
    """Why the refined solution ``ref`` on ``n`` spots is not accepted (empty: accepted)."""
    frac = ref.n_indexed / n
    log10_false = sig.log10_false_probability
    if ref.n_indexed < params.min_indexed:
        return f"too few spots indexed ({ref.n_indexed} < {params.min_indexed})"
    if frac < params.min_fraction_indexed:
        return f"fraction indexed too low ({frac:.2f} < {params.min_fraction_indexed})"
    if not ref.rmsd_px <= params.max_rmsd_px:
        return f"rmsd too high ({ref.rmsd_px:.2f} px > {params.max_rmsd_px} px)"
    med_exc = float(np.median(np.abs(ref.excitation_inv_a[ref.indexed_mask])))
    if not med_exc <= params.max_median_excitation_inv_a:
        return (f"lattice points too far from the Ewald sphere (median {med_exc:.2e} > "
                f"{params.max_median_excitation_inv_a:.2e} 1/A)")
    if not _cell_ok(ref.crystal.cell, target.cell, params):
        return ("refined cell too far from target ("
                + " ".join(f"{x:.2f}" for x in ref.crystal.cell.parameters) + ")")
    if not log10_false <= math.log10(params.max_false_probability):
        return (f"not significant: {sig.n_matched} of {sig.n_spots} spots matched, "
                f"chance probability 10^{log10_false:.1f} > {params.max_false_probability:g}")
    return ""


def _least_indexed(spots: SpotTable, detector: Detector, beam: Beam, target: TargetCell,
                   params: IndexParams) -> int:
    """The least number of ``spots`` a solution found on them must index to pass the count tests
    of :func:`_rejection` and its significance test; ``len(spots) + 1`` when none can.

    The significance bound takes the case most favourable to a solution: its profile at the
    narrowest the refinement allows (the chance of a match grows with the depth), the angular
    resolution at its coarsest over the spots (the number of trials falls as it grows), no
    detector shift, and every indexed spot matched. On the 8 or 9 false spots a 60-spot hit
    leaves it needs 4 to 6 of them for the bench targets, fewer than ``min_indexed``, so at the
    default settings the count tests bound it; with a lower ``min_indexed`` it is the
    significance test. It is computed (0.09 ms) only where the count tests already leave
    fewer spots off the lattice than the pair spots less one, where the pair search can stop
    early (:func:`_pairs_tried`); on more spots every pair is tried and the solution's own
    significance test decides, as before.
    """
    n = len(spots)
    f = params.min_fraction_indexed
    least_fraction = min(n, math.ceil(f * n))  # n_indexed / n >= f, as _rejection computes it
    while least_fraction > 0 and (least_fraction - 1) / n >= f:
        least_fraction -= 1
    while least_fraction < n and least_fraction / n < f:
        least_fraction += 1
    least = max(params.min_indexed, least_fraction)
    pair_spots = min(n, params.n_pair_spots)
    if least > n or n - least >= pair_spots - 1 or params.max_false_probability >= 1.0:
        return least
    narrowest = ProfileModel.for_beam(_PROFILE_PARAMS.min_profile_radius_inv_a, beam)
    fixed = target._fixed
    s0 = beam.s0_inv_a
    p, delta = _least_indexed_bound(
        detector_tables(detector).d, spots.panel, spots.fs_px, spots.ss_px,
        float(params.significance_tolerance_px), float(beam.wavelength_a),
        float(s0[0]), float(s0[1]), float(s0[2]), bool(params.profile_acceptance),
        float(params.profile_nsigma), float(narrowest.radius_inv_a),
        float(narrowest.divergence_term), float(narrowest.bandwidth_term_a),
        float(params.significance_excitation_inv_a),
        _lattice_points_per_sr(fixed.volume_a3, fixed.n_centring, beam.wavelength_a))
    limit = math.log10(params.max_false_probability) - _log10_trials(delta, target, params, 1.0)

    def significant(k: int) -> bool:
        return binomial_log10_tail(k, n, p) <= limit

    # a sufficient test first: P(X >= k) <= C(n, k) p^k (some k of the n spots all match), and
    # the tail is computed to far better than the margin; 0.3 µs against the tail's 1.8
    if 0.0 < p and math.log10(math.comb(n, least)) + least * math.log10(p) <= limit - 1e-9:
        return least
    if significant(least):
        return least
    if not significant(n):
        return n + 1
    lo, hi = least, n  # not significant at lo, significant at hi: the tail falls as k grows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if significant(mid) else (mid, hi)
    return hi


def _accepted_result(ref: RefineResult, q: np.ndarray, n_tested: int,
                     log10_false: float) -> IndexResult:
    """The successful :class:`IndexResult` of ``ref``, in the canonical setting."""
    n = q.shape[0]
    crystal = canonical_crystal(ref.crystal)
    # Miller indices in the canonical setting: A' = A M  ->  h' = M^-1 h
    m = np.rint(np.linalg.solve(ref.crystal.a_matrix, crystal.a_matrix))
    hkl = np.rint(ref.miller_indices @ np.linalg.inv(m).T).astype(np.int32)
    mask = ref.indexed_mask
    q_pred = hkl @ crystal.a_matrix.T
    rmsd_q = float(np.sqrt(np.mean(np.sum((q[mask] - q_pred[mask]) ** 2, axis=1))))
    return IndexResult(
        success=True,
        crystal=crystal,
        miller_indices=hkl,
        indexed_mask=mask,
        n_indexed=ref.n_indexed,
        fraction_indexed=ref.n_indexed / n,
        rmsd_px=ref.rmsd_px,
        rmsd_inv_a=rmsd_q,
        n_spots=n,
        n_candidates=n_tested,
        log10_false_probability=log10_false,
        detector_shift_mm=ref.detector_shift_mm,
        distance_shift_mm=ref.distance_shift_mm,
        outlier_threshold_px=ref.outlier_threshold_px,
    )


def index_spots(
    spots: SpotTable,
    detector: Detector,
    beam: Beam,
    target: TargetCell,
    params: IndexParams | None = None,
) -> IndexResult:
    """Index one still's spots against a known cell and refine the solution.

    The steps: scattering vectors of the spots, candidate orientations from spot pairs
    (:func:`index_q_candidates`), refinement of the best distinct candidates
    (:func:`_refine_candidates`), the tests of the best refined one (:func:`_rejection`,
    :func:`solution_significance`) and its canonical setting (:func:`_accepted_result`).

    Parameters
    ----------
    spots : the frame's spots (``panel``, ``fs_px``, ``ss_px`` are used).
    detector, beam : the frame's geometry (wavelength of this frame).
    target : known cell and space group.
    params : :class:`IndexParams`.

    Returns
    -------
    IndexResult
        ``success`` with the refined, canonical crystal, or a ``reason``: ``too few spots``,
        ``no candidate orientation``, or why the best candidates were rejected (too few indexed,
        fraction too low, RMSD too high, cell too far from the target).

    Examples
    --------
    >>> from scipy.spatial.transform import Rotation
    >>> from sfxflow.algorithms.geometry import miller_indices
    >>> from sfxflow.algorithms.predict import predict_spots
    >>> from sfxflow.models import Panel
    >>> det = Detector((Panel("p0", (-100.0, -100.0, 120.0), (1, 0, 0), (0, 1, 0), 0.1,
    ...                       (2000, 2000)),))
    >>> beam = Beam(wavelength_a=1.3)
    >>> target = TargetCell("79 79 38 90 90 90", "P 43 21 2")
    >>> truth = Crystal.from_u(target.cell, target.space_group,
    ...                        Rotation.random(random_state=3).as_matrix())
    >>> hkl = miller_indices(target.cell, target.space_group, 2.5)
    >>> p = predict_spots(truth, beam, det, hkl, 0.0004)
    >>> spots = SpotTable(p.panel, p.fs_px, p.ss_px, *np.zeros((4, len(p.panel))), p.d_a)
    >>> res = index_spots(spots, det, beam, target)
    >>> res.success, res.rmsd_px < 0.01, misorientation_deg(res.crystal, truth) < 0.01
    (True, True, True)
    """
    params = params or IndexParams()
    if params.max_spots is not None and len(spots) > params.max_spots:
        return _index_strongest(spots, detector, beam, target, params)
    n = len(spots)
    if n < max(params.min_spots, params.min_indexed):
        return _fail(f"too few spots ({n} < {max(params.min_spots, params.min_indexed)})", n)
    q, q_len, rays, perp_tol, pair_order = _search_vectors(spots.panel, spots.fs_px,
                                                           spots.ss_px, detector, beam, params)
    if pair_order.size < 2:
        return _fail("too few spots with usable resolution for pairs", n)
    least = _least_indexed(spots, detector, beam, target, params)
    if least > n:
        return _fail(f"not significant: a lattice on all {n} spots would be chance", n)
    rots, counts, n_tested = index_q_candidates(q, rays, perp_tol, target, params,
                                                pair_order, least, q_len_inv_a=q_len)
    if rots.shape[0] == 0:
        return _fail("no candidate orientation (no spot pair matches the cell)", n, n_tested)
    refined = _refine_candidates(rots, counts, spots, detector, beam, target, params)
    if not refined:
        return _fail("no candidate orientation indexes enough spots", n, n_tested)
    # the solution is the candidate that explains most spots (then the smallest RMSD); if it
    # fails a check the frame fails: a worse candidate that happens to pass is not trusted
    ref = max(refined, key=lambda r: (r.n_indexed, -r.rmsd_px))
    sig = solution_significance(ref, spots, detector, beam, target, params)
    reason = _rejection(ref, sig, n, target, params)
    if not reason:
        return _accepted_result(ref, q, n_tested, sig.log10_false_probability)
    return replace(_fail(reason, n, n_tested), n_indexed=ref.n_indexed,
                   fraction_indexed=ref.n_indexed / n, rmsd_px=ref.rmsd_px,
                   log10_false_probability=sig.log10_false_probability)


def index_lattices(
    spots: SpotTable,
    detector: Detector,
    beam: Beam,
    target: TargetCell,
    params: IndexParams | None = None,
) -> list[IndexResult]:
    """Index every lattice on a still: the first as :func:`index_spots`, then the spots no
    lattice explains yet, again and again, up to ``params.max_crystals`` (CrystFEL's
    ``--multi``).

    Returns
    -------
    list of IndexResult
        The successful lattices in the order found, each with ``miller_indices`` and
        ``indexed_mask`` over *all* the frame's spots (rows of another lattice are zero /
        False); when even the first lattice fails, a one-element list with that failure.
        Each later search must pass every test the first one does (significance included),
        on its own remaining spots, with ``further_min_indexed`` for ``min_indexed`` when set.
    """
    params = params or IndexParams()
    further = further_lattice_params(params)
    n = len(spots)
    remaining = np.arange(n)
    found: list[IndexResult] = []
    for _ in range(params.max_crystals):
        sub = spots if remaining.size == n else spots.select(remaining)
        res = index_spots(sub, detector, beam, target, further if found else params)
        if not res.success:
            if not found:
                return [res]
            break
        if remaining.size == n:
            found.append(res)
        else:
            hkl = np.zeros((n, 3), np.int32)
            hkl[remaining] = res.miller_indices
            mask = np.zeros(n, bool)
            mask[remaining] = res.indexed_mask
            found.append(replace(res, miller_indices=hkl, indexed_mask=mask, n_spots=n))
        if len(found) == params.max_crystals:
            break  # no further search: the spots it would get are not needed
        remaining = spots_left_after(res, sub, remaining, detector, beam, further)
        if remaining.size == 0:
            break
    return found


def further_lattice_params(params: IndexParams) -> IndexParams:
    """The options a search for a lattice after the first runs with: ``params`` with
    ``further_min_indexed`` for ``min_indexed`` when it is set."""
    if params.further_min_indexed is None:
        return params
    return replace(params, min_indexed=params.further_min_indexed)


def spots_left_after(res: IndexResult, sub: SpotTable, remaining: np.ndarray,
                     detector: Detector, beam: Beam, params: IndexParams) -> np.ndarray:
    """The frame's spots the search for a further lattice gets once ``res`` is found on ``sub``
    (the frame's spots ``remaining``; ``res``'s masks over ``sub``): those it neither indexes
    nor lies near (:func:`_near_lattice_columns`); none when too few are left to make a lattice
    (``min_spots``, ``min_indexed``): then no search is made, at no cost.
    :func:`index_lattices` steps from lattice to lattice with it."""
    too_few = max(params.min_spots, params.min_indexed)
    if remaining.size - int(res.indexed_mask.sum()) < too_few:
        return remaining[:0]
    explained = res.indexed_mask.copy()
    rest = np.flatnonzero(~explained)  # only these can be near the lattice yet not indexed
    explained[rest] = _near_lattice_columns(res, sub.panel[rest], sub.fs_px[rest],
                                            sub.ss_px[rest], detector, beam, params)
    left = remaining[~explained]
    return left if left.size >= too_few else left[:0]


def _near_lattice_columns(res: IndexResult, panel: np.ndarray, fs_px: np.ndarray,
                          ss_px: np.ndarray, detector: Detector, beam: Beam,
                          params: IndexParams) -> np.ndarray:
    """Which of the spots (columns ``panel``, ``fs_px``, ``ss_px``) sit on a found lattice's
    predictions though not counted as indexed by it (beyond ``max_spots``, or rejected as
    outliers by a whisker): they must not seed the search for the next lattice. Columns, not a
    :class:`SpotTable` (one of the rows left costs 7 µs to build, a fifth of
    :func:`spots_left_after`)."""
    if res.crystal is None or panel.size == 0:
        return np.zeros(panel.size, bool)
    _, _, rays, _, _ = _search_vectors(panel, fs_px, ss_px, detector, beam, params)
    hkl, _, exc = assign_hkl(res.crystal.a_matrix, rays, beam, params.refine.max_excitation_inv_a,
                             res.crystal.space_group)
    fs, ss = predict_positions_px(res.crystal.a_matrix, hkl, panel, detector, beam,
                                  distance_shift_mm=res.distance_shift_mm,
                                  detector_shift_mm=res.detector_shift_mm)
    near = np.empty(panel.size, np.bool_)
    _near_predictions(hkl, exc, fs, ss, fs_px, ss_px, params.refine.outlier_px, near)
    return near


@njit(cache=True, nogil=True)
def _near_predictions(hkl, exc, fs, ss, fs_px, ss_px, outlier_px,
                      near):  # pragma: no cover - compiled
    """Spot ``j`` has an index (not ``000``, a finite excitation) whose prediction lies within
    ``outlier_px`` of it: :func:`_near_lattice_columns`' test in one pass, not five numpy
    steps (5 µs on 9 spots; ``math.hypot`` is libm's, as ``np.hypot``)."""
    for j in range(near.size):
        indexed = (hkl[j, 0] != 0) | (hkl[j, 1] != 0) | (hkl[j, 2] != 0)
        near[j] = indexed & math.isfinite(exc[j]) & (
            math.hypot(fs[j] - fs_px[j], ss[j] - ss_px[j]) <= outlier_px)
