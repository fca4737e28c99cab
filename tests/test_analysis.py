"""Graph analyses: weight ops and residual-stream blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.analysis import residual_blocks, weight_ops


def _residual_model(mask_steps: int = 0) -> ir.Model:
    """Two residual blocks; a mask input and shape arithmetic reach both, as in real exports.

    ``mask_steps``: elementwise ops on the mask before it is used (a causal mask built
    from the attention mask), which make its dominator chain longer than the stream's.
    """
    rng = np.random.default_rng(0)

    def weight(name: str) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), name)

    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h0"], axis=-1),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        *[helper.make_node("Neg", [f"mask{i}" if i else "mask"], [f"mask{i + 1}"]) for i in range(mask_steps)],
        helper.make_node("Reshape", [f"mask{mask_steps}" if mask_steps else "mask", "x_shape"], ["mask_full"]),
        # block 1: h1 = h0 + relu(h0 W1 + mask) W2
        helper.make_node("MatMul", ["h0", "w1"], ["a1"]),
        helper.make_node("Add", ["a1", "mask_full"], ["a1m"]),
        helper.make_node("Relu", ["a1m"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m1"]),
        helper.make_node("Add", ["h0", "m1"], ["h1"]),
        # block 2: h2 = h1 + (h1 W3 + mask)
        helper.make_node("MatMul", ["h1", "w3"], ["a3"]),
        helper.make_node("Add", ["a3", "mask_full"], ["a3m"]),
        helper.make_node("Add", ["h1", "a3m"], ["h2"]),
        helper.make_node("LayerNormalization", ["h2", "g", "b"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=[weight("w1"), weight("w2"), weight("w3"),
                     numpy_helper.from_array(np.ones(8, np.float32), "g"),
                     numpy_helper.from_array(np.zeros(8, np.float32), "b")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_weight_ops_in_order_with_params():
    ops = weight_ops(_residual_model())
    assert [op.weight.name for op in ops] == ["w1", "w2", "w3"]
    assert all(op.params == 64 for op in ops)


@pytest.mark.parametrize("mask_steps", [0, 6])
def test_residual_blocks_follow_the_stream_not_the_mask(mask_steps):
    # With 6 steps the mask's chain (6 + Reshape + h2 + y) is longer than the stream's
    # (h0 h1 h2 y), but it splits the weight ops into one block, the stream into two.
    blocks = residual_blocks(_residual_model(mask_steps))
    assert [[op.weight.name for op in block.ops] for block in blocks] == [["w1", "w2"], ["w3"]]
    assert [block.exit.name for block in blocks] == ["h1", "h2"]
    assert blocks[0].entry.name == "h0"


def test_no_stream_in_a_single_op_graph():
    model = ir.serde.deserialize_model(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(np.ones((8, 8), np.float32), "w")])))
    assert residual_blocks(model) == []
    assert [op.weight.name for op in weight_ops(model)] == ["w"]
