"""Constant folding through our kernels (:mod:`rewriter.backends.tvm.relax_passes.fold_constant`).

An attention whose queries, keys and values are all weights (DETR's first decoder
self-attention at a fixed batch: object queries over a zero target) reaches the fused
attention kernel with constant arguments. TVM's ``FoldConstant`` JIT-compiled the kernel
for plain ``llvm`` and LLVM aborted the process; now the kernel is built for the target
and folded, or, where this CPU cannot run the target's code, left in the library.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import cpu_features  # noqa: E402
from rewriter.backends.tvm.ops.softmax_attention import KERNEL_NAME  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402

SHAPE = [1, 4, 100, 64]  # past the ONNX optimizer's folding size: TVM sees the attention


def constant_attention() -> onnx.ModelProto:
    """``softmax(q kᵀ / 8) v + x`` with q, k, v weights, after two-pass-softmax."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(SHAPE).astype(np.float32), name) for name in "qkv"]
    weights.append(numpy_helper.from_array(np.array(0.125, np.float32), "scale"))
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["attended"]),
        helper.make_node("Add", ["attended", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewritten = create_pass("two-pass-softmax")(ir.serde.deserialize_model(model)).model
    return ir.serde.serialize_model(rewritten)


def run(compiled, model: onnx.ModelProto) -> None:
    feeds = {"x": np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)}
    expected = verify.run(model.SerializeToString(), feeds)["y"]
    got = compiled.run(feeds)["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_an_attention_of_weights_is_folded_with_the_kernel_built_for_the_target() -> None:
    model = constant_attention()
    compiled = backend.compile(model, target="avx512")  # aborted the process before
    run(compiled, model)
    assert not any(name.startswith(KERNEL_NAME) for name in compiled.schedules.scheduled)


def test_where_this_cpu_cannot_run_the_target_the_kernel_stays_in_the_library(monkeypatch) -> None:
    monkeypatch.setattr(cpu_features, "missing", lambda features, flags=None: ["amx-tile"])
    model = constant_attention()
    compiled = backend.compile(model, target="avx512")
    assert any(name.startswith(KERNEL_NAME) for name in compiled.schedules.scheduled)
    monkeypatch.undo()
    run(compiled, model)
