"""Peers and bandwidth probes for benchmarking the softmax kernels, and a zero-copy runner.

* :func:`stock_softmax`: TVM's own softmax (``topi.nn.softmax``, what Relax's
  ``LegalizeOps`` produces for ``relax.op.nn.softmax``), unscheduled, as the default CPU
  pipeline leaves it.
* :func:`read_probe` / :func:`write_probe` (``cols`` a multiple of 8 vectors): read a
  ``[rows, cols]`` buffer once (8
  accumulators) or write it once (with the same non-temporal stores the two-pass kernel
  uses for that shape), so the two-pass floor -- two reads and one write per element
  (Dukhan & Ablavatski 2020) -- can be measured on the spot.
* :func:`fma_probe` / :func:`fma_peak`: vector FMAs on registers only, in independent
  chains: the cores' float32 multiply-add peak, the floor of any matmul's time.
* :func:`bind`: compile a PrimFunc and bind it to numpy buffers without copying.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm import te, tirx, topi
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common.simd_plan import UNROLL, Plan


def stock_softmax(rows: int, cols: int) -> tirx.PrimFunc:
    """TVM's stock softmax over the last axis of ``X[rows, cols]`` (``topi.nn.softmax``).

    >>> stock_softmax(2, 8).params[0].name
    'X'
    """
    x = te.placeholder((rows, cols), "float32", name="X")
    y = topi.nn.softmax(x, axis=-1)
    return te.create_prim_func([x, y]).with_attr("global_symbol", "stock_softmax")


def read_probe(rows: int, cols: int, target: tvm.target.Target) -> tirx.PrimFunc:
    """Read every element of ``X`` once (vector sums); writes one vector per row of ``Y``.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    >>> read_probe(1, 64, target).params[1].name
    'Y'
    """
    p = Plan(rows, cols, "float32", target)
    lanes, width = p.lanes, p.lanes * UNROLL

    @T.prim_func
    def read_probe(
        X: T.Buffer((p.rows, p.cols), "float32"),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), "float32"),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for r in T.parallel(p.rows):
            acc = T.alloc_buffer((width,), "float32", scope="global")
            for u in T.unroll(UNROLL):
                acc[T.Ramp(u * lanes, 1, lanes)] = p.vec(0.0)
            for j in T.serial(p.blocks):
                for u in T.unroll(UNROLL):
                    acc[T.Ramp(u * lanes, 1, lanes)] = acc[T.Ramp(u * lanes, 1, lanes)] + p.load(
                        X, r, j * width + u * lanes, lanes
                    )
            for u in T.unroll(1, UNROLL):
                acc[T.Ramp(0, 1, lanes)] = (
                    acc[T.Ramp(0, 1, lanes)] + acc[T.Ramp(u * lanes, 1, lanes)]
                )
            Y[r, T.Ramp(0, 1, lanes)] = acc[T.Ramp(0, 1, lanes)]

    return read_probe


def write_probe(rows: int, cols: int, target: tvm.target.Target) -> tirx.PrimFunc:
    """Write every element of ``Y`` once, with the two-pass kernel's kind of store.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    >>> write_probe(1, 64, target).params[0].name
    'X'
    """
    p = Plan(rows, cols, "float32", target)
    lanes, width = p.lanes, p.lanes * UNROLL

    @T.prim_func
    def write_probe(
        X: T.Buffer((p.rows, p.cols), "float32"),  # type: ignore[valid-type]
        Y: T.Buffer((p.rows, p.cols), "float32"),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for r in T.parallel(p.rows):
            tmp = T.alloc_buffer((lanes,), "float32", scope="global")
            for j in T.serial(p.blocks):
                for u in T.unroll(UNROLL):
                    if p.stream:
                        tmp[T.Ramp(0, 1, lanes)] = p.vec(1.0) + T.Broadcast(
                            T.Cast("float32", j), lanes
                        )
                        T.evaluate(
                            T.call_llvm_intrin(
                                "void",
                                "llvm.x86.movdir64b",
                                T.address_of(Y[r, j * width + u * lanes]),
                                T.address_of(tmp[0]),
                            )
                        )
                    else:
                        Y[r, T.Ramp(j * width + u * lanes, 1, lanes)] = p.vec(1.0)
            if p.stream:
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.sse.sfence"))

    return write_probe


FMA_CHAINS = 12  # independent accumulators: more than the FMA latency x the FMA pipes


def fma_probe(iterations: int, tasks: int, lanes: int) -> tirx.PrimFunc:
    """``tasks`` parallel tasks, each ``iterations`` rounds of :data:`FMA_CHAINS`
    independent ``lanes``-wide multiply-adds on registers (no memory traffic inside the
    loop): ``2 x FMA_CHAINS x lanes x iterations x tasks`` flops.

    >>> fma_probe(10, 2, 16).params[0].name
    'X'
    """
    width = FMA_CHAINS * lanes

    @T.prim_func
    def fma_probe(
        X: T.Buffer((tasks, width), "float32"),  # type: ignore[valid-type]
        Y: T.Buffer((tasks, width), "float32"),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((width,), "float32", scope="global")
            for u in T.unroll(FMA_CHAINS):
                acc[T.Ramp(u * lanes, 1, lanes)] = X[t, T.Ramp(u * lanes, 1, lanes)]
            for _ in T.serial(iterations):
                for u in T.unroll(FMA_CHAINS):
                    acc[T.Ramp(u * lanes, 1, lanes)] = acc[
                        T.Ramp(u * lanes, 1, lanes)
                    ] * T.Broadcast(T.float32(0.9999999), lanes) + T.Broadcast(
                        T.float32(1e-7), lanes
                    )
            for u in T.unroll(FMA_CHAINS):
                Y[t, T.Ramp(u * lanes, 1, lanes)] = acc[T.Ramp(u * lanes, 1, lanes)]

    return fma_probe


def fma_peak(target: tvm.target.Target, tasks: int = 1) -> float:
    """The float32 FMA peak in GFLOP/s of ``tasks`` threads (TVM's pool runs them: its
    thread count is ``TVM_NUM_THREADS``), the fastest of 5 calls (a few ms each)."""
    lanes = Plan(1, 1, "float32", target).lanes
    iterations = 1 << 20
    flops = 2 * FMA_CHAINS * lanes * iterations * tasks
    x, y = aligned_empty((tasks, FMA_CHAINS * lanes)), aligned_empty((tasks, FMA_CHAINS * lanes))
    x[:] = 1.0
    run = bind(fma_probe(iterations, tasks, lanes), target, x, y)
    run()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def aligned_empty(shape: tuple[int, ...], dtype: str = "float32", align: int = 64) -> np.ndarray:
    """An uninitialised numpy array whose data starts on an ``align``-byte boundary.

    numpy's own allocation is kept (it asks for transparent huge pages on large buffers).

    >>> aligned_empty((3, 5)).ctypes.data % 64
    0
    """
    size = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size + align // itemsize, dtype)
    start = (-raw.ctypes.data % align) // itemsize
    return raw[start : start + size].reshape(shape)


def bind(func: tirx.PrimFunc, target: tvm.target.Target, *arrays: np.ndarray) -> Callable[[], None]:
    """Compile ``func`` for ``target`` and return a call on ``arrays`` (no copies).

    The arrays must be 64-byte aligned (see :func:`aligned_empty`); TVM refuses others.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    >>> x, y = aligned_empty((1, 64)), aligned_empty((1, 64))
    >>> bind(write_probe(1, 64, target), target, x, y)()
    >>> float(y.sum())
    64.0
    """
    ex = tvm.compile(func, target=target)
    tensors = [tvm.runtime.from_dlpack(a) for a in arrays]

    def run() -> None:
        ex(*tensors)

    return run


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in TVM's thread pool (0: one per core)."""
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def cpu_target() -> tvm.target.Target:
    """The LLVM target of the CPU this runs on: the ``native`` preset, whose features come
    from ``/proc/cpuinfo``'s flags (LLVM's host name alone may be another CPU's on a KVM
    guest: ``rocketlake`` on Sapphire Rapids, without its MOVDIR64B)."""
    from rewriter.backends.tvm import targets

    return targets.resolve("native")
