"""Pools whose one window covers the map as global pools
(:mod:`rewriter.backends.tvm.relax_passes.global_pools`).

HF EfficientNet's head, ``AvgPool2d(2560, ceil_mode=True)`` over a 7 x 7 map: TVM padded
the map to the window (67 GB) and the library failed with ``std::bad_alloc``. Each form
agrees with ONNX Runtime; a pool whose divisor counts explicit padding keeps its form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE


def pool_model(op: str, shape: list[int | str], **attributes: object) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attributes)],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    # EfficientNet's head, at its width: a window of 2560 over 7 x 7.
    "average-ceil": ("AveragePool", ["batch", 16, 7, 7], dict(kernel_shape=[2560, 2560], strides=[2560, 2560], ceil_mode=1, count_include_pad=1)),
    "average-exact": ("AveragePool", ["batch", 16, 5, 6], dict(kernel_shape=[5, 6])),
    "average-padded-end": ("AveragePool", [1, 16, 5, 5], dict(kernel_shape=[8, 8], pads=[0, 0, 3, 3])),
    "max-ceil": ("MaxPool", ["batch", 16, 7, 7], dict(kernel_shape=[64, 64], strides=[64, 64], ceil_mode=1)),
    "max-1d": ("MaxPool", [2, 8, 9], dict(kernel_shape=[16], ceil_mode=1, strides=[16])),
    "average-3d": ("AveragePool", [1, 8, 3, 4, 4], dict(kernel_shape=[4, 8, 8], strides=[4, 8, 8], ceil_mode=1)),
}


def _names(compiled: backend.Compiled) -> list[str]:
    assert compiled.schedules is not None
    return [*compiled.schedules.scheduled, *compiled.schedules.unscheduled]


@pytest.mark.parametrize("case", list(CASES))
def test_a_window_over_the_whole_map_is_a_global_pool_and_agrees(case):
    op, shape, attributes = CASES[case]
    model = pool_model(op, shape, **attributes)
    compiled = backend.compile(model, "avx512")
    assert not any("pool" in name and "adaptive" not in name for name in _names(compiled)), _names(compiled)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 2) if shape[0] == "batch" else (shape[0],):
        x = np.random.default_rng(batch).standard_normal([batch, *shape[1:]]).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        np.testing.assert_allclose(got, reference, rtol=COMPILED_TOLERANCE["float32"].rtol, atol=1e-6)


def test_an_average_counting_its_explicit_padding_keeps_its_form():
    model = pool_model("AveragePool", [1, 16, 5, 5], kernel_shape=[8, 8], pads=[0, 0, 3, 3], count_include_pad=1)
    compiled = backend.compile(model, "avx512")
    assert any("avg_pool2d" in name for name in _names(compiled)), _names(compiled)
    x = np.random.default_rng(0).standard_normal((1, 16, 5, 5)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(compiled.run({"x": x})["y"], reference, rtol=1e-5, atol=1e-6)
