"""Storages of symbolic size shared between tensors whose lifetimes do not overlap
(:func:`memory_plan.share_symbolic_storage`).

A model compiled for any batch has one storage per distinct activation size from TVM's
planner; the pass gives a dead storage to the next request whose size is a constant
times the same variables. The outputs stay exact (a tensor still live overwritten would
change them): the compiled model agrees with ONNX Runtime at several batch sizes, on a
graph whose early activation stays live (a residual and a view returned at the end).
Tolerance: :data:`COMPILED_TOLERANCE` (float32), see there why.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm.relax_passes import memory_plan
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE
from tests.helpers import run as ort_run

TOLERANCE = COMPILED_TOLERANCE["float32"]
SEED = 0


def branchy_net() -> onnx.ModelProto:
    """Over ``[batch, 4, 16, 16]``: ``r1 = Relu(Conv(x))``; a strided conv, a sigmoid and
    two more convs from it; their sum with ``MaxPool(r1)`` (``r1`` live across them);
    the output concatenates ``r1`` flattened (a view of it) and the sum flattened."""
    rng = np.random.default_rng(SEED)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)

    shape = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "flat"], ["f1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c2"], ["s2"]),
        helper.make_node("Conv", ["s2", "w3"], ["c3"]),
        helper.make_node("Conv", ["c3", "w4"], ["c4"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["c4", "p1"], ["a"]),
        helper.make_node("Reshape", ["a", "flat"], ["g"]),
        helper.make_node("Concat", ["f1", "g"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2560])],
        initializer=[
            weight("w1", 8, 4, 3, 3), weight("w2", 16, 8, 3, 3), weight("w3", 4, 16, 1, 1),
            weight("w4", 8, 4, 3, 3), shape,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def shared() -> backend.Compiled:
    return backend.compile(branchy_net(), "avx512")


@pytest.fixture(scope="module")
def unshared() -> backend.Compiled:
    original = memory_plan.share_symbolic_storage
    memory_plan.share_symbolic_storage = lambda: tvm.transform.Sequential([])
    try:
        return backend.compile(branchy_net(), "avx512")
    finally:
        memory_plan.share_symbolic_storage = original


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_outputs_agree_with_onnx_runtime_at_any_batch(shared, batch):
    feeds = {"x": np.random.default_rng(SEED + batch).standard_normal((batch, 4, 16, 16)).astype(np.float32)}
    ref = ort_run(branchy_net(), feeds)["y"]
    comparison = verify.compare("y", ref, shared.run(feeds)["y"])
    assert TOLERANCE.allows(comparison.max_abs_err, float(np.abs(ref).max())), comparison


def test_fewer_storages_are_allocated_per_call(shared, unshared):
    assert shared.memory is not None and unshared.memory is not None
    before, after = unshared.memory.functions["main_out"], shared.memory.functions["main_out"]
    assert before["static"] == after["static"] == 0
    assert after["dynamic"] < before["dynamic"], (before, after)


BATCH = tvm.tirx.Var("batch", "int64")


def storage(name: str, start: int, end: int, coefficient: int, kind: str = "batch") -> memory_plan._Storage:
    """A storage of ``coefficient * batch`` bytes allocated at binding ``start``, last
    used at ``end``."""
    return memory_plan._Storage(name, start, end, coefficient, (BATCH,), kind)


def test_a_dead_storage_serves_the_next_request_the_smallest_that_fits_first():
    a, b, c, d = storage("a", 0, 2, 10), storage("b", 1, 5, 40), storage("c", 3, 6, 30), storage("d", 6, 8, 20)
    groups = memory_plan._share([a, b, c, d])
    # c: a is dead (last used at 2 < 3), b is not: a's storage grows to 30. d: c is used
    # at 6 itself, so only b (dead since 5) is free.
    assert [[m.var for m in g] for g in groups] == [["a", "c"], ["b", "d"]]


def test_the_smallest_fitting_storage_is_taken_and_kinds_do_not_mix():
    a, b = storage("a", 0, 1, 50), storage("b", 0, 1, 20)
    c = storage("c", 2, 3, 15)
    other = storage("e", 2, 3, 15, kind="batch,uint8")
    groups = memory_plan._share([a, b, c, other])
    assert [[m.var for m in g] for g in groups] == [["a"], ["b", "c"], ["e"]]


@pytest.mark.parametrize(
    ("size", "terms"),
    [
        (4 * BATCH * 1000, (4000, ("batch",))),
        (BATCH * 12 * tvm.tirx.Var("seq", "int64") * 2, (24, ("batch", "seq"))),
        (BATCH * 4 + 8, None),
        (tvm.tirx.IntImm("int64", 64), None),
    ],
)
def test_size_terms(size, terms):
    found = memory_plan.size_terms(size)
    described = None if found is None else (found[0], tuple(var.name for var in found[1]))
    assert described == terms
