"""The merge's per-observation loops in numba: the per-crystal fit, the per-reflection sums.

Every scaling cycle passes over every observation several times (the fit tries each point of
the profile grid), so these loops decide the merge's speed. They are written to vectorise:
each crystal's observations with a reference are first copied into contiguous scratch arrays
(no NaN test, no gather inside the hot loops), the loops are branch-free, the sums may be
reassociated (``fastmath`` without ``nnan``/``ninf``: NaN tests still work), and the
exponential is :func:`exp_vec`, a polynomial LLVM can vectorise (the C library's ``exp`` is a
call it cannot). Results match the plain loops to rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, register_jitable

# the one formula of the profile width, compiled into the loop (register_jitable)
from sfxflow.algorithms.diffraction import _profile_sigma2

__all__ = ["delta_cc_half_kernel", "exp_vec", "exp_vec_array", "fit_kernel",
           "observations_kernel", "profile_vec", "sums_kernel"]

#: reassociation (sums in vector lanes), fused multiply-adds, reciprocals; NaN and inf
#: semantics kept, and no "nsz": with "reassoc" it let LLVM merge the two-part ln 2 of
#: :func:`exp_vec` (700 ulp errors)
FASTMATH = {"reassoc", "contract", "arcp"}

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below: 0 (the result would be subnormal)
_EXP_MAX = 709.0


@intrinsic
def _float_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]  # pragma: no cover
    """The float whose bits are those of ``bits`` (int64 -> float64, int32 -> float32)."""
    out = types.float64 if bits.bitwidth == 64 else types.float32

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(out))

    return out(bits), codegen


@register_jitable
def exp_vec(x: float) -> float:  # pragma: no cover - numba
    """``exp(x)`` to within 2 ulp, in a form LLVM vectorises: ``x = k ln 2 + r``, a degree-13
    Taylor polynomial in ``|r| <= ln 2 / 2`` (truncation below 1e-17), ``2**k`` built from its
    bits. 0 below -708, inf above 709, NaN for NaN."""
    xc = min(max(x, _EXP_MIN), _EXP_MAX)
    k = math.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float_from_bits((np.int64(k) + 1023) << 52)  # type: ignore[call-arg]
    if x < _EXP_MIN:
        y = 0.0
    if x > _EXP_MAX:
        y = np.inf
    if x != x:
        y = x
    return y


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def exp_vec_array(x: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """:func:`exp_vec` of each element (for tests)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp_vec(x[i])
    return out


# float32 constants (a Python float in a float32 expression would make it float64)
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FHALF = np.float32(0.5)
_FLOG2E = np.float32(_LOG2E)
_FLN2_HI = np.float32(0.693359375)  # Cephes' split of ln 2 for single precision
_FLN2_LO = np.float32(-2.12194440e-4)
_FEXP_MIN = np.float32(-87.0)
_FEXP_MAX = np.float32(88.0)
_FP = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                    4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_FP0, _FP1, _FP2, _FP3, _FP4, _FP5 = _FP


@register_jitable
def exp32(x):  # type: ignore[no-untyped-def]  # pragma: no cover - numba
    """``exp(x)`` in single precision (Cephes' ``expf`` polynomial, about 1 ulp), vectorisable;
    0 below -87."""
    xc = min(max(x, _FEXP_MIN), _FEXP_MAX)
    k = np.floor(xc * _FLOG2E + _FHALF)
    r = (xc - k * _FLN2_HI) - k * _FLN2_LO
    p = _FP0
    p = p * r + _FP1
    p = p * r + _FP2
    p = p * r + _FP3
    p = p * r + _FP4
    p = p * r + _FP5
    bits = np.int32((np.int32(k) + 127) << 23)  # numba's integer arithmetic is 64-bit
    y = (p * r * r + r + _F1) * _float_from_bits(bits)  # type: ignore[call-arg]
    if x < _FEXP_MIN:
        y = _F0
    return y


@register_jitable
def _profile32(m, q2, half_eps2, bw, radius, eta, p):  # type: ignore[no-untyped-def]  # pragma: no cover
    """:func:`profile_vec` in single precision (the profile grid's ranking)."""
    r2 = radius * radius
    for j in range(m):
        inv_s2 = _F1 / _profile_sigma2(q2[j], radius, eta, bw[j])
        p[j] = np.sqrt(r2 * inv_s2) * exp32(-half_eps2[j] * inv_s2)


@register_jitable
def _rank32(m, y, var, inv_var, ref, q2, p, g2, b_limit, b_restraint,
            t):  # type: ignore[no-untyped-def]  # pragma: no cover
    """(G, weighted residual) of :func:`_fit_point` with two rounds, in single precision on
    observations normalised per crystal (the residual does not change with the units of the
    intensities and the reference): what ranks the profile grid. The first round starts from
    G = 0 and B = 0, where the weights are ``inv_var`` (1/σ²) and exp(-B q²/2) is 1."""
    bb = _F0
    g = _F0
    for it in range(2):
        num = _F0
        den = _F0
        if it == 0:
            for j in range(m):
                t[j] = p[j] * ref[j]
                num += inv_var[j] * y[j] * t[j]
                den += inv_var[j] * t[j] * t[j]
        else:
            for j in range(m):
                t[j] = exp32(-_FHALF * bb * q2[j]) * p[j] * ref[j]
            for j in range(m):
                mg = g * t[j]
                w = _F1 / (var[j] + g2 * mg * mg)
                num += w * y[j] * t[j]
                den += w * t[j] * t[j]
        if not (den > _F0):
            return _F0, np.float32(np.inf)
        g = num / den
        num = _F0
        den = _F0
        for j in range(m):
            mg = g * t[j]
            w = _F1 / (var[j] + g2 * mg * mg)
            dm = -_FHALF * q2[j] * mg
            num += w * (y[j] - mg) * dm
            den += w * dm * dm
        num -= bb * b_restraint
        den += b_restraint
        if den > _F0:
            bb = min(max(bb + num / den, -b_limit), b_limit)
    res = _F0
    for j in range(m):
        mg = g * exp32(-_FHALF * bb * q2[j]) * p[j] * ref[j]
        w = _F1 / (var[j] + g2 * mg * mg)
        res += w * (y[j] - mg) * (y[j] - mg)
    return g, res


@register_jitable
def profile_vec(m, q2, half_eps2, bw, radius, eta, p):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``p[:m]``: :func:`~sfxflow.algorithms.diffraction.scaled_partiality` of each observation
    (``half_eps2`` is ``ε² / 2``) at profile radius ``radius`` and angular term ``eta``, with
    :func:`exp_vec`."""
    r2 = radius * radius
    for j in range(m):
        inv_s2 = 1.0 / _profile_sigma2(q2[j], radius, eta, bw[j])
        p[j] = math.sqrt(r2 * inv_s2) * exp_vec(-half_eps2[j] * inv_s2)


@register_jitable
def _model_terms(m, bb, q2, p, ref, t):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``t[:m] = exp(-B q²/2) · P · I_ref``: the model of each observation without ``G``."""
    if bb == 0.0:  # exp(0) = 1: the first round of every fit
        for j in range(m):
            t[j] = p[j] * ref[j]
    else:
        for j in range(m):
            t[j] = exp_vec(-0.5 * bb * q2[j]) * p[j] * ref[j]


@register_jitable
def _fit_point(m, y, var, ref, q2, p, gamma, b_limit, b_restraint, n_iter,
               t):  # type: ignore[no-untyped-def]  # pragma: no cover
    """(G, B, weighted residual) of one crystal at one profile (partialities ``p``):
    ``n_iter`` rounds of G in closed form and one Gauss-Newton step in B, with weights
    ``1 / (σ² + (γ · model)²)``; ``t`` is scratch for the model without G."""
    g2 = gamma * gamma
    bb = 0.0
    g = 0.0
    for _ in range(n_iter):
        _model_terms(m, bb, q2, p, ref, t)
        # G in closed form at this B (weights from the current model)
        num = 0.0
        den = 0.0
        for j in range(m):
            mg = g * t[j]
            w = 1.0 / (var[j] + g2 * mg * mg)
            num += w * y[j] * t[j]
            den += w * t[j] * t[j]
        if den <= 0.0:
            return 0.0, bb, np.inf
        g = num / den
        # one Gauss-Newton step in B
        num = 0.0
        den = 0.0
        for j in range(m):
            mg = g * t[j]
            w = 1.0 / (var[j] + g2 * mg * mg)
            dm = -0.5 * q2[j] * mg
            num += w * (y[j] - mg) * dm
            den += w * dm * dm
        # a restraint towards B = 0 keeps weak crystals from running off
        num -= bb * b_restraint
        den += b_restraint
        if den > 0.0:
            bb = min(max(bb + num / den, -b_limit), b_limit)
    _model_terms(m, bb, q2, p, ref, t)
    res = 0.0
    for j in range(m):
        mg = g * t[j]
        w = 1.0 / (var[j] + g2 * mg * mg)
        res += w * (y[j] - mg) * (y[j] - mg)
    return g, bb, res


# fit_kernel's steps are inlined into it (inline="always"), as integrate.py's are: a call per
# crystal and per profile would cost time in the innermost loops.
@numba.njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _gather_observations(start, stop, bw_c, ref, inten, sig, inv_d2, eps, y, var, rf, q2, he2,
                         bwc):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Copy the observations ``start:stop`` that have a reference to the front of the work
    arrays (contiguous, for the fits' vector loops); their number."""
    m = 0
    for i in range(start, stop):
        if ref[i] == ref[i]:
            y[m] = inten[i]
            var[m] = sig[i] * sig[i]
            rf[m] = ref[i]
            q2[m] = inv_d2[i]
            he2[m] = 0.5 * eps[i] * eps[i]
            bwc[m] = bw_c
            m += 1
    return m


@numba.njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _rank_profiles(m, y, var, rf, q2, he2, bwc, r_grid32, eta_grid32, g2_32, b_limit32,
                   b_restraint32, y32, var32, ivar32, rf32, q2_32, he2_32, bw32, p32,
                   t32):  # type: ignore[no-untyped-def]  # pragma: no cover
    """The grid point ``(radius index, eta index)`` whose short single-precision fit leaves the
    least residual with a positive scale; ``(-1, -1)`` if none does."""
    # normalised so that single precision keeps the sums' digits
    sy = 0.0
    sr = 0.0
    for j in range(m):
        sy += var[j]
        sr += abs(rf[j])
    sy = math.sqrt(sy / m)
    sr = sr / m
    if not (sy > 0.0 and sy < np.inf):
        sy = 1.0
    if not (sr > 0.0 and sr < np.inf):
        sr = 1.0
    for j in range(m):
        y32[j] = y[j] / sy
        var32[j] = var[j] / (sy * sy)
        ivar32[j] = _F1 / var32[j]
        rf32[j] = rf[j] / sr
        q2_32[j] = q2[j]
        he2_32[j] = he2[j]
        bw32[j] = bwc[j]
    best = np.float32(np.inf)
    ir_best = -1
    ie_best = -1
    for ir in range(r_grid32.shape[0]):
        for ie in range(eta_grid32.shape[0]):
            _profile32(m, q2_32, he2_32, bw32, r_grid32[ir], eta_grid32[ie], p32)
            g, res = _rank32(m, y32, var32, ivar32, rf32, q2_32, p32, g2_32,
                             b_limit32, b_restraint32, t32)
            if res < best and g > _F0:
                best = res
                ir_best = ir
                ie_best = ie
    return ir_best, ie_best


@numba.njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def _correlation(m, t, y):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Pearson correlation of ``t[:m]`` and ``y[:m]``; NaN when either is constant."""
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    for j in range(m):
        sx += t[j]
        sy += y[j]
        sxx += t[j] * t[j]
        syy += y[j] * y[j]
        sxy += t[j] * y[j]
    vx = sxx - sx * sx / m
    vy = syy - sy * sy / m
    if vx > 0 and vy > 0:
        return (sxy - sx * sy / m) / math.sqrt(vx * vy)
    return np.nan


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def fit_kernel(offsets, ref, inten, sig, inv_d2, eps, bw, use_p, r_grid, eta_grid, gamma,
               b_limit, b_restraint, g_out, b_out, r_out, eta_out, n_out,
               cc_out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Fit every crystal (observations ``offsets[c]:offsets[c + 1]``) against ``ref`` (the
    reference per observation, NaN: none; ``bw`` per crystal): with ``use_p`` the profile grid
    (``r_grid`` x ``eta_grid``) ranked by a short fit (two rounds), then the full fit (six
    rounds) at the best profile; without, G and B alone. Writes G, B, R, η, the number of observations with a
    reference and the correlation of the observations with the fitted model."""
    nc = offsets.shape[0] - 1
    longest = 0
    for c in range(nc):
        longest = max(longest, offsets[c + 1] - offsets[c])
    y = np.empty(longest)
    var = np.empty(longest)
    rf = np.empty(longest)
    q2 = np.empty(longest)
    he2 = np.empty(longest)
    bwc = np.empty(longest)
    p = np.empty(longest)
    t = np.empty(longest)
    # the grid's ranking in single precision: twice the vector lanes
    y32 = np.empty(longest, dtype=np.float32)
    var32 = np.empty(longest, dtype=np.float32)
    ivar32 = np.empty(longest, dtype=np.float32)
    rf32 = np.empty(longest, dtype=np.float32)
    q2_32 = np.empty(longest, dtype=np.float32)
    he2_32 = np.empty(longest, dtype=np.float32)
    bw32 = np.empty(longest, dtype=np.float32)
    p32 = np.empty(longest, dtype=np.float32)
    t32 = np.empty(longest, dtype=np.float32)
    r_grid32 = r_grid.astype(np.float32)
    eta_grid32 = eta_grid.astype(np.float32)
    g2_32 = np.float32(gamma * gamma)
    b_limit32 = np.float32(b_limit)
    b_restraint32 = np.float32(b_restraint)
    for c in range(nc):
        m = _gather_observations(offsets[c], offsets[c + 1], bw[c], ref, inten, sig, inv_d2, eps,
                                 y, var, rf, q2, he2, bwc)
        n_out[c] = m
        g_out[c] = np.nan
        b_out[c] = 0.0
        r_out[c] = np.nan
        eta_out[c] = np.nan
        cc_out[c] = np.nan
        if m < 3:
            continue
        for j in range(m):
            p[j] = 1.0
        if use_p:
            # the profile grid ranked by a short fit (two rounds, single precision), then the
            # full fit (six rounds) at the best profile: the ranking rarely changes after two
            # rounds, and the search costs a third of fitting every profile in full
            ir_best, ie_best = _rank_profiles(m, y, var, rf, q2, he2, bwc, r_grid32, eta_grid32,
                                              g2_32, b_limit32, b_restraint32, y32, var32, ivar32,
                                              rf32, q2_32, he2_32, bw32, p32, t32)
            if ir_best < 0:
                continue
            r_out[c] = r_grid[ir_best]
            eta_out[c] = eta_grid[ie_best]
            profile_vec(m, q2, he2, bwc, r_out[c], eta_out[c], p)
        g, bb, res = _fit_point(m, y, var, rf, q2, p, gamma, b_limit, b_restraint, 6, t)
        if not (g > 0.0 and res < np.inf):
            r_out[c] = np.nan
            eta_out[c] = np.nan
            continue
        g_out[c] = g
        b_out[c] = bb
        # correlation of observations with the fitted model (for rejection and reporting)
        _model_terms(m, bb, q2, p, rf, t)
        cc_out[c] = _correlation(m, t, y)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def observations_kernel(offsets, code, inten, sig, inv_d2, eps, bw, scale, b_a2, radius, eta,
                        accepted, use_p, ref_i, ref_n, level, sdfac, sdadd, min_partiality,
                        max_sigma_ratio, outlier_z, reject_outliers, i_est, s_model, s_est,
                        p_full, self_in, z, ref, ref_nn, use, outlier,
                        low_p):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Each observation corrected by its crystal's fit and judged against the reference (see
    :func:`~sfxflow.algorithms.merge.scale.scaled_observations`, which documents the
    outputs): one pass, per-crystal values read once per crystal. ``level`` empty: no
    weak-observation filter; ``radius`` NaN: a crystal fitted without a profile."""
    has_level = level.shape[0] > 0
    for c in range(offsets.shape[0] - 1):
        g = scale[c]
        b = b_a2[c]
        r = radius[c]
        profile = use_p and r == r
        ok_c = accepted[c]
        for i in range(offsets[c], offsets[c + 1]):
            pf = 1.0
            gauss = 1.0
            if profile:
                s2 = _profile_sigma2(inv_d2[i], r, eta[c], bw[c])
                gauss = math.exp(-0.5 * eps[i] * eps[i] / s2)
                pf = math.sqrt(r * r / s2) * gauss
            corr = g * math.exp(-0.5 * b * inv_d2[i]) * pf
            ie = inten[i] / corr
            se = sig[i] / corr
            h = code[i] // 2
            known = code[i] >= 0
            rv = ref_i[h] if known else np.nan
            rn = ref_n[h] if known else np.nan
            base = max(rv, 0.0) if rv == rv and abs(rv) < np.inf else abs(ie)
            sm = sdfac * math.sqrt(se * se + (sdadd * base) * (sdadd * base))
            u = known and ok_c and (ie == ie and abs(ie) < np.inf) and sm > 0.0
            lp = u and not (gauss >= min_partiality)
            # an observation whose σ dwarfs the mean intensity at its resolution carries no
            # information, and where it is one of the only two it makes a wild merged value
            if u and has_level and known and se > max_sigma_ratio * level[h]:
                lp = True
            u = u and not lp
            # the reference includes (nearly) this observation: I - <I> varies as σ² (1 - 1/n)
            si = min(max(1.0 - 1.0 / max(rn, 1.0), 0.05), 1.0) if rn == rn else np.nan
            zi = (ie - rv) / (sm * math.sqrt(si))
            has_ref = (zi == zi and abs(zi) < np.inf) and rn >= 3.0
            out = u and has_ref and abs(zi) > outlier_z and reject_outliers
            i_est[i] = ie
            s_model[i] = sm
            s_est[i] = se
            p_full[i] = pf
            self_in[i] = si
            z[i] = zi if has_ref else np.nan
            ref[i] = rv
            ref_nn[i] = rn
            use[i] = u and not out
            outlier[i] = out
            low_p[i] = lp


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def sums_kernel(offsets, half, code, use, intensity, sigma, z, sums, deviation_sums
                ):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Add the used observations into ``sums`` (rows n, Σw, Σw·I, then the same for half-sets
    a and b, per code), and the normalised deviations' sums (see
    :func:`~sfxflow.algorithms.merge.scale.accumulate`)."""
    for c in range(offsets.shape[0] - 1):
        k = 3 if half[c] == 0 else 6
        for i in range(offsets[c], offsets[c + 1]):
            if not use[i]:
                continue
            h = code[i]
            w = 1.0 / (sigma[i] * sigma[i])
            wi = w * intensity[i]
            sums[0, h] += 1.0
            sums[1, h] += w
            sums[2, h] += wi
            sums[k, h] += w
            sums[k + 1, h] += wi
            sums[k + 2, h] += 1.0
            zi = z[i]
            if zi == zi and abs(zi) < np.inf:
                deviation_sums[0] += 1.0
                deviation_sums[1] += zi * zi
                if abs(zi) > 3.0:
                    deviation_sums[2] += 1.0


@register_jitable
def _pearson(n, sx, sy, sxx, syy, sxy):  # type: ignore[no-untyped-def]  # pragma: no cover
    cov = sxy - sx * sy / n
    return cov / math.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def delta_cc_half_kernel(offsets, half, code, use, intensity, sigma, sw_a, swi_a, sw_b, swi_b,
                         delta):  # type: ignore[no-untyped-def]  # pragma: no cover
    """Per crystal: CC1/2 of the merge (half-set sums per asymmetric-unit reflection) minus
    CC1/2 without the crystal's used observations (NaN: none); see
    :func:`~sfxflow.algorithms.merge.rejection.delta_cc_half`. Each crystal's observations are
    summed per reflection in scratch arrays indexed by reflection (no sort)."""
    n_asu = sw_a.shape[0]
    x = np.zeros(n_asu)
    y = np.zeros(n_asu)
    has_x = sw_a > 0
    has_y = sw_b > 0
    t = np.zeros(6)
    for h in range(n_asu):
        if has_x[h]:
            x[h] = swi_a[h] / sw_a[h]
        if has_y[h]:
            y[h] = swi_b[h] / sw_b[h]
        if has_x[h] and has_y[h]:
            t[0] += 1.0
            t[1] += x[h]
            t[2] += y[h]
            t[3] += x[h] * x[h]
            t[4] += y[h] * y[h]
            t[5] += x[h] * y[h]
    cc_all = _pearson(t[0], t[1], t[2], t[3], t[4], t[5])
    w_pair = np.zeros(n_asu)
    wi_pair = np.zeros(n_asu)
    touched = np.empty(n_asu, dtype=np.int64)
    mark = np.full(n_asu, -1, dtype=np.int64)  # the last crystal that touched each reflection
    for c in range(offsets.shape[0] - 1):
        n_touched = 0
        for i in range(offsets[c], offsets[c + 1]):
            if not use[i]:
                continue
            h = code[i] // 2
            w = 1.0 / (sigma[i] * sigma[i])
            if mark[h] != c:
                mark[h] = c
                touched[n_touched] = h
                n_touched += 1
            w_pair[h] += w
            wi_pair[h] += w * intensity[i]
        if n_touched == 0:
            delta[c] = np.nan
            continue
        in_a = half[c] == 0
        m = t.copy()
        for k in range(n_touched):
            h = touched[k]
            # the crystal's half without it (what is left of Σw below rounding counts as empty)
            sw = (sw_a[h] if in_a else sw_b[h]) - w_pair[h]
            swi = (swi_a[h] if in_a else swi_b[h]) - wi_pair[h]
            left = sw > 1e-9 * (sw + w_pair[h])
            mean_left = swi / sw if left else 0.0
            x_new = mean_left if in_a else x[h]
            y_new = y[h] if in_a else mean_left
            if (left and has_y[h]) if in_a else (left and has_x[h]):
                m[0] += 1.0
                m[1] += x_new
                m[2] += y_new
                m[3] += x_new * x_new
                m[4] += y_new * y_new
                m[5] += x_new * y_new
            if has_x[h] and has_y[h]:
                m[0] -= 1.0
                m[1] -= x[h]
                m[2] -= y[h]
                m[3] -= x[h] * x[h]
                m[4] -= y[h] * y[h]
                m[5] -= x[h] * y[h]
            w_pair[h] = 0.0
            wi_pair[h] = 0.0
        delta[c] = cc_all - _pearson(m[0], m[1], m[2], m[3], m[4], m[5])
