"""Small parallel loops run on the calling thread (:mod:`rewriter.backends.tvm.parallel_cost`).

A parallel loop is a launch on TVM's thread pool (``TVMBackendParallelLaunch`` in the
generated code); one whose estimated work is under ``PARALLEL_MIN_NS`` is compiled as a
serial loop, and one with symbolic extents gets both forms behind a run-time test.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import sym  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm import parallel_cost  # noqa: E402

from .test_matmul import assert_agrees_with_ort, dense_model, layer_norm_model  # noqa: E402

LAUNCH = "TVMBackendParallelLaunch"


@T.prim_func
def add_one_small(a: T.Buffer((64, 16), "float32"), b: T.Buffer((64, 16), "float32")):
    for i in T.parallel(64):
        for j in range(16):
            b[i, j] = a[i, j] + T.float32(1)


@T.prim_func
def add_one_large(a: T.Buffer((4096, 1024), "float32"), b: T.Buffer((4096, 1024), "float32")):
    for i in T.parallel(4096):
        for j in range(1024):
            b[i, j] = a[i, j] + T.float32(1)


@T.prim_func
def add_one_rows(var_a: T.handle, var_b: T.handle):
    n = T.int64()
    a = T.match_buffer(var_a, (n, 16), "float32")
    b = T.match_buffer(var_b, (n, 16), "float32")
    for i in T.parallel(n):
        for j in range(16):
            b[i, j] = a[i, j] + T.float32(1)


@T.prim_func
def add_one_step(a: T.Buffer((64, 16), "float32"), b: T.Buffer((64, 16), "float32")):
    for i in T.parallel(64, annotations={parallel_cost.EVERY_STEP: 1}):
        for j in range(16):
            b[i, j] = a[i, j] + T.float32(1)


def build(func: object, pipeline: str) -> object:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.tirx.build(mod, target="llvm", pipeline=pipeline)


def llvm_ir(lib: object) -> str:
    return lib.inspect_source("ll")


def test_small_parallel_loop_is_serial_and_large_one_stays_parallel():
    ours = parallel_cost.pipeline_name()
    assert LAUNCH in llvm_ir(build(add_one_small, "default"))  # TVM launches the pool
    assert LAUNCH not in llvm_ir(build(add_one_small, ours))
    assert LAUNCH in llvm_ir(build(add_one_large, ours))


def test_a_loop_marked_as_a_recurrence_step_stays_parallel_however_small():
    """The recurrence kernels' step loops (EVERY_STEP): launched once per step within a
    call, when the pool's workers spin; the GRU's recurrence at batch 1 ran on the
    calling thread before, no faster on two threads than on one."""
    assert LAUNCH in llvm_ir(build(add_one_step, parallel_cost.pipeline_name()))
    from rewriter.backends.tvm import targets
    from rewriter.backends.tvm.kernels import recurrent

    func = recurrent.recurrence("gru", 32, 1, reverse=False, target=targets.resolve("avx512"))
    assert func.script().count(parallel_cost.EVERY_STEP) >= 1


def test_estimate_counts_stores_by_extent():
    # 64 x 16 stores into memory; the arguments are two 64 x 16 float32 buffers.
    expected = 64 * 16 * parallel_cost.STORE_NS
    simplify = sym.Analyzer().simplify
    assert float(simplify(parallel_cost.work_ns(add_one_small.body)).value) == pytest.approx(expected)
    assert float(simplify(parallel_cost.argument_bytes(add_one_small)).value) == 2 * 64 * 16 * 4


@pytest.mark.parametrize("rows", [1, 3, 20_000])
def test_symbolic_loop_tests_its_size_at_run_time(rows: int):
    lib = build(add_one_rows, parallel_cost.pipeline_name())
    assert LAUNCH in llvm_ir(lib)  # the parallel form is kept for large sizes
    a = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
    b = tvm.runtime.tensor(np.zeros_like(a))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), a + 1)


def test_compiled_model_keeps_small_kernels_on_the_calling_thread():
    small = assert_agrees_with_ort(layer_norm_model((4, 32)))
    large = assert_agrees_with_ort(dense_model((1, 512, 512), 512))
    assert LAUNCH not in small.executable.mod.imports[0].inspect_source("ll")
    assert LAUNCH in large.executable.mod.imports[0].inspect_source("ll")
