"""Compiled arithmetic rounded as numpy's small products are (its OpenBLAS here).

numpy's ``@`` of 3x3 (and ``(n, 3) @ (3, 3)``) matrices sums each entry from the first term by
fused multiply-adds. Compiled kernels that must give numpy's bits (the refinement's cycle loop,
the indexer's polishing and the predictions that decide which spots lie near a lattice) do the
same here, through one fused multiply-add that rounds once on any machine (another BLAS may
round numpy's own products otherwise, in the last bits only).
"""

from __future__ import annotations

from numba import njit, types
from numba.extending import intrinsic

__all__ = ["fma", "product3_into", "product3_t_into"]


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``a * b + c`` rounded once (IEEE fused multiply-add: the same bits on any machine)."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@njit(cache=True, nogil=True, inline="always")
def product3_into(a, b, out):  # pragma: no cover - compiled
    """``out = a @ b`` (3x3) as numpy's ``@`` rounds it: each entry ``a_i0 b_0j`` then two
    fused multiply-adds (numba's own ``@`` calls BLAS for this, 0.2-0.4 µs a product)."""
    for i in range(3):
        for j in range(3):
            out[i, j] = fma(a[i, 2], b[2, j], fma(a[i, 1], b[1, j], a[i, 0] * b[0, j]))


@njit(cache=True, nogil=True, inline="always")
def product3_t_into(a, b, out):  # pragma: no cover - compiled
    """``out = a @ b.T`` (3x3), as :func:`product3_into`."""
    for i in range(3):
        for j in range(3):
            out[i, j] = fma(a[i, 2], b[j, 2], fma(a[i, 1], b[j, 1], a[i, 0] * b[j, 0]))
