"""Transposed convolutions after channels-last ones
(:mod:`rewriter.backends.tvm.relax_passes.conv_transpose`, ``conv.KEEP_FIRST``).

A DPT export (``ConvTranspose2d(k, k, stride=k)`` upsampling after its convolutions)
crashed in VM codegen: the layout conversion gave the transposed convolution its
channels-last input's layout, which TVM does not lower. Non-overlapping blocks are now a
1 x 1 convolution (scheduled) and a depth-to-space; overlapping ones a matmul and an
overlap-add (EnCodec's 1-D decoder ran at 85x ORT's time on TVM's scalar lowering);
grouped and dilated ones stay channels-first. Each agrees with ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE


def upsampling_model(kernel: int, stride: int, pads: int, output_padding: int, groups: int = 1) -> onnx.ModelProto:
    """A 3 x 3 convolution (channels-last here), then ``ConvTranspose`` with a bias."""
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 8, "c")
    up = numpy_helper.from_array(rng.standard_normal((16, 8 // groups, kernel, kernel)).astype(np.float32) / 8, "u")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "c"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node(
            "ConvTranspose",
            ["r", "u", "b"],
            ["y"],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pads] * 4,
            output_padding=[output_padding] * 2,
            group=groups,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "upsampling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [conv, up, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "kernel, stride, pads, output_padding, groups, form",
    [
        (2, 2, 0, 0, 1, "blocks"),
        (4, 4, 0, 0, 1, "blocks"),
        (3, 2, 1, 1, 1, "overlap_add"),
        (4, 2, 1, 0, 1, "overlap_add"),
        (4, 2, 1, 0, 2, "conv2d_transpose"),
    ],
    ids=["2x2-blocks", "4x4-blocks", "overlapping", "overlapping-4x4", "grouped"],
)
def test_a_transposed_convolution_after_channels_last_ones_compiles_and_agrees(
    kernel, stride, pads, output_padding, groups, form
):
    model = upsampling_model(kernel, stride, pads, output_padding, groups)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    names = [*compiled.schedules.scheduled, *compiled.schedules.unscheduled]
    assert any("conv2d_transpose" in name for name in names) == (form == "conv2d_transpose"), names
    assert any("overlap_add" in name for name in names) == (form == "overlap_add"), names
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 8, 10, 12)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        error = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert error < COMPILED_TOLERANCE["float32"].rtol, (batch, error)


def decoder_1d(kernel: int, stride: int, pads: list[int], output_padding: int) -> onnx.ModelProto:
    """``ConvTranspose1d`` with a bias over ``x[batch, 32, frames]`` (EnCodec's upsampling)."""
    rng = np.random.default_rng(0)
    up = numpy_helper.from_array(rng.standard_normal((32, 16, kernel)).astype(np.float32) / 8, "u")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    node = helper.make_node(
        "ConvTranspose", ["x", "u", "b"], ["y"], strides=[stride], pads=pads, output_padding=[output_padding]
    )
    graph = helper.make_graph(
        [node],
        "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, "frames"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [up, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "kernel, stride, pads, output_padding",
    [(16, 8, [0, 0], 0), (10, 5, [2, 3], 0), (3, 2, [1, 1], 1), (3, 1, [1, 1], 0)],
    ids=["encodec-16-8", "padded", "output-padding", "stride-1"],
)
def test_a_1d_transposed_convolution_is_a_matmul_and_an_overlap_add_at_any_length(
    kernel, stride, pads, output_padding
):
    model = decoder_1d(kernel, stride, pads, output_padding)
    compiled = backend.compile(model, "avx512")  # one library, symbolic batch and frames
    assert compiled.schedules is not None
    assert compiled.schedules.unscheduled == []
    assert "matmul" in compiled.schedules.scheduled.values()
    rules = {rule for name, rule in compiled.schedules.scheduled.items() if "overlap_add" in name}
    # Elementwise (the taps a sum of terms), not the row reduction's one output per row,
    # whose index divided by the symbolic length (4-5x the fixed-size time).
    assert rules == {"elementwise"}, compiled.schedules.scheduled
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, frames in ((1, 75), (3, 40)):
        x = np.random.default_rng(frames).standard_normal((batch, 32, frames)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        error = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert error < COMPILED_TOLERANCE["float32"].rtol, (batch, frames, error)
