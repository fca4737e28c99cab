"""Vector loops with masked lanes split into a full-vector case and a tail
(:mod:`rewriter.backends.tvm.vector_tails`).

A padded matmul's epilogue stores through a per-lane predicate (``panel * 32 + lane <
n``); TVM's vectorizer makes such a loop scalar in every panel. Our pipeline runs the
unpredicated vector loop where the bound holds at the extreme lane, the original
elsewhere.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import tirx as T  # noqa: E402

from rewriter.backends.tvm import parallel_cost, vector_tails  # noqa: E402

from .test_matmul import assert_agrees_with_ort, attention_model  # noqa: E402


def doubled(width: int, predicate: object) -> object:
    """``b = 2 * a`` over 64 x ``width`` floats, columns in 2 vectors of 32, the block
    predicated by ``predicate(i, jo, ji)`` (row, vector, lane)."""

    @T.prim_func(s_tir=True)
    def func(a: T.Buffer((64, width), "float32"), b: T.Buffer((64, width), "float32")):
        for i, jo in T.grid(64, 2):
            for ji in T.vectorized(32):
                with T.sblock("double"):
                    vi = T.axis.spatial(64, i)
                    vj = T.axis.spatial(width, jo * 32 + ji)
                    T.where(predicate(i, jo, ji))
                    b[vi, vj] = a[vi, vj] * T.float32(2)

    return func


# 50 columns: the second vector's last 14 lanes are masked.
doubled_head = doubled(50, lambda i, jo, ji: jo * 32 + ji < 50)
# Columns from 14 on: the first vector's first 14 lanes are masked, and rows past 60.
doubled_tail = doubled(64, lambda i, jo, ji: tvm.tirx.And(jo * 32 + ji >= 14, i < 60))
doubled_evens = doubled(64, lambda i, jo, ji: ji % 2 == 0)


def split_loops(func: object) -> list[object]:
    """The ``if`` statements the pass put around a vector loop."""
    import tvm_ffi

    found: list[object] = []

    def visit(node: object) -> object:
        if isinstance(node.then_case, tvm.tirx.For):  # type: ignore[attr-defined]
            found.append(node)
        return node

    body = vector_tails.unswitch_pass()(tvm.IRModule({"main": func}))["main"].body
    tvm_ffi.structural_map(body, [(tvm.tirx.IfThenElse, visit)], order="post")
    return found


def run(func: object, masked: np.ndarray) -> str:
    """Build ``func`` with our pipeline, check ``b`` (zeros where the predicate masks it)
    element by element, and return the LLVM IR."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})  # type: ignore[attr-defined]
    lib = tvm.tirx.build(mod, target={"kind": "llvm"}, pipeline=parallel_cost.pipeline_name())
    a = np.random.default_rng(0).standard_normal(masked.shape).astype(np.float32)
    b = tvm.runtime.tensor(np.zeros_like(a))
    lib["main"](tvm.runtime.tensor(a), b)
    expected = np.where(masked, 0, 2 * a).astype(np.float32)
    np.testing.assert_array_equal(b.numpy(), expected)
    return lib.inspect_source("ll")


def test_a_masked_last_vector_gets_a_full_vector_case():
    (split,) = split_loops(doubled_head)
    assert str(split.condition) == "jo < 1"  # jo * 32 + 31 < 50
    vector = split.then_case
    assert vector.kind == tvm.tirx.ForKind.VECTORIZED and bool(vector.body.predicate)
    assert split.else_case.body.predicate is not None  # the original, masked
    ir = run(doubled_head, np.zeros((64, 50), bool))
    assert "store <32 x float>" in ir or "store <16 x float>" in ir


def test_a_lower_bound_is_checked_at_the_first_lane_and_other_conditions_stay():
    (split,) = split_loops(doubled_tail)
    assert str(split.condition) == "1 <= jo"  # jo * 32 + 0 >= 14
    assert "i < 60" in str(split.then_case.body.predicate)
    masked = np.zeros((64, 64), bool)
    masked[:, :14] = True
    masked[60:, :] = True
    run(doubled_tail, masked)


def test_a_predicate_not_monotone_in_the_lane_is_left_alone():
    assert split_loops(doubled_evens) == []


def test_padded_attention_scores_store_whole_vectors_and_agree():
    # 197 keys in 7 panels of 32: the epilogue's 224 stores per row of a tile were scalar
    # (TVM's vectorizer: 257 vmovss in the kernel); 6 panels of 7 now store vectors.
    model = attention_model(heads=2, sequence=197, dim=64)
    model.graph.node.pop()  # the scores alone, scaled
    model.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 197
    model.graph.node[-1].output[0] = "y"
    asm = assert_agrees_with_ort(model).executable.mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"vmovss\s+%xmm\d+, [^\n]*\(", asm)) < 64
    assert len(re.findall(r"vmovups\s+%zmm\d+, [^\n]*\(", asm)) >= 2 * 8
