"""Activations compiled through their fast ``exp``/``tanh``/``erf`` forms
(:mod:`rewriter.backends.tvm.relax_passes.activations`): the compiled function is the fast form, not a libm
call per element, and agrees with ONNX Runtime within the compiled tolerance."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm import verify

TOLERANCE = verify.COMPILED_TOLERANCE["float32"]


@pytest.mark.parametrize(
    ("op", "attributes", "fast"),
    [
        ("Sigmoid", {}, "fast_tanh"),
        ("Gelu", {}, "fast_erf"),
        ("Gelu", {"approximate": "tanh"}, "fast_tanh"),
    ],
)
def test_activation_compiles_to_its_fast_form_and_agrees(op, attributes, fast):
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attributes)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 4).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    compiled = backend.compile(model, "avx512")
    got = compiled.run({"x": x})["y"]
    assert np.abs(got - expected).max() <= TOLERANCE.rtol * np.abs(expected).max()
    assert compiled.schedules is not None
    assert any(fast in name for name in compiled.schedules.scheduled), compiled.schedules.scheduled
