"""Three-pass softmax along the last axis on the CPU: max, sum of exp, scale.

The baseline of Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020 (arXiv
2001.04438): three reads and one write per element, with the same vectorization,
exponential (:mod:`rewriter.backends.tvm.kernels.common.exp_pair`) and stores as the two-pass kernel,
for apples-to-apples comparisons. Exact up to float32 rounding; -inf, +inf, NaN and huge
inputs follow ONNX Softmax (the max pass makes them safe in float32).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.simd_plan import UNROLL, Extent, Plan, row_writer, span


def three_pass_cpu(
    rows: Extent, cols: Extent, dtype: str, log: bool, target: tvm.target.Target
) -> tirx.PrimFunc:
    """The three-pass PrimFunc for ``X[rows, cols]`` (see ``softmax.three_pass_softmax``)."""
    p = Plan(rows, cols, dtype, target)
    lanes, width, scalef = p.lanes, p.lanes * UNROLL, p.scalef
    f32 = "float32"

    def exp_of(u: tirx.Expr, n_lanes: int) -> tirx.Expr:
        m, n = ep.exp_pair(u, n_lanes)
        return ep.scale(m, n, n_lanes, scalef)

    def shifted(x: tirx.Expr, row: tirx.Buffer, n_lanes: int) -> tirx.Expr:
        return x - (row[0] if n_lanes == 1 else tirx.Broadcast(row[0], n_lanes))

    def out(x: tirx.Expr, row: tirx.Buffer, n_lanes: int) -> tirx.Expr:
        b = (lambda v: v) if n_lanes == 1 else (lambda v: tirx.Broadcast(v, n_lanes))
        if log:
            return shifted(x, row, n_lanes) - b(row[2])
        return exp_of(shifted(x, row, n_lanes), n_lanes) * b(row[2])

    write_row = row_writer(p, out)

    @T.prim_func
    def three_pass_softmax(
        X: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.parallel(p.rows):
            acc = T.alloc_buffer((width,), f32, scope="global")
            tmp = T.alloc_buffer((lanes,), f32, scope="global")
            row = T.alloc_buffer((3,), f32, scope="global")
            # Pass 1: max.
            for u in T.unroll(UNROLL):
                acc[span(u * lanes, lanes)] = p.vec(-np.inf)
            for j in T.serial(p.blocks):
                for u in T.unroll(UNROLL):
                    acc[span(u * lanes, lanes)] = T.max(
                        acc[span(u * lanes, lanes)], p.load(X, r, j * width + u * lanes, lanes)
                    )
            for j in T.serial(p.rest):
                acc[span(0, lanes)] = T.max(
                    acc[span(0, lanes)], p.load(X, r, p.blocks * width + j * lanes, lanes)
                )
            row[0] = ep.across_lanes(
                T.max, ep.tree(T.max, [acc[span(u * lanes, lanes)] for u in range(UNROLL)]), lanes
            )
            for k in T.serial(p.tail):
                row[0] = T.max(row[0], p.load(X, r, p.cols - p.tail + k, 1))
            # Pass 2: sum of exp(x - max).
            for u in T.unroll(UNROLL):
                acc[span(u * lanes, lanes)] = p.vec(0.0)
            for j in T.serial(p.blocks):
                for u in T.unroll(UNROLL):
                    acc[span(u * lanes, lanes)] = acc[span(u * lanes, lanes)] + exp_of(
                        shifted(p.load(X, r, j * width + u * lanes, lanes), row, lanes), lanes
                    )
            for j in T.serial(p.rest):
                acc[span(0, lanes)] = acc[span(0, lanes)] + exp_of(
                    shifted(p.load(X, r, p.blocks * width + j * lanes, lanes), row, lanes), lanes
                )
            row[1] = ep.across_lanes(
                tirx.Add,
                ep.tree(tirx.Add, [acc[span(u * lanes, lanes)] for u in range(UNROLL)]),
                lanes,
            )
            for k in T.serial(p.tail):
                row[1] = row[1] + exp_of(shifted(p.load(X, r, p.cols - p.tail + k, 1), row, 1), 1)
            # Pass 3: scale.
            if log:
                row[2] = T.log(row[1])
            else:
                row[2] = T.float32(1) / row[1]
            write_row(X, Y, tmp, r, row)

    return three_pass_softmax
