"""ONNX ``DFT`` through TVM: a transform along one axis as one scheduled matmul.

The dynamo exporter writes every ``torch.fft`` call as ``DFT`` (FNet's token mixing),
which TVM's importer lacks: such models were refused. Each form compiles
(:mod:`rewriter.backends.tvm.spectral`) and agrees with ONNX Runtime, at fixed sizes and
at a symbolic signal length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.errors import InputError  # noqa: E402

TOLERANCE = 1e-5  # of the output's scale


def agree(got: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


def dft_model(
    axes: list[int | str],
    axis: int,
    *,
    inverse: int = 0,
    onesided: int = 0,
    opset: int = 18,
    length: int | None = None,
) -> onnx.ModelProto:
    """One ``DFT`` node over ``x[axes]``: ``axis`` an attribute before opset 20, an input
    from it on; ``length`` the ``dft_length`` input."""
    names, initializers = ["x"], []
    if length is not None:
        initializers.append(helper.make_tensor("length", TensorProto.INT64, [], [length]))
        names.append("length")
    attributes = {"inverse": inverse, "onesided": onesided}
    if opset < 20:
        attributes["axis"] = axis
    else:
        names += [] if length is not None else [""]
        initializers.append(helper.make_tensor("axis", TensorProto.INT64, [], [axis]))
        names.append("axis")
    graph = helper.make_graph(
        [helper.make_node("DFT", names, ["y"], **attributes)],
        "dft",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, axes)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check(model: onnx.ModelProto, shapes: list[list[int]], tolerance: float = TOLERANCE) -> Any:
    compiled = backend.compile(model, target="avx512")
    rng = np.random.default_rng(0)
    for shape in shapes:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        name = model.graph.output[0].name
        agree(compiled.run(feeds)[name], verify.run(model.SerializeToString(), feeds)[name], tolerance)
    return compiled


@pytest.mark.parametrize(
    ("shape", "axis", "options"),
    [
        ([2, 16, 1], 1, {}),  # real in, complex out
        ([2, 16, 2], 1, {}),
        ([2, 16, 2], 1, {"inverse": 1}),
        ([2, 16, 1], 1, {"onesided": 1}),  # torch.fft.rfft: N // 2 + 1 bins
        ([3, 12, 10, 2], 1, {}),  # an inner axis: the matrix on the left
        ([3, 12, 10, 1], 2, {"onesided": 1}),
        ([3, 12, 10, 2], -3, {"inverse": 1, "opset": 20}),  # axis an input, negative
        ([2, 5, 7, 2], 1, {"opset": 20}),
        ([2, 16, 1], 1, {"length": 20}),  # zero-padded
        ([2, 16, 2], 1, {"length": 10}),  # cut
        ([2, 33, 2], 1, {"inverse": 1, "onesided": 1, "length": 64, "opset": 20}),  # irfft
        ([2, 33, 2], 1, {"inverse": 1, "onesided": 1, "opset": 20}),  # N = 2 (33 - 1)
        ([3, 32, 5, 2], 1, {"inverse": 1, "onesided": 1, "length": 63, "opset": 20}),  # odd N
    ],
)
def test_dft_agrees_with_onnx_runtime(shape, axis, options) -> None:
    compiled = check(dft_model(shape, axis, **options), [shape])
    assert compiled.schedules is not None
    assert compiled.schedules.unscheduled == []


@pytest.mark.parametrize(
    ("axes", "axis", "options"),
    [
        (["b", "n", 2], 1, {}),
        (["b", "n", 1], 1, {"inverse": 1}),
        ([2, "n", 1], 1, {"onesided": 1}),
        (["b", "n", 10, 2], 1, {}),
        (["b", "n", 10, 2], 2, {}),  # a fixed length beside a symbolic axis
        (["b", "n", 2], 1, {"inverse": 1, "onesided": 1, "opset": 20}),  # irfft of n bins
    ],
)
def test_dft_at_a_symbolic_length_runs_at_every_length(axes, axis, options) -> None:
    shapes = [[2 if isinstance(d, str) and d == "b" else d for d in axes] for _ in range(3)]
    for shape, size in zip(shapes, (7, 16, 33), strict=True):
        shape[1] = size
    check(dft_model(axes, axis, **options), shapes)  # one library, three lengths


def _length_model(length: onnx.NodeProto | None) -> onnx.ModelProto:
    """``DFT(x, length)`` over ``x[2, n, 1]``, ``length`` made by the node given (from
    ``x``'s shape) or a graph input."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"], start=1, end=2), helper.make_node("Squeeze", ["shape"], ["length"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "n", 1])]
    if length is None:
        nodes = []
        inputs.append(helper.make_tensor_value_info("length", TensorProto.INT64, []))
    graph = helper.make_graph(
        [*nodes, helper.make_node("DFT", ["x", "length"], ["y"], axis=1)],
        "dft",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_dft_length_read_from_the_signal_shape_stays_symbolic() -> None:
    # what the dynamo exporter writes for torch.fft.fft along a dynamic axis
    check(_length_model(helper.make_node("Identity", [], [])), [[2, 7, 1], [2, 30, 1]])


def test_dft_refuses_a_length_given_at_run_time_in_one_line() -> None:
    with pytest.raises(InputError, match="DFT's dft_length is computed at run time"):
        backend.compile(_length_model(None), target="avx512")


def test_torch_fft_exported_by_dynamo_compiles_at_symbolic_sizes() -> None:
    torch = pytest.importorskip("torch")

    class Spectral(torch.nn.Module):
        """FNet's mixing, an rfft/irfft filter, and a magnitude spectrum."""

        def __init__(self) -> None:
            super().__init__()
            self.filter = torch.nn.Parameter(torch.randn(33))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mixed = torch.fft.fft2(x).real  # over the last two axes
            smooth = torch.fft.irfft(torch.fft.rfft(x, dim=-1) * self.filter, n=64, dim=-1)
            return mixed + smooth + torch.fft.fft(x, dim=1).abs()

    torch.manual_seed(0)
    x = torch.randn(2, 24, 64)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        Spectral().eval(), (x,), dynamo=True, dynamic_shapes=({0: batch, 1: sequence},), verbose=False
    )
    model = program.model_proto
    assert "DFT" in {node.op_type for node in model.graph.node}
    # five transforms chained, float32 both sides (ORT's are FFTs): 1.4e-5 of the scale
    check(model, [[1, 24, 64], [3, 40, 64]], tolerance=5e-5)
