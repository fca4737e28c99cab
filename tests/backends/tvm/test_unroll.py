"""Unrolling constant-trip Loops for TVM (golden Before/Expected graphs), and SOFT attention
compiling through it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter import verify
from rewriter.backends.tvm.relax_passes.unroll import unroll_loops
from rewriter.registry import create_pass
from tests import attention_models
from tests.backends.tvm.onnx_golden import structure
from tests.helpers import model_from_text, to_proto


def test_constant_trip_loop_is_unrolled_and_equal():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 2] a, float[2, 2] x0) => (float[2, 2] y) {
            trips = Constant<value = int64 {5}>()
            cond = Constant<value = bool {1}>()
            y = Loop(trips, cond, x0) <body = step (int64 i, bool c, float[2, 2] x) => (bool c_out, float[2, 2] x_out) {
                c_out = Identity(c)
                ax = MatMul(x, a)
                x_out = Add(ax, x)
            }>
        }
        """
    )
    feeds = {"a": np.array([[0.5, 0.1], [0.0, 0.3]], np.float32), "x0": np.eye(2, dtype=np.float32)}
    expected = verify.run(to_proto(model).SerializeToString(), feeds)["y"]
    for node in model.graph:  # constants as the optimizer leaves them
        if node.op_type == "Constant":
            node.outputs[0].const_value = node.attributes["value"].as_tensor()
    assert unroll_loops(model) == 1
    assert "Loop" not in {node.op_type for node in model.graph}
    assert [node.op_type for node in model.graph].count("MatMul") == 5
    got = verify.run(to_proto(model).SerializeToString(), feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_softmax_free_attention_compiles_with_tvm():
    from rewriter.backends import tvm as backend

    form = "mul_mask_first"
    model = attention_models.attention_model(form)
    feeds = attention_models.feeds(form)
    assert create_pass("softmax-free-attention", {"landmarks": "4"})(model).stats["attention_replaced"] == 1
    proto = ir.serde.serialize_model(model)
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    got = backend.compile(proto, target="llvm").run(feeds)["y"]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def _with_constant_values(model: ir.Model) -> ir.Model:
    """``model`` with its Constant nodes' values on their outputs, as the optimizer leaves them."""
    for node in model.graph:
        if node.op_type == "Constant":
            node.outputs[0].const_value = node.attributes["value"].as_tensor()
    return model


LOOP = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 2] a, float[2, 2] x0, int64 n) => (float[2, 2] y) {{
        trips = {trips}
        cond = Constant<value = bool {{1}}>()
        y = Loop(trips, cond, x0) <body = step (int64 i, bool c, float[2, 2] x) => (bool c_out, float[2, 2] x_out) {{
            c_out = Identity(c)
            ax = MatMul(x, a)
            x_out = Add(ax, x)
        }}>
    }}
"""


def test_golden_two_trips():
    before = _with_constant_values(
        model_from_text(LOOP.format(trips="Constant<value = int64 {2}>()"))
    )
    # Each iteration: its index as a constant, then the body on the carried value; the
    # condition's Identity is dropped, the trip count and condition are left to the optimizer.
    expected = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 2] a, float[2, 2] x0, int64 n) => (float[2, 2] y) {
            trips = Constant<value = int64 {2}>()
            cond = Constant<value = bool {1}>()
            i0 = Constant<value = int64 {0}>()
            ax0 = MatMul(x0, a)
            x1 = Add(ax0, x0)
            i1 = Constant<value = int64 {1}>()
            ax1 = MatMul(x1, a)
            y = Add(ax1, x1)
        }
        """
    )
    assert unroll_loops(before) == 1
    assert structure(before) == structure(expected)
    assert unroll_loops(before) == 0  # idempotent: no Loop left


def test_loop_with_a_computed_trip_count_is_left():
    before = _with_constant_values(model_from_text(LOOP.format(trips="Identity(n)")))
    unchanged = structure(before)
    assert unroll_loops(before) == 0
    assert structure(before) == unchanged


TORCHSCRIPT_LOOP = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[6, 3] data, float[2, 3] acc0) => (float[2, 3] y) {
        trips = Constant<value = int64[1] {3}>()
        cond = Constant<value = bool {1}>()
        starts = Constant<value = int64[3] {0, 3, 4}>()
        two = Constant<value = int64 {2}>()
        axes = Constant<value = int64[1] {0}>()
        y = Loop(trips, cond, acc0) <body = step (int64[1] i, bool c, float[2, 3] acc) => (bool c_out, float[2, 3] acc_out) {
            c_out = Identity(cond)
            start = Gather(starts, i)
            end = Add(start, two)
            rows = Slice(data, start, end, axes)
            acc_out = Add(acc, rows)
        }>
    }
"""


def test_a_torchscript_loop_unrolls_and_compiles():
    # TorchScript's form (MViT's pooling): a trip count of shape [1], the condition a
    # constant from outside the body, and an iteration number of shape [1] (so Slice
    # bounds picked by it are 1-D, as ONNX Runtime runs the loop).
    from rewriter.backends import tvm as backend

    model = to_proto(model_from_text(TORCHSCRIPT_LOOP))
    rng = np.random.default_rng(0)
    feeds = {
        "data": rng.standard_normal((6, 3)).astype(np.float32),
        "acc0": rng.standard_normal((2, 3)).astype(np.float32),
    }
    expected = verify.run(model.SerializeToString(), feeds)["y"]
    got = backend.compile(model, "avx512").run(feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
