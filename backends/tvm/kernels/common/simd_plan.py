"""The SIMD plan of a CPU row kernel: ISA, vector width, blocks, and kinds of store.

Shared by the two-pass kernel (Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm",
2020, arXiv 2001.04438), the three-pass baseline and the benchmark probes, so that all of
them load and store the same way for a given shape and target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep

Extent: TypeAlias = int | tirx.Var
# ``value(x, row, lanes)``: an output vector of ``lanes`` from input ``x`` and row state ``row``.
RowValue: TypeAlias = Callable[[tirx.Expr, tirx.Buffer, int], tirx.Expr]
UNROLL = 8
# Outputs larger than this (bytes) bypass the caches in pass 2 (about L2 size per core).
STREAM_MIN_BYTES = 8 << 20
# A row of input plus output up to this size (bytes) stays in the core's L2 between the
# passes: pass 1 then keeps e**x in Y and pass 2 rescales it (measured faster than
# recomputing with streaming stores even when the whole tensor is out of cache).
KEEP_EXP_MAX_ROW_BYTES = 1 << 20
# Kept exponentials are scaled by 2**-n(x[0]); the row's largest n may exceed n(x[0]) by
# at most this, so that they cannot overflow (else pass 2 recomputes them).
KEEP_EXP_MAX_SHIFT = 100.0


def isa(target: tvm.target.Target) -> str:
    """``"cuda"``, ``"avx512"``, ``"avx2"`` or ``"generic"`` for ``target``."""
    if target.kind.name == "cuda":
        return "cuda"
    if target.kind.name != "llvm":
        raise ValueError(f"softmax kernels support llvm and cuda targets, not {target.kind.name}")
    has = tvm.target.codegen.target_has_features
    if has("avx512f", target):
        return "avx512"
    if has("avx2", target) and has("fma", target):
        return "avx2"
    return "generic"


def lanes_of(target: tvm.target.Target) -> int:
    """float32 lanes of one vector on a CPU ``target``: 16 (AVX512), 8 (AVX2), else 4."""
    return {"avx512": 16, "avx2": 8}.get(isa(target), 4)


def dividing_lanes(lanes: int, extent: int) -> int:
    """The widest of ``lanes``, ``lanes / 2``, ... that divides ``extent`` (1 at least)."""
    width = lanes
    while extent % width:
        width //= 2
    return width


class Plan:
    """Shapes, vector width and store kind of one CPU kernel."""

    def __init__(self, rows: Extent, cols: Extent, dtype: str, target: tvm.target.Target):
        kind = isa(target)
        self.lanes = lanes_of(target)
        self.scalef = kind == "avx512"
        self.rows, self.cols = ep.extents(rows, cols)
        self.dtype = dtype
        width = self.lanes * UNROLL
        self.blocks = self.cols // width
        self.rest = (self.cols - self.blocks * width) // self.lanes
        self.tail = self.cols % self.lanes
        self.idx = str(self.cols.ty)
        static = isinstance(rows, int) and isinstance(cols, int)
        big = static and int(rows) * int(cols) * 4 >= STREAM_MIN_BYTES
        # Rows that stay in L2 keep e**x (scaled by 2**-n(x[0])) in Y during pass 1, so pass
        # 2 is one multiply (one exp per element); longer rows recompute it in pass 2.
        self.keep_exp = (
            isinstance(cols, int) and dtype == "float32" and 2 * cols * 4 <= KEEP_EXP_MAX_ROW_BYTES
        )
        self.stream = (
            big
            and not self.keep_exp
            and self.scalef
            and int(cols) % 16 == 0
            and dtype == "float32"
            and tvm.target.codegen.target_has_features("movdir64b", target)
        )

    def vec(self, value: float) -> tirx.Expr:
        return ep.const(value, "float32", self.lanes)

    def load(self, buf: tirx.Buffer, r: tirx.Expr, off: tirx.Expr, lanes: int) -> tirx.Expr:
        index = off if lanes == 1 else tirx.Ramp(off, tirx.IntImm(self.idx, 1), lanes)
        value = tirx.BufferLoad(buf, [r, index])
        return value if self.dtype == "float32" else tirx.Cast(ep.vtype("float32", lanes), value)

    def cast_out(self, value: tirx.Expr, lanes: int) -> tirx.Expr:
        return value if self.dtype == "float32" else tirx.Cast(ep.vtype(self.dtype, lanes), value)


def bcast(value: tirx.Expr, lanes: int) -> tirx.Expr:
    return value if lanes == 1 else tirx.Broadcast(value, lanes)


def span(off: tirx.Expr, lanes: int) -> tirx.Expr:
    return tirx.Ramp(off, 1, lanes)


def row_writer(p: Plan, value: RowValue) -> Any:
    """The macro ``write_row(X, Y, tmp, r, row)``: ``Y[r, :] = value(X[r, :], row)``, read
    and written as every kernel here does: UNROLL vectors per block, then single vectors,
    then scalars; with ``p.stream`` each vector goes through ``tmp`` as one non-temporal
    64-byte store (``movdir64b``; TVM's buffers are 64-byte aligned), then an ``sfence``.
    """
    lanes, width = p.lanes, p.lanes * UNROLL

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

    @T.macro
    def write_row(X, Y, tmp, r, row):
        for j in T.serial(p.blocks):
            for u in T.unroll(UNROLL):
                store(
                    Y,
                    tmp,
                    r,
                    j * width + u * lanes,
                    value(p.load(X, r, j * width + u * lanes, lanes), row, lanes),
                )
        for j in T.serial(p.rest):
            store(
                Y,
                tmp,
                r,
                p.blocks * width + j * lanes,
                value(p.load(X, r, p.blocks * width + j * lanes, lanes), row, lanes),
            )
        for k in T.serial(p.tail):
            Y[r, p.cols - p.tail + k] = p.cast_out(
                value(p.load(X, r, p.cols - p.tail + k, 1), row, 1), 1
            )
        if p.stream:
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.sfence"))

    return write_row
