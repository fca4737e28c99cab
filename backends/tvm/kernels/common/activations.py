"""Vector sigmoid and tanh as TIR expressions, on the polynomial exponential of
:mod:`rewriter.backends.tvm.kernels.common.exp_pair`.

TVM lowers ``sigmoid`` and ``tanh`` through ``llvm.exp``, which LLVM cannot vectorize
without a vector math library (one libm call per lane). Both here take the exponential
of a non-positive argument only, so ``2**n`` is built from its bits
(:func:`exp_pair.pow2`) and never overflows:

* ``sigmoid(x) = (1 if x >= 0 else e) / (1 + e)`` with ``e = exp(-|x|)``;
* ``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2 |x|)`` for ``|x| >= 0.625``
  (``|x|`` capped at 9: tanh(9) rounds to 1 in float32), and below it Cephes' odd
  polynomial of ``tanhf`` (``x + x z p(z)``, ``z = x**2``), where ``1 - e`` would cancel.

Each is two stages, so that the exponential (which reads its argument many times) is a
load in the second: ``e = sigmoid_exp(x)`` or ``tanh_exp(x)`` stored, then
``sigmoid(x, e)`` or ``tanh(x, e)``. Both are within 2e-7 of float64 over [-30, 30]
(``tests/backends/tvm/test_recurrent.py``).
"""

from __future__ import annotations

from tvm import tirx

from rewriter.backends.tvm.kernels.common import exp_pair as ep

# Cephes tanhf: the polynomial below |x| = 0.625, coefficients from high to low order.
TANH_POLY_F32 = (
    -5.70498872745e-3,
    2.06390887954e-2,
    -5.37397155531e-2,
    1.33314422036e-1,
    -3.33332819422e-1,
)
TANH_SMALL = 0.625
TANH_CAP = 9.0


def _exp_nonpositive(y: tirx.Expr, lanes: int) -> tirx.Expr:
    """``e**y`` for ``y <= 0`` (0 below float32's normal range)."""
    m, n = ep.exp_pair(y, lanes)
    return m * ep.pow2(n, lanes)


def sigmoid_exp(x: tirx.Expr, lanes: int) -> tirx.Expr:
    """Stage 1 of :func:`sigmoid`: ``exp(-|x|)``."""
    return _exp_nonpositive(ep.const(0.0, "float32", lanes) - tirx.abs(x), lanes)


def sigmoid(x: tirx.Expr, e: tirx.Expr, lanes: int) -> tirx.Expr:
    """``1 / (1 + exp(-x))`` given ``e = sigmoid_exp(x)`` (both loads)."""
    one = ep.const(1.0, "float32", lanes)
    return tirx.Select(x >= ep.const(0.0, "float32", lanes), one, e) / (one + e)


def tanh_exp(x: tirx.Expr, lanes: int) -> tirx.Expr:
    """Stage 1 of :func:`tanh`: ``exp(-2 min(|x|, 9))``."""
    capped = tirx.min(tirx.abs(x), ep.const(TANH_CAP, "float32", lanes))
    return _exp_nonpositive(ep.const(-2.0, "float32", lanes) * capped, lanes)


def tanh(x: tirx.Expr, e: tirx.Expr, lanes: int) -> tirx.Expr:
    """``tanh(x)`` given ``e = tanh_exp(x)`` (both loads)."""

    def c(value: float) -> tirx.Expr:
        return ep.const(value, "float32", lanes)

    z = x * x
    p = c(TANH_POLY_F32[0])
    for coefficient in TANH_POLY_F32[1:]:
        p = p * z + c(coefficient)
    small = x + x * z * p
    large = (c(1.0) - e) / (c(1.0) + e)
    signed = tirx.Select(x < c(0.0), c(0.0) - large, large)
    return tirx.Select(tirx.abs(x) < c(TANH_SMALL), small, signed)
