"""Pass 1 of the two-pass softmax: a row's sum of exponentials as running (M, N) pairs.

Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020 (arXiv 2001.04438): each
exponential is a pair ``(m, n)`` with value ``m * 2**n`` (:mod:`.exp_pair`), and each SIMD
lane keeps a running pair ``(M, N)``, so the sum needs no max pass and cannot overflow.
This module is that mechanism, once, for every kernel that needs ``log sum exp`` of a row:
the two-pass softmax (:mod:`.softmax`) and the cross-entropy kernels (:mod:`.cross_entropy`,
whose rows of logits come from memory or from a register tile of a matmul).

:class:`PairSum` builds TVMScript macros over one CPU :class:`~.simd_plan.Plan`:

* ``fold``: ``units`` vectors into one lane-wise running pair with one max and one tree of
  ``vscalefps`` and adds, ``N' = max(N, n_0..)``, ``M' = M 2**(N-N') + sum_u m_u 2**(n_u-N')``,
  Kahan-compensated (a long row folds thousands of blocks into one pair per lane); its
  scratch is small enough for LLVM to keep in registers, and each ``n`` is computed once
  (pass 1 is bound by the FMA pipes on AMD Zen 4, not by memory, so every op counts);
* ``add``/``add_scalar``: one vector, or one element, without compensation;
* ``merge``: the lanes into the row's pair ``row[0] = N``, ``row[1] = M``;
* ``row_sum``: all of pass 1 over ``X[r, :]`` (blocks of ``UNROLL`` vectors, the vectors
  left, the scalar tail); optionally (``keep``) it also stores ``m 2**(n - n(x[0]))`` in
  ``Y`` for the softmax's short-row pass 2;
* ``exact_add``/``exact_finish``: the same sum in float64 for rows outside the float32
  contract (see :func:`.exp_pair.fast_path_ok`), NaN for an all -inf row as ONNX gives.

:func:`log_terms`, :func:`log_prob` and :func:`log_prob_exact` turn a row's pair into
``log softmax(x) = x - N ln2 - log M`` (with ``N ln2`` split like Cody-Waite's ``t``, so
it stays exact), shared by the log-softmax kernel and the cross-entropy loss.

A running pair lives in a buffer at an offset: ``M`` at ``off``, ``N`` at ``off + lanes``,
the compensation at ``off + 2 lanes`` (:data:`PairSum.STATE` vectors), so a kernel can
keep the pairs of many rows in one buffer. Exact up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.simd_plan import UNROLL, Plan, bcast, span
from rewriter.passes.two_pass_softmax import math as tpm

VectorAt = Callable[[tirx.Expr], tirx.Expr]


class PairSum:
    """Pass-1 macros for ``plan``; ``fold`` takes ``units`` vectors at a time.

    ``keep``: ``row_sum`` also stores each ``e**x`` scaled by ``2**-n(x[0])`` in ``Y``
    (``row[4] = n(x[0])``); the two-pass softmax's short rows use it.

    >>> import tvm
    >>> plan = Plan(4, 1000, "float32", tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    >>> PairSum(plan).tmp_size  # two vectors of 8 lanes
    16
    """

    STATE = 3  # vectors per running pair: M, N and the Kahan compensation

    def __init__(self, plan: Plan, units: int = UNROLL, keep: bool = False) -> None:
        p = plan
        lanes, scalef, width = p.lanes, p.scalef, p.lanes * UNROLL
        self.plan, self.units, self.keep = plan, units, keep
        self.tmp_size = 2 * lanes

        def m_of(st: tirx.Buffer, off: tirx.Expr) -> tirx.Expr:
            return st[span(off, lanes)]

        def n_of(st: tirx.Buffer, off: tirx.Expr) -> tirx.Expr:
            return st[span(off + lanes, lanes)]

        def c_of(st: tirx.Buffer, off: tirx.Expr) -> tirx.Expr:
            return st[span(off + 2 * lanes, lanes)]

        def loads(X: tirx.Buffer, r: tirx.Expr, base: tirx.Expr) -> VectorAt:
            return lambda u: p.load(X, r, base + u * lanes, lanes)

        @T.macro
        def init(st, off):
            st[span(off, lanes)] = p.vec(0.0)
            st[span(off + lanes, lanes)] = p.vec(ep.N_LOW)
            st[span(off + 2 * lanes, lanes)] = p.vec(0.0)

        @T.macro
        def fold(st, off, x_at, Y, r, base, row):
            # units independent (m, n) vectors; one max and one tree sum update the pair.
            # The scratch is under TVM's stack-allocation limit, so LLVM keeps it in
            # registers, and n is computed once for m and for the max. With Y (not None),
            # also keep e**x scaled by 2**-row[4] in Y[r, base:] (PairSum's keep).
            tm = T.alloc_buffer((units * lanes,), "float32", scope="global")
            tn = T.alloc_buffer((units * lanes,), "float32", scope="global")
            big_n = T.alloc_buffer((lanes,), "float32", scope="global")
            tot = T.alloc_buffer((lanes,), "float32", scope="global")
            old = T.alloc_buffer((lanes,), "float32", scope="global")
            for u in T.unroll(units):
                tn[span(u * lanes, lanes)] = ep.exponent(x_at(u), lanes)
                tm[span(u * lanes, lanes)] = ep.mantissa(x_at(u), tn[span(u * lanes, lanes)], lanes)
            big_n[span(0, lanes)] = ep.tree(
                T.max, [n_of(st, off)] + [tn[span(u * lanes, lanes)] for u in range(units)]
            )
            tot[span(0, lanes)] = ep.tree(
                tirx.Add,
                [
                    ep.scale(
                        tm[span(u * lanes, lanes)],
                        tn[span(u * lanes, lanes)] - big_n[span(0, lanes)],
                        lanes,
                        scalef,
                    )
                    for u in range(units)
                ],
            ) - ep.scale(c_of(st, off), n_of(st, off) - big_n[span(0, lanes)], lanes, scalef)
            old[span(0, lanes)] = ep.scale(
                m_of(st, off), n_of(st, off) - big_n[span(0, lanes)], lanes, scalef
            )
            st[span(off, lanes)] = old[span(0, lanes)] + tot[span(0, lanes)]
            st[span(off + 2 * lanes, lanes)] = (m_of(st, off) - old[span(0, lanes)]) - tot[
                span(0, lanes)
            ]
            st[span(off + lanes, lanes)] = big_n[span(0, lanes)]
            if Y is not None:
                # keep: e**x scaled by 2**-n(x[0]) into Y[r, base:], for a short row's pass 2.
                for u in T.unroll(units):
                    Y[r, span(base + u * lanes, lanes)] = ep.scale(
                        tm[span(u * lanes, lanes)],
                        tn[span(u * lanes, lanes)] - bcast(row[4], lanes),
                        lanes,
                        scalef,
                    )

        @T.macro
        def settle(st, off):
            # The compensation back into M: after the last fold.
            st[span(off, lanes)] = m_of(st, off) - c_of(st, off)

        @T.macro
        def add(st, off, tmp, x):
            # Assignments in TVMScript declare buffers, so values go through tmp and stores.
            tmp[span(lanes, lanes)] = ep.exponent(x, lanes)
            tmp[span(0, lanes)] = ep.mantissa(x, tmp[span(lanes, lanes)], lanes)
            st[span(off, lanes)] = ep.pair_add(
                m_of(st, off),
                n_of(st, off),
                tmp[span(0, lanes)],
                tmp[span(lanes, lanes)],
                lanes,
                scalef,
            )[0]
            st[span(off + lanes, lanes)] = ep.pair_add(
                m_of(st, off),
                n_of(st, off),
                tmp[span(0, lanes)],
                tmp[span(lanes, lanes)],
                lanes,
                scalef,
            )[1]

        @T.macro
        def merge(st, off, row):
            # N = max over lanes, M = sum over lanes of M 2**(N_lane - N): halving trees.
            row[0] = ep.across_lanes(T.max, n_of(st, off), lanes)
            row[1] = ep.across_lanes(
                tirx.Add,
                ep.scale(m_of(st, off), n_of(st, off) - bcast(row[0], lanes), lanes, scalef),
                lanes,
            )

        @T.macro
        def add_scalar(row, tmp, x):
            tmp[1] = ep.exponent(x, 1)
            tmp[0] = ep.mantissa(x, tmp[1], 1)
            row[1] = ep.pair_add(row[1], row[0], tmp[0], tmp[1], 1, False)[0]
            row[0] = T.max(row[0], tmp[1])

        @T.macro
        def row_sum(X, Y, r, st, tmp, row):
            # Pass 1 over X[r, :]: row[0] = N, row[1] = M (the per-lane pairs in st[0:3 lanes]).
            if keep:
                row[4] = ep.exponent(p.load(X, r, 0, 1), 1)
            init(st, 0)
            for j in T.serial(p.blocks):
                fold(st, 0, loads(X, r, j * width), Y if keep else None, r, j * width, row)
            settle(st, 0)
            for j in T.serial(p.rest):
                add(st, 0, tmp, p.load(X, r, p.blocks * width + j * lanes, lanes))
                if keep:
                    Y[r, span(p.blocks * width + j * lanes, lanes)] = ep.scale(
                        tmp[span(0, lanes)],
                        tmp[span(lanes, lanes)] - bcast(row[4], lanes),
                        lanes,
                        scalef,
                    )
            merge(st, 0, row)
            for k in T.serial(p.tail):
                add_scalar(row, tmp, p.load(X, r, p.cols - p.tail + k, 1))
                if keep:
                    Y[r, p.cols - p.tail + k] = tmp[0] * ep.pow2(tmp[1] - row[4], 1)

        @T.macro
        def exact_init(srow):
            srow[0] = T.float64(-np.inf)
            srow[1] = T.float64(0)

        @T.macro
        def exact_add(srow, x):
            srow[1] = ep.pair_add_exact(srow[1], srow[0], *ep.exp_pair(x, 1, "float64"))[0]
            srow[0] = ep.pair_add_exact(srow[1], srow[0], *ep.exp_pair(x, 1, "float64"))[1]

        @T.macro
        def exact_finish(srow):
            # A row of -inf has no largest term: NaN, as ONNX gives (-inf - -inf).
            srow[1] = T.Select(srow[0] == T.float64(-np.inf), T.float64(np.nan), srow[1])

        if units != UNROLL and keep:
            raise ValueError("row_sum folds UNROLL vectors: keep needs units == UNROLL")
        self.init, self.fold, self.settle, self.add = init, fold, settle, add
        self.merge, self.add_scalar, self.row_sum = merge, add_scalar, row_sum
        self.exact_init, self.exact_add, self.exact_finish = exact_init, exact_add, exact_finish


@T.macro
def log_terms(row):
    """``row[2] = N ln2_hi``, ``row[3] = N ln2_lo + log M`` from the row's pair ``row[0:2]``."""
    row[2] = row[0] * T.float32(ep.LN2_HI_F32)
    row[3] = row[0] * T.float32(ep.LN2_LO_F32) + T.log(row[1])


def log_prob(x: tirx.Expr, row: tirx.Buffer, lanes: int) -> tirx.Expr:
    """``log softmax = x - N ln2 - log M`` (float32, after :func:`log_terms`)."""
    return x - bcast(row[2], lanes) - bcast(row[3], lanes)


def log_prob_exact(x: tirx.Expr, srow: tirx.Buffer) -> tirx.Expr:
    """``log softmax`` of a float64 ``x`` from the float64 pair ``srow = (N, M)``."""
    m, n = ep.exp_pair(x, 1, "float64")
    return tirx.log(m) - tirx.log(srow[1]) + (n - srow[0]) * tirx.const(tpm.LN2, "float64")
