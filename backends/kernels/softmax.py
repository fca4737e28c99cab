"""Softmax along the last axis of a 2-D buffer as scheduled TIR PrimFuncs.

The two-pass algorithm of Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020
(arXiv 2001.04438): pass 1 keeps, per SIMD lane, a running pair ``(M, N)`` of the sum
``M * 2**N`` of the exponentials (no max pass), merged across lanes at the end; pass 2
recomputes each ``(m, n)`` and writes ``m / M * 2**(n - N)``. It is exact up to float32
rounding (the polynomial error is 2e-7, see :mod:`rewriter.backends.kernels.exp_pair`).

CPU schedule (built here by hand, not by a tuner): one row per loop iteration, rows
parallel over threads; 16 lanes (AVX512, ``vscalefps``) or 8 (AVX2) or 4 (generic).
Pass 1 (:mod:`rewriter.backends.kernels.pair_sum`, shared with the cross-entropy
kernels) computes 8 independent ``(m, n)`` vectors per block and folds them into the
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

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from rewriter.backends.kernels import exp_pair as ep
from rewriter.backends.kernels import softmax_cuda
from rewriter.backends.kernels.cpu_plan import (
    KEEP_EXP_MAX_SHIFT,
    UNROLL,
    Extent,
    Plan,
    bcast,
    isa,
    row_writer,
    span,
)
from rewriter.backends.kernels.pair_sum import PairSum, log_prob, log_prob_exact, log_terms
from rewriter.backends.kernels.three_pass import three_pass_cpu

logger = logging.getLogger(__name__)


def _two_pass_cpu(
    rows: Extent, cols: Extent, dtype: str, log: bool, target: tvm.target.Target
) -> tirx.PrimFunc:
    p = Plan(rows, cols, dtype, target)
    lanes, width, scalef = p.lanes, p.lanes * UNROLL, p.scalef
    f32, f64 = "float32", "float64"
    keep = p.keep_exp and not log
    sums = PairSum(p, keep=keep)

    def fast_y(x: tirx.Expr, row: tirx.Buffer, n_lanes: int) -> tirx.Expr:
        if log:
            return log_prob(x, row, n_lanes)
        m, n = ep.exp_pair(x, n_lanes)
        return ep.scale(m * bcast(row[2], n_lanes), n - bcast(row[0], n_lanes), n_lanes, scalef)

    def exact_y(x: tirx.Expr, srow: tirx.Buffer) -> tirx.Expr:
        if log:
            return log_prob_exact(x, srow)
        m, n = ep.exp_pair(x, 1, f64)
        return m / srow[1] * ep.pow2(n - srow[0], 1, f64)

    write_row = row_writer(p, fast_y)

    @T.macro
    def recompute(X, Y, tmp, row, r):
        # Pass 2 (float32): recompute (m, n), write m / M * 2**(n - N).
        if log:
            log_terms(row)
        else:
            row[2] = T.float32(1) / row[1]
        write_row(X, Y, tmp, r, row)

    @T.prim_func
    def two_pass_softmax(
        X: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for r in T.parallel(p.rows):
            st = T.alloc_buffer((PairSum.STATE * lanes,), f32, scope="global")
            tmp = T.alloc_buffer((sums.tmp_size,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            srow = T.alloc_buffer((2,), f64, scope="global")
            # Pass 1: a running pair per lane, fed UNROLL independent vectors per block.
            sums.row_sum(X, Y, r, st, tmp, row)
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
                sums.exact_init(srow)
                for k in T.serial(p.cols):
                    sums.exact_add(srow, T.Cast(f64, X[r, k]))
                sums.exact_finish(srow)
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
