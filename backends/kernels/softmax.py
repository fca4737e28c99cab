"""Softmax along the last axis of a 2-D buffer as scheduled TIR PrimFuncs.

The two-pass algorithm of Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020
(arXiv 2001.04438): pass 1 keeps, per SIMD lane, a running pair ``(M, N)`` of the sum
``M * 2**N`` of the exponentials (no max pass), merged across lanes at the end; pass 2
recomputes each ``(m, n)`` and writes ``m / M * 2**(n - N)``. It is exact up to float32
rounding (the polynomial error is 2e-7, see :mod:`rewriter.backends.kernels.exp_pair`).

CPU schedule (built here by hand, not by a tuner): one row per loop iteration, rows
parallel over threads; 16 lanes (AVX512, ``vscalefps``) or 8 (AVX2) or 4 (generic).
Pass 1 computes 8 independent ``(m, n)`` vectors per block and folds them into the
running pair of each lane with one max and a tree of ``vscalefps`` and adds; the vectors
after the last block and the scalar tail (``cols % lanes``) are added one at a time.
Pass 2 depends on the row length (static ``cols``):

* a row (input and output) that fits in L2 (``KEEP_EXP_MAX_ROW_BYTES``): pass 1 also
  stores ``m 2**(n - n(x[0]))`` in Y, and pass 2 multiplies Y by ``2**(n(x[0]) - N) / M``
  (one exponential per element; recomputed instead if ``N - n(x[0]) > 100``);
* longer rows: pass 2 recomputes ``(m, n)``; when the output is over 8 MiB and the row
  length a multiple of 16 on AVX512 with MOVDIR64B, it writes with ``movdir64b`` (a
  non-temporal 64-byte store; TVM guarantees 64-byte aligned buffers), then ``sfence``.

Exactness on every input (ONNX Softmax semantics): the float32 fast path holds while the
row's largest exponent ``N`` is in a safe range (see ``exp_pair``); a row that fails the
check (+inf, NaN, all -inf, or ``|x|`` above about 2700) is recomputed in float64 by the
same algorithm as :func:`rewriter.two_pass_math.reference_softmax`, so such rows give
NaN where ONNX does and stay one-hot near the float maximum.

The three-pass kernel (max, sum of exp, scale; three reads, one write) uses the same
vectorization and exponential, for comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from rewriter import two_pass_math as tpm
from rewriter.backends.kernels import exp_pair as ep
from rewriter.backends.kernels import softmax_cuda
from rewriter.backends.kernels.cpu_plan import (
    KEEP_EXP_MAX_SHIFT,
    UNROLL,
    Extent,
    Plan,
    bcast,
    isa,
    span,
)
from rewriter.backends.kernels.three_pass import three_pass_cpu

logger = logging.getLogger(__name__)


def _two_pass_cpu(
    rows: Extent, cols: Extent, dtype: str, log: bool, target: tvm.target.Target
) -> tirx.PrimFunc:
    p = Plan(rows, cols, dtype, target)
    lanes, width, scalef = p.lanes, p.lanes * UNROLL, p.scalef
    f32, f64 = "float32", "float64"
    keep = p.keep_exp and not log

    def m_at(tmp: tirx.Buffer, u: int) -> tirx.Expr:
        return tmp[span(u * lanes, lanes)]

    def n_at(tmp: tirx.Buffer, u: int) -> tirx.Expr:
        return tmp[span((UNROLL + u) * lanes, lanes)]

    def slot(k: int) -> tirx.Expr:
        return span((2 * UNROLL + k) * lanes, lanes)

    def new_n(acc_n: tirx.Buffer, tmp: tirx.Buffer) -> tirx.Expr:
        return ep.tree(T.max, [acc_n[span(0, lanes)]] + [n_at(tmp, u) for u in range(UNROLL)])

    @T.macro
    def accumulate_block(acc_m, acc_n, acc_c, tmp, X, Y, row, r, base):
        # UNROLL independent (m, n) vectors; one max and one tree sum per block update the
        # running pair: N' = max(N, n_0..7), M' = M 2**(N-N') + sum_u m_u 2**(n_u-N').
        for u in T.unroll(UNROLL):
            tmp[span(u * lanes, lanes)] = ep.exp_pair(p.load(X, r, base + u * lanes, lanes), lanes)[
                0
            ]
            tmp[span((UNROLL + u) * lanes, lanes)] = ep.exp_pair(
                p.load(X, r, base + u * lanes, lanes), lanes
            )[1]
            if keep:
                Y[r, span(base + u * lanes, lanes)] = ep.scale(
                    tmp[span(u * lanes, lanes)],
                    tmp[span((UNROLL + u) * lanes, lanes)] - bcast(row[4], lanes),
                    lanes,
                    scalef,
                )
        # Kahan-compensated: a long row adds thousands of blocks to one pair per lane.
        tmp[slot(0)] = new_n(acc_n, tmp)
        tmp[slot(1)] = ep.tree(
            tirx.Add,
            [
                ep.scale(m_at(tmp, u), n_at(tmp, u) - tmp[slot(0)], lanes, scalef)
                for u in range(UNROLL)
            ],
        ) - ep.scale(acc_c[span(0, lanes)], acc_n[span(0, lanes)] - tmp[slot(0)], lanes, scalef)
        tmp[slot(2)] = ep.scale(
            acc_m[span(0, lanes)], acc_n[span(0, lanes)] - tmp[slot(0)], lanes, scalef
        )
        acc_m[span(0, lanes)] = tmp[slot(2)] + tmp[slot(1)]
        acc_c[span(0, lanes)] = (acc_m[span(0, lanes)] - tmp[slot(2)]) - tmp[slot(1)]
        acc_n[span(0, lanes)] = tmp[slot(0)]

    @T.macro
    def accumulate(acc_m, acc_n, tmp, off, x, Y, row, r, col):
        # Assignments in TVMScript declare buffers, so values go through tmp and stores.
        tmp[span(0, lanes)] = ep.exp_pair(x, lanes)[0]
        tmp[span(lanes, lanes)] = ep.exp_pair(x, lanes)[1]
        acc_m[span(off, lanes)] = ep.pair_add(
            acc_m[span(off, lanes)],
            acc_n[span(off, lanes)],
            tmp[span(0, lanes)],
            tmp[span(lanes, lanes)],
            lanes,
            scalef,
        )[0]
        acc_n[span(off, lanes)] = ep.pair_add(
            acc_m[span(off, lanes)],
            acc_n[span(off, lanes)],
            tmp[span(0, lanes)],
            tmp[span(lanes, lanes)],
            lanes,
            scalef,
        )[1]
        if keep:
            Y[r, span(col, lanes)] = ep.scale(
                tmp[span(0, lanes)],
                tmp[span(lanes, lanes)] - bcast(row[4], lanes),
                lanes,
                scalef,
            )

    @T.macro
    def store(Y, tmp, r, off, y):
        if p.stream:
            tmp[span(0, lanes)] = y
            T.evaluate(
                T.call_llvm_intrin(
                    "void", "llvm.x86.movdir64b", T.address_of(Y[r, off]), T.address_of(tmp[0])
                )
            )
        else:
            Y[r, span(off, lanes)] = p.cast_out(y, lanes)

    def fast_y(x: tirx.Expr, row: tirx.Buffer, n_lanes: int) -> tirx.Expr:
        if log:
            # y = x - N ln2 - log M, with N ln2 split like t so that it stays exact.
            return x - bcast(row[2], n_lanes) - bcast(row[3], n_lanes)
        m, n = ep.exp_pair(x, n_lanes)
        return ep.scale(m * bcast(row[2], n_lanes), n - bcast(row[0], n_lanes), n_lanes, scalef)

    def exact_y(x: tirx.Expr, srow: tirx.Buffer) -> tirx.Expr:
        m, n = ep.exp_pair(x, 1, f64)
        if log:
            return tirx.log(m) - tirx.log(srow[1]) + (n - srow[0]) * tirx.const(tpm.LN2, f64)
        return m / srow[1] * ep.pow2(n - srow[0], 1, f64)

    @T.macro
    def recompute(X, Y, tmp, row, r):
        # Pass 2 (float32): recompute (m, n), write m / M * 2**(n - N).
        if log:
            row[2] = row[0] * T.float32(ep.LN2_HI_F32)
            row[3] = row[0] * T.float32(ep.LN2_LO_F32) + T.log(row[1])
        else:
            row[2] = T.float32(1) / row[1]
        for j in T.serial(p.blocks):
            for u in T.unroll(UNROLL):
                store(
                    Y,
                    tmp,
                    r,
                    j * width + u * lanes,
                    fast_y(p.load(X, r, j * width + u * lanes, lanes), row, lanes),
                )
        for j in T.serial(p.rest):
            store(
                Y,
                tmp,
                r,
                p.blocks * width + j * lanes,
                fast_y(p.load(X, r, p.blocks * width + j * lanes, lanes), row, lanes),
            )
        for k in T.serial(p.tail):
            Y[r, p.cols - p.tail + k] = p.cast_out(
                fast_y(p.load(X, r, p.cols - p.tail + k, 1), row, 1), 1
            )
        if p.stream:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.sfence"))

    @T.prim_func
    def two_pass_softmax(
        X: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for r in T.parallel(p.rows):
            acc_m = T.alloc_buffer((lanes,), f32, scope="global")
            acc_n = T.alloc_buffer((lanes,), f32, scope="global")
            acc_c = T.alloc_buffer((lanes,), f32, scope="global")
            tmp = T.alloc_buffer(((2 * UNROLL + 3) * lanes,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            srow = T.alloc_buffer((2,), f64, scope="global")
            # Pass 1: a running pair per lane, fed UNROLL independent vectors per block.
            if keep:
                row[4] = ep.exp_pair(p.load(X, r, 0, 1), 1)[1]
            acc_m[span(0, lanes)] = p.vec(0.0)
            acc_n[span(0, lanes)] = p.vec(ep.N_LOW)
            acc_c[span(0, lanes)] = p.vec(0.0)
            for j in T.serial(p.blocks):
                accumulate_block(acc_m, acc_n, acc_c, tmp, X, Y, row, r, j * width)
            acc_m[span(0, lanes)] = acc_m[span(0, lanes)] - acc_c[span(0, lanes)]
            for j in T.serial(p.rest):
                accumulate(
                    acc_m,
                    acc_n,
                    tmp,
                    0,
                    p.load(X, r, p.blocks * width + j * lanes, lanes),
                    Y,
                    row,
                    r,
                    p.blocks * width + j * lanes,
                )
            row[0] = T.float32(ep.N_LOW)
            row[1] = T.float32(0)
            for k in T.unroll(lanes):
                row[1] = ep.pair_add(row[1], row[0], acc_m[k], acc_n[k], 1, False)[0]
                row[0] = T.max(row[0], acc_n[k])
            for k in T.serial(p.tail):
                tmp[0] = ep.exp_pair(p.load(X, r, p.cols - p.tail + k, 1), 1)[0]
                tmp[1] = ep.exp_pair(p.load(X, r, p.cols - p.tail + k, 1), 1)[1]
                row[1] = ep.pair_add(row[1], row[0], tmp[0], tmp[1], 1, False)[0]
                row[0] = T.max(row[0], tmp[1])
                if keep:
                    Y[r, p.cols - p.tail + k] = tmp[0] * ep.pow2(tmp[1] - row[4], 1)
            if ep.fast_path_ok(row[0], row[1]):
                if keep and row[0] - row[4] <= T.float32(KEEP_EXP_MAX_SHIFT):
                    # Pass 2 on the kept e**x: one multiply by 2**(n(x[0]) - N) / M.
                    row[2] = ep.pow2(row[4] - row[0], 1) / row[1]
                    for j in T.serial(p.blocks):
                        for u in T.unroll(UNROLL):
                            Y[r, span(j * width + u * lanes, lanes)] = Y[
                                r, span(j * width + u * lanes, lanes)
                            ] * bcast(row[2], lanes)
                    for j in T.serial(p.rest):
                        Y[r, span(p.blocks * width + j * lanes, lanes)] = Y[
                            r, span(p.blocks * width + j * lanes, lanes)
                        ] * bcast(row[2], lanes)
                    for k in T.serial(p.tail):
                        Y[r, p.cols - p.tail + k] = Y[r, p.cols - p.tail + k] * row[2]
                else:
                    recompute(X, Y, tmp, row, r)
            else:
                # Rows with inf, NaN or huge magnitudes: the same algorithm in float64.
                srow[0] = T.float64(-np.inf)
                srow[1] = T.float64(0)
                for k in T.serial(p.cols):
                    srow[1] = ep.pair_add_exact(
                        srow[1], srow[0], *ep.exp_pair(T.Cast(f64, X[r, k]), 1, f64)
                    )[0]
                    srow[0] = ep.pair_add_exact(
                        srow[1], srow[0], *ep.exp_pair(T.Cast(f64, X[r, k]), 1, f64)
                    )[1]
                # A row of -inf has no largest term: NaN, as ONNX gives (-inf - -inf).
                srow[1] = T.Select(srow[0] == T.float64(-np.inf), T.float64(np.nan), srow[1])
                for k in T.serial(p.cols):
                    Y[r, k] = T.Cast(dtype, exact_y(T.Cast(f64, X[r, k]), srow))

    return two_pass_softmax


Builder = Callable[[Extent, Extent, str, bool, tvm.target.Target], tirx.PrimFunc]


def _dispatch(
    cpu: Builder,
    cuda_name: str,
    rows: Extent,
    cols: Extent,
    dtype: str,
    log: bool,
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"softmax kernels take float32, float16 or bfloat16, not {dtype}")
    if isa(target) == "cuda":
        func = getattr(softmax_cuda, cuda_name)(rows, cols, dtype, log)
    else:
        func = cpu(rows, cols, dtype, log, target)
    logger.debug("built %s for %s (%s)", func.attrs["global_symbol"], target, isa(target))
    return _with_root_block(func)


def _with_root_block(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its body in a root block, as Relax's ``call_tir`` passes expect.

    The schedule is written by hand without blocks; the root block changes no code.
    """
    root = s_tir.SBlock(iter_vars=[], reads=[], writes=[], name_hint="root", body=func.body)
    return func.with_body(s_tir.SBlockRealize(iter_values=[], predicate=True, block=root))


def two_pass_softmax(
    rows: Extent,
    cols: Extent,
    *,
    dtype: str = "float32",
    log: bool = False,
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """Softmax (or log-softmax) of each row of ``X[rows, cols]`` by the two-pass algorithm.

    Dukhan & Ablavatski 2020 (arXiv 2001.04438); see the module docstring for the
    schedule. ``rows`` and ``cols`` are ints or ``tvm.tirx.Var`` (symbolic). float16 and
    bfloat16 are computed in float32. The PrimFunc takes ``(X, Y)``, both
    ``Buffer[(rows, cols), dtype]``, and is scheduled for ``target`` (llvm with
    AVX512, AVX2 or neither, or cuda).

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    >>> func = two_pass_softmax(4, 1000, target=target)
    >>> [p.name for p in func.params]
    ['X', 'Y']
    >>> executable = tvm.compile(func, target=target)  # or R.call_tir(func, ...) in Relax
    """
    return _dispatch(_two_pass_cpu, "two_pass_softmax_cuda", rows, cols, dtype, log, target)


def three_pass_softmax(
    rows: Extent,
    cols: Extent,
    *,
    dtype: str = "float32",
    log: bool = False,
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """Softmax (or log-softmax) of each row by max, sum of exp, scale (three passes).

    The baseline the two-pass paper (Dukhan & Ablavatski 2020) compares against, with the
    same vectorization and exponential as :func:`two_pass_softmax` and the same signature.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    >>> three_pass_softmax(2, 8, target=target).params[0].name
    'X'
    """
    return _dispatch(three_pass_cpu, "three_pass_softmax_cuda", rows, cols, dtype, log, target)
