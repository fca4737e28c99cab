"""ONNX ``Min``/``Max`` as pairwise ops (:mod:`rewriter.backends.tvm.relax_passes.pairwise`).

TVM's importer writes ``Min(a, b)`` as broadcast copies of both, stacked and reduced:
T5's relative-position buckets ran scalar on every call of a symbolic library. The
golden rewrite, a near miss left alone, and the compiled model against ONNX Runtime at
two sizes (exact: the same min/max of the same values).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx, targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import pairwise  # noqa: E402


@I.ir_module
class Before:
    @R.function
    def main(
        a: R.Tensor(("n", 8), "float32"),
        b: R.Tensor(("n", 8), "float32"),
        c: R.Tensor((1, 8), "float32"),
    ):
        n = T.int64()
        with R.dataflow():
            a8 = R.broadcast_to(a, R.shape([n, 8]))
            b8 = R.broadcast_to(b, R.shape([n, 8]))
            low = R.min(R.stack((a8, b8), axis=0), axis=[0], keepdims=False)
            low8 = R.broadcast_to(low, R.shape([n, 8]))
            c8 = R.broadcast_to(c, R.shape([n, 8]))
            high = R.max(R.stack((low8, c8), axis=0), axis=[0], keepdims=False)
            kept = R.max(R.stack((a8, b8), axis=2), axis=[2], keepdims=False)  # near miss: axis 2
            out = (high, kept)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @R.function
    def main(
        a: R.Tensor(("n", 8), "float32"),
        b: R.Tensor(("n", 8), "float32"),
        c: R.Tensor((1, 8), "float32"),
    ):
        n = T.int64()
        with R.dataflow():
            a8 = R.broadcast_to(a, R.shape([n, 8]))
            b8 = R.broadcast_to(b, R.shape([n, 8]))
            low = R.minimum(a, b)
            high = R.maximum(low, c)
            kept = R.max(R.stack((a8, b8), axis=2), axis=[2], keepdims=False)
            out = (high, kept)
            R.output(out)
        return out


def test_stacked_min_and_max_become_pairwise_ops():
    tvm.ir.assert_structural_equal(pairwise.pairwise()(Before), Expected)


def test_second_run_changes_nothing():
    once = pairwise.pairwise()(Before)
    tvm.ir.assert_structural_equal(pairwise.pairwise()(once), once)


def _model() -> onnx.ModelProto:
    """T5's bucket clamp: ``Max(Min(a, b), c)`` over [n, 8] with c broadcast from [1, 8]."""
    nodes = [helper.make_node("Min", ["a", "b"], ["m"]), helper.make_node("Max", ["m", "c"], ["y"])]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 8]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    graph = helper.make_graph(nodes, "clamp", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_imported_min_max_are_pairwise_and_agree_with_ort():
    model = _model()
    imported = import_onnx.import_onnx(import_onnx.prepare(model), target=targets.resolve("avx512"))
    module = pairwise.pairwise()(imported)
    script = module["main"].script()
    assert "R.minimum" in script and "R.maximum" in script and "R.stack" not in script
    compiled = backend.compile(model, "avx512")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 13):
        feeds = {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("a", (n, 8)), ("b", (n, 8)), ("c", (1, 8)))
        }
        np.testing.assert_array_equal(compiled.run(feeds)["y"], session.run(None, feeds)[0])
