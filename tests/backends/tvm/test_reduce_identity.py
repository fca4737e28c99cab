"""Float ``max``/``min`` reductions start from -inf/+inf (:mod:`rewriter.backends.tvm.relax_passes.reduce_identity`).

TVM's own legalization starts ``max`` from the lowest finite float, so a row of ``-inf``
reduced to -3.4e38: the expanded ONNX ``Attention`` then missed its fully masked rows
(``Equal(ReduceMax(bias), -inf)``) and returned NaN for them. The conformance cases that
showed it are in ``test_conformance.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from rewriter.backends.tvm.relax_passes import reduce_identity  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 3, 4), "float32"), i: R.Tensor((2, 3), "int32")):
        with R.dataflow():
            row_max = R.max(x, axis=[-1], keepdims=True)
            min_0_2 = R.min(x, axis=[0, 2], keepdims=False)
            total_max = R.max(x)
            int_max = R.max(i, axis=[1])
            out = (row_max, min_0_2, total_max, int_max)
            R.output(out)
        return out


def _inits(mod: tvm.IRModule) -> list[str]:
    """The initial values of the module's reductions, as TVMScript writes them."""
    return [
        init
        for func in mod.functions.values()
        if isinstance(func, tvm.tirx.PrimFunc)
        for init in re.findall(r"with T\.init\(\):\s*[^=\n]+ = (.+)", func.script())
    ]


def test_float_reductions_start_from_infinity_and_ints_as_before():
    after = reduce_identity.legalize_pass()(Before)
    stock = relax.transform.LegalizeOps()(Before)
    assert sorted(_inits(after)) == sorted(
        ['T.float32("-inf")', 'T.float32("-inf")', 'T.float32("inf")', "-2147483648"]
    )
    # TVM's own: the finite extremes (an int32 max is left to it above)
    assert sorted(_inits(stock)) == sorted(
        ["T.float32(-340282346638528859811704183484516925440.0)"] * 2
        + ["T.float32(340282346638528859811704183484516925440.0)", "-2147483648"]
    )


def test_rows_of_infinities_reduce_to_infinity():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    x[0, 1, :] = -np.inf  # a fully masked row
    x[:, 2, :] = np.inf
    i = np.arange(6, dtype=np.int32).reshape(2, 3)
    executable = relax.build(reduce_identity.legalize_pass()(Before), target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(i))
    expected = (x.max(-1, keepdims=True), x.min((0, 2)), x.max(), i.max(1))
    for value, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(value.numpy(), reference)
