"""3-D convolutions as 2-D ones over their depth taps
(:mod:`rewriter.backends.tvm.relax_passes.conv_depth`).

TVM's default ``conv3d`` ran torchvision's R3D-18 at 60x ONNX Runtime's time; as 2-D
convolutions over stacked taps every one is scheduled by our convolution rules. Each
form (strides, padding and dilation in depth, one tap, grouped, depthwise, symbolic
frames) agrees with ONNX Runtime, and no ``conv3d`` is left to TVM's default lowering.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE


def conv3d_model(
    channels: int,
    outputs: int,
    kernel: tuple[int, int, int],
    *,
    strides: tuple[int, int, int] = (1, 1, 1),
    pads: tuple[int, ...] = (0,) * 6,
    dilations: tuple[int, int, int] = (1, 1, 1),
    groups: int = 1,
    shape: list[int | str],
) -> onnx.ModelProto:
    """One ONNX ``Conv`` over ``x[shape]`` (NCDHW) with a bias, then a ReLU."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((outputs, channels // groups, *kernel)).astype(np.float32) / 8
    bias = rng.standard_normal(outputs).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["c"],
            kernel_shape=list(kernel),
            strides=list(strides),
            pads=list(pads),
            dilations=list(dilations),
            group=groups,
        ),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv3d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _assert_agrees(model: onnx.ModelProto, compiled: backend.Compiled, shapes: list[tuple[int, ...]]) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = np.random.default_rng(len(shape) + sum(shape)).standard_normal(shape).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape, (shape, got.shape, reference.shape)
        error = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert error < COMPILED_TOLERANCE["float32"].rtol, (shape, error)


CASES = {
    # R3D-18's stem: 3 x 7 x 7 taps, stride 2 in height and width, padded in depth.
    "stem": dict(channels=3, outputs=16, kernel=(3, 7, 7), strides=(1, 2, 2), pads=(1, 3, 3) * 2, shape=[1, 3, 4, 20, 20]),
    # 3 x 3 x 3 with 32 channels each way over 8 frames: the 2-D one goes by Winograd.
    "3x3x3": dict(channels=32, outputs=32, kernel=(3, 3, 3), pads=(1,) * 6, shape=[1, 32, 4, 12, 12]),
    "strided-in-depth": dict(channels=8, outputs=16, kernel=(3, 3, 3), strides=(2, 2, 2), pads=(1,) * 6, shape=[2, 8, 7, 9, 9]),
    "one-tap": dict(channels=8, outputs=16, kernel=(1, 1, 1), strides=(2, 2, 2), shape=[1, 8, 5, 9, 9]),
    "temporal": dict(channels=8, outputs=8, kernel=(3, 1, 1), pads=(1, 0, 0) * 2, shape=[1, 8, 5, 6, 6]),
    "grouped-dilated": dict(channels=16, outputs=16, kernel=(3, 3, 3), pads=(2, 1, 1) * 2, dilations=(2, 1, 1), groups=4, shape=[1, 16, 6, 8, 8]),
    # One input channel (a medical volume): its taps stacked, 3 channels, as an image's.
    "one-channel": dict(channels=1, outputs=8, kernel=(3, 3, 3), pads=(1,) * 6, shape=[1, 1, 5, 8, 8]),
    "depthwise": dict(channels=16, outputs=16, kernel=(3, 3, 3), pads=(1,) * 6, groups=16, shape=[1, 16, 5, 8, 8]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_conv3d_runs_as_scheduled_conv2ds_and_agrees(case):
    options = dict(CASES[case])
    shape = options.pop("shape")
    model = conv3d_model(**options, shape=shape)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    assert compiled.schedules.unscheduled == [], compiled.schedules.unscheduled
    rules = set(compiled.schedules.scheduled.values())
    assert rules & {"conv", "channels-last window", "matmul"}, rules  # (Winograd's products: matmul)
    assert not any("conv3d" in name for name in compiled.schedules.scheduled), compiled.schedules.scheduled
    _assert_agrees(model, compiled, [tuple(shape)])


def test_a_conv3d_over_symbolic_batch_and_frames_agrees_at_every_length():
    # Depth slices of a run-time length (assumed in bounds: they are, by the output's
    # length) rather than clipped, whose shapes TVM could not carry.
    model = conv3d_model(8, 16, (3, 3, 3), strides=(2, 1, 1), pads=(1,) * 6, shape=["batch", 8, "frames", 10, 10])
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    _assert_agrees(model, compiled, [(1, 8, 5, 10, 10), (2, 8, 8, 10, 10), (1, 8, 1, 10, 10)])


@pytest.mark.slow(reason="builds and exports torchvision's R3D-18 (random weights), compiles it (~30 s)")
def test_r3d_18_export_compiles_and_agrees(tmp_path):
    pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.video.r3d_18(weights=None).eval()
    path = tmp_path / "r3d_18.onnx"
    torch.onnx.export(
        module,
        (torch.randn(1, 3, 4, 56, 56),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    model = onnx.load(str(path))
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    _assert_agrees(model, compiled, [(1, 3, 4, 56, 56), (2, 3, 4, 56, 56)])


def test_frames_between_conv3ds_stay_channels_last_under_a_symbolic_batch():
    # Two 3 x 3 x 3 convolutions: the frames between them are channels-last and reshaped
    # into and out of the batch (views), so the only transposes are the model's input
    # and output (NCDHW); channels-first, each convolution's frames went in and out of
    # the batch by transposes, each a kernel of its own under a symbolic batch.
    first = conv3d_model(16, 16, (3, 3, 3), pads=(1,) * 6, shape=["batch", 16, 4, 10, 10])
    second = conv3d_model(16, 16, (3, 3, 3), pads=(1,) * 6, shape=["batch", 16, 4, 10, 10])
    graph = first.graph
    renamed = []
    for node in second.graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = [{"x": "y", "w": "w2", "b": "b2", "c": "c2"}.get(n, n) for n in node.input]
        node.output[:] = [{"c": "c2", "y": "z"}.get(n, n) for n in node.output]
        renamed.append(node)
    graph.node.extend(renamed)
    for tensor in second.graph.initializer:
        tensor.name += "2"
        graph.initializer.append(tensor)
    graph.output[0].name = "z"
    compiled = backend.compile(first, "avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    names = list(compiled.schedules.scheduled)
    assert sum("transpose" in name for name in names) <= 2, names
    session = ort.InferenceSession(first.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 16, 4, 10, 10)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        error = float(np.abs(compiled.run({"x": x})["z"] - reference).max() / np.abs(reference).max())
        assert error < COMPILED_TOLERANCE["float32"].rtol, (batch, error)
