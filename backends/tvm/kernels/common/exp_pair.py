"""The (mantissa, exponent) exponential of the two-pass softmax as TIR expressions.

Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020 (arXiv 2001.04438): e**x is
kept as a pair ``(m, n)`` with value ``m * 2**n``, where ``n`` is ``x log2(e)`` rounded,
``t = x - n ln2`` (Cody-Waite) and ``m = p(t)``. The helpers here build that pair, and
the scaling by ``2**d``, for any vector width (``lanes == 1`` is scalar), so the CPU and
CUDA kernels share one copy of the math. :mod:`rewriter.passes.two_pass_softmax.math` holds the float64
version and the oracle.

float32 constants (derived here, not copied):

* ``LN2_HI_F32 = 2839 / 4096``: ln2 rounded to 12 significant bits, so ``n * LN2_HI_F32``
  is exact for ``|n| < 2**12`` with or without FMA contraction;
  ``LN2_LO_F32 = float32(ln2 - LN2_HI_F32)``.
* ``EXP_POLY_F32``: minimax fit of ``e**t`` in relative error on ``|t| <= 0.347``
  (ln2/2 plus the slack of rounding ``x log2(e)`` in float32), by linear programming on
  4001 Chebyshev nodes with ``c0 = c1 = 1`` fixed, each further coefficient rounded to
  float32 before the next is refitted. Evaluated in float32 by Horner's rule, the max
  relative error over 2e6 points is 2.0e-7 (the float64 coefficients of
  ``math.EXP_POLY`` rounded to float32 give 2.1e-7: c1 does not round well).

Finite-range contract of the float32 pair (the kernels check it per row and recompute a
row in float64 when it fails): with ``N`` the row's largest exponent,
``N_LOW + 200 < N < N_HIGH``. Then every ``n`` that matters is exact and ``|t| <= 0.347``.
``x`` is clamped below at ``X_LOW`` (one ``vmaxps``, NaN passes through), so -inf and
very negative inputs get ``n <= -4184``, a finite ``m`` and a scale ``2**(n - N) = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import tirx

from rewriter.passes.two_pass_softmax import math as tpm

LOG2E_F32 = float(np.float32(tpm.LOG2E))
LN2_HI_F32 = 2839.0 / 4096.0
LN2_LO_F32 = float(np.float32(tpm.LN2 - LN2_HI_F32))
EXP_POLY_F32 = (
    1.0,
    1.0,
    0.4999922811985016,
    0.16667117178440094,
    0.04189074784517288,
    0.008306803181767464,
)
EXP_POLY_F32_MAX_REL_ERROR = 2.0e-7
N_LOW = -4096.0
X_LOW = -2900.0
N_HIGH = 4000.0
N_MARGIN = 200.0
ROUND_MAGIC = 12582912.0


def const(value: float, dtype: str, lanes: int) -> tirx.Expr:
    """``value`` as a ``dtype`` scalar, or broadcast to ``lanes`` lanes."""
    scalar = tirx.const(value, dtype)
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def vtype(dtype: str, lanes: int) -> str:
    """The TIR type string of ``lanes`` lanes of ``dtype``."""
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def max_keep_nan(low: tirx.Expr, x: tirx.Expr) -> tirx.Expr:
    """``max(low, x)`` that returns ``x`` when ``x`` is NaN (vmaxps operand order)."""
    return tirx.Select(low > x, low, x)


def exp_pair(
    x: tirx.Expr, lanes: int, dtype: str = "float32", *, llvm: bool = True
) -> tuple[tirx.Expr, tirx.Expr]:
    """The pair ``(m, n)`` with ``e**x = m * 2**n`` (float32: ``x`` clamped for the fast path).

    float32 is :func:`exponent` (``llvm``: see there) and :func:`mantissa`; float64 uses the constants of
    :mod:`rewriter.passes.two_pass_softmax.math` (where -inf gets ``t = 0`` and ``|t| <= 1`` as in
    ``reference_softmax``).
    """
    if dtype == "float32":
        n = exponent(x, lanes, llvm=llvm)
        return mantissa(x, n, lanes), n

    def c(v: float) -> tirx.Expr:
        return const(v, dtype, lanes)

    n = tirx.floor(x * c(tpm.LOG2E) + c(0.5))
    t = x - n * c(tpm.LN2_HI) - n * c(tpm.LN2_LO)
    t = tirx.Select(x == c(-np.inf), c(0.0), t)
    t = tirx.Select(t < c(-tpm.T_CLAMP), c(-tpm.T_CLAMP), t)
    t = tirx.Select(t > c(tpm.T_CLAMP), c(tpm.T_CLAMP), t)
    return _horner(tpm.EXP_POLY, t, dtype, lanes), n


def exponent(x: tirx.Expr, lanes: int, *, llvm: bool = True) -> tirx.Expr:
    """``n``, ``x log2(e)`` rounded to an integer, of the float32 pair of ``e**x``.

    For LLVM targets it rounds by adding and subtracting ``ROUND_MAGIC`` (``1.5 * 2**23``,
    where the float32 spacing is 1): one FMA and one subtraction, where ``floor`` costs a
    ``vrndscaleps`` that, with the polynomial's FMAs, bounded pass 1 of the two-pass
    softmax on AMD Zen 4. Exact for ``|x log2(e)| < 2**22``; a larger ``x`` fails
    :func:`fast_path_ok` either way. The FMA is ``tirx.fma`` because TVM's simplifier
    folds ``(a + magic) - magic`` to ``a``; the CUDA codegen has no ``tirx.fma``, so
    ``llvm=False`` gives ``floor(x log2(e) + 1/2)``. Either ``n`` gives the same
    ``m 2**n`` (they differ only at ties, by one, where ``m`` doubles).
    """
    c = const(LOG2E_F32, "float32", lanes)
    x = max_keep_nan(const(X_LOW, "float32", lanes), x)
    if not llvm:
        return tirx.floor(x * c + const(0.5, "float32", lanes))
    magic = const(ROUND_MAGIC, "float32", lanes)
    return tirx.op.fma(x, c, magic) - magic


def mantissa(x: tirx.Expr, n: tirx.Expr, lanes: int) -> tirx.Expr:
    """``m = p(x - n ln2)`` of the float32 pair of ``e**x``, given its ``n`` = :func:`exponent`.

    Separate from :func:`exponent` so that a kernel can keep ``n`` and compute it once.
    """
    x = max_keep_nan(const(X_LOW, "float32", lanes), x)
    t = x - n * const(LN2_HI_F32, "float32", lanes) - n * const(LN2_LO_F32, "float32", lanes)
    return _horner(EXP_POLY_F32, t, "float32", lanes)


def _horner(poly: tuple[float, ...], t: tirx.Expr, dtype: str, lanes: int) -> tirx.Expr:
    m = const(poly[-1], dtype, lanes)
    for coefficient in poly[-2::-1]:
        m = m * t + const(coefficient, dtype, lanes)
    return m


def pow2(d: tirx.Expr, lanes: int, dtype: str = "float32") -> tirx.Expr:
    """``2**d`` for integral ``d <= 0`` by building the float's bits.

    Below the normal range the result is 0, and so is NaN: callers keep NaN in the
    mantissa (TVM's simplifier folds ``d == d``, so NaN cannot be tested for here).
    """
    bits, bias, low = (32, 127, -126.0) if dtype == "float32" else (64, 1023, -1022.0)
    itype = vtype(f"int{bits}", lanes)
    clamped = tirx.Select(d >= const(low, dtype, lanes), d, const(low - 1.0, dtype, lanes))
    biased = tirx.Cast(itype, clamped) + const(bias, f"int{bits}", lanes)
    shift = const(bits - 9 if bits == 32 else 52, f"int{bits}", lanes)
    return tirx.reinterpret(vtype(dtype, lanes), tirx.shift_left(biased, shift))


def scale(m: tirx.Expr, d: tirx.Expr, lanes: int, use_scalef: bool) -> tirx.Expr:
    """``m * 2**d`` (float32): ``vscalefps`` on AVX512 when ``use_scalef``, else :func:`pow2`."""
    if use_scalef and lanes == 16:
        return tirx.call_llvm_pure_intrin(
            "float32x16",
            "llvm.x86.avx512.mask.scalef.ps.512",
            m,
            d,
            m,
            tirx.const(-1, "int16"),
            tirx.const(4, "int32"),
        )
    return m * pow2(d, lanes)


def pair_add(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr, lanes: int, use_scalef: bool
) -> tuple[tirx.Expr, tirx.Expr]:
    """Add pair ``(m, n)`` to ``(M, N)``: ``N' = max(N, n)``, ``M' = M 2**(N-N') + m 2**(n-N')``."""
    new_n = tirx.Select(n > big_n, n, big_n)
    new_m = scale(big_m, big_n - new_n, lanes, use_scalef) + scale(m, n - new_n, lanes, use_scalef)
    return new_m, new_n


def pair_add_exact(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr
) -> tuple[tirx.Expr, tirx.Expr]:
    """Float64 running pair that starts at (0, -inf) and treats equal exponents exactly."""
    new_n = tirx.Select(n > big_n, n, big_n)
    keep = tirx.Select(big_n == new_n, big_m, big_m * pow2(big_n - new_n, 1, "float64"))
    add = tirx.Select(n == new_n, m, m * pow2(n - new_n, 1, "float64"))
    return keep + add, new_n


def fast_path_ok(big_n: tirx.Expr, big_m: tirx.Expr) -> tirx.Expr:
    """Whether the float32 pair of a row is inside the fast path's contract."""
    return tirx.all(
        big_m < tirx.const(np.inf, "float32"),
        big_n < tirx.const(N_HIGH, "float32"),
        big_n > tirx.const(N_LOW + N_MARGIN, "float32"),
    )


def extents(rows: int | tirx.Var, cols: int | tirx.Var) -> tuple[tirx.Expr, tirx.Expr]:
    """Rows and columns as TIR expressions of one index type (int64 unless a Var says)."""
    dtypes = {str(v.ty) for v in (rows, cols) if isinstance(v, tirx.Var)}
    if len(dtypes) > 1:
        raise ValueError(f"rows and cols must share an index type, got {sorted(dtypes)}")
    index = dtypes.pop() if dtypes else "int64"

    def as_expr(v: int | tirx.Var) -> tirx.Expr:
        return v if isinstance(v, tirx.Var) else tirx.IntImm(index, int(v))

    return as_expr(rows), as_expr(cols)


def tree(op: Callable[[tirx.Expr, tirx.Expr], tirx.Expr], items: list[tirx.Expr]) -> tirx.Expr:
    """``op`` over ``items`` as a balanced tree (short dependency chains)."""
    while len(items) > 1:
        items = [op(a, b) for a, b in zip(items[::2], items[1::2], strict=False)] + (
            [items[-1]] if len(items) % 2 else []
        )
    return items[0]


def across_lanes(
    op: Callable[[tirx.Expr, tirx.Expr], tirx.Expr], v: tirx.Expr, lanes: int
) -> tirx.Expr:
    """``op`` over the ``lanes`` (a power of two) lanes of ``v``, as a scalar: halves are
    combined ``log2(lanes)`` times (shuffles), a short dependency chain where a loop over
    the lanes is a long one."""
    while lanes > 1:
        lanes //= 2
        low = tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(lanes)])
        high = tirx.Shuffle([v], [tirx.IntImm("int32", lanes + i) for i in range(lanes)])
        v = op(low, high)
    return v
