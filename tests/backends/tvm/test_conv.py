"""Convolutions, pooling and transposes on CPU: which schedule takes each, and their numbers.

* :mod:`rewriter.backends.tvm.relax_passes.conv`: convolutions become channels-last (``NHWC``/``HWIO``,
  ``NWC``/``WIO``); a dense one gets the implicit-GEMM register tile (``conv``) with its
  weight packed in panels, a depthwise one and pooling the channels-last window schedule.
* :mod:`rewriter.backends.tvm.relax_passes.transpose`: the layout changes at the model's edges are copied
  in tiles (``transpose``).
* :class:`rewriter.backends.tvm.relax_passes.cpu_schedule.ScheduleRecord` names the rule of every function
  and lists those left to TVM's default lowering.

Every compiled model agrees with ONNX Runtime within
:data:`rewriter.backends.verify.COMPILED_TOLERANCE` (float32: 1e-4 of the
output's scale): the conv sums the same products in another order.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm import verify
from rewriter.backends.tvm.relax_passes import conv, schedules

TOLERANCE = verify.COMPILED_TOLERANCE["float32"]


def _model(nodes: list[onnx.NodeProto], shape: list[int], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_model(
    shape: list[int], out: int, kernel: int, stride: int = 1, pad: int = 0, groups: int = 1,
    *, relu: bool = True, bias: bool = True,
) -> onnx.ModelProto:
    """``Relu(Conv(x, W, b))`` in NCHW (NCW for a 3-D ``shape``), as exporters write it."""
    rng = np.random.default_rng(0)
    dims = len(shape) - 2
    weight = rng.standard_normal((out, shape[1] // groups, *[kernel] * dims)).astype(np.float32)
    inits = [numpy_helper.from_array((weight / np.sqrt(weight[0].size)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {"kernel_shape": [kernel] * dims, "strides": [stride] * dims, "pads": [pad] * 2 * dims}
    nodes = [helper.make_node("Conv", inputs, ["c" if relu else "y"], group=groups, **attrs)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    return _model(nodes, shape, inits)


def resnet_block(channels: int = 32, size: int = 14) -> onnx.ModelProto:
    """conv-relu-conv + residual, relu, max pool, global average pool, flatten, Gemm."""
    rng = np.random.default_rng(1)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        return numpy_helper.from_array(value, name)

    inits = [
        weight("w1", channels, channels, 3, 3),
        weight("w2", channels, channels, 3, 3),
        weight("fc", 10, channels),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"),
    ]
    three = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **three),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], **three),
        helper.make_node("Add", ["c2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    return _model(nodes, [1, channels, size, size], inits)


def _run(
    model: onnx.ModelProto, shape: list[int], dims: dict[str, int] | None = None
) -> tuple[backend.Compiled, float]:
    """Compile ``model`` for avx512 (``dims`` fixed) and return it with its error relative
    to ORT's output on an input of ``shape``."""
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    compiled = backend.compile(model, "avx512", dims=dims)
    got = compiled.run({"x": x})["y"]
    assert got.shape == reference.shape
    return compiled, float(np.abs(got - reference).max() / np.abs(reference).max())


def _rules(compiled: backend.Compiled) -> dict[str, str]:
    assert compiled.schedules is not None
    return compiled.schedules.scheduled


CONVS = [
    pytest.param([1, 16, 20, 20], 32, 3, 1, 1, 1, id="3x3"),
    pytest.param([1, 16, 21, 21], 32, 3, 2, 1, 1, id="3x3-stride2-odd"),
    pytest.param([2, 8, 12, 12], 16, 1, 1, 0, 1, id="1x1-batch2"),
    pytest.param([1, 3, 32, 32], 32, 8, 8, 0, 1, id="patch-8x8"),
    pytest.param([1, 3, 30, 30], 16, 7, 2, 3, 1, id="stem-7x7"),
    pytest.param([1, 24, 10, 10], 24, 3, 1, 1, 1, id="24-channels"),
    pytest.param([1, 4, 64], 32, 5, 2, 0, 1, id="conv1d"),
]


@pytest.mark.parametrize(("shape", "out", "kernel", "stride", "pad", "groups"), CONVS)
def test_dense_conv_gets_the_implicit_gemm_and_agrees(shape, out, kernel, stride, pad, groups):
    compiled, error = _run(conv_model(shape, out, kernel, stride, pad, groups), shape)
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    convs = [name for name in rules if "conv" in name]
    # A 1x1 convolution has one reduction axis: it is a matmul, and gets the matmul's tile.
    assert convs and all(rules[name] in ("conv", "matmul") for name in convs), rules


def pooled(pool: onnx.NodeProto, shape: list[int]) -> onnx.ModelProto:
    """``pool(Conv(x))``: pooling as CNNs have it, behind a convolution (channels-last)."""
    model = conv_model(shape, shape[1], 1, relu=False)
    model.graph.node[0].output[0] = "c"
    model.graph.node.append(pool)
    return model


WINDOWS = [
    pytest.param(conv_model([1, 32, 14, 14], 32, 3, 1, 1, 32), [1, 32, 14, 14], "conv", id="depthwise-3x3"),
    pytest.param(conv_model([1, 48, 15, 15], 48, 5, 2, 2, 48), [1, 48, 15, 15], "conv", id="depthwise-5x5-stride2"),
    pytest.param(
        pooled(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4), [1, 16, 15, 15]),
        [1, 16, 15, 15],
        "max_pool",
        id="maxpool",
    ),
    pytest.param(
        pooled(helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), [1, 32, 8, 8]),
        [1, 32, 8, 8],
        "avg_pool",
        id="avgpool",
    ),
    pytest.param(
        pooled(helper.make_node("GlobalAveragePool", ["c"], ["y"]), [1, 32, 7, 7]), [1, 32, 7, 7], "mean", id="global-avgpool"
    ),
]


@pytest.mark.parametrize(("model", "shape", "function"), WINDOWS)
def test_depthwise_conv_and_pooling_get_the_window_schedule_and_agree(model, shape, function):
    compiled, error = _run(model, shape)
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    windows = [name for name, rule in rules.items() if rule == "channels-last window"]
    assert any(function in name for name in windows), rules


def test_small_resnet_block_agrees_with_nothing_left_unscheduled():
    compiled, error = _run(resnet_block(), [1, 32, 14, 14])
    assert error < TOLERANCE.rtol
    assert compiled.schedules is not None
    assert "conv" in compiled.schedules.scheduled.values()
    # The whole block is channels-last: one transpose in, none out (pooled to [1, C]).
    assert compiled.schedules.unscheduled == []


@pytest.mark.parametrize(
    ("channels", "groups", "rule"),
    [(32, 2, "conv"), (16, 4, "conv"), (128, 32, "conv"), (16, 8, "conv"), (18, 6, None)],
)
def test_grouped_conv_tiles_inside_a_group_and_agrees(channels, groups, rule):
    # 16 output channels per group: tiles of 16 inside each group; groups of 4 or 2
    # channels (ResNeXt's 32 groups of 4) tiles of one group in 4- or 2-lane vectors
    # (11x TVM's generic reduction); groups of 3 are left to another rule, and still
    # compute right.
    compiled, error = _run(conv_model([1, channels, 8, 8], channels, 3, 1, 1, groups), [1, channels, 8, 8])
    assert error < TOLERANCE.rtol
    convs = {name: kind for name, kind in _rules(compiled).items() if "conv" in name}
    assert convs and all((kind == "conv") == (rule == "conv") for kind in convs.values()), convs


@pytest.mark.parametrize(
    ("channels", "size", "kernel"), [(1000, 13, 1), (400, 7, 1), (40, 9, 1), (3, 16, 3), (1, 16, 3), (12, 9, 3)]
)
def test_ragged_channels_and_pixels_get_whole_tiles_and_agree(channels, size, kernel):
    # 1000 output channels are padded to 1024 (sliced back), 400 to 416: tiles two
    # vectors wide; 13 x 13 = 169 pixels (a
    # prime square) run whole 8-pixel tiles and a masked last one. An image's 3 output
    # channels (super-resolution, decoders), a depth map's 1, and 12 are padded to a
    # multiple of 8 whatever the waste: no register tile divides them (TVM's generic
    # reduction rule ran Swin2SR's 64 -> 3 at 12x ONNX Runtime's time).
    model = conv_model([1, 64, size, size], channels, kernel, 1, kernel // 2)
    compiled, error = _run(model, [1, 64, size, size])
    assert error < TOLERANCE.rtol
    convs = {name: rule for name, rule in _rules(compiled).items() if "conv" in name}
    assert convs and set(convs.values()) == {"conv"}, convs


def test_transpose_at_the_edge_is_tiled():
    compiled, error = _run(conv_model([1, 16, 32, 32], 32, 3, 1, 1), [1, 16, 32, 32])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert "transpose" in rules.values(), rules


def test_image_channels_to_channels_last_are_interleaved():
    # NCHW -> NHWC of an RGB image: the output's innermost axis (3 channels) is shorter
    # than a vector. One fused vectorized loop gathered every lane (CLIP's input: 1.2 ns
    # per element, 2.7 at a symbolic batch); the transpose rule takes it now, the
    # channels unrolled inside a plain loop over the pixels (interleaved stores).
    compiled, error = _run(conv_model([1, 3, 32, 32], 16, 3, 1, 1), [1, 3, 32, 32])
    assert error < TOLERANCE.rtol
    transposes = {name: rule for name, rule in _rules(compiled).items() if "transpose" in name}
    assert len(transposes) == 2 and set(transposes.values()) == {"transpose"}, transposes


def test_transpose_then_reshape_is_tiled():
    # wav2vec2's feature projection: a transpose TVM fuses with an identity reshape after
    # it (a second block); 37 is ragged (the tiles' tails masked, not vectorized).
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([64, 37], np.int64), "shape")
    compiled, error = _run(_model(nodes, [1, 37, 64], [shape]), [1, 37, 64])
    assert error == 0
    assert list(_rules(compiled).values()) == ["transpose"], _rules(compiled)


@pytest.mark.parametrize(
    ("batch", "pad"),
    [
        pytest.param(1, 8, id="wav2vec2"),  # the slice becomes less padding
        pytest.param(2, 8, id="batch2"),
        pytest.param(1, 0, id="no-padding-to-drop"),  # the slice stays, fused: a kept tail
    ],
)
def test_conv_whose_output_drops_a_position_gets_the_implicit_gemm_and_agrees(batch, pad):
    # wav2vec2's positional convolution: grouped, an even kernel padded by half of it on
    # both sides, then its last position sliced off.
    model = conv_model([batch, 32, 40], 32, 16, 1, pad, 4, relu=False)
    model.graph.node[0].output[0] = "c"
    model.graph.node.append(helper.make_node("Slice", ["c", "start", "end", "axis"], ["s"]))
    model.graph.node.append(helper.make_node("Relu", ["s"], ["y"]))
    for name, value in (("start", 0), ("end", -1), ("axis", 2)):
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    compiled, error = _run(model, [batch, 32, 40])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert "conv" in rules.values(), rules
    assert any("strided_slice" in name for name in rules) == (pad == 0), rules


def test_conv1d_over_a_symbolic_length_gets_the_implicit_gemm_and_agrees_at_every_length():
    # wav2vec2's feature encoder compiled for any number of samples: the one pixel axis is
    # symbolic (padded to whole tiles: test_conv_frames.py); one library for every batch
    # and length.
    model = conv_model([1, 16, 64], 32, 3, 2, 0, 1)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, "samples"]))
    compiled = backend.compile(model, "avx512")
    rules = _rules(compiled)
    assert [rules[name] for name in rules if "conv" in name] == ["conv"], rules
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ([1, 16, 64], [3, 16, 101]):
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol


def test_tile_widths_are_powers_of_two_dividing_the_channels():
    assert conv.conv_tile_width(64, 16) == 32
    assert conv.conv_tile_width(48, 16) == 16
    assert conv.conv_tile_width(24, 16) == 8
    assert conv.conv_tile_width(10, 16) is None


def test_schedule_record_lists_unscheduled_functions():
    # A cumulative sum has no schedule of ours: it is listed, by name.
    model = _model(
        [helper.make_node("CumSum", ["x", "axis"], ["y"])],
        [4, 16],
        [numpy_helper.from_array(np.array(1, np.int64), "axis")],
    )
    compiled, error = _run(model, [4, 16])
    assert error < TOLERANCE.rtol
    assert compiled.schedules is not None
    assert any("cumsum" in name for name in compiled.schedules.unscheduled), compiled.schedules


def squeeze_excite_block(channels: int = 48, size: int = 14) -> onnx.ModelProto:
    """MobileNetV3's block: a depthwise 3x3 conv, HardSwish, then squeeze-excitation
    (global average pool, 1x1 conv, Relu, 1x1 conv, HardSigmoid, times the features)."""
    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        return numpy_helper.from_array(value, name)

    squeezed = channels // 4
    inits = [
        weight("dw", channels, 1, 3, 3),
        weight("s1", squeezed, channels, 1, 1),
        weight("s2", channels, squeezed, 1, 1),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw", "b"], ["c"], group=channels, kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("HardSwish", ["c"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Conv", ["g", "s1"], ["q"]),
        helper.make_node("Relu", ["q"], ["r"]),
        helper.make_node("Conv", ["r", "s2"], ["e"]),
        helper.make_node("HardSigmoid", ["e"], ["gate"], alpha=1 / 6),
        helper.make_node("Mul", ["h", "gate"], ["y"]),
    ]
    return _model(nodes, [1, channels, size, size], inits)


def test_hardswish_and_hardsigmoid_fuse_into_the_convolutions_and_agree():
    # TVM's ConvertLayout has no rule for clip: HardSwish and HardSigmoid went back to
    # channels-first between transposes, each a function of its own. As maximum/minimum
    # they stay channels-last, in the convolutions' epilogues.
    compiled, error = _run(squeeze_excite_block(), [1, 48, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert not any("clip" in name for name in rules), rules
    depthwise = [name for name, rule in rules.items() if rule == "channels-last window" and "conv2d" in name]
    assert depthwise and all("minimum" in name for name in depthwise), rules
    # The transposes are the model's edges only: in, and out (the output is NCHW).
    assert sum("transpose" in name for name in rules) <= 2, rules



def relu6_block(opset: int = 17, channels: int = 32, size: int = 14) -> onnx.ModelProto:
    """MobileNetV2's inverted residual, as the torch exporters write it: a 1x1 conv, ReLU6
    (``Clip(x, 0, 6)``), a depthwise 3x3 conv, ReLU6, a 1x1 projection; bounds as
    constants (opset 11 on), or as attributes (opset 6)."""
    rng = np.random.default_rng(4)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (4 * rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        return numpy_helper.from_array(value, name)

    inits = [weight("e", channels * 2, channels, 1, 1), weight("dw", channels * 2, 1, 3, 3), weight("p", channels, channels * 2, 1, 1)]
    if opset >= 11:
        inits += [numpy_helper.from_array(np.float32(v), n) for v, n in ((0, "lo"), (6, "hi"))]

    def relu6(x: str, y: str) -> onnx.NodeProto:
        if opset >= 11:
            return helper.make_node("Clip", [x, "lo", "hi"], [y])
        return helper.make_node("Clip", [x], [y], min=0.0, max=6.0)

    nodes = [
        helper.make_node("Conv", ["x", "e"], ["a"]),
        relu6("a", "b"),
        helper.make_node("Conv", ["b", "dw"], ["c"], group=channels * 2, kernel_shape=[3, 3], pads=[1] * 4),
        relu6("c", "d"),
        helper.make_node("Conv", ["d", "p"], ["y"]),
    ]
    model = _model(nodes, [1, channels, size, size], inits)
    model.opset_import[0].version = opset
    return model


@pytest.mark.parametrize("opset", [17, 6])
def test_relu6_fuses_into_the_convolutions_and_agrees(opset: int):
    # TVM's Clip converter emits its own maximum/minimum PrimFuncs, which ConvertLayout
    # cannot carry: each ReLU6 went back to channels-first between two transposes
    # (MobileNetV2 at batch 1: 1.09 -> 0.85 of ORT's time once they fused).
    compiled, error = _run(relu6_block(opset), [1, 32, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    convs = [name for name in rules if "conv2d" in name]
    assert len(convs) == 3 and sum("minimum" in name for name in convs) == 2, rules
    assert sum("transpose" in name for name in rules) <= 2, rules


def test_clip_bounds_absent_nan_or_computed_agree_with_onnx_runtime():
    # ONNX Runtime reads an absent or NaN bound as none; a computed bound stays a tensor.
    nan = numpy_helper.from_array(np.float32(np.nan), "nan")
    nodes = [
        helper.make_node("Clip", ["x", "", "hi"], ["a"]),
        helper.make_node("Clip", ["a", "nan"], ["b"]),
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Clip", ["b", "m"], ["y"]),
    ]
    hi = numpy_helper.from_array(np.float32(0.5), "hi")
    _, error = _run(_model(nodes, [2, 8, 5, 5], [hi, nan]), [2, 8, 5, 5])
    assert error < TOLERANCE.rtol


def dense_layer(channels: int = 32, growth: int = 16, size: int = 14) -> onnx.ModelProto:
    """DenseNet's pre-activation layer: the features so far concatenated, BatchNorm, Relu,
    then a 1x1 conv (the BatchNorm has no conv before it to fold into)."""
    rng = np.random.default_rng(4)
    total = channels + growth

    def tensor(name: str, *shape: int, low: float = -1.0) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(low, 1.0, shape).astype(np.float32), name)

    inits = [
        tensor("grow", growth, channels, 1, 1),
        tensor("scale", total), tensor("shift", total), tensor("mean", total),
        tensor("var", total, low=0.5),
        tensor("w", 32, total, 1, 1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "grow"], ["new"]),
        helper.make_node("Concat", ["x", "new"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "scale", "shift", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["y"]),
    ]
    return _model(nodes, [1, channels, size, size], inits)


def test_an_unfolded_batch_norm_fuses_with_the_relu_after_it():
    # DecomposeOpsForInference leaves a tuple (y, mean, var) that its users index; the
    # index ended fusion, so the Relu after a pre-activation BatchNorm was a pass of its
    # own over the maps (DenseNet-121 at batch 8: 18 ms of 480).
    compiled, error = _run(dense_layer(), [1, 32, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert not any(name.startswith("fused_relu") for name in rules), rules
    assert any("concatenate" in name and "add_relu" in name for name in rules), rules


def two_branches(channels: int = 32, size: int = 14) -> onnx.ModelProto:
    """One channels-first tensor, a channel shuffle's, read by two convolutions
    (ShuffleNetV2's downsampling unit: a depthwise branch and a 1x1 branch), their
    outputs concatenated."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) / 3, "dw"),
        numpy_helper.from_array(rng.standard_normal((channels, channels, 1, 1)).astype(np.float32) / 6, "pw"),
    ]
    shapes = [[1, 2, channels // 2, size, size], [1, channels, size, size]]
    inits += [numpy_helper.from_array(np.array(shape, np.int64), f"s{i}") for i, shape in enumerate(shapes)]
    nodes = [  # a channel shuffle first: its output stays channels-first
        helper.make_node("Reshape", ["x", "s0"], ["g"]),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "s1"], ["shuffled"]),
        helper.make_node("Conv", ["shuffled", "dw"], ["a"], group=channels, kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["shuffled", "pw"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
    ]
    return _model(nodes, [1, channels, size, size], inits)


def test_a_tensor_two_convolutions_read_is_transposed_once():
    # Each convolution's input got a transpose of its own: the two branches transposed
    # one tensor twice (ShuffleNetV2 at a symbolic batch 8: 1.5 ms of 37).
    compiled, error = _run(two_branches(), [1, 32, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    transposes = [name for name in rules if name.startswith("transpose")]
    assert not transposes, rules  # the one transpose fused into the shuffle


def atrous(rate: int, size: int = 14, kernel: int = 3) -> onnx.ModelProto:
    """DeepLabV3's ASPP branch: a 3 x 3 convolution dilated by ``rate``, padded by it
    (``kernel`` wide: padded by ``rate`` per tap beside the centre)."""
    rng = np.random.default_rng(6)
    weight = (rng.standard_normal((32, 16, kernel, kernel)) / 12).astype(np.float32)
    pad = rate * (kernel // 2)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel] * 2, dilations=[rate] * 2, pads=[pad] * 4
    )
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")]
    return _model([node, helper.make_node("Relu", ["c"], ["y"])], [1, 16, size, size], inits)


def _conv_kernels(model: onnx.ModelProto) -> list[tuple[list[int], list[int], list[int]]]:
    """(weight shape, dilation, padding) of each convolution after the channels-last pass."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm import import_onnx, targets

    target = targets.resolve("avx512")
    mod = relax.transform.FoldConstant()(import_onnx.import_onnx(model, target=target))
    with target:
        mod = conv.channels_last()(mod)
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in conv.LAYOUTS:
            shape = [int(v) for v in expr.args[1].ty.shape.values]
            found.append((shape, [int(v) for v in expr.attrs.dilation], [int(v) for v in expr.attrs.padding]))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.mark.parametrize(
    ("rate", "size", "width", "kernel"),
    [
        (36, 14, 3, ([1, 1, 16, 32], [1, 1], [0] * 4)),
        (24, 14, 3, ([1, 1, 16, 32], [1, 1], [0] * 4)),
        (2, 14, 3, ([3, 3, 16, 32], [2, 2], [2] * 4)),  # every tap live almost everywhere
    ],
)
def test_taps_that_only_read_padding_are_dropped_and_agree(rate, size, width, kernel):
    # Dilated by 24 or 36 over a 14 x 14 map, the outer taps never reach the map: a 1 x 1
    # convolution (DeepLabV3-MobileNetV3 at batch 1: 39 -> 22.5 ms, its three ASPP
    # branches each a 3 x 3 conv over an 86 x 86 padded copy). At 2 every tap is live
    # almost everywhere: the convolution stays as it is.
    model = atrous(rate, size, width)
    assert _conv_kernels(model) == [kernel]
    _, error = _run(model, [1, 16, size, size])
    assert error < TOLERANCE.rtol


@pytest.mark.parametrize(("rate", "size", "width"), [(12, 14, 3), (6, 10, 5)])
def test_convolutions_mostly_over_padding_are_split_into_regions_and_agree(rate, size, width):
    # Dilated by 12 over 14 x 14, every tap is live somewhere, the outer ones on the two
    # border rows or columns only: a fifth of the work reads the map. One convolution per
    # region of the same live taps, unpadded: the centre's 1 x 1, the borders' 2 x 1 and
    # 1 x 2, the corners' 2 x 2 (DeepLabV3-MobileNetV3's rate-12 branch; the model at
    # batch 1: 22.3 -> 16.4 ms). With five taps at rate 6 over 10 x 10, the outer two
    # first dropped (never live), the same nine regions.
    model = atrous(rate, size, width)
    kernels = _conv_kernels(model)
    shapes = sorted(tuple(weight[:2]) for weight, _, _ in kernels)
    assert shapes == [(1, 1), (1, 2), (1, 2), (2, 1), (2, 1), (2, 2), (2, 2), (2, 2), (2, 2)], kernels
    assert all(padding == [0] * 4 for _, _, padding in kernels), kernels
    _, error = _run(model, [1, 16, size, size])
    assert error < TOLERANCE.rtol


def test_a_wide_kernel_sliding_over_padding_is_not_split():
    # wav2vec2's positional convolution (128 taps over 49 frames, padded by 64) has a
    # different live range at every output: 49 regions ran 4x the time of the one.
    assert len(conv.tap_bands(49, 50, 128, 1, 1, 64)) == 50 > conv.PARTIAL_TAPS_REGIONS
    model = conv_model([1, 16, 49], 16, 128, pad=64)
    assert len(_conv_kernels(model)) == 1
    _, error = _run(model, [1, 16, 49])
    assert error < TOLERANCE.rtol


def test_clips_become_maximum_then_minimum():
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, 8, 4, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        y = bb.emit(relax.op.clip(x, 0, 6))
        bb.emit_func_output(y)
    text = conv.clips_as_max_min(bb.get())["main"].script()
    assert "R.clip" not in text
    assert "R.maximum" in text and "R.minimum" in text


def _scheduled(
    rule: str,
    size: int,
    weight: tuple[int, int, int, int],
    stride: int,
    groups: int,
    *,
    symbolic: bool = False,
    images: int = 1,
) -> str:
    """Rule ``rule``'s schedule (TVMScript) of a legalized channels-last conv of an
    ``size x size`` image with an HWIO ``weight``, padded by half the kernel (a symbolic
    batch with ``symbolic``, else ``images`` images)."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm import targets

    channels = weight[2] * groups
    batch = tvm.tirx.Var("batch", "int64") if symbolic else images
    x = relax.Var("x", relax.TensorType((batch, size, size, channels), "float32"))
    w = relax.Var("w", relax.TensorType(weight, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        y = relax.op.nn.conv2d(
            x, w, strides=stride, padding=weight[0] // 2, groups=groups, data_layout="NHWC", kernel_layout="HWIO"
        )
        bb.emit_func_output(bb.emit(y))
    mod = relax.transform.LegalizeOps()(bb.get())
    func = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    sch = conv.rules()[rule](16).apply(func, targets.resolve("avx512"), False)
    assert sch is not None
    return str(sch.mod["main"].script())


def _window_schedule(channels: int, size: int, kernel: int, stride: int) -> str:
    """The window rule's schedule of a depthwise conv."""
    return _scheduled("window", size, (kernel, kernel, 1, channels), stride, channels)


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride", "copied", "lanes", "pixels"),
    [
        # 2 reads per padded element: the padding is tested in the loads, no copy;
        # 72 channels: 8-lane vectors (no 24-lane ones), 7 of the 14 pixels of a row.
        pytest.param(72, 28, 3, 2, False, 8, 7, id="3x3-stride2-72"),
        # 15 reads per padded element: the copy pays; 8 of 16 pixels, 16 lanes of 240.
        pytest.param(240, 16, 5, 1, True, 16, 8, id="5x5-240"),
    ],
)
def test_depthwise_window_tiles_pixels_of_one_row(channels, size, kernel, stride, copied, lanes, pixels):
    text = _window_schedule(channels, size, kernel, stride)
    assert ("pad_temp = T.sblock_alloc_buffer" in text) == copied, text
    assert f"T.vectorized(T.int64({lanes}))" in text, text
    assert f"T.unroll(T.int64({pixels}))" in text, text
    # Pixels of one row: no flattened pixel index (a division by the width per load).
    width = (size + stride - 1) // stride
    assert f"// T.int64({width})" not in text, text


def test_a_row_no_wide_tile_divides_takes_narrower_tiles():
    # 55 x 55 pixels (SqueezeNet's max pool): 64-channel tiles hold at most 4 pixels, of
    # which 1 divides 55 (and none of 2 to 4 divides 3025): ragged 3-pixel tiles over
    # flattened pixels, one panel as the parallel loop. 32-channel tiles: 5 of at most 8.
    text = _window_schedule(64, 110, 3, 2)
    assert "T.vectorized(T.int64(32))" in text, text
    assert "T.unroll(T.int64(5))" in text, text
    assert "T.where" not in text, text


def test_a_long_row_no_wide_tile_divides_takes_narrower_tiles_at_a_symbolic_batch():
    # The same at a symbolic batch (images apart): masked 4 x 64 tiles over each image's
    # flattened pixels ran SqueezeNet's first max pool in 2.6x the time of 5 x 32 row
    # tiles (its symbolic library 1.09 -> 0.99x ORT's time at batch 1).
    text = _scheduled("window", 110, (3, 3, 1, 64), 2, 64, symbolic=True)
    assert "T.vectorized(T.int64(32))" in text, text
    assert "T.unroll(T.int64(5))" in text, text
    assert "T.where" not in text, text


@pytest.mark.parametrize("symbolic", [False, True])
def test_a_short_row_of_images_kept_apart_takes_row_tiles(symbolic):
    # A 7 x 7 map of 1152 channels at batch 8 (MNASNet's, EfficientNet's last stage): its
    # images are kept apart, and 3 x 64 tiles over 49 flattened pixels were masked and
    # divided by the width per load (2-3x the time); 7 x 32 tiles cover one row each.
    text = _scheduled("window", 7, (5, 5, 1, 1152), 1, 1152, symbolic=symbolic, images=8)
    assert "T.vectorized(T.int64(32))" in text, text
    assert "T.unroll(T.int64(7))" in text, text
    assert "T.where" not in text and "// T.int64(7)" not in text, text


@pytest.mark.parametrize(
    ("kernel", "size", "unrolled"),
    [(3, 56, True), (3, 7, True), (5, 28, False), (7, 14, False)],
    ids=["3x3-rows", "3x3-ragged-flattened", "5x5-loops", "7x7-loops"],
)
def test_small_window_is_unrolled_in_full(kernel, size, unrolled):
    # Left as loops, LLVM kept one over the kernel's rows, its padding tests branching
    # between copies of the tile's FMAs: EfficientNet-B0's 3 x 3 depthwise conv at batch
    # 8 ran 3x slower than unrolled. 25 taps stay loops (its 5 x 5 stride-2 conv, a
    # padding test in every load, ran 1.1-1.65x slower unrolled).
    text = _window_schedule(144, size, kernel, 1)
    loops = [line.strip() for line in text.splitlines() if line.strip().startswith(("for ry", "for rx"))]
    assert loops, text
    assert all("T.unroll" in loop for loop in loops) == unrolled, loops


@pytest.mark.parametrize(("size", "stride"), [(56, 1), (112, 2)], ids=["56x56", "112-stride2"])
def test_depthwise_window_tile_lives_on_the_stack(size, stride):
    # Rows of 56 output pixels take 7-pixel tiles of 32 channels (896 bytes, on the stack,
    # in registers), not 8-pixel ones (1 KiB: a workspace allocated and zeroed per tile,
    # the accumulators stored after every FMA; EfficientNet-B0 at batch 8, Zen 4, 1.03 ->
    # 1.00x ORT).
    text = _window_schedule(96, size, 3, stride)
    assert 'scope="local"' not in text, text
    assert "T.unroll(T.int64(7))" in text and "T.unroll(T.int64(8))" not in text, text


def test_ragged_window_tile_lives_on_the_stack():
    # A 64-wide tile of at most 4 pixels that no height divides: 3 pixels (768 bytes, on
    # the stack), not 4 (1 KiB, a workspace per tile).
    assert schedules.stack_height(4, 64) == 3
    # 7 x 7 pixels of 128 channels (EfficientNet-B0's 5 x 5 depthwise convolutions over
    # 7 x 7 maps): no 64-wide tile divides 7 or 49; 7 x 32 row tiles instead (the model
    # at batch 1: 0.871-0.874 -> 0.857-0.863x ORT, one thread), on the stack.
    text = _window_schedule(128, 7, 5, 1)
    assert 'scope="local"' not in text, text
    assert "T.unroll(T.int64(7))" in text and "T.vectorized(T.int64(32))" in text, text


def test_symbolic_batch_decides_the_padding_copy_per_image():
    # 58 x 58 x 72 padded floats per image (969 KB, past the L2 block): inlined as at a
    # fixed batch; a copy kept for any batch (its size unknown) ran MobileNetV3's
    # symbolic depthwise convs at 2x their fixed time.
    text = _scheduled("window", 56, (3, 3, 1, 72), 1, 72, symbolic=True)
    assert "pad_temp = T.sblock_alloc_buffer" not in text, text


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride"),
    [
        pytest.param(72, 28, 3, 2, id="3x3-stride2-72"),
        pytest.param(240, 14, 5, 1, id="5x5-240"),
        pytest.param(96, 14, 7, 1, id="7x7-96"),
        pytest.param(88, 13, 3, 1, id="3x3-ragged-row-88"),  # 13 pixels: flattened tiles
        # ShuffleNetV2's branches: 116 channels (4-lane vectors) and 58 (2-lane): without
        # a width dividing them, TVM's generic reduction rule ran them scalar (18x, 9x).
        pytest.param(116, 14, 3, 1, id="3x3-116"),
        pytest.param(58, 28, 3, 2, id="3x3-stride2-58"),
    ],
)
def test_depthwise_convs_agree(channels, size, kernel, stride):
    model = conv_model([1, channels, size, size], channels, kernel, stride, kernel // 2, channels)
    compiled, error = _run(model, [1, channels, size, size])
    assert error < TOLERANCE.rtol
    assert "channels-last window" in _rules(compiled).values(), _rules(compiled)


@pytest.mark.parametrize(
    ("shape", "perm"),
    [
        pytest.param([2, 3, 20, 32], [0, 2, 3, 1], id="image-channels-last"),  # 3 channels: a short output axis
        pytest.param([2, 20, 32, 3], [0, 3, 1, 2], id="channels-first"),  # a short input axis
        pytest.param([1, 3, 20, 20], [0, 2, 3, 1], id="ragged-row"),  # 20: a masked last vector
    ],
)
def test_transpose_with_a_short_innermost_axis_is_scheduled_and_exact(shape, perm):
    # An image's 3 channels moved last before the first convolution: the long axis in
    # vectors, the short one unrolled (TVM's elementwise vectors gathered each element).
    out = [shape[p] for p in perm]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=perm)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
    )
    compiled, error = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), shape)
    assert error == 0
    assert list(_rules(compiled).values()) == ["transpose"], _rules(compiled)


def test_a_sliced_half_of_the_channels_moved_last_is_a_tiled_transpose():
    # ShuffleNetV2: the second half of the channels (read at c + 116), NCHW -> NHWC for
    # the branch's convolution; with the slice's offset in the index it was left to the
    # elementwise rule (13.8 us against 6.3 tiled for 116 x 14 x 14).
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "end", "axis"], ["half"]),
            helper.make_node("Transpose", ["half"], ["y"], perm=[0, 2, 3, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 232, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 14, 14, 116])],
        [
            numpy_helper.from_array(np.array([116], np.int64), "start"),
            numpy_helper.from_array(np.array([232], np.int64), "end"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled, error = _run(model, [1, 232, 14, 14])
    assert error == 0
    assert list(_rules(compiled).values()) == ["transpose"], _rules(compiled)


def test_first_convolution_of_an_image_gets_a_scheduled_transpose():
    compiled, error = _run(conv_model([1, 3, 32, 32], 16, 3, 2, 1), [1, 3, 32, 32])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert "transpose" in rules.values() and "elementwise" not in rules.values(), rules


def test_pointwise_conv_reads_its_input_without_a_copy():
    # TVM's pad_temp of an unpadded (1x1) convolution is a plain copy: inlined.
    text = _scheduled("conv", 14, (1, 1, 16, 64), 1, 1)
    assert "pad_temp" not in text, text
    assert "T.vectorized(T.int64(32))" in text, text  # two-vector register tiles
    padded = _scheduled("conv", 14, (3, 3, 16, 64), 1, 1)
    assert "pad_temp = T.sblock_alloc_buffer" in padded, padded  # read 9 times per element: kept


@pytest.mark.parametrize(
    ("weight", "copied"),
    [
        pytest.param((3, 3, 3, 16), False, id="3x3-stride2-image"),  # each padded element read ~2 times: inlined
        pytest.param((7, 7, 3, 64), True, id="7x7-stride2-image"),  # ~17 times: the copy pays
    ],
)
def test_first_convolution_copies_its_padded_image_only_where_it_is_reread(weight, copied):
    text = _scheduled("conv", 32, weight, 2, 1)
    assert ("pad_temp = T.sblock_alloc_buffer" in text) == copied, text
    model = conv_model([1, 3, 32, 32], weight[3], weight[0], 2, weight[0] // 2)
    _, error = _run(model, [1, 3, 32, 32])
    assert error < TOLERANCE.rtol


@pytest.mark.parametrize(
    ("size", "weight", "rows", "width"),
    [
        pytest.param(56, (3, 3, 64, 64), 7, 32, id="56x56-7x32"),
        pytest.param(14, (1, 1, 16, 16), 7, 16, id="16-wide"),
    ],
)
def test_register_tile_lives_on_the_stack(size, weight, rows, width):
    # A "local" tile, or one of 1 KiB (8 x 32 floats), is a workspace allocation and a
    # memset per tile; a "global" one under 1 KiB stays on the stack, in registers.
    # 56 x 56 pixels take 7-pixel tiles (7 divides them) rather than 8.
    text = _scheduled("conv", size, weight, 1, 1)
    assert 'scope="local"' not in text, text
    # The micro-kernel's pixel loop (the last split of the pixels), its channels inside.
    kernel = r"for ax0_\d+ in T\.unroll\(T\.int64\((\d+)\)\):\n\s+for ax1_\d+ in T\.vectorized\(T\.int64\((\d+)\)\)"
    assert (str(rows), str(width)) in re.findall(kernel, text), text


def test_stack_tile_sizes():
    assert schedules.tile_scope(7, 32) == "global" and schedules.tile_scope(8, 32) == "local"
    assert schedules.stack_rows(3136, 8, 32) == 7  # ResNet's 56 x 56 pixels
    assert schedules.stack_rows(4096, 8, 32) is None  # 4 rows: too few accumulators; 8 in a workspace
    assert schedules.stack_rows(4096, 8, 16) == 8  # a 16-wide tile of 8 rows fits


def test_stack_tiled_convs_agree_with_ort():
    for model, shape in (
        (conv_model([1, 16, 56, 56], 32, 3, pad=1), [1, 16, 56, 56]),  # 7 x 32 tiles
        (conv_model([1, 16, 28, 28], 24, 1), [1, 16, 28, 28]),  # 8 x 8 tiles
    ):
        compiled, error = _run(model, shape)
        assert error <= 1e-5, error


@pytest.mark.parametrize("symbolic", [False, True], ids=["one-image", "symbolic-batch"])
def test_streamed_conv_weight_is_prefetched_and_agrees(monkeypatch, symbolic):
    # Scaled down from ResNet-18's last stage (7 x 7 pixels, a 9 MiB 3 x 3 x 512 x 512
    # weight): a 144 KiB weight counts as streamed; the 7 x 7 pixels are 7 tiles of 7,
    # each image's few tiles the only reuse of a panel. With a symbolic batch the
    # images are fused into the same parallel loop, and the panel is found modulo them.
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 3 * 3 * 64 * 64 * 4)
    monkeypatch.setattr(schedules, "ROW_MAJOR_MAX_B_BYTES", 1024)  # nor does it stay in L2
    model = conv_model([1, 64, 7, 7], 64, 3, 1, 1)
    if symbolic:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    compiled, error = _run(model, [1, 64, 7, 7])
    assert error < TOLERANCE.rtol
    assert "prefetcht0" in compiled.executable.mod.imports[0].inspect_source("asm")
    if symbolic:
        x = np.random.default_rng(3).standard_normal((3, 64, 7, 7)).astype(np.float32)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert np.abs(got - reference).max() / np.abs(reference).max() < TOLERANCE.rtol


def test_prefetches_spread_over_more_iterations_than_lines_stay_in_the_next_panel(monkeypatch):
    # An 8 x 8 patch embedding over 3 channels (CLIP's is 32 x 32): its reduction loop
    # takes no K_UNROLL steps, so 7 tiles of 7 pixels run 7 x 192 iterations over a panel
    # of 192 x 32 floats (384 lines). A line each iteration ran 3.5 panels ahead (CLIP at
    # batch 8: 5.5 ms against 4.1); now every 4th iteration prefetches one.
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 8 * 8 * 3 * 64 * 4)
    monkeypatch.setattr(schedules, "ROW_MAJOR_MAX_B_BYTES", 1024)  # the weight is not in L2
    model = conv_model([1, 3, 56, 56], 64, 8, 8)
    script = _scheduled_function(model, "conv")
    assert script.count("llvm.prefetch") == 1, script
    guard = script.split("llvm.prefetch")[0].rsplit("if ", 1)[1]
    assert guard.startswith("(") and "% T.int64(4) == T.int64(0)" in guard, script
    compiled, error = _run(model, [1, 3, 56, 56])
    assert error < TOLERANCE.rtol
    assert "prefetcht0" in compiled.executable.mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("tiles", [1, 3, 7, 8, 10])
@pytest.mark.parametrize("elements", [16, 32, 128])
def test_prefetches_cover_at_most_the_next_panel_and_at_least_half(tiles, elements):
    # Each of `tiles` row tiles runs the k loop over the panel, `elements` of it (16 a
    # line) an iteration: the iterations' prefetched lines, together, stay within the
    # next panel and cover at least half of it.
    iterations = 48
    lines, every = schedules.prefetch_spacing(elements, 16, tiles)
    covered = -(-tiles * iterations // every) * lines
    panel = iterations * elements // 16
    assert panel // 2 <= covered <= panel


def test_conv_weight_reused_by_many_pixel_tiles_is_not_prefetched(monkeypatch):
    # The same weight over 14 x 14 pixels: 28 tiles reuse each panel from cache (at the
    # default limit: code for avx512 compiled on a Sapphire Rapids is tuned for it).
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 3 * 3 * 64 * 64 * 4)
    monkeypatch.setattr(schedules, "PREFETCH_MAX_TILES_BY_CPU", {})
    monkeypatch.setattr(schedules, "ROW_MAJOR_MAX_B_BYTES", 1024)  # nor does it stay in L2
    compiled, error = _run(conv_model([1, 64, 14, 14], 64, 3, 1, 1), [1, 64, 14, 14])
    assert error < TOLERANCE.rtol
    assert "prefetch" not in compiled.executable.mod.imports[0].inspect_source("asm")


IMAGES_APART = [
    # 4 images of 16 x 16 x 16 (64 KiB), a 1 x 1 weight in L2: flattened, every panel
    # swept the pixels of all images (MobileNetV3-small at batch 8: 1.45 ms against 0.78
    # ms for one 56 x 56 layer).
    pytest.param("conv", 16, (1, 1, 16, 32), 1, 32 << 10, (4, 256, 32), (1024, 32), id="conv-1x1"),
    # 4 images of 7 x 7 x 64, a 5 x 5 depthwise window (EfficientNet's last stage):
    # flattened, its tiles of 4 pixels span image rows (no tile divides 7) over the padded
    # input of every image, 124 KiB here, 4.4 MiB at batch 8 there (EfficientNet-B0 at
    # batch 8, two threads: the model 11% faster image by image); apart, each tile is a
    # row of an image (WINDOW_LONG_ROW), accumulated per image.
    pytest.param("window", 7, (5, 5, 1, 64), 64, 64 << 10, (4, 7, 7, 64), (196, 64), id="depthwise-5x5"),
]


@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize(("rule", "size", "weight", "groups", "limit", "accumulator", "flattened"), IMAGES_APART)
def test_a_large_batch_input_is_convolved_image_by_image(
    monkeypatch, rule, size, weight, groups, limit, accumulator, flattened, apart
):
    # Past the limit the images stay apart (one image's input in cache over the panels
    # or tiles), as under a symbolic batch; under it, the pixels of all images are one axis.
    monkeypatch.setattr(conv, "CONV_IMAGES_APART_BYTES", limit if apart else 1 << 20)
    script = _scheduled(rule, size, weight, 1, groups, images=4)

    def allocated(extents: tuple[int, ...]) -> bool:
        return "T.sblock_alloc_buffer((" + ", ".join(f"T.int64({e})" for e in extents) + ")" in script

    assert (allocated(accumulator), allocated(flattened)) == (apart, not apart), script
    kernel, channels, out = weight[0], weight[2] * groups, weight[3]
    model = conv_model([4, channels, size, size], out, kernel, 1, kernel // 2, groups)
    compiled, error = _run(model, [4, channels, size, size])
    assert error < TOLERANCE.rtol


@pytest.mark.parametrize(
    ("block_bytes", "weight_in_l2", "first"),
    [
        pytest.param(1 << 20, False, [0, 8, 16, 24], id="one-block"),
        pytest.param(16 * 192 * 4, False, [0, 8, 0, 8], id="blocks"),
        pytest.param(1 << 20, True, [0, 0, 8, 8], id="weight-in-l2"),
    ],
)
def test_pixels_are_convolved_in_blocks_outside_the_panels(monkeypatch, block_bytes, weight_in_l2, first):
    # Two images of 4 x 4 patches (8 x 8 x 3: 192 input floats a pixel), two panels of 32
    # output channels, tiles of 8 pixels. Past ROW_BLOCK_BYTES (16 pixels' input here),
    # blocks of pixels come outside the panels, as the matmul's row blocks do: the first
    # half of the parallel loop (a thread's share) convolves the first image, the one its
    # producer's first share wrote, its input in cache over both panels. Panels outside,
    # each half read every image (CLIP's patch embedding at batch 8, two threads: 2.2 ms
    # against 1.8). A weight that stays in L2 is swept by each tile, all panels: the
    # tile's input stays in L1 (RegNetY-400MF at batch 1, two threads: 7.4 -> 6.2 ms).
    monkeypatch.setattr(schedules, "ROW_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(schedules, "ROW_MAJOR_MAX_B_BYTES", 1 << 19 if weight_in_l2 else 1024)
    model = conv_model([2, 3, 32, 32], 64, 8, 8)
    pixels = _parallel_first_pixels(_scheduled_primfunc(model, "conv"))
    assert len(pixels) == 8
    assert pixels[:4] == first, pixels
    compiled, error = _run(model, [2, 3, 32, 32])
    assert error < TOLERANCE.rtol


def _parallel_first_pixels(func: object) -> list[int]:
    """The first pixel that each iteration of ``func``'s parallel loop convolves."""
    import tvm_ffi
    from tvm import s_tir, sym, tirx

    found: dict[str, object] = {}

    def loop(node: object, visitor: object) -> None:
        if node.kind == tirx.ForKind.PARALLEL:  # type: ignore[attr-defined]
            found.setdefault("loop", node)
        visitor.default_visit(node)  # type: ignore[attr-defined]

    def realize(node: object, visitor: object) -> None:
        if node.block.name_hint.endswith("_update"):  # type: ignore[attr-defined]
            found["pixel"] = node.iter_values[0]  # type: ignore[attr-defined]
        visitor.default_visit(node)  # type: ignore[attr-defined]

    tvm_ffi.structural_visit(func.body, [(tirx.For, loop), (s_tir.SBlockRealize, realize)])  # type: ignore[attr-defined]
    parallel, pixel = found["loop"], found["pixel"]
    analyzer = sym.Analyzer()

    def at(iteration: int) -> int:
        # The other loops at 0: the tile's first pixel.
        value = tvm_ffi.structural_map(
            pixel,
            [(tirx.Var, lambda var: tirx.const(iteration if var.same_as(parallel.loop_var) else 0, "int64"))],  # type: ignore[attr-defined]
        )
        return int(analyzer.simplify(value))

    return [at(i) for i in range(int(parallel.extent))]  # type: ignore[attr-defined]


def excitation_gate(channels: int = 48, size: int = 14, batch: int = 2) -> onnx.ModelProto:
    """EfficientNet's squeeze-excitation gate after a convolution: ``f = Conv3x3(x)``,
    ``f * Sigmoid(Conv1x1(Relu(Conv1x1(GlobalAveragePool(f)))))``: the last convolution's
    result, ``[n, c, 1, 1]``, scales every pixel of ``f``."""
    rng = np.random.default_rng(4)
    squeezed = channels // 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) / 20, "w"),
        numpy_helper.from_array(rng.standard_normal((squeezed, channels, 1, 1)).astype(np.float32) / 7, "s1"),
        numpy_helper.from_array(rng.standard_normal((channels, squeezed, 1, 1)).astype(np.float32) / 3, "s2"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["f"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["f"], ["g"]),
        helper.make_node("Conv", ["g", "s1"], ["q"]),
        helper.make_node("Relu", ["q"], ["r"]),
        helper.make_node("Conv", ["r", "s2", "b"], ["e"]),
        helper.make_node("Sigmoid", ["e"], ["gate"]),
        helper.make_node("Mul", ["f", "gate"], ["y"]),
    ]
    return _model(nodes, [batch, channels, size, size], inits)


def _scheduled_primfunc(model: onnx.ModelProto, name: str) -> object:
    """The scheduled PrimFunc of ``model`` whose name contains ``name``."""
    import tvm

    from rewriter.backends.tvm import import_onnx, pipeline, targets

    target = targets.resolve("avx512")
    mod = import_onnx.import_onnx(import_onnx.prepare(model), target=target)
    scheduled = pipeline.relax_pipeline(target)(mod)
    funcs = [
        func
        for var, func in scheduled.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc) and name in var.name_hint
    ]
    assert len(funcs) == 1, [var.name_hint for var in scheduled.functions]
    return funcs[0]


def _scheduled_function(model: onnx.ModelProto, name: str) -> str:
    """TVMScript of the scheduled PrimFunc of ``model`` whose name contains ``name``."""
    return str(_scheduled_primfunc(model, name).script())  # type: ignore[attr-defined]


@pytest.mark.parametrize("batch", [1, 3])
def test_excitation_gate_is_computed_once_per_channel_and_agrees(batch):
    # The gate's convolution has one pixel an image and its epilogue (the sigmoid, then
    # the product with the features) 14 x 14: the sigmoid was computed per pixel, in
    # the epilogue of the tile (EfficientNet-B0 at batch 8: 2.0 ms against 0.6 ms for its
    # largest gate). Now it is computed into a [n, 1, 1, c] buffer on the tile, and the
    # product is a loop of its own, parallel over the pixels.
    model = excitation_gate(batch=batch)
    compiled, error = _run(model, [batch, 48, 14, 14])
    assert error < TOLERANCE.rtol
    assert "conv2d" in "".join(name for name, rule in _rules(compiled).items() if rule == "conv")
    text = _scheduled_function(model, "multiply")
    assert f"T.sblock_alloc_buffer((T.int64({batch}), T.int64(1), T.int64(1), T.int64(48)))" in text, text
    product = [line for line in text.splitlines() if "T_multiply" in line and " = " in line and "[v" in line]
    assert product and not any("sigmoid" in line or "exp" in line or "tanh" in line for line in product), text


def group_norm_block(groups: int | None, channels: int = 16, size: int = 12) -> onnx.ModelProto:
    """conv, a group norm of ``groups`` as both torch exporters write it (``Reshape`` to
    ``[N, G, -1]``, ``InstanceNormalization``, ``Reshape`` back to the conv's shape, the
    affine as ``[C, 1, 1]`` constants), ReLU, conv; ``groups=None``: an instance norm of
    the conv's output itself (its affine inside)."""
    rng = np.random.default_rng(7)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value.astype(value.dtype if value.dtype == np.int64 else np.float32), name)

    norms = channels if groups is None else groups
    inits = [
        const("w1", rng.standard_normal((channels, 8, 3, 3)) / 6),
        const("w2", rng.standard_normal((channels, channels, 3, 3)) / 12),
        const("b1", rng.standard_normal(channels) + 2.0),  # a mean away from zero
        const("scale", rng.uniform(0.5, 1.5, norms)),
        const("shift", rng.uniform(-0.5, 0.5, norms)),
        const("gamma", rng.uniform(0.5, 1.5, (channels, 1, 1))),
        const("beta", rng.uniform(-0.5, 0.5, (channels, 1, 1))),
        const("groups", np.array([0, norms, -1], np.int64)),
    ]
    three = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], **three)]
    if groups is None:
        nodes.append(helper.make_node("InstanceNormalization", ["c", "scale", "shift"], ["n"], epsilon=1e-5))
    else:
        nodes += [
            helper.make_node("Reshape", ["c", "groups"], ["g"]),
            helper.make_node("InstanceNormalization", ["g", "scale", "shift"], ["i"], epsilon=1e-5),
            helper.make_node("Shape", ["c"], ["shape"]),
            helper.make_node("Reshape", ["i", "shape"], ["back"]),
            helper.make_node("Mul", ["back", "gamma"], ["m"]),
            helper.make_node("Add", ["m", "beta"], ["n"]),
        ]
    nodes += [helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], **three)]
    return _model(nodes, [1, 8, size, size], inits)


@pytest.mark.parametrize("groups", [4, 1, 16, None])
def test_group_norms_between_convolutions_stay_channels_last_and_agree(groups):
    # A group norm read its map in channels-first order (the exporters' reshape to
    # [N, G, -1]): between channels-last convolutions it was a transpose to channels-first
    # and one back (BiT's 13 group norms: 8.4 of 37 ms at batch 1). As per-channel
    # statistics (onnx_simplify) it reads the channels-last map as it is. An instance
    # norm of its own (None) is TVM's decomposition, which stays channels-last too.
    compiled, error = _run(group_norm_block(groups), [1, 8, 12, 12])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    # The image's transpose in and the output's transpose out; none in between, and the
    # normalized map written as the ReLU leaves it (not transposed after it).
    assert len([name for name in rules if name.startswith("transpose")]) == 2, rules
    assert not any("relu_transpose" in name for name in rules), rules
    assert not any(rule == "none" for rule in rules.values()), rules


def padded_pool(value: float, mode: str = "constant", pads: tuple[int, ...] = (0, 0, 1, 1, 0, 0, 1, 1)) -> onnx.ModelProto:
    """conv, an explicit ``Pad`` of its output (BiT's stem before its max pool), a 3 x 3
    stride-2 max pool, a 1 x 1 conv."""
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) / 6).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) / 4).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(pads, np.int64), "pads"),
        numpy_helper.from_array(np.array(value, np.float32), "value"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c", "pads", "value"], ["p"], mode=mode),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["m", "w2"], ["y"]),
    ]
    return _model(nodes, [1, 8, 14, 14], inits)


def test_a_zero_pad_between_convolutions_stays_channels_last_and_agrees():
    # TVM's layout conversion has no rule for pad: the pad went back to channels-first
    # between two transposes, and the max pool after it stayed there, unscheduled (BiT's
    # stem at batch 8: 4.3 + 1.4 ms of 250).
    compiled, error = _run(padded_pool(0.0), [1, 8, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    pools = [rule for name, rule in rules.items() if "max_pool2d" in name]
    assert pools == ["channels-last window"], rules
    assert len([name for name in rules if "transpose" in name]) == 2, rules


@pytest.mark.parametrize(
    ("value", "mode", "pads"),
    [
        (1.5, "constant", (0, 0, 1, 1, 0, 0, 1, 1)),  # not zero: stays a pad of its own
        (0.0, "reflect", (0, 0, 1, 1, 0, 0, 1, 1)),
        (0.0, "constant", (0, 0, 1, 0, 0, 0, 2, 1)),  # uneven
        (0.0, "constant", (0, 0, 0, 0, 0, 0, 0, 0)),  # nothing: the input itself
        (0.0, "constant", (0, 0, -1, 0, 0, 0, 0, -1)),  # a crop
    ],
)
def test_other_pads_between_convolutions_agree(value, mode, pads):
    _, error = _run(padded_pool(value, mode, pads), [1, 8, 14, 14])
    assert error < TOLERANCE.rtol


def test_lower_rank_constants_of_binary_ops_take_the_channels_last_layout():
    # A per-channel constant [C, 1, 1] (a layer scale) has fewer axes than the map: TVM's
    # layout conversion took the op back to channels-first, between two transposes.
    rng = np.random.default_rng(9)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) / 6).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) / 4).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (16, 1, 1)).astype(np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["scale", "c"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    compiled, error = _run(_model(nodes, [1, 8, 14, 14], inits), [1, 8, 14, 14])
    assert error < TOLERANCE.rtol
    rules = _rules(compiled)
    assert len([name for name in rules if "transpose" in name]) == 2, rules


def _scheduled_windows(model, shape, rule="channels-last window"):
    """:func:`_run`'s ``(compiled, error)``, and the script of each PrimFunc our ``rule``
    (the window rule) scheduled (after the scheduling pass)."""
    import tvm
    from tvm import tirx

    scripts: dict[str, str] = {}

    @tvm.instrument.pass_instrument
    class Scheduled:
        def run_after_pass(self, mod, info):
            if info.name == "RewriterCpuSchedule":
                for gv, func in mod.functions_items():
                    if isinstance(func, tirx.PrimFunc):
                        scripts[gv.name_hint] = func.script()

    with tvm.transform.PassContext(opt_level=3, instruments=[Scheduled()]):
        compiled, error = _run(model, shape)
    return (compiled, error), {name: scripts[name] for name, by in _rules(compiled).items() if by == rule}


STREAMED = [
    pytest.param([4, 48, 16, 16], 3, 2, id="3x3-stride2"),
    pytest.param([4, 32, 14, 14], 3, 1, id="3x3"),
    pytest.param([2, 32, 48, 48], 5, 1, id="5x5"),  # its padded copy past WINDOW_BLOCK_BYTES: inlined
]


@pytest.mark.parametrize(("shape", "kernel", "stride"), STREAMED)
@pytest.mark.parametrize("symbolic", [False, True], ids=["fixed", "symbolic"])
def test_windows_that_stream_their_input_prefetch_rows_ahead_in_one_vector_tiles_and_agree(
    monkeypatch, shape, kernel, stride, symbolic
):
    """Where a window streams its input (STREAM_BYTES_BY_CPU: here every batch),
    each tile prefetches the input rows its next output row adds, and its tiles are one
    vector (16 channels) wide; the output agrees with ORT, border rows and the last row
    (whose prefetches are clamped into the image) included."""
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 1)
    model = conv_model(shape, shape[1], kernel, stride, kernel // 2, shape[1])
    if symbolic:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    (_, error), windows = _scheduled_windows(model, shape)
    assert error < TOLERANCE.rtol
    (script,) = windows.values()
    assert "llvm.prefetch" in script
    assert re.search(r"T\.vectorized\(T\.int64\(16\)\)", script) and "T.vectorized(T.int64(32))" not in script


def test_windows_stream_only_over_a_batch_and_only_where_tuned_so():
    """A window over one image keeps its widest tiles, unprefetched; and streaming is
    tuned per CPU: on for Zen 4, off for Sapphire Rapids (measured with 2 MiB of L2)."""
    from rewriter.backends.tvm import targets

    shape = [1, 32, 14, 14]
    (_, error), windows = _scheduled_windows(conv_model(shape, 32, 3, 1, 1, 32), shape)
    assert error < TOLERANCE.rtol and "llvm.prefetch" not in next(iter(windows.values()))
    assert conv.stream_bytes(targets.resolve("zen4")) > 0
    assert conv.stream_bytes(targets.resolve("sapphirerapids")) == 0


def test_streamed_windows_keep_their_tiles_where_rows_do_not_tile_or_no_weight(monkeypatch):
    """Streaming narrows a window's tiles for its rows' prefetch, which needs row tiles:
    a depthwise conv over 13 x 13 (a prime row: flattened pixels) keeps its unstreamed
    32-channel tiles (27 x 27 x 192 at batch 8: 0.83 -> 0.43 ms). A pool (no weight)
    keeps its widest tiles, unprefetched (ResNet-18's max pool: 1.46x slower streamed)."""
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 1)
    ragged = [4, 32, 13, 13]
    (_, error), windows = _scheduled_windows(conv_model(ragged, 32, 3, 1, 1, 32), ragged)
    assert error < TOLERANCE.rtol
    (script,) = windows.values()
    assert "llvm.prefetch" not in script and "T.vectorized(T.int64(32))" in script
    shape = [4, 64, 17, 17]  # 8 x 8 pooled: 4 x 64 row tiles
    pool = pooled(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2]), shape)
    (_, error), windows = _scheduled_windows(pool, shape)
    assert error < TOLERANCE.rtol
    (script,) = windows.values()
    assert "llvm.prefetch" not in script and "T.vectorized(T.int64(64))" in script


POINTWISE_STREAMED = [
    pytest.param([4, 48, 14, 14], 32, 1, id="one-panel"),
    pytest.param([4, 48, 14, 14], 96, 1, id="three-panels"),  # the first panel prefetches
    pytest.param([2, 40, 15, 15], 32, 2, id="stride2"),  # 40 channels: 3 lines a pixel
]


READ, WRITE = "), 0, 3, 1)", "), 1, 3, 1)"  # llvm.prefetch's flags: read or write, into L1


@pytest.mark.parametrize(("shape", "out", "stride"), POINTWISE_STREAMED)
@pytest.mark.parametrize("symbolic", [False, True], ids=["fixed", "symbolic"])
def test_pointwise_convs_that_stream_prefetch_the_next_tiles_input_and_output_and_agree(
    monkeypatch, shape, out, stride, symbolic
):
    """Where a pointwise convolution streams its input and output (STREAM_BYTES_BY_CPU:
    here every batch), its micro-kernel prefetches the next tile's pixels (in the first
    panel of output channels only, under an ``if`` where there are more) and, for
    writing, the next tile's output; the output agrees with ORT (the last tile's
    prefetches clamped into the pixels)."""
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 1)
    model = conv_model(shape, out, 1, stride)
    if symbolic:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    (_, error), convs = _scheduled_windows(model, shape, "conv")
    assert error < TOLERANCE.rtol
    (script,) = convs.values()
    assert READ in script and WRITE in script
    guarded = any(line.strip().startswith("if ") for line in script.splitlines())
    assert guarded == (out > 32), script


def test_a_pointwise_conv_whose_output_alone_streams_prefetches_only_its_output(monkeypatch):
    """16 -> 128 channels: 50 KB of input, 401 KB of output, streaming from 100 KB."""
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 100 << 10)
    shape = [4, 16, 14, 14]
    (_, error), convs = _scheduled_windows(conv_model(shape, 128, 1), shape, "conv")
    assert error < TOLERANCE.rtol
    (script,) = convs.values()
    assert WRITE in script and READ not in script


def test_convs_prefetch_pixels_only_where_pointwise_and_streamed(monkeypatch):
    """A 3 x 3 convolution (its windows overlap: each tile's input mostly read by the
    last; and an image's first, 3 -> 32 channels, ran 1.16x slower with its output
    prefetched), a pointwise one whose ragged tiles (2 x 13 x 13 pixels) are a loop of
    their own, and one under the streaming size keep their micro-kernel unprefetched."""
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 1)
    shape = [4, 32, 14, 14]
    (_, error), convs = _scheduled_windows(conv_model(shape, 32, 3, 1, 1), shape, "conv")
    assert error < TOLERANCE.rtol and "llvm.prefetch" not in next(iter(convs.values()))
    ragged = [2, 32, 13, 13]
    (_, error), convs = _scheduled_windows(conv_model(ragged, 32, 1), ragged, "conv")
    assert error < TOLERANCE.rtol and "llvm.prefetch" not in next(iter(convs.values()))
    monkeypatch.setattr(conv, "stream_bytes", lambda target: 1 << 30)
    (_, error), convs = _scheduled_windows(conv_model(shape, 32, 1), shape, "conv")
    assert error < TOLERANCE.rtol and "llvm.prefetch" not in next(iter(convs.values()))
