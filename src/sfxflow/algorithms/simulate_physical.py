"""Physically modelled partial observations of stills, for checking merging against a truth.

The merger (:mod:`sfxflow.algorithms.merge`) assumes a closed form: a Gaussian excitation-error
profile of one refined width. This module computes what a still records from a different, more
physical model, so that agreement with the truth is earned:

* **SASE spectrum.** Every shot has its own mean wavelength (jitter) and a spectrum of a random
  number of narrow spikes at random places inside a Gaussian envelope, with exponentially
  distributed weights. Each spike is its own Ewald sphere.
* **Mosaic crystal.** The crystal is ``n_blocks`` blocks, each slightly rotated (Gaussian angles,
  ``mosaicity_deg`` FWHM). A block is a sphere of diameter ``block_size_a``; its reciprocal-lattice
  point is the sphere's shape transform, ``(3 j1(x) / x)²``, whose integral over a plane at
  distance ε (the Ewald sphere, locally) is tabulated once. It has power-law tails, not a
  Gaussian's.
* **Crystals and beam.** Crystal scale log-uniform over ``scale_range`` (two orders of magnitude
  by default) times a shot-intensity jitter; a per-crystal B factor; cell non-isomorphism (a, b
  and c scaled per crystal, keeping the lattice symmetry).
* **What the integrator reports.** The crystal's mean orientation with a small indexing error and
  a slightly wrong cell, the shot's nominal wavelength, and every reflection its predictor would
  integrate (``|ε| <`` ``prediction_radius_inv_a`` on the detector), whether or not it truly
  diffracts; intensities with Poisson photon noise on a background, the polarisation factor of a
  horizontally polarised beam, and where asked, re-indexed by an ambiguity operator.

The truth here must not share the merger's model, so the SASE spectrum, the mosaic blocks and
the blocks' shape transform (:func:`block_profile`, :func:`_recorded`) are this module's own
physics on purpose. What the integrator *reports* (the nominal partiality column, Lorentz and
polarisation factors) is the model, and comes from :mod:`sfxflow.algorithms.diffraction`; the
polarisation of the true recording is that same exact geometric factor.

Pure computation: the true intensities come in as arrays (:class:`TrueIntensities`; the MTZ
reader is :func:`sfxflow.io.mtz.read_true_intensities`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import gemmi
import numba
import numpy as np
from scipy.spatial.transform import Rotation

from sfxflow.algorithms import diffraction
from sfxflow.algorithms.geometry import miller_indices
from sfxflow.algorithms.merge.reflections import AsuIndex
from sfxflow.algorithms.predict import Prediction, predict_spots
from sfxflow.models import (
    FWHM_TO_SIGMA,
    Beam,
    Crystal,
    Detector,
    a_matrix_columns,
    as_space_group,
    as_unit_cell,
)
from sfxflow.settings import check_fields, setting

__all__ = [
    "OBSERVATION_COLUMNS",
    "PhysicalParams",
    "SimulatedCrystal",
    "TrueIntensities",
    "block_profile",
    "simulate_crystal",
]


OBSERVATION_COLUMNS = (
    "h", "k", "l", "panel", "fs_px", "ss_px", "intensity", "sigma", "background", "peak_pixels",
    "partiality", "d_a", "excitation_error_inv_a", "lorentz", "polarisation", "flags",
)
"""Columns of :attr:`SimulatedCrystal.reflections`: those of a run directory's
``reflections.parquet`` (docs/run-directory.md) less ``source_url frame_index crystal``."""


@dataclass(frozen=True)
class TrueIntensities:
    """True intensities per asymmetric-unit reflection, Friedel mates apart.

    Attributes
    ----------
    index : the asymmetric unit (cell, space group, resolution).
    values : ``(2 * len(index),)`` intensities at ``2 * i + minus`` (NaN where unknown).

    Examples
    --------
    >>> t = TrueIntensities.from_arrays("40 40 40 90 90 90", "P 4", np.array([[1, 2, 3]]),
    ...                                 np.array([5.0]), np.array([7.0]))
    >>> t.at(np.array([[1, 2, 3], [-1, -2, -3], [2, -1, 3], [1, 1, 1]])).tolist()
    [5.0, 7.0, 5.0, nan]
    """

    index: AsuIndex
    values: np.ndarray

    @classmethod
    def from_arrays(cls, cell: gemmi.UnitCell | str | tuple[float, ...],
                    space_group: gemmi.SpaceGroup | str, hkl: np.ndarray,
                    i_plus: np.ndarray, i_minus: np.ndarray | None = None) -> TrueIntensities:
        """From Miller indices with I(+) and I(-) (``None`` or NaN: the same as I(+))."""
        hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
        uc, sg = as_unit_cell(cell), as_space_group(space_group)
        d = 1.0 / np.linalg.norm(hkl @ np.asarray(uc.frac.mat, dtype=float), axis=1)
        index = AsuIndex.build(uc, sg, float(d.min()) * (1 - 1e-9))
        values = np.full(2 * len(index), np.nan)
        i_plus = np.asarray(i_plus, dtype=float)
        i_minus = i_plus if i_minus is None else np.asarray(i_minus, dtype=float)
        i_minus = np.where(np.isfinite(i_minus), i_minus, i_plus)
        code = index.lookup(hkl)
        ok = code >= 0
        # a listed index that is itself a Friedel minus carries I(+) of the mate's orbit
        plus_code = code[ok] - code[ok] % 2
        is_minus = code[ok] % 2 == 1
        values[plus_code] = np.where(is_minus, i_minus[ok], i_plus[ok])
        values[plus_code + 1] = np.where(is_minus, i_plus[ok], i_minus[ok])
        return cls(index, values)

    def at(self, hkl: np.ndarray) -> np.ndarray:
        """The true intensity of each Miller index (NaN where unknown or absent)."""
        code = self.index.lookup(hkl)
        out = np.full(code.shape[0], np.nan)
        ok = code >= 0
        out[ok] = self.values[code[ok]]
        return out

    def merged(self) -> np.ndarray:
        """Friedel-averaged intensity per asymmetric-unit reflection."""
        v = self.values.reshape(-1, 2)
        with np.errstate(invalid="ignore"):
            return np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=1) \
                if np.isfinite(v).any() else v[:, 0]


@dataclass(frozen=True)
class PhysicalParams:
    """Parameters of :func:`simulate_crystal` (lengths in Å, Å⁻¹; angles as named).

    Parameters
    ----------
    wavelength_a : nominal wavelength.
    wavelength_jitter_rel : shot-to-shot rms of the mean wavelength (relative).
    bandwidth_fwhm : FWHM of the SASE envelope (relative).
    n_spikes_mean : mean number of spikes per shot (Poisson, at least 1).
    n_blocks : mosaic blocks per crystal.
    block_size_a : diameter of a mosaic block.
    mosaicity_deg : FWHM of the blocks' orientation spread.
    scale_photons : photons of a fully recorded reflection of unit true intensity, for the
        median crystal.
    scale_range : ratio of the largest to the smallest crystal scale (log-uniform).
    beam_jitter_rel : rms of the shot intensity (log-normal).
    b_sigma_a2 : rms of the per-crystal B factor about 0.
    cell_sigma_rel : rms of the per-crystal cell change (non-isomorphism).
    indexing_error_deg : rms of the reported orientation's error about each axis.
    cell_error_rel : rms of the reported cell's error.
    prediction_radius_inv_a : the predictor's reach: reflections with ``|ε|`` below it at the
        reported geometry are integrated.
    background_photons : background photons under a peak's integration area.
    background_ratio : pixels of background estimate per pixel of peak.
    polarization_fraction : fraction of the beam polarised along lab ``x``.
    d_min_a : highest resolution.
    """

    wavelength_a: float = setting(1.3051, gt=0)
    wavelength_jitter_rel: float = setting(1.0e-3, ge=0, lt=0.1)
    bandwidth_fwhm: float = setting(3.0e-3, ge=0, lt=0.2)
    n_spikes_mean: float = setting(12.0, ge=1)
    n_blocks: int = setting(24, ge=1)
    block_size_a: float = setting(1000.0, gt=0)
    mosaicity_deg: float = setting(0.05, ge=0, lt=10)
    scale_photons: float = setting(0.05, gt=0)
    scale_range: float = setting(100.0, ge=1)
    beam_jitter_rel: float = setting(0.3, ge=0)
    b_sigma_a2: float = setting(4.0, ge=0)
    cell_sigma_rel: float = setting(2.0e-3, ge=0, lt=0.1)
    indexing_error_deg: float = setting(0.01, ge=0, lt=5)
    cell_error_rel: float = setting(5.0e-4, ge=0, lt=0.1)
    prediction_radius_inv_a: float = setting(1.5e-3, gt=0)
    background_photons: float = setting(30.0, ge=0)
    background_ratio: float = setting(5.0, gt=0)
    polarization_fraction: float = setting(1.0, ge=0, le=1)
    d_min_a: float = setting(1.6, gt=0)

    def __post_init__(self) -> None:
        check_fields(self)  # NaN and infinities are refused too


@dataclass(frozen=True)
class SimulatedCrystal:
    """One simulated crystal: what the integrator reports, and the truth behind it.

    ``reported`` is the crystal as indexed (orientation and cell errors; indices in the reported
    setting); ``wavelength_a`` the shot's nominal wavelength; ``reflections`` the integrated
    reflections (:data:`OBSERVATION_COLUMNS`); ``truth`` per reflection the true intensity
    (``i_true``) and the physical partiality (``partiality_true``, recorded / full); the scalars
    are the crystal's true scale, B factor and re-indexing operator (index into the operators
    given, 0 = none).
    """

    reported: Crystal
    wavelength_a: float
    reflections: dict[str, np.ndarray] = field(repr=False)
    truth: dict[str, np.ndarray] = field(repr=False)
    scale: float
    b_factor_a2: float
    reindex_op: int


@functools.lru_cache(maxsize=8)
def _profile_table(block_size_a: float) -> tuple[np.ndarray, np.ndarray]:
    # |FT|² of a sphere of radius r, as a function of |Δq| (cycles/Å): (3 j1(x)/x)², x = 2π r t.
    # The Ewald sphere cuts it in (nearly) a plane at distance ε: f(ε) = 2π ∫_ε^∞ t S(t) dt.
    r = block_size_a / 2.0
    t_max = 40.0 / (2 * math.pi * r)
    t = np.linspace(0.0, t_max, 20001)
    x = 2 * math.pi * r * t
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(x > 1e-6, 3.0 * (np.sin(x) - x * np.cos(x)) / x**3, 1.0) ** 2
    g = t * s
    # integral from ε to t_max by the trapezium rule, from the top down
    seg = 0.5 * (g[1:] + g[:-1]) * np.diff(t)
    tail = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
    f = 2 * math.pi * tail
    return t, f / f[0]  # 1 at ε = 0: the peak of one block


def block_profile(eps_inv_a: np.ndarray, block_size_a: float) -> np.ndarray:
    """Fraction of a spherical block's peak diffraction recorded at excitation error ε.

    >>> p = block_profile(np.array([0.0, 1e-4, 1e-2]), 1500.0)
    >>> bool(p[0] == 1.0 > p[1] > p[2] >= 0)
    True
    """
    t, f = _profile_table(float(block_size_a))
    return np.interp(np.abs(eps_inv_a), t, f, right=0.0)


@numba.njit(cache=True)
def _recorded(q_blocks, s0_spikes, inv_lambda, weights, t_tab, f_tab):  # pragma: no cover
    # the true recording, deliberately not algorithms.diffraction's Gaussian model: every
    # spike's own Ewald sphere through every block's shape transform
    # q_blocks: (n_blocks, n_refl, 3); s0_spikes: (n_spikes, 3)
    n_b, n_r = q_blocks.shape[0], q_blocks.shape[1]
    n_s = s0_spikes.shape[0]
    dt = t_tab[1] - t_tab[0]
    n_t = t_tab.shape[0]
    out = np.zeros(n_r)
    for r in range(n_r):
        acc = 0.0
        for b in range(n_b):
            for s in range(n_s):
                x = q_blocks[b, r, 0] + s0_spikes[s, 0]
                y = q_blocks[b, r, 1] + s0_spikes[s, 1]
                z = q_blocks[b, r, 2] + s0_spikes[s, 2]
                e = abs(math.sqrt(x * x + y * y + z * z) - inv_lambda[s])
                u = e / dt
                i = int(u)
                if i < n_t - 1:
                    w = u - i
                    acc += weights[s] * (f_tab[i] * (1.0 - w) + f_tab[i + 1] * w)
        out[r] = acc / n_b
    return out


def _true_partiality(q_inv_a: np.ndarray, s0_spikes: np.ndarray, lam_spikes: np.ndarray,
                     weights: np.ndarray, params: PhysicalParams, rng: np.random.Generator
                     ) -> np.ndarray:
    """The true recording of reflections at ``q_inv_a`` (n, 3): every mosaic block (drawn
    here) through every spike's Ewald sphere (:func:`_recorded`)."""
    sigma_rad = math.radians(params.mosaicity_deg) * FWHM_TO_SIGMA
    blocks = Rotation.from_rotvec(rng.normal(0.0, sigma_rad, (params.n_blocks, 3))).as_matrix()
    q_blocks = np.ascontiguousarray(np.einsum("bij,rj->bri", blocks, q_inv_a))
    t_tab, f_tab = _profile_table(float(params.block_size_a))
    return _recorded(q_blocks, s0_spikes, 1.0 / lam_spikes, weights, t_tab, f_tab)


def simulate_crystal(
    truth: TrueIntensities,
    detector: Detector,
    params: PhysicalParams,
    rng: np.random.Generator,
    reindex_ops: list[np.ndarray] | None = None,
) -> SimulatedCrystal:
    """Simulate one crystal on one shot and return what integration would report.

    Parameters
    ----------
    truth : true intensities (cell, space group; absences honoured, anomalous pairs kept).
    detector : where reflections land (only reflections on a panel are reported).
    params : the physics (:class:`PhysicalParams`).
    rng : source of everything random for this crystal.
    reindex_ops : indexing-ambiguity operators (``hkl @ R``; the first the identity); the
        crystal is reported in one of them chosen at random. ``None``: never re-indexed.
    """
    # the random draws are made in a fixed order (cell, orientation, spectrum, errors, blocks,
    # scale, photons, re-indexing): a seed gives the same crystal whatever is reported
    cell0 = truth.index.cell
    sg = truth.index.space_group
    crystal, u = _true_crystal(cell0, sg, params, rng)
    lam_shot, lam_spikes, weights = _spectrum(params, rng)
    s0_spikes = np.array([0.0, 0.0, 1.0])[None, :] / lam_spikes[:, None]
    reported = _reported_crystal(crystal, u, params, rng)
    beam = Beam(wavelength_a=lam_shot)

    hkl_all = _hkl_sphere(cell0.parameters, sg.xhm(), params.d_min_a)
    pred = predict_spots(reported, beam, detector, hkl_all, params.prediction_radius_inv_a,
                         params.polarization_fraction)
    hkl = pred.hkl.astype(np.int64)
    i_true = truth.at(hkl)
    known = np.isfinite(i_true)
    hkl, i_true = hkl[known], np.maximum(i_true[known], 0.0)

    partiality_true = _true_partiality(hkl @ crystal.a_matrix.T, s0_spikes, lam_spikes, weights,
                                       params, rng)

    log_range = math.log(params.scale_range)
    scale = params.scale_photons * math.exp(rng.uniform(-0.5, 0.5) * log_range) * math.exp(
        params.beam_jitter_rel * rng.standard_normal())
    b_factor = float(rng.normal(0.0, params.b_sigma_a2))
    d = pred.d_a[known]
    pol = pred.polarisation[known]
    mu = scale * i_true * np.exp(-b_factor / (2 * d * d)) * partiality_true * pol
    intensity, sigma = _photons(mu, params, rng)

    op = 0
    hkl_rep = hkl
    if reindex_ops is not None and len(reindex_ops) > 1:
        op = int(rng.integers(0, len(reindex_ops)))
        r = np.asarray(reindex_ops[op], dtype=np.int64)
        hkl_rep = hkl @ r
        # the same spots: A' h' = A h with h' = h R
        reported = Crystal(reported.cell, sg,
                           reported.a_matrix @ np.linalg.inv(r.astype(float)).T)
    reflections = _reported_reflections(hkl_rep, pred, known, intensity, sigma, pol, params)
    return SimulatedCrystal(
        reported=reported,
        wavelength_a=lam_shot,
        reflections=reflections,
        truth={"i_true": i_true, "partiality_true": partiality_true},
        scale=scale,
        b_factor_a2=b_factor,
        reindex_op=op,
    )


def _reported_reflections(hkl: np.ndarray, pred: Prediction, known: np.ndarray,
                          intensity: np.ndarray, sigma: np.ndarray, pol: np.ndarray,
                          params: PhysicalParams) -> dict[str, np.ndarray]:
    """The columns integration would report for the predicted reflections ``pred[known]``
    (indices ``hkl`` as reported): the partiality as the nominal model gives it, not the true
    one."""
    exc = pred.excitation_error_inv_a[known]
    nominal_width = params.prediction_radius_inv_a / 2.0
    n = hkl.shape[0]
    return {
        "h": hkl[:, 0].astype(np.int32),
        "k": hkl[:, 1].astype(np.int32),
        "l": hkl[:, 2].astype(np.int32),
        "panel": pred.panel[known].astype(np.int32),
        "fs_px": pred.fs_px[known],
        "ss_px": pred.ss_px[known],
        "intensity": intensity,
        "sigma": sigma,
        "background": np.full(n, params.background_photons / 40.0),
        "peak_pixels": np.full(n, 40, dtype=np.int32),
        "partiality": diffraction.partiality(exc, nominal_width * nominal_width),
        "d_a": pred.d_a[known],
        "excitation_error_inv_a": exc,
        "lorentz": diffraction.lorentz_factor(n),
        "polarisation": pol,
        "flags": np.zeros(n, dtype=np.int32),
    }


def _true_crystal(cell0: gemmi.UnitCell, sg: gemmi.SpaceGroup, params: PhysicalParams,
                  rng: np.random.Generator) -> tuple[Crystal, np.ndarray]:
    """The crystal as it is and its orientation ``U``: the cell varied (non-isomorphism that
    keeps the lattice's symmetry: a and b together where they are equal), ``U`` random."""
    a, b, c, al, be, ga = cell0.parameters
    da, dc = rng.normal(0.0, params.cell_sigma_rel, 2)
    db = da if abs(a - b) < 1e-3 else rng.normal(0.0, params.cell_sigma_rel)
    if abs(a - c) < 1e-3 and abs(a - b) < 1e-3:
        dc = da
    true_cell = gemmi.UnitCell(a * (1 + da), b * (1 + db), c * (1 + dc), al, be, ga)
    u = Rotation.random(random_state=rng).as_matrix()
    return Crystal.from_u(true_cell, sg, u), u


def _spectrum(params: PhysicalParams, rng: np.random.Generator
              ) -> tuple[float, np.ndarray, np.ndarray]:
    """The shot's mean wavelength, and its SASE spikes' wavelengths and weights (sum 1)."""
    lam_shot = params.wavelength_a * (1.0 + params.wavelength_jitter_rel * rng.standard_normal())
    return lam_shot, *_spikes(lam_shot, params, rng)


def _spikes(lam_mean_a: float, params: PhysicalParams, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """A shot's SASE spikes about ``lam_mean_a``: their wavelengths and weights (sum 1)."""
    n_spikes = max(1, int(rng.poisson(params.n_spikes_mean)))
    lam_spikes = lam_mean_a * (1.0 + params.bandwidth_fwhm * FWHM_TO_SIGMA
                               * rng.standard_normal(n_spikes))
    weights = rng.exponential(1.0, n_spikes)
    return lam_spikes, weights / weights.sum()


def _reported_crystal(crystal: Crystal, u: np.ndarray, params: PhysicalParams,
                      rng: np.random.Generator) -> Crystal:
    """The crystal as indexing reports it: an orientation error and a cell length error."""
    err = Rotation.from_rotvec(rng.normal(0.0, math.radians(params.indexing_error_deg), 3))
    cell_err = 1.0 + rng.normal(0.0, params.cell_error_rel)
    a, b, c, al, be, ga = crystal.cell.parameters
    rep_cell = gemmi.UnitCell(a * cell_err, b * cell_err, c * cell_err, al, be, ga)
    return Crystal.from_u(rep_cell, crystal.space_group, err.as_matrix() @ u)


def _photons(mu: np.ndarray, params: PhysicalParams, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """Integrated intensities and sigmas of mean photon counts ``mu``: the peak area holds
    signal and background, the background is estimated from a ring ``background_ratio`` times
    larger."""
    bg = params.background_photons
    peak = rng.poisson(mu + bg).astype(float)
    bg_est = rng.poisson(bg * params.background_ratio) / params.background_ratio
    return peak - bg_est, np.sqrt(np.maximum(peak, 1.0) + bg / params.background_ratio)


@functools.lru_cache(maxsize=4)
def _hkl_sphere(cell: tuple[float, ...], sg_xhm: str, d_min_a: float) -> np.ndarray:
    # a little beyond d_min: non-isomorphous cells move reflections across the limit
    hkl = miller_indices(as_unit_cell(cell), as_space_group(sg_xhm), d_min_a * 0.98)
    hkl.setflags(write=False)
    return hkl


def crystal_row(sim: SimulatedCrystal, source_url: str, frame_index: int) -> dict:
    """The crystals.parquet row (docs/run-directory.md) of a simulated crystal, with its truth
    (``true_scale``, ``true_b_a2``, ``true_reindex_op``)."""
    a = sim.reported.a_matrix
    p = sim.reported.cell.parameters
    row: dict = {"source_url": source_url, "frame_index": frame_index, "event_id": "",
                 "block_id": "", "crystal": 0}
    row.update(dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), map(float, p), strict=True)))
    row.update(a_matrix_columns(a))
    n = len(sim.reflections["h"])
    row.update({"wavelength_a": sim.wavelength_a, "n_indexed": n, "rmsd_px": 0.0,
                "profile_radius_inv_a": float("nan"),
                "resolution_limit_a": float(sim.reflections["d_a"].min()) if n else float("nan"),
                "n_predicted": n, "n_integrated": n, "status": "integrated", "reason": "",
                "true_scale": sim.scale, "true_b_a2": sim.b_factor_a2,
                "true_reindex_op": sim.reindex_op})
    return row


class PhysicalFrames:
    """The physical model for whole images (``sfxflow simulate --intensities REF.mtz``).

    :func:`sfxflow.algorithms.simulate.simulate_frame` calls it per crystal: the true intensity
    of each predicted reflection (from ``truth``, relative to its mean, times the crystal's B
    factor and a size factor log-uniform over ``params.scale_range``) and its partiality from
    the shot's SASE spikes and the crystal's mosaic blocks, drawn from the frame's generator.

    Examples
    --------
    >>> t = TrueIntensities.from_arrays("40 40 40 90 90 90", "P 4", np.array([[1, 2, 3]]),
    ...                                 np.array([5.0]))
    >>> phys = PhysicalFrames(t, PhysicalParams())
    >>> c = Crystal.from_u(t.index.cell, t.index.space_group, np.eye(3))
    >>> f2, p = phys.intensity_and_partiality(c, Beam(1.3), np.array([[1, 2, 3], [0, 0, 1]]),
    ...                                       np.random.default_rng(0))
    >>> bool(np.isfinite(f2[0]) and np.isnan(f2[1]) and 0 <= p[0] <= 1)
    True
    """

    def __init__(self, truth: TrueIntensities, params: PhysicalParams) -> None:
        self.truth = truth
        self.params = params
        v = truth.values[np.isfinite(truth.values)]
        self.mean = float(np.mean(np.maximum(v, 0.0))) if v.size else 1.0

    def reach_inv_a(self, q_max_inv_a: float, beam: Beam) -> float:
        """The largest excitation error that still records anything (prediction's reach)."""
        p = self.params
        bw = 3.0 * p.bandwidth_fwhm * FWHM_TO_SIGMA * beam.wavelength_a * q_max_inv_a**2 / 2
        mosaic = 3.0 * math.radians(p.mosaicity_deg) * FWHM_TO_SIGMA * q_max_inv_a
        return bw + mosaic + 4.0 / p.block_size_a

    def intensity_and_partiality(self, crystal: Crystal, beam: Beam, hkl: np.ndarray,
                                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(relative true intensity with the crystal's B and size, physical partiality)."""
        p = self.params
        hkl = np.asarray(hkl, dtype=np.int64)
        i_true = self.truth.at(hkl) / self.mean
        lam, weights = _spikes(beam.wavelength_a, p, rng)
        s0 = np.asarray(beam.direction, dtype=float)[None, :] / lam[:, None]
        q = hkl.astype(float) @ crystal.a_matrix.T
        partiality = _true_partiality(q, s0, lam, weights, p, rng)
        size = math.exp(rng.uniform(-0.5, 0.5) * math.log(p.scale_range))
        b = float(rng.normal(0.0, p.b_sigma_a2))
        inv_d2 = np.einsum("ri,ri->r", q, q)
        return np.maximum(i_true, 0.0) * size * np.exp(-b * inv_d2 / 2.0), partiality
