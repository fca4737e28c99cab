"""float32 ``log`` as a polynomial in the loop's vector width
(:mod:`rewriter.backends.tvm.vector_log`), not a libm call per element: within an ulp of
the correctly rounded log, each distinct log of a stored value computed once."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from tvm.script import tirx as T  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import vector_log  # noqa: E402


def log_model(shape: list[object], nodes: list[object]) -> object:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_log_compiles_to_a_vector_polynomial_within_an_ulp_of_the_exact_log():
    # DeBERTa's and T5's relative-position buckets take a log on every call of a library
    # with a symbolic sequence: TVM's log was a libm call per element.
    rng = np.random.default_rng(1)
    normal = np.exp(rng.uniform(-87, 88, 4000)).astype(np.float32)
    near_one = (1 + rng.uniform(-0.3, 0.3, 1000)).astype(np.float32)
    subnormal = np.array([1e-40, 1.4e-45, 5e-39, 1.1754942e-38], np.float32)
    edges = np.array([1.0, 2.0, 0.5, 0.70710677, 0.7071068, 1.4142135, 3.4028235e38, 1.1754944e-38], np.float32)
    finite = np.concatenate([normal, near_one, subnormal, edges, np.arange(1, 200, dtype=np.float32)])
    special = np.array([0.0, -0.0, np.inf, -1.0, -np.inf, np.nan], np.float32)
    x = np.concatenate([finite, special])[None, :]
    compiled = backend.compile(log_model(list(x.shape), [helper.make_node("Log", ["x"], ["y"])]), "avx512")
    got = compiled.run({"x": x})["y"][0]
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.log(x[0].astype(np.float64)).astype(np.float32)  # correctly rounded
    count = finite.size
    ulps = np.abs(got[:count].view(np.int32).astype(np.int64) - expected[:count].view(np.int32))
    assert ulps.max() <= 1, (x[0][:count][ulps.argmax()], got[ulps.argmax()], expected[ulps.argmax()])
    assert got[count] == -np.inf and got[count + 1] == -np.inf and got[count + 2] == np.inf
    assert np.isnan(got[count + 3 :]).all()
    assert compiled.schedules is not None and set(compiled.schedules.scheduled.values()) == {"elementwise"}
    assert "logf" not in compiled.executable.mod.imports[0].inspect_source("asm")  # no libm call


def test_a_log_read_many_times_is_computed_once_and_agrees_at_symbolic_sizes():
    # T5's position bucket reads one log 15 times once its producers are inlined; each
    # copy expanded made the compile take minutes. A symbolic size, as a library for any
    # sequence length has.
    nodes = [
        helper.make_node("Log", ["x"], ["l"]),
        helper.make_node("Mul", ["l", "l"], ["s"]),
        helper.make_node("Add", ["s", "l"], ["y"]),
    ]
    compiled = backend.compile(log_model(["rows", 37], nodes), "avx512")
    x = np.random.default_rng(2).uniform(0.01, 50, (3, 37)).astype(np.float32)
    expected = np.log(x.astype(np.float64)) ** 2 + np.log(x.astype(np.float64))
    assert np.abs(compiled.run({"x": x})["y"] - expected).max() <= 1e-5 * np.abs(expected).max()

    @T.prim_func
    def func(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
        T.func_attr({"target": T.target("llvm"), "global_symbol": "func"})
        for i in range(16):
            b[i] = T.log(a[i]) * T.log(a[i]) + T.log(a[i] * T.float32(2))

    lowered = tvm.tirx.transform.LowerIntrin()(tvm.IRModule({"func": func}))
    expanded = vector_log.log_pass()(lowered)["func"].script()
    assert "llvm.log" not in expanded
    # two distinct logs, each one polynomial (its highest coefficient once)
    assert expanded.count(str(vector_log.LOG_POLYNOMIAL[0])[:10]) == 2, expanded


def test_a_log_of_a_guarded_load_is_left_where_it_is():
    # Computed ahead of the stored value, the log of a padded read would read past its
    # guard; a log of index arithmetic under the same guard (a position bucket) is not a read.
    @T.prim_func
    def func(a: T.Buffer((8,), "float32"), b: T.Buffer((16,), "float32")):
        T.func_attr({"target": T.target("llvm"), "global_symbol": "func"})
        for i in range(16):
            b[i] = T.if_then_else(i < 8, T.log(a[i]), T.float32(0)) + T.if_then_else(
                i < 4, T.log(T.Cast("float32", i + 1)), T.float32(0)
            )

    lowered = tvm.tirx.transform.LowerIntrin()(tvm.IRModule({"func": func}))
    expanded = vector_log.log_pass()(lowered)["func"].script()
    assert expanded.count("llvm.log") == 1, expanded  # the padded read's
    assert expanded.count(str(vector_log.LOG_POLYNOMIAL[0])[:10]) == 1, expanded
