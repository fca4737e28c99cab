"""Softmax along the last axis of a 2-D buffer on CUDA: one thread block per row.

The two-pass algorithm of Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020
(arXiv 2001.04438), with the math of :mod:`rewriter.backends.tvm.kernels.common.exp_pair`: each
thread keeps a running ``(M, N)`` pair over a strided slice of the row, the block merges
the pairs (warp shuffles, then one warp over the per-warp results in shared memory), and
pass 2 writes ``m / M * 2**(n - N)``. Rows outside the float32 fast path's contract
(inf, NaN, huge magnitudes) are recomputed in float64, as on the CPU, so the results
follow ONNX Softmax semantics. The three-pass baseline (max, sum, scale) uses the same
block layout. Exact up to float32 rounding.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.passes.two_pass_softmax import math as tpm

THREADS = 256
WARP = 32
WARPS = THREADS // WARP
FULL_MASK = 0xFFFFFFFF


def _f32(x: tirx.Expr, dtype: str) -> tirx.Expr:
    return x if dtype == "float32" else tirx.Cast("float32", x)


def _pair_add32(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr
) -> tuple[tirx.Expr, tirx.Expr]:
    return ep.pair_add(big_m, big_n, m, n, 1, False)


def _pair_add64(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr
) -> tuple[tirx.Expr, tirx.Expr]:
    return ep.pair_add_exact(big_m, big_n, m, n)


def _max_pair(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr
) -> tuple[tirx.Expr, tirx.Expr]:
    """A "pair" whose first value is a max (the three-pass kernel's reduction)."""
    return tirx.Select(m > big_m, m, big_m), big_n


def _sum_pair(
    big_m: tirx.Expr, big_n: tirx.Expr, m: tirx.Expr, n: tirx.Expr
) -> tuple[tirx.Expr, tirx.Expr]:
    return big_m + m, big_n


@T.macro
def _block_reduce(acc, sh, out, tx, combine, ident_m, ident_n):
    # Warp shuffles, then warp 0 merges the per-warp pairs kept in shared memory.
    for s in T.unroll(5):
        acc[2] = T.tvm_warp_shuffle_down(
            T.uint32(FULL_MASK), acc[0], T.shift_right(16, s), WARP, WARP
        )
        acc[3] = T.tvm_warp_shuffle_down(
            T.uint32(FULL_MASK), acc[1], T.shift_right(16, s), WARP, WARP
        )
        acc[0] = combine(acc[0], acc[1], acc[2], acc[3])[0]
        acc[1] = combine(acc[0], acc[1], acc[2], acc[3])[1]
    if tx % WARP == 0:
        sh[tx // WARP] = acc[0]
        sh[WARPS + tx // WARP] = acc[1]
    T.tvm_storage_sync("shared")
    if tx < WARP:
        acc[0] = T.Select(tx < WARPS, sh[T.min(tx, WARPS - 1)], ident_m)
        acc[1] = T.Select(tx < WARPS, sh[WARPS + T.min(tx, WARPS - 1)], ident_n)
        for s in T.unroll(5):
            acc[2] = T.tvm_warp_shuffle_down(
                T.uint32(FULL_MASK), acc[0], T.shift_right(16, s), WARP, WARP
            )
            acc[3] = T.tvm_warp_shuffle_down(
                T.uint32(FULL_MASK), acc[1], T.shift_right(16, s), WARP, WARP
            )
            acc[0] = combine(acc[0], acc[1], acc[2], acc[3])[0]
            acc[1] = combine(acc[0], acc[1], acc[2], acc[3])[1]
        if tx == 0:
            out[0] = acc[0]
            out[1] = acc[1]
    T.tvm_storage_sync("shared")
    acc[0] = out[0]
    acc[1] = out[1]


def two_pass_softmax_cuda(
    rows: int | tirx.Var, cols: int | tirx.Var, dtype: str, log: bool
) -> tirx.PrimFunc:
    """Two-pass softmax of each row of ``X[rows, cols]``, one CUDA block per row.

    >>> two_pass_softmax_cuda(8, 1000, "float32", False).params[1].name
    'Y'
    """
    n_rows, n_cols = ep.extents(rows, cols)
    steps = (n_cols + THREADS - 1) // THREADS
    f32, f64 = "float32", "float64"

    def x32(X: tirx.Buffer, r: tirx.Expr, k: tirx.Expr) -> tirx.Expr:
        return _f32(X[r, k], dtype)

    def fast_y(x: tirx.Expr, acc: tirx.Buffer) -> tirx.Expr:
        if log:
            return x - acc[2] - acc[3]
        m, n = ep.exp_pair(x, 1, llvm=False)
        return m * acc[2] * ep.pow2(n - acc[1], 1)

    def exact_y(x: tirx.Expr, acc: tirx.Buffer) -> tirx.Expr:
        m, n = ep.exp_pair(x, 1, f64)
        if log:
            return tirx.log(m) - tirx.log(acc[0]) + (n - acc[1]) * tirx.const(tpm.LN2, f64)
        return m / acc[0] * ep.pow2(n - acc[1], 1, f64)

    @T.prim_func
    def two_pass_softmax_cuda(
        X: T.Buffer((n_rows, n_cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((n_rows, n_cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.thread_binding(n_rows, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                acc = T.alloc_buffer((4,), f32, scope="local")
                acc64 = T.alloc_buffer((4,), f64, scope="local")
                fast = T.alloc_buffer((1,), "int32", scope="local")
                sh = T.alloc_buffer((2 * WARPS,), f32, scope="shared")
                sh64 = T.alloc_buffer((2 * WARPS,), f64, scope="shared")
                out = T.alloc_buffer((2,), f32, scope="shared")
                out64 = T.alloc_buffer((2,), f64, scope="shared")
                acc[0] = T.float32(0)
                acc[1] = T.float32(ep.N_LOW)
                for j in T.serial(steps):
                    if j * THREADS + tx < n_cols:
                        acc[2] = ep.exp_pair(x32(X, r, j * THREADS + tx), 1, llvm=False)[0]
                        acc[3] = ep.exp_pair(x32(X, r, j * THREADS + tx), 1, llvm=False)[1]
                        acc[0] = _pair_add32(acc[0], acc[1], acc[2], acc[3])[0]
                        acc[1] = _pair_add32(acc[0], acc[1], acc[2], acc[3])[1]
                _block_reduce(acc, sh, out, tx, _pair_add32, T.float32(0), T.float32(ep.N_LOW))
                # The fast-path test is block-uniform; it sets loop extents rather than
                # guarding the block reduction, which may not sit under a condition.
                fast[0] = T.Cast("int32", ep.fast_path_ok(acc[1], acc[0]))
                if log:
                    acc[2] = acc[1] * T.float32(ep.LN2_HI_F32)
                    acc[3] = acc[1] * T.float32(ep.LN2_LO_F32) + T.log(acc[0])
                else:
                    acc[2] = T.float32(1) / acc[0]
                for j in T.serial(steps * fast[0]):
                    if j * THREADS + tx < n_cols:
                        Y[r, j * THREADS + tx] = T.Cast(
                            dtype, fast_y(x32(X, r, j * THREADS + tx), acc)
                        )
                # Rows with inf, NaN or huge magnitudes: the same algorithm in float64.
                acc64[0] = T.float64(0)
                acc64[1] = T.float64(-np.inf)
                for j in T.serial(steps * (1 - fast[0])):
                    if j * THREADS + tx < n_cols:
                        acc64[2] = ep.exp_pair(T.Cast(f64, X[r, j * THREADS + tx]), 1, f64)[0]
                        acc64[3] = ep.exp_pair(T.Cast(f64, X[r, j * THREADS + tx]), 1, f64)[1]
                        acc64[0] = _pair_add64(acc64[0], acc64[1], acc64[2], acc64[3])[0]
                        acc64[1] = _pair_add64(acc64[0], acc64[1], acc64[2], acc64[3])[1]
                _block_reduce(acc64, sh64, out64, tx, _pair_add64, T.float64(0), T.float64(-np.inf))
                # A row of -inf has no largest term: NaN, as ONNX gives (-inf - -inf).
                acc64[0] = T.Select(acc64[1] == T.float64(-np.inf), T.float64(np.nan), acc64[0])
                for j in T.serial(steps * (1 - fast[0])):
                    if j * THREADS + tx < n_cols:
                        Y[r, j * THREADS + tx] = T.Cast(
                            dtype, exact_y(T.Cast(f64, X[r, j * THREADS + tx]), acc64)
                        )

    return two_pass_softmax_cuda


def three_pass_softmax_cuda(
    rows: int | tirx.Var, cols: int | tirx.Var, dtype: str, log: bool
) -> tirx.PrimFunc:
    """Three-pass softmax (max, sum of exp, scale) of each row, one CUDA block per row.

    >>> three_pass_softmax_cuda(8, 1000, "float32", True).params[0].name
    'X'
    """
    n_rows, n_cols = ep.extents(rows, cols)
    steps = (n_cols + THREADS - 1) // THREADS
    f32 = "float32"

    def exp_of(u: tirx.Expr) -> tirx.Expr:
        m, n = ep.exp_pair(u, 1, llvm=False)
        return m * ep.pow2(n, 1)

    @T.prim_func
    def three_pass_softmax_cuda(
        X: T.Buffer((n_rows, n_cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((n_rows, n_cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.thread_binding(n_rows, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                acc = T.alloc_buffer((4,), f32, scope="local")
                row = T.alloc_buffer((2,), f32, scope="local")
                sh = T.alloc_buffer((2 * WARPS,), f32, scope="shared")
                sh2 = T.alloc_buffer((2 * WARPS,), f32, scope="shared")
                out = T.alloc_buffer((2,), f32, scope="shared")
                out2 = T.alloc_buffer((2,), f32, scope="shared")
                acc[0] = T.float32(-np.inf)
                acc[1] = T.float32(0)
                for j in T.serial(steps):
                    if j * THREADS + tx < n_cols:
                        acc[0] = T.max(acc[0], _f32(X[r, j * THREADS + tx], dtype))
                _block_reduce(acc, sh, out, tx, _max_pair, T.float32(-np.inf), T.float32(0))
                row[0] = acc[0]
                acc[0] = T.float32(0)
                for j in T.serial(steps):
                    if j * THREADS + tx < n_cols:
                        acc[0] = acc[0] + exp_of(_f32(X[r, j * THREADS + tx], dtype) - row[0])
                _block_reduce(acc, sh2, out2, tx, _sum_pair, T.float32(0), T.float32(0))
                if log:
                    row[1] = T.log(acc[0])
                else:
                    row[1] = T.float32(1) / acc[0]
                for j in T.serial(steps):
                    if j * THREADS + tx < n_cols:
                        if log:
                            Y[r, j * THREADS + tx] = T.Cast(
                                dtype, _f32(X[r, j * THREADS + tx], dtype) - row[0] - row[1]
                            )
                        else:
                            Y[r, j * THREADS + tx] = T.Cast(
                                dtype, exp_of(_f32(X[r, j * THREADS + tx], dtype) - row[0]) * row[1]
                            )

    return three_pass_softmax_cuda
