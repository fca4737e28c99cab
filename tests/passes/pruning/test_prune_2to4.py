"""Tests of ``prune-2to4``: the 2:4 pattern on MatMul, Gemm and Conv weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run, to_proto
from onnx import TensorProto, helper, numpy_helper

from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning import prune_2to4


def model() -> ir.Model:
    """x [2, 8] -> MatMul W [8, 12] -> Gemm(transB) G [8, 12] -> y; c [1, 8, 5, 5] -> Conv K [4, 8, 3, 3]; plus a MatMul with 6 inputs."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.standard_normal((8, 12)),
        "G": rng.standard_normal((8, 12)),
        "K": rng.standard_normal((4, 8, 3, 3)),
        "S": rng.standard_normal((6, 3)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
        helper.make_node("Gemm", ["h", "G"], ["y"], name="gemm", transB=1),
        helper.make_node("Conv", ["c", "K"], ["z"], name="conv"),
        helper.make_node("MatMul", ["s", "S"], ["t"], name="small"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 5, 5]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 6]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 3, 3]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3]),
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((2, 8)).astype(np.float32),
        "c": rng.standard_normal((1, 8, 5, 5)).astype(np.float32),
        "s": rng.standard_normal((2, 6)).astype(np.float32),
    }


def weights(m: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in m.graph.initializers.items()}


# (initializer, input axis): MatMul [in, out], Gemm transB [out, in], Conv [out, in, kh, kw].
AXES = {"W": 0, "G": 1, "K": 1}


def assert_two_four(before: np.ndarray, after: np.ndarray, axis: int) -> None:
    groups_before = np.moveaxis(before, axis, -1).reshape(-1, 4)
    groups_after = np.moveaxis(after, axis, -1).reshape(-1, 4)
    for original, pruned in zip(groups_before, groups_after, strict=True):
        kept = np.flatnonzero(pruned)
        assert kept.size == 2
        np.testing.assert_array_equal(pruned[kept], original[kept])
        assert np.abs(original[kept]).min() >= np.abs(np.delete(original, kept)).max()


def test_two_four_pattern_holds_exactly() -> None:
    m = model()
    before, types = weights(m), op_types(m)
    result = prune_2to4.Prune2to4Pass()(m)
    after = weights(result.model)
    assert result.modified
    for name, axis in AXES.items():
        assert_two_four(before[name], after[name], axis)
    np.testing.assert_array_equal(after["S"], before["S"])
    assert result.stats == {
        "layers_sparsified": 3,
        "layers_skipped": 1,
        "params_total": 96 + 96 + 288,
        "params_zeroed": (96 + 96 + 288) // 2,
    }
    assert result.notes == ["layer small: input dimension 6 is not a multiple of 4, left dense"]
    assert [(row["layer"], row["axis"], row["zeros"]) for row in result.tables["layers"]] == [
        ("matmul", 0, 48),
        ("gemm", 1, 48),
        ("conv", 1, 144),
    ]
    assert op_types(result.model) == types
    onnx.checker.check_model(to_proto(result.model), full_check=True)


def test_numbers_equal_the_masked_weights() -> None:
    """The rewritten model is the original with W * mask: exact, the same float ops."""
    m = model()
    before = weights(m)
    reference_model = model()
    for name, axis in AXES.items():
        masked = np.where(pruning.two_four_mask(before[name], axis), before[name], 0).astype(
            np.float32
        )
        reference_model.graph.initializers[name].const_value = ir.Tensor(masked, name=name)
    expected = run(reference_model, feeds())
    actual = run(prune_2to4.Prune2to4Pass()(m).model, feeds())
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_include_and_exclude() -> None:
    options = prune_2to4.Prune2to4Options(include=["matmul", "gemm"], exclude=["gemm"])
    result = prune_2to4.Prune2to4Pass(options)(model())
    assert result.stats["layers_sparsified"] == 1
    after = weights(result.model)
    assert np.count_nonzero(after["W"] == 0) == 48
    assert not np.any(after["G"] == 0) and not np.any(after["K"] == 0)


def test_idempotent() -> None:
    once = prune_2to4.Prune2to4Pass()(model()).model
    first = weights(once)
    again = prune_2to4.Prune2to4Pass()(once)
    assert not again.modified
    for name, weight in weights(again.model).items():
        np.testing.assert_array_equal(weight, first[name])


def test_mask_ties_keep_the_earlier_weights() -> None:
    mask = pruning.two_four_mask(np.array([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 0.0]), 0)
    assert mask.tolist() == [True, True, False, False, False, True, True, False]
    with pytest.raises(ValueError, match="multiple of 4"):
        pruning.two_four_mask(np.zeros(6), 0)


def test_real_bert(real_model) -> None:
    bert = real_model("bert_eager_torchscript")
    m = ir.serde.deserialize_model(onnx.load(bert.path))
    result = prune_2to4.Prune2to4Pass()(m)
    # 2 layers x (q, k, v, o, up, down) and the pooler (a Gemm).
    assert result.stats["layers_sparsified"] == 13
    assert result.stats["params_zeroed"] * 2 == result.stats["params_total"]
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    assert run(result.model, bert.inputs)["last_hidden_state"].shape == (2, 16, 64)


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_weight_that_is_also_a_graph_input_or_output_is_left_dense(where: str) -> None:
    m = model()
    (m.graph.inputs if where == "input" else m.graph.outputs).append(m.graph.initializers["W"])
    before = weights(m)["W"]
    result = prune_2to4.Prune2to4Pass()(m)
    np.testing.assert_array_equal(weights(result.model)["W"], before)
    assert f"layer matmul: its weight is also a graph {where}, left dense" in result.notes
    assert_two_four(weights(model())["G"], weights(result.model)["G"], AXES["G"])
