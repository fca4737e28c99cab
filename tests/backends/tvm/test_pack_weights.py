"""Golden test of the weight-packing Relax pass (:mod:`rewriter.backends.tvm.relax_passes.pack_weights`).

Before: a fused matmul PrimFunc called with a constant weight ``W[K, N]``. Expected: the
same matmul reading ``Wp[j // NB, k, j % NB]``, called as ``matmul_packed`` with the
weight packed in numpy (``NB`` = 32 on avx512), and the unpacked original dropped.
The more varied cases (padding, computed weights, schedules) are in ``test_matmul.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm import targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import pack_weights, schedules  # noqa: E402

# 8 rows, K = 16, N = 64: two whole panels of NB = 32 and one whole 8-row register tile,
# so nothing is padded.
WEIGHT = np.arange(16 * 64, dtype=np.float32).reshape(16, 64) / 64


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def matmul(
        A: T.Buffer((8, 16), "float32"),
        W: T.Buffer((16, 64), "float32"),
        C: T.Buffer((8, 64), "float32"),
    ):
        for i, j, k in T.grid(8, 64, 16):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * W[vk, vj]

    @R.function
    def main(x: R.Tensor((8, 16), "float32"), w: R.Tensor((16, 64), "float32")) -> R.Tensor(
        (8, 64), "float32"
    ):
        cls = Before
        with R.dataflow():
            y = R.call_tir(cls.matmul, (x, w), out_ty=R.Tensor((8, 64), "float32"))
            R.output(y)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def matmul_packed(
        A: T.Buffer((8, 16), "float32"),
        W: T.Buffer((2, 16, 32), "float32"),
        C: T.Buffer((8, 64), "float32"),
    ):
        for i, j, k in T.grid(8, 64, 16):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + A[vi, vk] * W[vj // 32, vk, vj % 32]

    @R.function
    def main(x: R.Tensor((8, 16), "float32"), wp: R.Tensor((2, 16, 32), "float32")) -> R.Tensor(
        (8, 64), "float32"
    ):
        cls = Expected
        with R.dataflow():
            y = R.call_tir(cls.matmul_packed, (x, wp), out_ty=R.Tensor((8, 64), "float32"))
            R.output(y)
        return y


def test_constant_weight_is_packed_in_column_panels():
    target = targets.resolve("avx512")
    assert schedules.pack_width(target) == 32
    before = relax.transform.BindParams("main", {"w": WEIGHT})(Before)
    expected = relax.transform.BindParams("main", {"wp": pack_weights.pack(WEIGHT, 32)})(Expected)
    after = pack_weights.pack_matmul_weights(target)(before)
    tvm.ir.assert_structural_equal(after, expected)
    # Idempotent: the packed matmul reads no [K, N] weight left to pack.
    tvm.ir.assert_structural_equal(pack_weights.pack_matmul_weights(target)(after), expected)


def test_weight_passed_at_run_time_is_left():
    # The same module with the weight an input of main: nothing to pack at compile time.
    after = pack_weights.pack_matmul_weights(targets.resolve("avx512"))(Before)
    tvm.ir.assert_structural_equal(after, Before)
