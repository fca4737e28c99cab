"""rewriter.shapes: shape inference for passes, only where needed, the model left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import shapes


def chain(blocks: int = 3, width: int = 16, *, batch: int | str = 2) -> onnx.ModelProto:
    """``blocks`` x (MatMul, Add, Softmax), no value_info; weights of 1 KiB (big), biases small."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    x = "x"
    for i in range(blocks):
        initializers += [
            numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Softmax", [f"a{i}"], [f"s{i}"], axis=-1),
        ]
        x = f"s{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, width])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def softmax_inputs(model: ir.Model) -> list[ir.Value]:
    return [node.inputs[0] for node in model.graph if node.op_type == "Softmax"]


def test_fills_what_onnx_ir_infers_and_leaves_the_model_as_it_was() -> None:
    proto = chain()
    model = ir.serde.deserialize_model(proto)
    reference = ir.serde.deserialize_model(proto)
    onnx_ir.passes.common.ShapeInferencePass()(reference)
    initializers = list(model.graph.initializers.items())
    tensors = [value.const_value for _, value in initializers]
    inputs = list(model.graph.inputs)

    assert shapes.infer(model, softmax_inputs(model)) == 3
    for mine, theirs in zip(softmax_inputs(model), softmax_inputs(reference), strict=True):
        assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape) == (ir.DataType.FLOAT, ir.Shape([2, 16]))
    # Only the values asked for: the MatMul outputs stay untyped.
    assert all(node.outputs[0].shape is None for node in model.graph if node.op_type == "MatMul")
    # The big weights left the inferred copy only: same initializers, order, tensors, inputs.
    assert list(model.graph.initializers.items()) == initializers
    assert [value.const_value for _, value in initializers] == tensors
    assert list(model.graph.inputs) == inputs
    assert all(value.is_initializer() and not value.is_graph_input() for _, value in initializers)
    assert ir.serde.serialize_model(model).graph.initializer == proto.graph.initializer


def test_every_value_when_none_are_named() -> None:
    model = ir.serde.deserialize_model(chain())
    shapes.infer(model)
    assert all(shapes.known(node.outputs[0]) for node in model.graph)


def test_nothing_runs_when_the_values_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ir.serde.deserialize_model(chain())
    shapes.infer(model)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("shape inference ran again")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    assert shapes.infer(model) == 0
    assert shapes.infer(model, softmax_inputs(model)) == 0


def test_static_refines_symbolic_dims_only_when_asked() -> None:
    model = ir.serde.deserialize_model(chain(batch=2))
    for value in softmax_inputs(model):
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape(["n", 16])
    assert shapes.infer(model, softmax_inputs(model)) == 0  # a rank is known: enough
    assert shapes.infer(model, softmax_inputs(model), static=True) == 3
    assert all(value.shape == ir.Shape([2, 16]) for value in softmax_inputs(model))


def test_a_model_inference_rejects_is_left_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    proto = chain(blocks=1)
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(16, np.int64), "b0"))  # float + int64
    model = ir.serde.deserialize_model(proto)
    assert shapes.infer(model) == 0
    assert "shape inference failed" in caplog.text
    assert all(node.outputs[0].shape is None for node in model.graph if node.op_type != "Softmax")
