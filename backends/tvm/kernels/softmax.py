"""Softmax along the last axis of a 2-D buffer as scheduled TIR PrimFuncs.

The two-pass algorithm of Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020
(arXiv 2001.04438): pass 1 keeps, per SIMD lane, a running pair ``(M, N)`` of the sum
``M * 2**N`` of the exponentials (no max pass), merged across lanes at the end; pass 2
recomputes each ``(m, n)`` and writes ``m / M * 2**(n - N)``. It is exact up to float32
rounding (the polynomial error is 2e-7, see :mod:`rewriter.backends.tvm.kernels.common.exp_pair`).

CPU schedule (built here by hand, not by a tuner): one row per loop iteration, rows
parallel over threads; 16 lanes (AVX512, ``vscalefps``) or 8 (AVX2) or 4 (generic).
Fewer than ``PARALLEL_ITEMS`` long rows are cut into segments (:func:`split_segments`):
pass 1 runs on all segments in parallel, each row's segment pairs are merged, and pass 2
runs on the segments in parallel, so one long row uses every thread.
Pass 1 (:mod:`rewriter.backends.tvm.kernels.common.pair_sum`, shared with the cross-entropy
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
  Only targets that name a CPU with it (Sapphire Rapids) get it: the portable ``avx512``
  preset does not, and this TVM has no other non-temporal store.

Exactness on every input (ONNX Softmax semantics): the float32 fast path holds while the
row's largest exponent ``N`` is in a safe range (see ``exp_pair``); a row that fails the
check (+inf, NaN, all -inf, or ``|x|`` above about 2700) is recomputed in float64 by the
same algorithm as :func:`rewriter.passes.two_pass_softmax.math.reference_softmax`, so such rows give
NaN where ONNX does and stay one-hot near the float maximum.

The three-pass kernel (max, sum of exp, scale; three reads, one write) uses the same
vectorization and exponential, for comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels import softmax_cuda
from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.pair_sum import (
    PairSum,
    log_prob,
    log_prob_exact,
    log_terms,
)
from rewriter.backends.tvm.kernels.common.simd_plan import (
    KEEP_EXP_MAX_SHIFT,
    UNROLL,
    Extent,
    Plan,
    bcast,
    isa,
    row_writer,
    span,
)
from rewriter.backends.tvm.kernels.three_pass import three_pass_cpu

logger = logging.getLogger(__name__)

# Rows fewer than this are split into segments (see split_segments), down to MIN_SEGMENT
# elements each.
PARALLEL_ITEMS = 64
MIN_SEGMENT = 1 << 15


def _two_pass_cpu(
    rows: Extent, cols: Extent, dtype: str, log: bool, target: tvm.target.Target
) -> tirx.PrimFunc:
    segments = split_segments(rows, cols)
    if segments > 1:
        return _two_pass_split_cpu(int(rows), int(cols), segments, dtype, log, target)
    p = Plan(rows, cols, dtype, target)
    f32, f64 = "float32", "float64"
    sums, pass2, exact_row = _row_parts(p, dtype, log)

    @T.prim_func
    def two_pass_softmax(
        X: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.parallel(p.rows):
            st = T.alloc_buffer((PairSum.STATE * p.lanes,), f32, scope="global")
            tmp = T.alloc_buffer((sums.tmp_size,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            srow = T.alloc_buffer((2,), f64, scope="global")
            # Pass 1: a running pair per lane, fed UNROLL independent vectors per block.
            sums.row_sum(X, Y, r, st, tmp, row)
            if ep.fast_path_ok(row[0], row[1]):
                pass2(X, Y, tmp, row, r)
            else:
                exact_row(X, Y, r, srow, p.cols)

    return two_pass_softmax


def split_segments(rows: Extent, cols: Extent) -> int:
    """Segments per row for a long row's reductions to run on many threads (1: no split).

    With fewer than ``PARALLEL_ITEMS`` rows, each row is cut into equal segments of at
    least ``MIN_SEGMENT`` elements, a multiple of the widest block (``16 * UNROLL``
    lanes), so that ``rows * segments`` reaches ``PARALLEL_ITEMS``; static shapes only.

    >>> split_segments(1, 1 << 26), split_segments(1, 32768), split_segments(64, 1 << 20)
    (64, 1, 1)
    """
    if not (isinstance(rows, int) and isinstance(cols, int)) or rows >= PARALLEL_ITEMS:
        return 1
    block = 16 * UNROLL
    wanted = -(-PARALLEL_ITEMS // rows)
    for segments in range(wanted, 1, -1):
        length, rest = divmod(cols, segments)
        if not rest and length % block == 0 and length >= MIN_SEGMENT:
            return segments
    return 1


def _row_parts(p: Plan, dtype: str, log: bool) -> tuple[PairSum, Any, Any]:
    """Pass 1 (``PairSum``), pass 2 and the float64 path over rows of ``p``'s buffers.

    ``pass2(X, Y, tmp, row, r)`` writes ``Y[r, :]`` from the row's pair ``row[0:2]``
    (and ``row[4] = n(x[0])`` of the kept exponentials); ``exact_row(X, Y, r, srow,
    cols)`` redoes a row in float64.
    """
    lanes, width, scalef = p.lanes, p.lanes * UNROLL, p.scalef
    f64 = "float64"
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
    def pass2(X, Y, tmp, row, r):
        if keep and row[0] - row[4] <= T.float32(KEEP_EXP_MAX_SHIFT):
            # On the kept e**x: one multiply by 2**(n(x[0]) - N) / M.
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
            # Recompute (m, n) in float32, write m / M * 2**(n - N).
            if log:
                log_terms(row)
            else:
                row[2] = T.float32(1) / row[1]
            write_row(X, Y, tmp, r, row)

    @T.macro
    def exact_row(X, Y, r, srow, cols):
        # Rows with inf, NaN or huge magnitudes: the same algorithm in float64.
        sums.exact_init(srow)
        for k in T.serial(cols):
            sums.exact_add(srow, T.Cast(f64, X[r, k]))
        sums.exact_finish(srow)
        for k in T.serial(cols):
            Y[r, k] = T.Cast(dtype, exact_y(T.Cast(f64, X[r, k]), srow))

    return sums, pass2, exact_row


def _two_pass_split_cpu(
    rows: int, cols: int, segments: int, dtype: str, log: bool, target: tvm.target.Target
) -> tirx.PrimFunc:
    """The two-pass kernel with each row cut into ``segments`` (see :func:`split_segments`).

    Pass 1 runs on the segments in parallel (one pair per segment), a short step per row
    merges its segments' pairs (or redoes the row in float64), and pass 2 runs on the
    segments in parallel again. The
    segments are rows of a ``[rows * segments, cols / segments]`` view of X and Y, so the
    row macros are the same as the unsplit kernel's.
    """
    length = cols // segments
    p = Plan(rows * segments, length, dtype, target)
    f32, f64 = "float32", "float64"
    sums, pass2, exact_row = _row_parts(p, dtype, log)

    @T.prim_func
    def two_pass_softmax(
        X: T.Buffer((rows, cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((rows, cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        Xs = T.decl_buffer((rows * segments, length), dtype, data=X.data)
        Ys = T.decl_buffer((rows * segments, length), dtype, data=Y.data)
        # Per segment: N, M, n(x[0]); per row: N, M and 1 where the float32 path holds.
        seg = T.alloc_buffer((rows * segments * 3,), f32, scope="global")
        whole = T.alloc_buffer((rows * 3,), f32, scope="global")
        for q in T.parallel(rows * segments):
            st = T.alloc_buffer((PairSum.STATE * p.lanes,), f32, scope="global")
            tmp = T.alloc_buffer((sums.tmp_size,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            sums.row_sum(Xs, Ys, q, st, tmp, row)
            seg[q * 3] = row[0]
            seg[q * 3 + 1] = row[1]
            seg[q * 3 + 2] = row[4]
        for r in T.parallel(rows):
            srow = T.alloc_buffer((2,), f64, scope="global")
            whole[r * 3] = T.float32(ep.N_LOW)
            whole[r * 3 + 1] = T.float32(0)
            for s in T.serial(segments):
                whole[r * 3 + 1] = ep.pair_add(
                    whole[r * 3 + 1],
                    whole[r * 3],
                    seg[(r * segments + s) * 3 + 1],
                    seg[(r * segments + s) * 3],
                    1,
                    False,
                )[0]
                whole[r * 3] = T.max(whole[r * 3], seg[(r * segments + s) * 3])
            whole[r * 3 + 2] = T.float32(0)
            if ep.fast_path_ok(whole[r * 3], whole[r * 3 + 1]):
                whole[r * 3 + 2] = T.float32(1)
            else:
                exact_row(X, Y, r, srow, cols)
        for q in T.parallel(rows * segments):
            tmp = T.alloc_buffer((sums.tmp_size,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            if whole[q // segments * 3 + 2] > T.float32(0):
                row[0] = whole[q // segments * 3]
                row[1] = whole[q // segments * 3 + 1]
                row[4] = seg[q * 3 + 2]
                pass2(Xs, Ys, tmp, row, q)

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

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
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
