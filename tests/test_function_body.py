"""The one function-body builder: its opset rules, attribute references, and valid bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import TensorProto, helper

from rewriter.function_body import FunctionBody, Ref
from rewriter.pass_base import DOMAIN


@pytest.mark.parametrize(
    ("op", "opset", "axes_input"),
    [
        ("ReduceSum", 12, False),
        ("ReduceSum", 13, True),
        ("ReduceMax", 17, False),
        ("ReduceMax", 18, True),
    ],
)
def test_reductions_take_axes_as_an_input_from_their_opset(op: str, opset: int, axes_input: bool) -> None:
    body = FunctionBody(opset)
    body.reduce(op, "X", [-1], "Y")
    reduce_node = body.nodes[-1]
    assert (len(reduce_node.input) == 2) == axes_input
    assert any(a.name == "axes" for a in reduce_node.attribute) == (not axes_input)


def test_const_cast_like_names_the_cast_and_keeps_the_float_constant() -> None:
    body = FunctionBody(18)
    assert body.const("zero", 0.0, like="Q") == "zero"
    assert [(n.op_type, n.output[0]) for n in body.nodes] == [("Constant", "zero_f32"), ("CastLike", "zero")]
    assert body.const("two", 2.0, dtype=TensorProto.DOUBLE) == "two"
    assert body.nodes[-1].attribute[0].t.data_type == TensorProto.DOUBLE


def _scaled_identity(opset: int) -> onnx.FunctionProto:
    """Y = X * scale, ``scale`` a function attribute read by a Constant reference."""
    body = FunctionBody(opset)
    scale = body.node("CastLike", [body.attribute("scale", "float"), "X"], "scale_x")
    body.node("Mul", ["X", scale], "Y")
    return body.function("Scaled", ["X"], ["Y"], attributes=["scale"], doc="Y = X * scale")


def test_a_body_with_an_attribute_reference_runs_and_checks() -> None:
    function = _scaled_identity(18)
    assert function.domain == DOMAIN and list(function.attribute) == ["scale"]
    node = helper.make_node("Scaled", ["x"], ["y"], domain=DOMAIN, scale=3.0)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
        functions=[function],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    x = np.array([1.0, -2.0], dtype=np.float32)
    (y,) = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_array_equal(y, 3.0 * x)


def test_ref_makes_a_node_attribute_a_reference() -> None:
    body = FunctionBody(18)
    body.node("Gemm", ["A", "B"], "Y", alpha=1.0, transB=Ref("transpose_weight", "INT"))
    attributes = {a.name: a for a in body.nodes[0].attribute}
    assert attributes["alpha"].f == 1.0 and not attributes["alpha"].ref_attr_name
    assert attributes["transB"].ref_attr_name == "transpose_weight"
    assert attributes["transB"].type == onnx.AttributeProto.INT
