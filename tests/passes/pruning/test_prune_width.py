"""Tests of ``prune-width``: GLU and plain MLPs lose hidden channels, shapes really shrink."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run, to_proto
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import InputError
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning import prune_width

D, H = 8, 16


def glu_model(*, leak: bool = False, transpose: bool = False) -> ir.Model:
    """y = (silu(x @ Wg) * (x @ Wu)) @ Wd with silu = g * Sigmoid(g); x [2, 3, D].

    ``leak`` also makes the product a graph output (so the MLP cannot shrink);
    ``transpose`` puts a Transpose between the up projection and the product.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), name)
        for name in ("Wg", "Wu")
    ] + [numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32), "Wd")]
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["g", "s"], ["a"]),
        helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
    ]
    if transpose:
        nodes.append(helper.make_node("Transpose", ["u"], ["t"], perm=[0, 1, 2]))
    nodes.append(helper.make_node("Mul", ["a", "t" if transpose else "u"], ["p"]))
    nodes.append(helper.make_node("MatMul", ["p", "Wd"], ["y"], name="down"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, D])]
    if leak:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 3, H]))
    graph = helper.make_graph(
        nodes,
        "glu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, D])],
        outputs,
        inits,
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, H]) for n in "gsau"],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def gelu_mlp_model() -> ir.Model:
    """BERT's MLP as the TorchScript exporter writes it: (x @ W1 + b1) -> erf GELU -> @ W2 + b2, Gemm-free."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(math.sqrt(2), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"], name="up"),
        helper.make_node("Add", ["b1", "m"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["f"]),
        helper.make_node("Mul", ["h", "f"], ["k"]),
        helper.make_node("Mul", ["k", "half"], ["a"]),
        helper.make_node("MatMul", ["a", "W2"], ["n"], name="down"),
        helper.make_node("Add", ["n", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def weights(m: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in m.graph.initializers.items()}


def x3() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).standard_normal((2, 3, D)).astype(np.float32)}


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def test_glu_shrinks_by_maw_and_computes_the_kept_channels() -> None:
    m = glu_model()
    before, types = weights(m), op_types(m)
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.5))(m)
    assert result.stats == {
        "glu_pruned": 1,
        "mlp_pruned": 0,
        "channels_before": H,
        "channels_after": H // 2,
        "params_removed": 3 * D * H // 2,
    }
    assert result.tables["mlps"] == [
        {
            "down": "down",
            "kind": "glu",
            "hidden": H,
            "kept": H // 2,
            "params_removed": 3 * D * H // 2,
        }
    ]
    scores = np.abs(before["Wg"]).max(axis=0) + np.abs(before["Wu"]).max(axis=0)
    keep = np.sort(np.argsort(-scores)[: H // 2])
    after = weights(result.model)
    np.testing.assert_array_equal(after["Wg"], before["Wg"][:, keep])
    np.testing.assert_array_equal(after["Wu"], before["Wu"][:, keep])
    np.testing.assert_array_equal(after["Wd"], before["Wd"][keep])
    assert op_types(result.model) == types
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"] and [
        o.name for o in proto.graph.output
    ] == ["y"]
    # Numbers: the smaller model is the dense one restricted to the kept channels.
    # float32 matmuls over 8 terms in a different order: 1e-5 of the output scale.
    x = x3()["x"].astype(np.float64)
    expected = (silu(x @ before["Wg"][:, keep]) * (x @ before["Wu"][:, keep])) @ before["Wd"][keep]
    actual = run(result.model, x3())["y"]
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max())


def test_plain_gelu_mlp_with_biases() -> None:
    m = gelu_mlp_model()
    before = weights(m)
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.25))(m)
    assert result.stats["mlp_pruned"] == 1 and result.stats["channels_after"] == 12
    keep = np.sort(np.argsort(-np.abs(before["W1"]).max(axis=0))[:12])
    after = weights(result.model)
    np.testing.assert_array_equal(after["b1"], before["b1"][keep])
    np.testing.assert_array_equal(after["b2"], before["b2"])
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    x = np.random.default_rng(3).standard_normal((5, D))
    h = x @ before["W1"][:, keep] + before["b1"][keep]
    gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    expected = gelu @ before["W2"][keep] + before["b2"]
    actual = run(result.model, {"x": x.astype(np.float32)})["y"]
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("kind", "reason"), [("leak", "also used outside"), ("transpose", "comes from Transpose")]
)
def test_near_misses_are_left_alone(kind: str, reason: str) -> None:
    m = glu_model(leak=kind == "leak", transpose=kind == "transpose")
    before = weights(m)
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.5))(m)
    assert not result.modified
    assert result.stats["glu_pruned"] == 0
    assert any(reason in note for note in result.notes), result.notes
    for name, weight in weights(result.model).items():
        np.testing.assert_array_equal(weight, before[name])


@pytest.mark.parametrize(
    ("make", "name", "where"),
    [(glu_model, "Wd", "input"), (glu_model, "Wg", "output"), (gelu_mlp_model, "b1", "input")],
)
def test_a_weight_or_bias_that_is_also_a_graph_input_or_output_is_left_alone(make, name: str, where: str) -> None:
    # A graph input is a weight the user may override at run time (valid since IR 4):
    # slicing it would break the declared shape and the override.
    m = make()
    (m.graph.inputs if where == "input" else m.graph.outputs).append(m.graph.initializers[name])
    before = weights(m)
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.5))(m)
    assert not result.modified
    assert any(f"{name!r} is also a graph {where}" in note for note in result.notes), result.notes
    for key, weight in weights(result.model).items():
        np.testing.assert_array_equal(weight, before[key])


def test_ratio_zero_and_multiple() -> None:
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.0))(glu_model())
    assert not result.modified
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.3, multiple=4))(
        glu_model()
    )
    assert result.stats["channels_after"] == 8  # round(0.7 * 16) = 11, down to a multiple of 4
    with pytest.raises(InputError, match="ratio"):
        prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=1.0))(glu_model())


def test_channels_to_keep() -> None:
    assert pruning.channels_to_keep(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 0.4).tolist() == [0, 2, 4]


@pytest.mark.slow  # the dynamo export of the tiny Llama takes 30-100 s on 2 cores
def test_real_llama_glu(real_model) -> None:
    llama = real_model("llama_eager_dynamo")
    m = ir.serde.deserialize_model(onnx.load(llama.path))
    inputs = [(v.name, v.shape) for v in m.graph.inputs]
    outputs = [(v.name, v.shape) for v in m.graph.outputs]
    reference = run(m, llama.inputs)
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.5))(m)
    assert result.stats["glu_pruned"] == 2 and result.stats["channels_after"] == 2 * 64
    assert result.stats["params_removed"] == 2 * 3 * 64 * 64
    assert [(v.name, v.shape) for v in result.model.graph.inputs] == inputs
    assert [(v.name, v.shape) for v in result.model.graph.outputs] == outputs
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    pruned = run(result.model, llama.inputs)
    for name, value in reference.items():
        assert pruned[name].shape == value.shape


def test_real_bert_plain_mlp(real_model) -> None:
    bert = real_model("bert_eager_torchscript")
    m = ir.serde.deserialize_model(onnx.load(bert.path))
    result = prune_width.PruneWidthPass(prune_width.PruneWidthOptions(ratio=0.25))(m)
    assert result.stats["mlp_pruned"] == 2 and result.stats["channels_after"] == 2 * 96
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    assert run(result.model, bert.inputs)["last_hidden_state"].shape == (2, 16, 64)


def test_l2_criterion_and_bad_criterion() -> None:
    m = glu_model()
    before = weights(m)
    options = prune_width.PruneWidthOptions(ratio=0.5, criterion="l2")
    result = prune_width.PruneWidthPass(options)(m)
    scores = np.linalg.norm(before["Wg"], axis=0) + np.linalg.norm(before["Wu"], axis=0)
    keep = np.sort(np.argsort(-scores)[: H // 2])
    np.testing.assert_array_equal(weights(result.model)["Wd"], before["Wd"][keep])
    with pytest.raises(InputError, match="criterion"):
        prune_width.PruneWidthPass(prune_width.PruneWidthOptions(criterion="random"))(glu_model())
