"""ONNX ops rewritten before TVM's import (:mod:`rewriter.backends.tvm.relax_passes.onnx_simplify`).

Each rewrite is checked on a small graph: it fires (its statistic), the op is gone, and
ONNX Runtime gives the same outputs before and after (products of x instead of pow: a
few ulp; sums added left to right: exact here).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends.tvm.relax_passes import onnx_simplify


def _model(nodes: list[onnx.NodeProto], inputs: list[str], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 8]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(model: onnx.ModelProto, stat: str, count: int, gone: str) -> None:
    work = ir.serde.deserialize_model(model)
    stats = onnx_simplify.simplify(work)
    assert stats[stat] == count
    rewritten = ir.serde.serialize_model(work)
    onnx.checker.check_model(rewritten, full_check=True)
    assert gone not in {node.op_type for node in rewritten.graph.node}
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.uniform(0.5, 2.0, (2, 8)).astype(np.float32) for i in model.graph.input}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)


@pytest.mark.parametrize("power", [2.0, 3.0, 4.0, 0.5, 1.0])
def test_pow_by_a_small_constant_becomes_products(power):
    exponent = numpy_helper.from_array(np.array(power, np.float32), "p")
    _check(_model([helper.make_node("Pow", ["x", "p"], ["y"])], ["x"], [exponent]), "pow_expanded", 1, "Pow")


def test_pow_by_another_constant_is_kept():
    exponent = numpy_helper.from_array(np.array(2.5, np.float32), "p")
    work = ir.serde.deserialize_model(_model([helper.make_node("Pow", ["x", "p"], ["y"])], ["x"], [exponent]))
    assert onnx_simplify.simplify(work)["pow_expanded"] == 0


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_and_mean_become_adds(op):
    _check(_model([helper.make_node(op, ["a", "b", "c"], ["y"])], ["a", "b", "c"], []), "variadic_split", 1, op)


def test_inference_dropout_becomes_its_input():
    nodes = [helper.make_node("Dropout", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    _check(_model(nodes, ["x"], []), "dropout_removed", 1, "Dropout")


def test_dropout_whose_mask_is_used_is_kept():
    nodes = [
        helper.make_node("Dropout", ["x"], ["d", "mask"]),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["d", "m"], ["y"]),
    ]
    work = ir.serde.deserialize_model(_model(nodes, ["x"], []))
    assert onnx_simplify.simplify(work)["dropout_removed"] == 0
