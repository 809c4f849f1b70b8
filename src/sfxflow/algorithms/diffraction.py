"""The diffraction model of a still: profile width, excitation error, partiality, Lorentz and
polarisation, written once and used by prediction, integration, merging, the observation
reader and the model side of both simulators.

A still records each reflection only partly. Its reciprocal-lattice point is smeared over a
small volume (crystal size, mosaic spread) and the Ewald sphere is a shell of some thickness
(bandwidth, divergence); a point at *excitation error* ``ε = |q + s0| - 1/λ`` (Å⁻¹) from the
sphere still diffracts if ``|ε|`` is small compared with the combined Gaussian width

    ``σ(q)² = R² + (η |q|)² + (w_bw |q|²)²``

with ``R`` a radius (Å⁻¹: crystal size, refined profile radius), ``η`` an angular spread
(radians, Gaussian σ: mosaicity, divergence) and ``w_bw = β λ / 2`` the bandwidth term of a beam
of relative Gaussian bandwidth ``β``. Angles and bandwidths are given as FWHM and converted to
Gaussian σ here (:func:`angular_term`, :func:`bandwidth_term_a`).

* **Partiality**: ``P = exp(-ε² / 2σ²)``, 1 on the sphere (:func:`partiality`).
  The merger's post-refined model multiplies it by ``R / σ`` (:func:`scaled_partiality`): the
  integral over ε of a broadened reflection stays proportional to ``R``.
* **Lorentz**: 1 (:func:`lorentz_factor`). In this still model the excitation-error profile,
  i.e. the partiality, already holds the geometry of how a reflection crosses the sphere.
* **Polarisation**: ``f (1 - u_x²) + (1 - f)(1 - u_y²)`` of the unit diffracted ray ``u`` for
  a beam of which a fraction ``f`` is polarised along lab ``x`` (:func:`polarisation_factor`).

Every formula is written once as a plain function of numbers that runs on numpy arrays (the
public array functions) and is compiled by numba for use inside kernels (the ``*_nb`` names,
``@njit`` functions of scalars): one source, so the kernels and the array code agree.

Pure numpy/numba; no I/O.

Examples
--------
>>> s2 = profile_sigma2_inv_a2(np.array([0.0, 0.25]), 3e-4, 0.0, 0.0)
>>> bool(np.allclose(s2, 9e-8)), float(partiality(np.array([0.0]), s2[:1])[0])
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numba import njit
from numba.extending import register_jitable
from numpy.typing import ArrayLike

from sfxflow.models import FWHM_TO_SIGMA, Beam

Num = float | np.ndarray  # a scalar, or an array of one value per row
N = TypeVar("N", float, np.ndarray)

__all__ = [
    "ProfileModel",
    "angular_term",
    "bandwidth_term_a",
    "excitation_error_inv_a",
    "lorentz_factor",
    "partiality",
    "partiality_nb",
    "polarisation_factor",
    "profile_sigma2_inv_a2",
    "profile_sigma2_nb",
    "profile_width_inv_a",
    "scaled_partiality",
    "scaled_partiality_nb",
]


def bandwidth_term_a(bandwidth_fwhm: float, wavelength_a: N) -> N:
    """``w_bw = β λ / 2`` (Å) of a beam of relative bandwidth ``bandwidth_fwhm`` (FWHM); the
    profile width grows as ``w_bw |q|²``.

    >>> round(bandwidth_term_a(2.3548200450309493e-3, 2.0), 12)
    0.001
    """
    return wavelength_a * bandwidth_fwhm * FWHM_TO_SIGMA / 2.0


def angular_term(angle_fwhm_rad: N) -> N:
    """Gaussian σ (radians) of an angular spread given as FWHM (mosaicity, divergence)."""
    return angle_fwhm_rad * FWHM_TO_SIGMA


@register_jitable
def _profile_sigma2(q2: Num, radius: Num, angular: Num, bandwidth_term: Num) -> Num:
    w_b = bandwidth_term * q2
    return radius * radius + angular * angular * q2 + w_b * w_b


@register_jitable
def _partiality(eps: Num, sigma2: Num) -> Num:
    return np.exp(-0.5 * eps * eps / sigma2)


@register_jitable
def _scaled_partiality(eps: Num, radius: Num, sigma2: Num) -> Num:
    return np.sqrt(radius * radius / sigma2) * _partiality(eps, sigma2)


def profile_sigma2_inv_a2(q2_inv_a2: Num, radius_inv_a: Num, angular: Num,
                          bandwidth_term_a: Num) -> Num:
    """``σ(q)² = R² + η² |q|² + (w_bw |q|²)²`` (Å⁻²) at ``|q|² = q2_inv_a2``.

    Parameters
    ----------
    q2_inv_a2 : ``|q|² = 1/d²``.
    radius_inv_a : ``R`` (Å⁻¹), scalar or per row.
    angular : ``η`` (radians, Gaussian σ: :func:`angular_term`).
    bandwidth_term_a : ``w_bw`` (:func:`bandwidth_term_a`).
    """
    return _profile_sigma2(q2_inv_a2, radius_inv_a, angular, bandwidth_term_a)


def profile_width_inv_a(q_inv_a: Num, radius_inv_a: Num, angular: Num,
                        bandwidth_term_a: Num) -> np.ndarray:
    """Gaussian width ``σ(q)`` (Å⁻¹) of the excitation-error profile at ``|q| = q_inv_a``.

    >>> float(profile_width_inv_a(np.array([0.3]), 3e-4, 0.0, 0.0)[0])
    0.0003
    """
    q = np.asarray(q_inv_a, dtype=float)
    return np.asarray(np.sqrt(_profile_sigma2(q * q, radius_inv_a, angular, bandwidth_term_a)))


def partiality(excitation_inv_a: Num, sigma2_inv_a2: Num) -> np.ndarray:
    """Gaussian partiality ``exp(-ε² / 2σ²)`` (1 on the Ewald sphere).

    >>> p = partiality(np.array([-2e-4, 0.0, 2e-4]), np.full(3, 4e-8))
    >>> [round(float(x), 6) for x in p]
    [0.606531, 1.0, 0.606531]
    """
    return np.asarray(_partiality(np.asarray(excitation_inv_a, dtype=float), sigma2_inv_a2))


def scaled_partiality(excitation_inv_a: Num, radius_inv_a: Num, sigma2_inv_a2: Num
                      ) -> np.ndarray:
    """``(R / σ) exp(-ε² / 2σ²)``: the partiality of the merger's post-refined model, whose
    integral over ε is proportional to ``R``."""
    return np.asarray(_scaled_partiality(np.asarray(excitation_inv_a, dtype=float),
                                         radius_inv_a, sigma2_inv_a2))


# the same formulas compiled for numba kernels (scalars in, scalar out)
profile_sigma2_nb = njit(cache=True)(_profile_sigma2)
partiality_nb = njit(cache=True)(_partiality)
scaled_partiality_nb = njit(cache=True)(_scaled_partiality)


def excitation_error_inv_a(q_inv_a: ArrayLike, s0_inv_a: ArrayLike, wavelength_a: ArrayLike
                           ) -> np.ndarray:
    """``ε = |q + s0| - 1/λ`` (Å⁻¹) of scattering vectors ``q`` (n, 3); ``s0`` (3,) or (n, 3),
    ``wavelength_a`` scalar or (n,). Positive outside the Ewald sphere.

    >>> s0 = np.array([0.0, 0.0, 1.0])
    >>> excitation_error_inv_a(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.1]]), s0, 1.0).tolist()
    [0.0, 0.10000000000000009]
    """
    k = np.asarray(q_inv_a, dtype=float) + np.asarray(s0_inv_a, dtype=float)
    return np.linalg.norm(k, axis=-1) - 1.0 / np.asarray(wavelength_a, dtype=float)


def lorentz_factor(n: int) -> np.ndarray:
    """Lorentz factor of ``n`` reflections of a still: 1. The excitation-error profile
    (:func:`partiality`) already holds the geometry of how a reflection crosses the sphere, so
    no rotation-method ``1 / sin 2θ`` applies."""
    return np.ones(int(n))


def polarisation_factor(directions: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """Polarisation factor ``f (1 - u_x²) + (1 - f)(1 - u_y²)`` of diffracted rays along
    ``directions`` (n, 3; any length, normalised here) for a beam of which ``fraction`` is
    polarised along lab ``x`` (XFELs: 1, as CrystFEL's default) and the rest along ``y``.
    The intensity a detector records is the true intensity times this factor.

    >>> polarisation_factor(np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])).round(6).tolist()
    [0.5, 1.0]
    >>> polarisation_factor(np.array([[1.0, 0.0, 1.0]]), 0.5).round(6).tolist()
    [0.75]
    """
    v = np.asarray(directions, dtype=float)
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    f = fraction
    return f * (1.0 - u[..., 0] ** 2) + (1.0 - f) * (1.0 - u[..., 1] ** 2)


@dataclass(frozen=True)
class ProfileModel:
    """A crystal's reflection-profile width ``σ(q)² = R² + (w_div q)² + (w_bw q²)²`` (Å⁻¹): its
    own radius ``R`` (refined by :func:`sfxflow.algorithms.predict.refine_profile`) and the
    beam's divergence and bandwidth terms.

    >>> m = ProfileModel(3e-4, 0.0, 0.0)
    >>> float(m.width_inv_a(np.array([0.3]))[0]), float(m.partiality(np.zeros(1), 0.3)[0])
    (0.0003, 1.0)
    """

    radius_inv_a: float
    bandwidth_term_a: float
    divergence_term: float

    @classmethod
    def for_beam(cls, radius_inv_a: float, beam: Beam) -> ProfileModel:
        return cls(float(radius_inv_a), bandwidth_term_a(beam.bandwidth_fwhm, beam.wavelength_a),
                   angular_term(beam.divergence_rad))

    def sigma2_inv_a2(self, q_inv_a: Num) -> Num:
        q = np.asarray(q_inv_a, dtype=float)
        return _profile_sigma2(q * q, self.radius_inv_a, self.divergence_term,
                               self.bandwidth_term_a)

    def width_inv_a(self, q_inv_a: Num) -> np.ndarray:
        return np.asarray(np.sqrt(self.sigma2_inv_a2(q_inv_a)))

    def partiality(self, excitation_inv_a: Num, q_inv_a: Num) -> np.ndarray:
        return partiality(excitation_inv_a, self.sigma2_inv_a2(q_inv_a))
