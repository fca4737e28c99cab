"""ONNX ``Einsum`` of two operands as one matmul (:mod:`rewriter.backends.tvm.einsum`).

TVM's own lowering of ``Einsum`` is a scalar loop nest no schedule takes (XLNet's
TorchScript export ran at 8.6x ONNX Runtime's time). Each contraction form below
compiles to a scheduled matmul and agrees with ONNX Runtime, at fixed and symbolic
sizes; the forms left to TVM still compile.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402


def einsum_model(equation: str, a: list, b: list | None, constant_b: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, a)]
    initializers = []
    names = ["a"]
    if b is not None:
        names.append("b")
        if constant_b:
            weight = np.random.default_rng(2).standard_normal(b).astype(np.float32)
            initializers.append(onnx.numpy_helper.from_array(weight, "b"))
        else:
            inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, b))
    graph = helper.make_graph(
        [helper.make_node("Einsum", names, ["y"], equation=equation)],
        "einsum",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def check(model: onnx.ModelProto, shapes: list[dict[str, list[int]]]):
    compiled = backend.compile(model, target="avx512")
    rng = np.random.default_rng(0)
    for shape in shapes:
        feeds = {name: rng.standard_normal(dims).astype(np.float32) for name, dims in shape.items()}
        expected = verify.run(model.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    return compiled


@pytest.mark.parametrize(
    ("equation", "a", "b", "constant_b"),
    [
        ("ibnd,jbnd->bnij", [5, 2, 3, 16], [6, 2, 3, 16], False),  # XLNet's scores
        ("bnij,jbnd->ibnd", [2, 3, 5, 6], [6, 2, 3, 16], False),  # XLNet's attention output
        ("ijbs,ibns->bnij", [5, 6, 2, 3], [5, 2, 4, 3], False),  # XLNet's segment term
        ("ibh,hnd->ibnd", [5, 2, 32], [32, 3, 16], True),  # a projection by a 3-D weight
        ("ibnd,hnd->ibh", [5, 2, 3, 16], [32, 3, 16], True),
        ("bhwc,hkc->bhwk", [2, 4, 5, 16], [4, 6, 16], False),  # SAM's relative positions
        ("bij,bjk->bik", [2, 3, 4], [2, 4, 5], False),
        ("ij,jk", [3, 4], [4, 5], False),  # implicit output
        ("abc,cd->d", [2, 3, 4], [4, 5], False),  # indices of one operand summed first
        ("ij,kj->ikj", [3, 4], [5, 4], False),  # no contraction
    ],
)
def test_einsum_is_a_scheduled_matmul_and_agrees(equation, a, b, constant_b) -> None:
    model = einsum_model(equation, a, b, constant_b)
    shape = {"a": a} if constant_b else {"a": a, "b": b}
    compiled = check(model, [shape])
    inputs, _, out = equation.partition("->")
    left, right = inputs.split(",")
    if any(c in right and c not in out for c in left) or not out:  # a contraction: a matmul
        assert "matmul" in compiled.schedules.scheduled.values()
    assert not any("einsum" in name for name in compiled.schedules.unscheduled)


def test_einsum_at_symbolic_sizes() -> None:
    model = einsum_model("ibnd,jbnd->bnij", ["i", "b", 3, 16], ["j", "b", 3, 16])
    compiled = check(
        model,
        [{"a": [5, 2, 3, 16], "b": [6, 2, 3, 16]}, {"a": [9, 1, 3, 16], "b": [4, 1, 3, 16]}],
    )
    assert not any("einsum" in name for name in compiled.schedules.unscheduled)


@pytest.mark.parametrize(
    ("equation", "a", "b"),
    [("...ij,...jk->...ik", [2, 3, 4], [2, 4, 5]), ("ii,ij->ij", [3, 3], [3, 4]), ("ij->ji", [3, 4], None)],
)
def test_einsum_forms_left_to_tvm_still_compile(equation, a, b) -> None:
    shape = {"a": a} if b is None else {"a": a, "b": b}
    check(einsum_model(equation, a, b), [shape])
