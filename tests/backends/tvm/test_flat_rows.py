"""Matmuls over two symbolic leading axes on their rows flattened
(:mod:`rewriter.backends.tvm.relax_passes.flat_rows`).

A sequence-first projection (``x[frames, batch, K] @ W``, as ``nn.MultiheadAttention``
writes them) of a model compiled for any batch and length: the matmul rule took the
batch as its rows, 8 rows computed for each row of a batch of 1. Flattened, the rows are
``frames x batch``. Each compiled model agrees with ONNX Runtime at several sizes.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE


def projection_model(sequence_first: bool) -> onnx.ModelProto:
    """``x[batch, frames, 64]`` (transposed to ``[frames, batch, 64]`` where
    ``sequence_first``) projected by a 64 x 48 weight plus a bias, then ReLU."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32) / 8, "w")
    bias = numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b")
    nodes = []
    source = "x"
    if sequence_first:
        nodes.append(helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]))
        source = "t"
    nodes += [
        helper.make_node("MatMul", [source, "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "frames", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_inputs(
    model: onnx.ModelProto, target: str = "avx512"
) -> tuple[backend.Compiled, list[int]]:
    """The model compiled without dims, and the rank of each matmul's first operand after
    ``FlattenSymbolicRows`` (none where the pass did not run)."""
    from tvm import relax

    ranks: list[int] = []

    @tvm.instrument.pass_instrument
    class Ranks:
        def run_after_pass(self, mod, info):
            if info.name != "FlattenSymbolicRows":
                return
            for _, func in mod.functions_items():
                if not isinstance(func, relax.Function):
                    continue
                for block in func.body.blocks:
                    for binding in block.bindings:
                        value = binding.value
                        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.matmul":
                            ranks.append(len(value.args[0].ty.shape.values))

    with tvm.transform.PassContext(opt_level=3, instruments=[Ranks()]):
        compiled = backend.compile(model, target)
    return compiled, ranks


def _assert_agrees(model: onnx.ModelProto, compiled: backend.Compiled) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, frames in [(1, 49), (3, 17), (8, 5)]:
        x = rng.standard_normal((batch, frames, 64)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        error = float(np.abs(got - reference).max() / np.abs(reference).max())
        assert error < COMPILED_TOLERANCE["float32"].rtol, (batch, frames, error)


def test_a_sequence_first_projection_runs_on_flattened_rows_and_agrees():
    model = projection_model(sequence_first=True)
    compiled, ranks = _matmul_inputs(model)
    assert ranks == [2], ranks  # [frames * batch, 64], not [frames, batch, 64]
    _assert_agrees(model, compiled)


def test_a_batch_first_projection_keeps_its_tokens_as_rows():
    model = projection_model(sequence_first=False)
    compiled, ranks = _matmul_inputs(model)
    assert ranks == [3], ranks
    _assert_agrees(model, compiled)
    # Its bias and ReLU stay in the matmul's function.
    assert compiled.schedules is not None
    assert any(
        "matmul" in name and "relu" in name for name in compiled.schedules.scheduled
    ), compiled.schedules.scheduled


@pytest.mark.parametrize("frames", [16, "frames"])
def test_one_symbolic_axis_is_left_to_the_matmul_rule(frames):
    # [frames, batch, 64] with static frames: the rule takes the frames as rows already.
    model = projection_model(sequence_first=True)
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, frames, 64])
    )
    _, ranks = _matmul_inputs(model)
    assert ranks == [3], ranks


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not on PATH: TVM cannot build CUDA code"
)
def test_cuda_targets_leave_the_leading_axes_to_dlight():
    # dlight's matmul rule fuses every leading axis of the rows itself; the pass is ours
    # for the CPU matmul rule only.
    _, ranks = _matmul_inputs(projection_model(sequence_first=True), "cuda")
    assert ranks == [], ranks
