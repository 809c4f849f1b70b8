"""Still-image simulator with ground truth: Bragg spots of a random crystal on any detector layout.

Physics, per frame (all lengths in Å, Å⁻¹, mm, px as the names say):

* **Prediction.** Every Miller index to ``d_min_a`` (systematic absences removed) is tested against
  the Ewald sphere of the frame's beam; positions come from
  :func:`sfxflow.algorithms.predict.predict_spots` (ray along ``q + s0``), so the truth uses the
  same geometry as every other part of sfxflow.
* **Partiality.** A reflection's excitation error ``ε`` is compared with an effective Gaussian
  width ``σ_ε(|q|)`` built (in quadrature, FWHM to σ) from the crystal domain size (``1/L``),
  mosaicity and beam divergence (``angle × |q|``) and bandwidth (``Δλ/λ · λ|q|²/2``);
  partiality is ``exp(-ε² / 2σ_ε²)`` and reflections below ``partiality_min`` are dropped. This
  closed form *is* the model of :mod:`sfxflow.algorithms.diffraction` (on purpose: the fast
  simulator checks the pipeline on its own terms); the truth that must not share the model is
  ``physics=`` (:mod:`sfxflow.algorithms.simulate_physical`: SASE spikes, mosaic blocks).
* **Intensities.** One "structure" per cell and ``structure_seed``: every unique reflection
  (symmetry and Friedel mates share it) gets an acentric Wilson intensity (exponential, mean 1),
  times ``exp(-B / (2 d²))``, times the crystal scale, partiality and the polarisation factor of
  a horizontally (``x``) polarised beam.
* **Rendering.** Each spot is a circular 2-D Gaussian of ``spot_sigma_px`` integrated exactly
  over every pixel's area (differences of ``erf``) on its panel, so the intensity-weighted
  centroid of the noiseless spot (pixel centres at +0.5) is the predicted position.
* **Background and detector.** Flat photons per pixel plus a water ring (Gaussian in ``|q|``)
  scaled by the pixel's solid angle (``cos³`` to the panel normal) and polarisation; Poisson
  photon noise, Gaussian readout noise, gain (ADU per photon), rounding to whole ADU; a fixed pattern of dead (0 ADU)
  and hot pixels; pixels masked in a ``Panel.mask`` read 0.

The per-pixel loop is a numba kernel with a counter-based random generator (splitmix64 keyed by
the frame seed and pixel index), so a frame is byte-identical for the same ``rng`` state. Pure
computation: no file access here (the CXI writer is :mod:`sfxflow.io.simulated`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import gemmi
import numba
import numpy as np

from sfxflow.algorithms import diffraction
from sfxflow.algorithms.detector_tables import detector_tables
from sfxflow.algorithms.geometry import miller_indices
from sfxflow.algorithms.predict import predict_spots
from sfxflow.models import (
    FWHM_TO_SIGMA,
    Beam,
    Crystal,
    Detector,
    as_space_group,
    as_unit_cell,
    photon_energy_ev_to_wavelength_a,
)
from sfxflow.settings import check_fields, refuse, setting

__all__ = [
    "TRUTH_COLUMNS",
    "FrameTruth",
    "SimulationParams",
    "expected_background",
    "iter_frames",
    "partiality_width_inv_a",
    "random_crystal",
    "render_spots",
    "simulate_frame",
    "sized_crystal_params",
    "with_defects_masked",
]

log = logging.getLogger(__name__)


TRUTH_COLUMNS: dict[str, str] = {
    "h": "int32",
    "k": "int32",
    "l": "int32",
    "panel": "int32",
    "fs_px": "float64",
    "ss_px": "float64",
    "intensity_photons": "float64",
    "partiality": "float64",
    "d_a": "float64",
    "snr_true": "float64",
    "excitation_error_inv_a": "float64",
    "background_photons": "float64",
    "on_panel_fraction": "float64",
}
"""Columns of the truth-reflection dict returned by :func:`simulate_frame`.

``intensity_photons`` is the expected number of photons the spot puts on its panel (after
partiality, polarisation and any loss past the panel edge, ``on_panel_fraction``);
``background_photons`` the expected background per pixel under the spot; ``snr_true`` is
``I / sqrt(I + background in the spot's 3σ disc)``.
"""


@dataclass(frozen=True)
class SimulationParams:
    """Everything that shapes a simulated SFX data set. Defaults: CSPAD-like at 9.5 keV,
    thermolysin-like crystals (P 61 2 2, a = b = 93, c = 130.5 Å) giving about 30-150 spots per
    hit clearly above a background of a few photons per pixel.

    Parameters
    ----------
    wavelength_a, bandwidth_fwhm, divergence_rad : nominal beam (see :meth:`beam`);
        :func:`simulate_frame` uses the :class:`~sfxflow.models.Beam` it is given.
    energy_jitter_rel : shot-to-shot relative rms of the photon energy (dataset writer).
    cell, space_group : the crystal (six numbers in Å and degrees; Hermann-Mauguin symbol).
    mosaicity_deg, domain_size_a : crystal mosaic spread (FWHM) and mosaic block size.
    d_min_a : highest resolution simulated.
    crystal_scale_photons : mean photons of a fully recorded reflection at low resolution.
    crystal_scale_log_sigma : per-hit log-normal spread of the crystal scale (crystal size).
    wilson_b_a2 : Wilson B factor (Å²): intensities fall as ``exp(-B / (2 d²))``.
    structure_seed : seed of the random "structure factors" (fixed across frames).
    partiality_min : reflections less partial than this are not simulated.
    spot_sigma_px : spot point-spread (Gaussian σ, pixels).
    background_photons : flat background per pixel.
    water_ring_photons, water_ring_d_a, water_ring_width_inv_a : water ring peak height
        (photons/pixel head-on), its position as a d spacing and its Gaussian σ in ``|q|``.
    polarization_fraction : fraction of the beam polarised along lab ``x`` (rest along ``y``).
    readout_noise_photons : Gaussian readout noise (σ, in photons).
    adu_per_photon : detector gain.
    dead_fraction, hot_fraction, hot_photons, defect_seed : fixed pattern of dead pixels
        (always 0 ADU) and hot pixels (``hot_photons`` extra); the same for every frame.
    crystal_size_min_a, crystal_size_max_a : when the maximum is > 0, every hit's crystal has
        its own size ``L`` (Å), drawn log-uniformly between the two (real SFX crystals: 100 nm
        to a few µm). Its shape transform widens the reciprocal-lattice point by ``1/L`` (the
        domain size is ``min(domain_size_a, L)``) and each spot by ``λ/L`` in angle (added in
        quadrature to ``spot_sigma_px``), so small crystals give broad partiality profiles
        and wider spots. 0 (default): every crystal is ``domain_size_a``.
    hit_fraction : probability that a frame holds a crystal (the rest are blank misses).
    noise : ``False`` renders expectation values (no Poisson / readout noise), for tests.
    """

    wavelength_a: float = setting(1.3051, ge=0.1, le=10)  # 9.5 keV
    bandwidth_fwhm: float = setting(2.0e-3, ge=0, le=0.5)
    divergence_rad: float = setting(5.0e-5, ge=0, le=0.1)
    energy_jitter_rel: float = setting(1.0e-3, ge=0, lt=0.1)
    cell: tuple[float, float, float, float, float, float] = setting(
        (93.0, 93.0, 130.5, 90.0, 90.0, 120.0), check=as_unit_cell,
        expect="six numbers a b c alpha beta gamma (Å, degrees) that form a real cell")
    space_group: str = setting("P 61 2 2", check=as_space_group,
                               expect="a space group symbol (P6122, 'P 61 2 2') or number 1 to 230")
    mosaicity_deg: float = setting(0.05, ge=0, le=10)
    domain_size_a: float = setting(3000.0, gt=0, le=1e7)
    d_min_a: float = setting(1.8, gt=0, le=100)
    crystal_scale_photons: float = setting(250.0, ge=0, le=1e9)
    crystal_scale_log_sigma: float = setting(0.5, ge=0, le=10)
    wilson_b_a2: float = setting(25.0, ge=-100, le=1000)
    structure_seed: int = setting(0, ge=0, le=2**63 - 1)
    partiality_min: float = setting(0.01, gt=0, lt=1)
    spot_sigma_px: float = setting(0.8, gt=0, le=100)
    background_photons: float = setting(1.5, ge=0, le=1e6)
    water_ring_photons: float = setting(2.5, ge=0, le=1e6)
    water_ring_d_a: float = setting(3.1, gt=0, le=100)
    water_ring_width_inv_a: float = setting(0.03, gt=0, le=1)
    polarization_fraction: float = setting(1.0, ge=0, le=1)
    readout_noise_photons: float = setting(0.1, ge=0, le=1e6)
    adu_per_photon: float = setting(32.0, gt=0, le=1e6)
    dead_fraction: float = setting(2e-4, ge=0, lt=1)
    hot_fraction: float = setting(2e-5, ge=0, lt=1)
    hot_photons: float = setting(300.0, ge=0, le=1e9)
    defect_seed: int = setting(12345, ge=0, le=2**63 - 1)
    crystal_size_min_a: float = setting(1000.0, gt=0, le=1e7)
    crystal_size_max_a: float = setting(0.0, ge=0, le=1e7)
    hit_fraction: float = setting(0.5, ge=0, le=1)
    noise: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", tuple(float(x) for x in self.cell))
        check_fields(self)
        if 0 < self.crystal_size_max_a < self.crystal_size_min_a:
            refuse(self, "crystal_size_max_a", f"0 (off) or >= crystal_size_min_a "
                   f"({self.crystal_size_min_a})", also="crystal_size_min_a")
        object.__setattr__(self, "space_group", as_space_group(self.space_group).xhm())

    def beam(self) -> Beam:
        """The nominal beam of these parameters.

        >>> round(SimulationParams().beam().photon_energy_ev)
        9500
        """
        return Beam(
            wavelength_a=self.wavelength_a,
            bandwidth_fwhm=self.bandwidth_fwhm,
            divergence_rad=self.divergence_rad,
        )

    def unit_cell(self) -> gemmi.UnitCell:
        return as_unit_cell(self.cell)

    def spacegroup(self) -> gemmi.SpaceGroup:
        return as_space_group(self.space_group)


def random_crystal(
    cell: gemmi.UnitCell | str | tuple[float, ...],
    sg: gemmi.SpaceGroup | str,
    rng: np.random.Generator,
) -> Crystal:
    """A crystal of the given cell in a uniformly random orientation (Haar measure on SO(3)).

    >>> c = random_crystal("93 93 130.5 90 90 120", "P6122", np.random.default_rng(1))
    >>> bool(np.allclose(c.u_matrix @ c.u_matrix.T, np.eye(3)))
    True
    """
    from scipy.spatial.transform import Rotation  # here: `process` imports this module, not this

    u = Rotation.random(random_state=rng).as_matrix()
    return Crystal.from_u(as_unit_cell(cell), as_space_group(sg), u)


def partiality_width_inv_a(q_inv_a: np.ndarray, beam: Beam, params: SimulationParams) -> np.ndarray:
    """Gaussian σ (Å⁻¹) of the excitation-error profile of reflections at ``|q| = q_inv_a``.

    >>> w = partiality_width_inv_a(np.array([0.1, 0.5]), Beam(1.3, 2e-3), SimulationParams())
    >>> bool(w[1] > w[0] > 0)
    True
    """
    # the domain size is the radius; mosaicity and divergence add in quadrature as one angle
    return diffraction.profile_width_inv_a(
        q_inv_a, FWHM_TO_SIGMA / params.domain_size_a,
        diffraction.angular_term(math.hypot(math.radians(params.mosaicity_deg),
                                            beam.divergence_rad)),
        diffraction.bandwidth_term_a(beam.bandwidth_fwhm, beam.wavelength_a))


# ----------------------------------------------------------------------------- structure


def _symmetry_keys(hkl: np.ndarray, space_group: gemmi.SpaceGroup, m: int) -> np.ndarray:
    """One integer per symmetry-and-Friedel orbit: the largest encoded equivalent."""
    hkl = np.asarray(hkl, dtype=np.int64)
    width = 2 * m + 1
    best = np.full(hkl.shape[0], -1, dtype=np.int64)
    for op in space_group.operations().sym_ops:
        r = np.array(op.rot, dtype=np.int64) // gemmi.Op.DEN
        e = hkl @ r
        for sign in (1, -1):
            f = sign * e + m
            key = (f[:, 0] * width + f[:, 1]) * width + f[:, 2]
            np.maximum(best, key, out=best)
    return best


@dataclass(frozen=True)
class _Structure:
    hkl: np.ndarray  # (n, 3) int32, all indices to d_min, absences removed
    keys: np.ndarray  # sorted unique orbit keys
    f2: np.ndarray  # relative intensity (mean 1) per key
    m: int  # key encoding half-width


@functools.lru_cache(maxsize=4)
def _structure(
    cell: tuple[float, ...], sg_hm: str, d_min_a: float, structure_seed: int
) -> _Structure:
    uc = as_unit_cell(cell)
    sg = as_space_group(sg_hm)
    hkl = miller_indices(uc, sg, d_min_a)
    m = int(np.abs(hkl).max()) + 1 if hkl.size else 1
    keys = np.unique(_symmetry_keys(hkl, sg, m))
    f2 = np.asarray(np.random.default_rng(structure_seed).exponential(1.0, keys.shape[0]))
    hkl.setflags(write=False)
    log.debug("simulated structure: %d reflections, %d unique, to %.2f A", len(hkl), len(keys), d_min_a)
    return _Structure(hkl=np.ascontiguousarray(hkl), keys=keys, f2=f2, m=m)


def _structure_for(params: SimulationParams, crystal: Crystal) -> _Structure:
    cell = tuple(round(x, 6) for x in crystal.cell.parameters)
    return _structure(cell, crystal.space_group.xhm(), params.d_min_a, params.structure_seed)


def _relative_intensity(st: _Structure, hkl: np.ndarray, sg: gemmi.SpaceGroup) -> np.ndarray:
    keys = _symmetry_keys(hkl, sg, st.m)
    pos = np.searchsorted(st.keys, keys)
    pos = np.clip(pos, 0, len(st.keys) - 1)
    if not np.all(st.keys[pos] == keys):  # a bug, not a user error
        raise RuntimeError("predicted reflection missing from the simulated structure")
    return st.f2[pos]


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _render_spots_kernel(
    img, base, stride, n_ss, n_fs, panel, fs, ss, photons, sigma, radius, frac
):  # pragma: no cover - numba
    inv = 1.0 / (math.sqrt(2.0) * sigma)
    wx = np.empty(2 * int(radius) + 4)
    wy = np.empty(2 * int(radius) + 4)
    for j in range(panel.shape[0]):
        p = panel[j]
        x0 = max(0, math.floor(fs[j] - radius))
        x1 = min(n_fs[p], math.floor(fs[j] + radius) + 1)
        y0 = max(0, math.floor(ss[j] - radius))
        y1 = min(n_ss[p], math.floor(ss[j] + radius) + 1)
        total = 0.0
        if x1 > x0 and y1 > y0:
            prev = math.erf((x0 - fs[j]) * inv)
            for x in range(x0, x1):
                cur = math.erf((x + 1 - fs[j]) * inv)
                wx[x - x0] = 0.5 * (cur - prev)
                prev = cur
            prev = math.erf((y0 - ss[j]) * inv)
            for y in range(y0, y1):
                cur = math.erf((y + 1 - ss[j]) * inv)
                wy[y - y0] = 0.5 * (cur - prev)
                prev = cur
            for y in range(y0, y1):
                row = base[p] + y * stride
                fy = photons[j] * wy[y - y0]
                for x in range(x0, x1):
                    v = fy * wx[x - x0]
                    img[row + x] += v
                    total += v
        frac[j] = total / photons[j] if photons[j] > 0 else 0.0


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PIXEL_KEY = np.uint64(0xD1B54A32D192ED03)
_U53 = 1.0 / 9007199254740992.0
# Readout noise: the standard normal quantile function tabulated on a uniform grid of (0, 1)
# (clipped at ±4.5σ), linearly interpolated; far cheaper than Box-Muller per pixel.
_NQ_SIZE = 8193


@functools.cache
def _normal_quantiles() -> np.ndarray:
    # made on first use: every `process` (client and workers) imports this module for its
    # settings, and scipy.special and scipy.spatial cost it 0.19 s of CPU
    from scipy import special

    return np.clip(
        special.ndtri(np.linspace(0.0, 1.0, _NQ_SIZE).clip(3.4e-6, 1 - 3.4e-6)), -4.5, 4.5
    )


_INV_K = np.concatenate([[0.0], 1.0 / np.arange(1, 64)])


@numba.njit(inline="always")
def _next(state):  # pragma: no cover - numba
    """splitmix64: returns (new state, 53-bit uniform in (0, 1])."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return state, (float(z >> np.uint64(11)) + 1.0) * _U53


@numba.njit(inline="always")
def _poisson(mu, state, inv_k):  # pragma: no cover - numba
    if mu <= 0.0:
        return state, 0.0
    if mu < 12.0:
        state, u = _next(state)
        p = math.exp(-mu)
        s = p
        k = 0
        while u > s and k < 63:
            k += 1
            p *= mu * inv_k[k]
            s += p
        return state, float(k)
    # Transformed rejection with squeeze (Hörmann 1993, "PTRS")
    slam = math.sqrt(mu)
    loglam = math.log(mu)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state, u = _next(state)
        u -= 0.5
        state, v = _next(state)
        us = 0.5 - abs(u)
        k = float(math.floor((2.0 * a / us + b) * u + mu + 0.43))
        if us >= 0.07 and v <= vr:
            return state, k
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -mu + k * loglam - math.lgamma(k + 1.0)
        ):
            return state, k


@numba.njit(cache=True)
def _detector_kernel(
    out, spot, sin_theta, geom, flag, two_over_lambda, flat_bg, ring_amp, ring_q, ring_w,
    gain, readout, hot_photons, seed, noise, normal_q, inv_k,
):  # pragma: no cover - numba
    inv_2w2 = 0.5 / (ring_w * ring_w)
    seed_u = np.uint64(seed)
    for i in range(out.shape[0]):
        f = flag[i]
        if f == 0 or f == 2:  # no pixel / masked, or dead
            out[i] = 0.0
            continue
        dq = sin_theta[i] * two_over_lambda - ring_q
        mu = flat_bg + geom[i] * ring_amp * math.exp(-dq * dq * inv_2w2) + spot[i]
        if f == 3:
            mu += hot_photons
        if not noise:
            out[i] = mu * gain
            continue
        state = seed_u ^ (np.uint64(i) * _PIXEL_KEY)
        state, k = _poisson(mu, state, inv_k)
        if readout > 0.0:
            state, u = _next(state)
            t = u * (_NQ_SIZE - 1)
            j = min(int(t), _NQ_SIZE - 2)
            k += readout * (normal_q[j] + (t - j) * (normal_q[j + 1] - normal_q[j]))
        out[i] = math.floor(k * gain + 0.5)  # whole ADU, as a digitiser gives


# ----------------------------------------------------------------------------- per-detector cache


@dataclass(frozen=True)
class _PixelMaps:
    shape: tuple[int, ...]
    base: np.ndarray  # (n_panels,) flat index of each panel's first pixel
    stride: int  # flat step of one ss row
    n_ss: np.ndarray
    n_fs: np.ndarray
    sin_theta: np.ndarray  # float32 flat
    geom: np.ndarray  # float32 flat: cos^3 to panel normal x polarisation
    flag: np.ndarray  # uint8 flat: 0 none/masked, 1 good, 2 dead, 3 hot


def _pixel_maps(detector: Detector, beam: Beam, params: SimulationParams) -> _PixelMaps:
    key = (
        "simulate.pixel_maps",
        beam.direction,
        params.polarization_fraction,
        params.dead_fraction,
        params.hot_fraction,
        params.defect_seed,
    )
    return detector_tables(detector).memo(key, lambda: _build_pixel_maps(detector, beam, params))


def _build_pixel_maps(detector: Detector, beam: Beam, params: SimulationParams) -> _PixelMaps:
    shape = detector.data_shape()
    n_total = int(np.prod(shape))
    stride = shape[-1]
    sin_theta = np.zeros(n_total, dtype=np.float32)
    geom = np.zeros(n_total, dtype=np.float32)
    flag = np.zeros(n_total, dtype=np.uint8)
    base = np.empty(len(detector), dtype=np.int64)
    direction = np.asarray(beam.direction)
    f = params.polarization_fraction
    for i, p in enumerate(detector.panels):
        ss0, fs0 = p.data_origin
        base[i] = int(np.ravel_multi_index((*p.data_index, ss0, fs0), shape))
        n_ss, n_fs = p.shape
        fs_c, ss_c = np.meshgrid(np.arange(n_fs) + 0.5, np.arange(n_ss) + 0.5)
        r = p.lab_mm(fs_c, ss_c)
        u = r / np.linalg.norm(r, axis=-1, keepdims=True)
        cos2t = np.clip(u @ direction, -1.0, 1.0)
        sin_t = np.sqrt((1.0 - cos2t) / 2.0)
        cos_n = np.abs(u @ np.asarray(p.normal))
        pol = diffraction.polarisation_factor(r, f)
        rows = base[i] + np.arange(n_ss)[:, None] * stride + np.arange(n_fs)[None, :]
        sin_theta[rows] = sin_t
        geom[rows] = cos_n**3 * pol
        flag[rows] = np.where(p.good_mask(), 1, 0)
    defect_rng = np.random.default_rng(params.defect_seed)
    u = defect_rng.random(n_total)
    live = flag == 1
    flag[live & (u < params.dead_fraction)] = 2
    flag[live & (u >= params.dead_fraction) & (u < params.dead_fraction + params.hot_fraction)] = 3
    maps = _PixelMaps(
        shape=shape,
        base=base,
        stride=stride,
        n_ss=np.array([p.shape[0] for p in detector.panels], dtype=np.int64),
        n_fs=np.array([p.shape[1] for p in detector.panels], dtype=np.int64),
        sin_theta=sin_theta,
        geom=geom,
        flag=flag,
    )
    return maps


# ----------------------------------------------------------------------------- public functions


def render_spots(
    detector: Detector,
    panel: np.ndarray,
    fs_px: np.ndarray,
    ss_px: np.ndarray,
    photons: np.ndarray,
    sigma_px: float,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add Gaussian spots, integrated over pixel areas, into an image in the data layout.

    Parameters
    ----------
    detector : the layout (panels' ``data_origin``/``data_index`` place them in the array).
    panel, fs_px, ss_px : spot centres (continuous pixels, first pixel centre at 0.5).
    photons : total photons of each spot (before clipping at the panel edges).
    sigma_px : Gaussian σ in pixels.
    out : image (``detector.data_shape()``, float32 or float64) to add into; a new zeroed
        float64 one when ``None``.

    Returns
    -------
    image, on_panel_fraction : the image and, per spot, the fraction of its photons that fell on
        its panel (less than 1 near edges).

    Examples
    --------
    >>> from sfxflow.algorithms.layouts import simple
    >>> img, frac = render_spots(simple(), np.array([0]), np.array([10.3]), np.array([20.5]),
    ...                          np.array([100.0]), 1.0)
    >>> ss, fs = np.indices(img.shape) + 0.5
    >>> round(float((img * fs).sum() / img.sum()), 6), round(float(frac[0]), 6)
    (10.3, 1.0)
    """
    shape = detector.data_shape()
    if out is None:
        out = np.zeros(shape, dtype=np.float64)
    if out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous with shape {shape}, got {out.shape}")
    base = np.empty(len(detector), dtype=np.int64)
    for i, p in enumerate(detector.panels):
        ss0, fs0 = p.data_origin
        base[i] = int(np.ravel_multi_index((*p.data_index, ss0, fs0), shape))
    panel = np.ascontiguousarray(panel, dtype=np.int64)
    frac = np.zeros(panel.shape[0])
    _render_spots_kernel(
        out.reshape(-1),
        base,
        shape[-1],
        np.array([p.shape[0] for p in detector.panels], dtype=np.int64),
        np.array([p.shape[1] for p in detector.panels], dtype=np.int64),
        panel,
        np.ascontiguousarray(fs_px, dtype=float),
        np.ascontiguousarray(ss_px, dtype=float),
        np.ascontiguousarray(photons, dtype=float),
        float(sigma_px),
        5.0 * float(sigma_px) + 1.0,
        frac,
    )
    return out, frac


def expected_background(detector: Detector, beam: Beam, params: SimulationParams) -> np.ndarray:
    """Noiseless background photons per pixel (flat + water ring), in the data layout.

    Masked, dead and hot pixels are not special here; pixels outside every panel read 0.
    """
    maps = _pixel_maps(detector, beam, params)
    return _background_at(maps, beam, params, slice(None)).reshape(maps.shape)


def _background_at(
    maps: _PixelMaps, beam: Beam, params: SimulationParams, where: np.ndarray | slice
) -> np.ndarray:
    sin_t = maps.sin_theta[where].astype(np.float64)
    q = sin_t * (2.0 / beam.wavelength_a)
    ring_q = 1.0 / params.water_ring_d_a
    ring = np.exp(-0.5 * ((q - ring_q) / params.water_ring_width_inv_a) ** 2)
    bg = params.background_photons + maps.geom[where] * params.water_ring_photons * ring
    return np.where(maps.flag[where] == 0, 0.0, bg)


def _empty_truth() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, dtype=v) for k, v in TRUTH_COLUMNS.items()}


def _predict_truth(
    detector: Detector,
    beam: Beam,
    crystal: Crystal,
    params: SimulationParams,
    maps: _PixelMaps,
    physics: Any = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    st = _structure_for(params, crystal)
    q_max = 1.0 / params.d_min_a
    cut = math.sqrt(-2.0 * math.log(params.partiality_min))
    max_exc = float(partiality_width_inv_a(np.array([q_max]), beam, params)[0]) * cut
    if physics is not None:
        max_exc = physics.reach_inv_a(q_max, beam)
    pred = predict_spots(crystal, beam, detector, st.hkl, max_exc,
                         params.polarization_fraction)
    if len(pred.hkl) == 0:
        return _empty_truth()
    if physics is not None:
        # the physical model (sfxflow.algorithms.simulate_physical): true intensities from a
        # real data set and partiality from SASE spikes and mosaic blocks
        f2_phys, partiality = physics.intensity_and_partiality(crystal, beam, pred.hkl, rng)
        partiality = np.where(np.isfinite(f2_phys), partiality, 0.0)
    else:
        q_len = 1.0 / pred.d_a
        sigma = partiality_width_inv_a(q_len, beam, params)
        partiality = diffraction.partiality(pred.excitation_error_inv_a, sigma * sigma)
    keep = partiality >= params.partiality_min
    hkl = pred.hkl[keep]
    panel, fs, ss = pred.panel[keep], pred.fs_px[keep], pred.ss_px[keep]
    d = pred.d_a[keep]
    partiality = partiality[keep]
    exc = pred.excitation_error_inv_a[keep]
    pol = pred.polarisation[keep]
    if physics is not None:
        f2 = f2_phys[keep]  # the data set's own falloff, and the crystal's B, are in it
        wilson = np.ones(len(d))
    else:
        f2 = _relative_intensity(st, hkl, crystal.space_group)
        wilson = np.exp(-params.wilson_b_a2 / (2.0 * d * d))
    photons = params.crystal_scale_photons * f2 * wilson * partiality * pol
    # background under each spot, for the true SNR
    col = np.clip(np.floor(fs).astype(np.int64), 0, maps.n_fs[panel] - 1)
    row = np.clip(np.floor(ss).astype(np.int64), 0, maps.n_ss[panel] - 1)
    bg = _background_at(maps, beam, params, maps.base[panel] + row * maps.stride + col)
    return {
        "h": hkl[:, 0].astype(np.int32),
        "k": hkl[:, 1].astype(np.int32),
        "l": hkl[:, 2].astype(np.int32),
        "panel": panel.astype(np.int32),
        "fs_px": fs,
        "ss_px": ss,
        "intensity_photons": photons,  # before edge clipping; fixed up by the caller
        "partiality": partiality,
        "d_a": d,
        "snr_true": np.zeros(len(d)),
        "excitation_error_inv_a": exc,
        "background_photons": bg,
        "on_panel_fraction": np.ones(len(d)),
    }


def simulate_frame(
    detector: Detector,
    beam: Beam,
    crystal: Crystal | None,
    params: SimulationParams,
    rng: np.random.Generator,
    physics: Any = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate one still: Bragg spots of ``crystal`` (none when ``None``) over background.

    Parameters
    ----------
    detector : layout; the image has ``detector.data_shape()``.
    beam : this frame's beam (wavelength, bandwidth and divergence are taken from it).
    crystal : the crystal (cell, space group, orientation), or ``None`` for a blank frame.
    params : everything else (see :class:`SimulationParams`).
    rng : source of this frame's noise; the same state gives a byte-identical frame.
    physics : ``None`` (the fast closed-form model) or a physical model such as
        :class:`sfxflow.algorithms.simulate_physical.PhysicalFrames`: true intensities from a
        real data set and partiality from the shot's spectrum and the crystal's mosaic blocks.

    Returns
    -------
    image : float32 ADU in the data layout.
    truth : dict of equal-length arrays, keys :data:`TRUTH_COLUMNS` (empty for a blank frame).

    Examples
    --------
    >>> from sfxflow.algorithms.layouts import simple
    >>> p = SimulationParams(d_min_a=3.0)
    >>> c = random_crystal(p.cell, p.space_group, np.random.default_rng(0))
    >>> img, truth = simulate_frame(simple(), p.beam(), c, p, np.random.default_rng(1))
    >>> img.dtype, img.shape, len(truth["h"]) > 10
    (dtype('float32'), (1024, 1024), True)
    """
    maps = _pixel_maps(detector, beam, params)
    spot = np.zeros(maps.shape, dtype=np.float32)
    truth = _empty_truth()
    if crystal is not None:
        truth = _predict_truth(detector, beam, crystal, params, maps, physics, rng)
        if len(truth["h"]):
            _, frac = render_spots(
                detector,
                truth["panel"],
                truth["fs_px"],
                truth["ss_px"],
                truth["intensity_photons"],
                params.spot_sigma_px,
                out=spot,
            )
            photons = truth["intensity_photons"] * frac
            area = math.pi * (3.0 * params.spot_sigma_px) ** 2
            readout2 = params.readout_noise_photons**2
            noise2 = photons + area * (truth["background_photons"] + readout2)
            truth["intensity_photons"] = photons
            truth["on_panel_fraction"] = frac
            with np.errstate(divide="ignore", invalid="ignore"):
                truth["snr_true"] = np.where(noise2 > 0, photons / np.sqrt(noise2), 0.0)
    seed = int(rng.integers(0, 2**63 - 1, dtype=np.int64))
    out = np.empty(maps.shape, dtype=np.float32)
    _detector_kernel(
        out.reshape(-1),
        spot.reshape(-1),
        maps.sin_theta,
        maps.geom,
        maps.flag,
        2.0 / beam.wavelength_a,
        float(params.background_photons),
        float(params.water_ring_photons),
        1.0 / params.water_ring_d_a,
        float(params.water_ring_width_inv_a),
        float(params.adu_per_photon),
        float(params.readout_noise_photons),
        float(params.hot_photons),
        seed,
        bool(params.noise),
        _normal_quantiles(),
        _INV_K,
    )
    return out, truth


@dataclass(frozen=True)
class FrameTruth:
    """Frame-level truth of one simulated frame (see :func:`iter_frames`)."""

    index: int
    beam: Beam
    crystal: Crystal | None
    scale: float
    size_a: float = math.nan

    @property
    def is_hit(self) -> bool:
        return self.crystal is not None


def iter_frames(
    detector: Detector,
    params: SimulationParams,
    n_frames: int,
    seed: int,
    beam: Beam | None = None,
    start: int = 0,
    physics: Any = None,
) -> Iterator[tuple[FrameTruth, np.ndarray, dict[str, np.ndarray]]]:
    """Simulate a series of frames: hit or miss, photon-energy jitter, crystal, image.

    Frame ``i`` draws everything from ``numpy.random.default_rng([seed, i])``, so any frame can
    be regenerated alone and the series does not depend on how it is split into files.

    Parameters
    ----------
    detector, params : as for :func:`simulate_frame`.
    n_frames : how many frames, indices ``start .. start + n_frames - 1``.
    seed : series seed.
    beam : nominal beam (``params.beam()`` when ``None``); each frame's photon energy is jittered
        by ``params.energy_jitter_rel``.
    physics : passed to :func:`simulate_frame`.
    """
    nominal = params.beam() if beam is None else beam
    cell, sg = params.unit_cell(), params.spacegroup()
    for i in range(start, start + n_frames):
        rng = np.random.default_rng([seed, i])
        is_hit = bool(rng.random() < params.hit_fraction)
        energy = nominal.photon_energy_ev * (1.0 + params.energy_jitter_rel * rng.standard_normal())
        frame_beam = replace(nominal, wavelength_a=photon_energy_ev_to_wavelength_a(energy))
        crystal = random_crystal(cell, sg, rng) if is_hit else None
        scale = 0.0
        frame_params = params
        if is_hit:
            scale = params.crystal_scale_photons * math.exp(
                params.crystal_scale_log_sigma * rng.standard_normal()
            )
            frame_params = replace(params, crystal_scale_photons=scale)
        size = math.nan
        if is_hit and params.crystal_size_max_a > 0:  # drawn last: other draws stay the same
            size = math.exp(rng.uniform(math.log(params.crystal_size_min_a),
                                        math.log(params.crystal_size_max_a)))
            frame_params = sized_crystal_params(frame_params, size, detector, frame_beam)
        image, truth = simulate_frame(detector, frame_beam, crystal, frame_params, rng, physics)
        yield (FrameTruth(index=i, beam=frame_beam, crystal=crystal, scale=scale, size_a=size),
               image, truth)


def with_defects_masked(detector: Detector, beam: Beam, params: SimulationParams) -> Detector:
    """``detector`` with the simulator's fixed pattern of dead and hot pixels masked, as a
    bad-pixel mask from dark runs masks them in a real experiment."""
    maps = _pixel_maps(detector, beam, params)
    flag = maps.flag.reshape(maps.shape)
    panels = []
    for p in detector.panels:
        bad = np.isin(flag[p.data_slices()], (2, 3))
        panels.append(p.with_mask(p.good_mask() & ~bad))
    return Detector(tuple(panels), detector.rigid_groups)


def sized_crystal_params(params: SimulationParams, size_a: float, detector: Detector,
                         beam: Beam) -> SimulationParams:
    """``params`` for one crystal of size ``size_a`` (Å): the domain size capped by the crystal
    and the spot widened by its shape transform (angular FWHM ``λ/L`` at the detector's mean
    distance)."""
    distance_mm = abs(detector.mean_distance_mm())
    pixel_mm = detector.panels[0].pixel_size_mm
    shape_px = FWHM_TO_SIGMA * beam.wavelength_a / size_a * distance_mm / pixel_mm
    return replace(params, domain_size_a=min(params.domain_size_a, size_a),
                   spot_sigma_px=math.hypot(params.spot_sigma_px, shape_px))
