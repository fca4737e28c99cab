"""``split`` as one slice per part (:mod:`rewriter.backends.tvm.relax_passes.split_slices`).

A split fused with its producers made a PrimFunc with an output per part, which no rule
of ours schedules (ShuffleNetV2's dynamo export: its channel shuffles ran as TVM's
scalar default). As slices, every function is scheduled; the results agree with ONNX
Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.relax_passes import split_slices
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE

tvm = pytest.importorskip("tvm")


def shuffle_model() -> onnx.ModelProto:
    """A ShuffleNetV2 unit as the dynamo exporter writes it: a 1 x 1 convolution of one
    half, the halves concatenated, the channels shuffled (reshape, transpose, reshape)
    and split into halves again by ``Split``, for the next unit (one half convolved, the
    other passed on); symbolic batch."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 8, 1, 1)).astype(np.float32) / 3
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([0, 2, 8, 6, 6], np.int64), "groups"),
        numpy_helper.from_array(np.array([0, 16, 6, 6], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Concat", ["x", "r"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "groups"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "flat"], ["s"]),
        helper.make_node("Split", ["s"], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Conv", ["b", "w"], ["c2"]),  # the next unit: one half convolved
        helper.make_node("Concat", ["a", "c2"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "shuffle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def qkv_model() -> onnx.ModelProto:
    """A projection split into unequal parts along its last axis (sizes 3, 5, 8), as a
    fused QKV projection with grouped keys is; the parts recombined."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "w"),
        numpy_helper.from_array(np.array([3, 5, 8], np.int64), "sizes"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Split", ["h", "sizes"], ["q", "k", "v"], axis=-1),
        helper.make_node("Concat", ["v", "k", "q"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _assert_agrees(model: onnx.ModelProto, compiled: backend.Compiled, shapes: list[tuple[int, ...]]) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        error = float(np.abs(compiled.run({"x": x})["y"] - expected).max())
        assert COMPILED_TOLERANCE["float32"].allows(error, float(np.abs(expected).max())), (shape, error)


def test_a_channel_shuffle_split_is_scheduled_and_agrees():
    compiled = backend.compile(shuffle_model(), "avx512")
    assert compiled.schedules is not None
    assert compiled.schedules.unscheduled == [], compiled.schedules.unscheduled
    assert not any("split" in name for name in compiled.schedules.scheduled), compiled.schedules.scheduled
    _assert_agrees(shuffle_model(), compiled, [(1, 8, 6, 6), (3, 8, 6, 6)])


def test_unequal_parts_are_sliced_where_they_are_and_agree():
    compiled = backend.compile(qkv_model(), "avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    _assert_agrees(qkv_model(), compiled, [(1, 12, 16), (2, 12, 16)])


def test_a_split_into_sections_of_a_symbolic_axis_stays_a_split():
    from tvm import relax, tirx
    from tvm.script import relax as R

    n = tirx.Var("n", "int64")
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, n), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            parts = builder.emit(relax.op.split(x, 2, axis=1))
            out = builder.emit_output(relax.TupleGetItem(parts, 0))
        builder.emit_func_output(out)
    mod = split_slices.split_slices()(builder.get())
    assert "R.split" in mod.script() and "strided_slice" not in mod.script()
