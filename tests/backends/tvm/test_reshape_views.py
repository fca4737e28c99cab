"""Symbolic reshapes stay views (:mod:`rewriter.backends.tvm.relax_passes.reshape_views`).

TVM's copying reshape over symbolic sizes divides by run-time extents per element (two
of wav2vec2's took 30% of its symbolic library's time). Over symbolic sizes the reshape
is kept for the VM's view builtin; static ones keep TVM's legalization.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm import pipeline, targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import reshape_views  # noqa: E402


@I.ir_module
class Reshapes:
    @R.function
    def main(x: R.Tensor(("n", 4, 8), "float32"), y: R.Tensor((2, 4, 8), "float32")):
        n = T.int64()
        with R.dataflow():
            flat = R.reshape(x + R.const(1.0, "float32"), R.shape([n, 32]))  # symbolic: a view
            fixed = R.reshape(y, R.shape([8, 8]))  # static: TVM's legalization
            out = (flat, fixed)
            R.output(out)
        return out


def test_symbolic_reshape_is_kept_and_static_one_legalized():
    legalized = relax.transform.LegalizeOps(customize_legalize_map=reshape_views.legalizations())(Reshapes)
    script = legalized["main"].script()
    assert script.count("R.reshape(") == 1 and "R.shape([n, 32])" in script
    assert sum(1 for gv in legalized.get_global_vars() if gv.name_hint.startswith("reshape")) == 1


def test_symbolic_reshape_agrees_at_several_sizes():
    target = targets.resolve("avx512")
    executable = relax.build(Reshapes, target=target, relax_pipeline=pipeline.relax_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    y = np.arange(64, dtype=np.float32).reshape(2, 4, 8)
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 4, 8)).astype(np.float32)
        flat, fixed = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y))
        np.testing.assert_array_equal(flat.numpy(), (x + 1).reshape(n, 32))
        np.testing.assert_array_equal(fixed.numpy(), y.reshape(8, 8))
