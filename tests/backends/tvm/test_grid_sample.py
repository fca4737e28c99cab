"""ONNX ``GridSample`` over 2-D maps through TVM: our kernel, every mode it takes, against
ONNX Runtime, at fixed and symbolic sizes; TVM's converter keeps bicubic sampling.

Deformable DETR's multi-scale deformable attention is ``grid_sample`` of 64-channel
maps (:mod:`rewriter.backends.tvm.grid_sample`); so are RT-DETR's, optical-flow warps
and spatial transformers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import targets  # noqa: E402
from rewriter.backends.tvm.grid_sample import KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.import_onnx import import_onnx  # noqa: E402

# Of the output's scale: the kernel sums a point's taps' products in another order than
# ONNX Runtime (a few float32 ulps of the largest pixel).
TOLERANCE = 1e-6


def grid_sample_model(
    mode: str, padding: str, align_corners: int, *, opset: int = 20, symbolic: bool = True
) -> onnx.ModelProto:
    data = ["n", 3, "h", "w"] if symbolic else [2, 3, 7, 9]
    grid = ["n", "ho", "wo", 2] if symbolic else [2, 5, 6, 2]
    node = helper.make_node(
        "GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align_corners
    )
    graph = helper.make_graph(
        [node],
        "grid_sample",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, data),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, grid),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds_for(batch: int, height: int, width: int, out_height: int, out_width: int, seed: int) -> dict:
    """A map and a grid reaching past its edges (by up to 1.5 map widths, where the
    padding modes differ), with the edges and centres of the corner pixels exactly."""
    rng = np.random.default_rng(seed)
    grid = rng.uniform(-2.5, 2.5, (batch, out_height, out_width, 2)).astype(np.float32)
    grid.reshape(-1)[: 8] = [-1, -1, 1, 1, -1 + 1 / width, 1 - 1 / height, 0, 0]
    return {"x": rng.standard_normal((batch, 3, height, width)).astype(np.float32), "grid": grid}


def agree(compiled, model: onnx.ModelProto, feeds: dict) -> None:
    expected = verify.run(model.SerializeToString(), feeds)["y"]
    got = compiled.run(feeds)["y"]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(feeds["x"]).max() * 4


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
@pytest.mark.parametrize(("mode", "opset"), [("bilinear", 16), ("linear", 20), ("nearest", 20)])
def test_each_mode_agrees_at_symbolic_sizes(mode, opset, padding, align_corners):
    model = grid_sample_model(mode, padding, align_corners, opset=opset)
    compiled = backend.compile(model, target="avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    # Output points a whole number of vectors and not; maps of one row and one column.
    for seed, sizes in enumerate([(1, 7, 9, 4, 8), (2, 5, 3, 7, 5), (1, 1, 6, 3, 3), (3, 6, 1, 2, 9)]):
        agree(compiled, model, feeds_for(*sizes, seed=seed))


def test_a_fixed_size_node_agrees():
    model = grid_sample_model("bilinear", "zeros", 0, opset=16, symbolic=False)
    agree(backend.compile(model, target="avx512"), model, feeds_for(2, 7, 9, 5, 6, seed=1))


@pytest.mark.parametrize(("mode", "ours"), [("linear", True), ("nearest", True), ("cubic", False)])
def test_the_kernel_takes_linear_and_nearest_and_tvm_the_rest(mode, ours):
    mod = import_onnx(grid_sample_model(mode, "zeros", 0), target=targets.resolve("avx512"))
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert (KERNEL_NAME in names) == ours
    assert ("R.image.grid_sample" in mod["main"].script()) != ours  # TVM's op


def test_cubic_sampling_stays_with_tvm_and_agrees():
    model = grid_sample_model("cubic", "border", 0)
    agree(backend.compile(model, target="avx512"), model, feeds_for(1, 7, 9, 4, 8, seed=2))


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_grid_sample_exports_compile_and_agree(tmp_path, dynamo):
    torch = pytest.importorskip("torch")

    class Warp(torch.nn.Module):
        """Samples a projected feature map at offsets predicted from it (deformable-style)."""

        def __init__(self) -> None:
            super().__init__()
            self.project = torch.nn.Conv2d(3, 16, 1)
            self.offsets = torch.nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            grid = torch.tanh(self.offsets(x)).permute(0, 2, 3, 1) * 1.2
            features = self.project(x)
            return torch.nn.functional.grid_sample(features, grid, mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    path = tmp_path / "warp.onnx"
    x = torch.randn(1, 3, 12, 20)
    kwargs = (
        {"dynamic_shapes": {"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}}}
        if dynamo
        else {"dynamic_axes": {"x": {0: "batch", 2: "h", 3: "w"}}}
    )
    torch.onnx.export(
        Warp().eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo, opset_version=18, **kwargs
    )
    model = onnx.load(str(path))
    compiled = backend.compile(model, target="avx512")
    assert compiled.schedules is not None and compiled.schedules.unscheduled == []
    for shape in [(1, 3, 12, 20), (2, 3, 9, 17)]:
        feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        expected = verify.run(model.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
