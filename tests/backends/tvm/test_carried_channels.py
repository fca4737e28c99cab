"""Padded channels carried from one convolution to the next (relax_passes.carried_channels)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends.tvm.relax_passes import carried_channels, conv
from tests.backends.tvm.test_conv import TOLERANCE, _run


def inverted_residual(
    channels: int = 24, expanded: int = 72, size: int = 14, *, tail: str = "conv"
) -> onnx.ModelProto:
    """MNASNet/MobileNetV3's block on channels no vector divides, after a 1x1 stem from
    16 channels: a 1x1 expansion, ReLU, a depthwise 3x3 conv, HardSwish,
    squeeze-excitation (a global pool, two 1x1 convs, HardSigmoid, times the map), a 1x1
    projection plus the block's input; then (``tail``) a 1x1 conv, a transpose out of
    the convolutions, or the map itself as the output."""
    rng = np.random.default_rng(5)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        return numpy_helper.from_array(value, name)

    def bias(name: str, count: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(count).astype(np.float32), name)

    squeezed = expanded // 4
    inits = [
        weight("stem", channels, 16, 1, 1),
        weight("expand", expanded, channels, 1, 1),
        bias("b1", expanded),
        weight("dw", expanded, 1, 3, 3),
        bias("b2", expanded),
        weight("s1", squeezed, expanded, 1, 1),
        weight("s2", expanded, squeezed, 1, 1),
        weight("project", channels, expanded, 1, 1),
        bias("b3", channels),
        weight("head", 40, channels, 1, 1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["s"]),
        helper.make_node("Conv", ["s", "expand", "b1"], ["e"]),
        helper.make_node("Relu", ["e"], ["r"]),
        helper.make_node(
            "Conv", ["r", "dw", "b2"], ["d"], group=expanded, kernel_shape=[3, 3], pads=[1] * 4
        ),
        helper.make_node("HardSwish", ["d"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Conv", ["g", "s1"], ["q"]),
        helper.make_node("Relu", ["q"], ["qr"]),
        helper.make_node("Conv", ["qr", "s2"], ["gate_in"]),
        helper.make_node("HardSigmoid", ["gate_in"], ["gate"], alpha=1 / 6),
        helper.make_node("Mul", ["h", "gate"], ["m"]),
        helper.make_node("Conv", ["m", "project", "b3"], ["p"]),
        helper.make_node("Add", ["p", "s"], ["block"]),
    ]
    if tail == "conv":
        nodes.append(helper.make_node("Conv", ["block", "head"], ["y"]))
    elif tail == "transpose":
        nodes.append(helper.make_node("Transpose", ["block"], ["y"], perm=[0, 2, 3, 1]))
    else:
        nodes.append(helper.make_node("Identity", ["block"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _channels_last(model: onnx.ModelProto) -> tuple[list[tuple[int, int, int]], list[int]]:
    """After the channels-last pass: (input channels, output channels, groups) of each
    convolution, and the channels each channel slice keeps."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm import import_onnx, targets

    target = targets.resolve("avx512")
    mod = relax.transform.FoldConstant()(import_onnx.import_onnx(model, target=target))
    with target:
        mod = carried_channels.carried()(conv.channels_last()(mod))
    convs, slices = [], []

    def visit(expr):
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
            return
        if expr.op.name == "relax.nn.conv2d":
            channels = int(expr.args[0].ty.shape.values[-1])
            convs.append((channels, int(expr.ty.shape.values[-1]), int(expr.attrs.groups)))
        elif expr.op.name == "relax.strided_slice":
            slices.append(int(expr.ty.shape.values[-1]))

    relax.analysis.post_order_visit(mod["main"], visit)
    return convs, slices


def _agreement(model: onnx.ModelProto, batch: int) -> float:
    """The compiled model's error relative to ORT's output on a batch of ``batch``."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return _run(model, [batch, *dims])[1]


def test_padded_channels_reach_the_next_convolution_unsliced():
    # 72 channels (padded to 80 by pad_channels) go through ReLU, the depthwise conv,
    # HardSwish and the squeeze-excitation on 80; 24 (no vector divides them) are
    # padded to 32 (the stem and the projection), through the residual add, into the
    # head, which reads 24 real and 8 zero channels. The one slice left is the head's
    # 40 channels of 48, the model's output.
    convs, slices = _channels_last(inverted_residual())
    assert slices == [40], (convs, slices)
    assert convs == [
        (16, 32, 1),
        (32, 80, 1),
        (80, 80, 80),
        (80, 24, 1),
        (24, 80, 1),
        (80, 32, 1),
        (32, 48, 1),
    ], convs


@pytest.mark.parametrize("tail", ["transpose", "output"])
def test_channels_leaving_the_convolutions_stay_sliced_where_they_were(tail):
    # The block's output leaves the convolutions (a transpose, the model's output): its
    # 24 channels are not widened, and the 72 stay padded to 80 inside the block only.
    convs, slices = _channels_last(inverted_residual(tail=tail))
    assert convs == [
        (16, 24, 1),
        (24, 80, 1),
        (80, 80, 80),
        (80, 24, 1),
        (24, 80, 1),
        (80, 24, 1),
    ], convs
    assert slices == [], slices


@pytest.mark.parametrize("tail", ["conv", "transpose", "output"])
@pytest.mark.parametrize("batch", [1, 3])
def test_carried_channels_agree_with_onnx_runtime(tail, batch):
    assert _agreement(inverted_residual(tail=tail), batch) < TOLERANCE.rtol


def test_grouped_convolutions_keep_their_slices():
    # A grouped (not depthwise) convolution reads its input channels group by group:
    # padded ones would shift the groups, so the slice before it stays (RegNet).
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((104, 48, 1, 1)).astype(np.float32) / 7, "w1"),
        numpy_helper.from_array(rng.standard_normal((104, 8, 3, 3)).astype(np.float32) / 9, "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], group=13, kernel_shape=[3, 3], pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convs, slices = _channels_last(model)
    assert (48, 112, 1) in convs and (104, 104, 13) in convs and slices == [104], (convs, slices)
    assert _agreement(model, 1) < TOLERANCE.rtol


def test_carried_channel_counts():
    assert [carried_channels.carried_channels(n) for n in (24, 40, 72, 8, 3)] == [32, 48, 80, 8, 8]
