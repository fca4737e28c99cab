"""The registry of op lowerings (:mod:`rewriter.backends.tvm.ops`): one entry per op, found
by its ONNX op type and by its torch op, with what ``prepare`` needs to know."""

from __future__ import annotations

import onnx
import pytest

from rewriter.backends.tvm import ops


def test_every_lowered_op_is_registered_once_by_name():
    assert sorted(ops.lowerings()) == [
        "FusedCrossEntropy",
        "FusedLinearCrossEntropy",
        "Int8MatMul",
        "SigmoidAttention",
        "SoftNonMaxSuppression",
        "SoftmaxAttention",
        "TwoPassLogSoftmax",
        "TwoPassLogSoftmaxDouble",
        "TwoPassSoftmax",
        "TwoPassSoftmaxDouble",
    ]
    assert ops.lowering("SoftmaxFreeAttention") is None  # compiled from its function body
    softmax = ops.lowering("TwoPassSoftmax")
    assert softmax is not None and softmax.renamed == "ai.rewriter::TwoPassSoftmax"
    with pytest.raises(ValueError, match="two lowerings"):
        ops.register("TwoPassSoftmax")(lambda call: None)


def test_torch_ops_find_the_same_lowering_as_onnx_ops():
    by_torch = ops.torch_lowerings()
    assert set(by_torch) == {"rewriter::two_pass_softmax", "rewriter::two_pass_log_softmax"}
    assert by_torch["rewriter::two_pass_softmax"] is ops.lowering("TwoPassSoftmax")
    assert by_torch["rewriter::two_pass_log_softmax"] is ops.lowering("TwoPassLogSoftmax")


def test_registered_torch_ops_are_the_fx_fronts():
    torch = pytest.importorskip("torch")
    import rewriter.fx  # noqa: F401  (defines torch.ops.rewriter.*)

    for name in ops.torch_lowerings():
        namespace, _, op = name.partition("::")
        overload = getattr(getattr(torch.ops, namespace), op).default
        assert overload._schema.name == name


def test_prepare_gets_static_kernels_cpu_only_kernels_and_options():
    softmax, attention = ops.lowering("TwoPassSoftmax"), ops.lowering("SigmoidAttention")
    loss = ops.lowering("FusedCrossEntropy")
    assert softmax is not None and attention is not None and loss is not None
    assert softmax.refusal is None and attention.refusal is not None and loss.refusal is not None
    everything = {"fuse_attention": True, "fuse_loss": True}
    assert softmax.wanted(everything, gpu=True)
    assert attention.wanted(everything, gpu=True) and not loss.wanted(everything, gpu=True)
    assert loss.wanted(everything, gpu=False)
    assert not loss.wanted({**everything, "fuse_loss": False}, gpu=False)
    assert not attention.wanted({**everything, "fuse_attention": False}, gpu=False)


def test_a_kernel_keeps_the_librarys_functions_noalias(tmp_path):
    # Our kernels said "tir.noalias" (TVM's old name): one such function in a module made
    # TVM's LLVM codegen drop every function's ``_compute_`` part, whose pointers are
    # noalias, and the matmul's register tile (a TVMBackendAllocWorkspace buffer) was
    # stored after every FMA (wav2vec2's fixed library with its softmax rewritten ran its
    # convolutions and matmuls at 2x their time).
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from rewriter.backends import tvm as backend
    from rewriter.job import rewrite_file

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        [weight],
    )
    source, rewritten = tmp_path / "m.onnx", tmp_path / "tp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    rewrite_file(source, rewritten, "two-pass-softmax")
    compiled = backend.compile(rewritten, "avx512")
    assert compiled.schedules is not None and "rewriter_two_pass_softmax" in compiled.schedules.scheduled
    llvm_ir = compiled.executable.mod.imports[0].inspect_source("ll")
    assert "@matmul_packed_compute_(ptr noalias" in llvm_ir
