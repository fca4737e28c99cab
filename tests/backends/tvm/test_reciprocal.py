"""Division by constants as multiplication (:mod:`rewriter.backends.tvm.relax_passes.reciprocal`).

Fast math only: ``x * (1 / c)`` is within one unit in the last place of ``x / c``. The
checks: the golden rewrite of ``divide``, the divisions it must keep (a non-constant
divisor, zero, infinity), quantize by the reciprocal scale in the pipeline, and the
compiled results against the exact ones within that one-ulp bound.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from rewriter.backends.tvm import pipeline, targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import reciprocal  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            a = R.divide(x, R.const(1.4142135, "float32"))
            b = R.divide(a, R.const(np.array([2.0, 4.0, 8.0, 16.0, 3.0, 5.0, 7.0, 9.0], "float32")))
            c = R.divide(b, y)  # not a constant: kept
            d = R.divide(c, R.const(0.0, "float32"))  # x / 0 keeps its IEEE meaning
            R.output(d)
        return d


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), y: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            a = R.multiply(x, R.const(np.float32(1) / np.float32(1.4142135), "float32"))
            b = R.multiply(
                a,
                R.const(
                    np.float32(1) / np.array([2.0, 4.0, 8.0, 16.0, 3.0, 5.0, 7.0, 9.0], "float32")
                ),
            )
            c = R.divide(b, y)
            d = R.divide(c, R.const(0.0, "float32"))
            R.output(d)
        return d


def test_divisions_by_constants_become_multiplications():
    tvm.ir.assert_structural_equal(reciprocal.divide_by_constants()(Before), Expected)


def test_second_run_changes_nothing():
    once = reciprocal.divide_by_constants()(Before)
    tvm.ir.assert_structural_equal(reciprocal.divide_by_constants()(once), once)


@I.ir_module
class Quantize:
    @R.function
    def main(x: R.Tensor((64, 16), "float32")):
        with R.dataflow():
            q = R.quantize(x, R.const(0.097, "float32"), R.const(3, "int8"), axis=-1, out_dtype="int8")
            u = R.quantize(x, R.const(0.05, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="uint8")
            out = (q, u)
            R.output(out)
        return out


def _build(fast_math: bool) -> relax.VirtualMachine:
    target = targets.resolve("avx512")
    executable = relax.build(
        Quantize, target=target, relax_pipeline=pipeline.relax_pipeline(target, fast_math=fast_math)
    )
    return relax.VirtualMachine(executable, tvm.cpu())


def test_quantize_multiplies_by_the_reciprocal_scale_under_fast_math():
    target = targets.resolve("avx512")
    with target:
        legalized = relax.transform.LegalizeOps(customize_legalize_map=reciprocal.legalizations())(
            Quantize
        )
    scripts = [f.script() for f in legalized.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(scripts) == 2 and not any(re.search(r"/ T\.float32", s) for s in scripts)
    assert all(re.search(r"\* T\.float32", s) for s in scripts)
    # saturation and rounding as QuantizeLinear, to within one step where x / s is within
    # an ulp of a rounding boundary
    x = (np.random.default_rng(0).standard_normal((64, 16)) * 8).astype(np.float32)
    x[0, :4] = [1e6, -1e6, 0.0, 0.097 * 2.5]
    fast = [t.numpy() for t in _build(True)["main"](tvm.runtime.tensor(x))]
    exact = [t.numpy() for t in _build(False)["main"](tvm.runtime.tensor(x))]
    reference = [
        np.clip(np.rint(x / np.float32(0.097)) + 3, -128, 127).astype(np.int8),
        np.clip(np.rint(x / np.float32(0.05)) + 128, 0, 255).astype(np.uint8),
    ]
    for got, slow, want in zip(fast, exact, reference, strict=True):
        np.testing.assert_array_equal(slow, want)
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert (got != want).mean() < 0.01
