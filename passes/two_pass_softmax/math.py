"""The math of the two-pass softmax, shared by the ONNX function bodies, the fx custom
op and the kernels (Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020,
arXiv 2001.04438).

Every exponential is kept as a pair (mantissa m, exponent n) with value m * 2**n:

* ``n = round(x * log2(e))``; ``t = x - n * ln2`` with ln2 split in a hi and a lo
  part (Cody-Waite), so ``|t| <= ln2 / 2``; ``m = p(t)`` with ``p`` a degree-5
  polynomial for ``e**t``.
* pass 1 reduces the pairs of a row: ``N = max n``, ``M = sum m * 2**(n - N)``;
* pass 2 writes ``y = m / M * 2**(n - N)`` (log-softmax:
  ``log m - log M + (n - N) ln2``).

Nothing overflows: a pair represents any magnitude, so no max pass is needed.
``p`` is the minimax fit of ``e**t`` on ``[-ln2/2, ln2/2]`` in relative error
(Remez exchange, max relative error 7.5e-8); ``reference_softmax`` below checks it.

float64 inputs take another pair, (m, k) with value ``m * e**k``: ``k = round(x)``,
``t = x - k``, ``m = e**t`` (``Exp`` in double); pass 1 reduces ``K = max k``,
``M = sum m e**(k - K)``; pass 2 writes ``y = m e**(k - K) / M`` (log-softmax:
``t + (k - K) - log M``). Why not the float path with a longer polynomial: float64's 53
bits need the reduced argument exact, and ``x - n ln2`` is exact only while ``n * ln2_hi``
is (``|n| < 2**21``, ``|x| < 1.4e6``); past that ``t`` carries an error of ``ulp(x)``,
5e-10 relative at ``x = 4e6``, which no polynomial degree removes. ``x - round(x)`` is
exact for every double (the fraction bits of ``x``), ``e**t`` on ``[-1/2, 1/2]`` and
``e**(k - K)`` of an integer ``k - K <= 0`` are each within an ulp in any libm (ONNX
Runtime's, TVM's), and no step overflows, even at the float64 maximum: the result is
within a few ulp of softmax, as ONNX Runtime's own (``exp(x - max)``) is.
``reference_softmax_double`` below is the numpy oracle.
"""

from __future__ import annotations

import numpy as np

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# fdlibm's split of ln2: the hi part has 21 trailing zero bits, so n * LN2_HI is exact
# in float64 for |n| < 2**21.
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10

# p(t) = c0 + c1 t + ... + c5 t**5 ~ e**t on [-ln2/2, ln2/2], relative error <= 7.5e-8.
EXP_POLY = (
    1.0000000716546849,
    0.9999996919915549,
    0.4999889485120405,
    0.16667574728623716,
    0.04191538199274357,
    0.008297655088386683,
)
EXP_POLY_MAX_REL_ERROR = 7.5e-8

# |t| is clamped to 1: finite inputs always give |t| <= ln2/2 + rounding, but for
# |x| near the float maximum t loses all its bits, and the clamp keeps m positive
# and finite (such rows are one-hot, so m's exact value does not matter).
T_CLAMP = 1.0


# Rounding to the nearest integer as floor(x + 1/2): any integer within 1 of x keeps
# x - k exact, so how ties round does not matter.
HALF = 0.5


def reference_softmax(x: np.ndarray, *, log: bool = False) -> np.ndarray:
    """The two-pass algorithm in float64 numpy along the last axis (a test oracle).

    >>> reference_softmax(np.array([1.0, 2.0, 3.0])).round(4)
    array([0.09  , 0.2447, 0.6652])
    """
    xd = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        n = np.floor(xd * LOG2E + 0.5)
        t = xd - n * LN2_HI - n * LN2_LO
        t = np.where(np.isneginf(xd), 0.0, t)
        t = np.clip(t, -T_CLAMP, T_CLAMP)
        m = np.polynomial.polynomial.polyval(t, EXP_POLY)
        n_max = np.max(n, axis=-1, keepdims=True)
        scaled = m * np.exp2(n - n_max)
        total = np.sum(scaled, axis=-1, keepdims=True)
        if log:
            return np.log(m) - np.log(total) + (n - n_max) * LN2
        return scaled / total


def reference_softmax_double(x: np.ndarray, *, log: bool = False) -> np.ndarray:
    """The float64 two-pass algorithm (pairs ``m e**k``) in numpy, along the last axis.

    >>> reference_softmax_double(np.array([1.0, 2.0, 3.0])).round(4)
    array([0.09  , 0.2447, 0.6652])
    """
    xd = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        k = np.floor(xd + HALF)
        t = np.where(np.isneginf(xd), 0.0, xd - k)
        m = np.exp(t)
        delta = k - np.max(k, axis=-1, keepdims=True)
        scaled = m * np.exp(delta)
        total = np.sum(scaled, axis=-1, keepdims=True)
        if log:
            return t + delta - np.log(total)
        return scaled / total
