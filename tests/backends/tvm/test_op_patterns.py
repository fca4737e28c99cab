"""Functions injective at every value of their symbolic sizes fuse as at fixed sizes.

TVM's ``AnnotateTIROpPattern`` called a pad, a slice or a gather at a symbolic length
opaque (its index reads the length, a variable its check takes for unknown), so nothing
fused into or out of it: EnCodec's ELU, reflect pad and transpose were one loop at fixed
sizes and three at symbolic ones. ``op_patterns.annotate_op_patterns`` takes its place.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te, tirx

from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm.relax_passes import op_patterns
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE
from tests.helpers import run

TOLERANCE = COMPILED_TOLERANCE["float32"]


def _module(compute, *shapes, attrs=None) -> tvm.IRModule:
    """A module whose ``main`` calls one PrimFunc made by ``compute`` from placeholders of ``shapes``."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(shape, "float32")) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.call_te(compute, *params, primfunc_name_hint="f", primfunc_attrs=attrs))
        bb.emit_func_output(out)
    return bb.get()


def _pattern(mod: tvm.IRModule, annotate) -> int:
    annotated = annotate()(mod)
    (func,) = [f for gv, f in annotated.functions_items() if gv.name_hint == "f"]
    return int(func.attrs["op_pattern"])


def _reflected(x):
    """``x`` reflect-padded by 2 at both ends of its symbolic length."""
    (n,) = x.shape
    return te.compute((n + 4,), lambda i: x[tirx.if_then_else(i < 2, 2 - i, tirx.if_then_else(i >= n + 2, 2 * n - i, i - 2))])


def _row_sums(x):
    n, m = x.shape
    k = te.reduce_axis((0, m))
    return te.compute((n,), lambda i: te.sum(x[i, k], axis=k))


def test_a_pad_at_a_symbolic_length_is_injective():
    n = tirx.Var("n", "int64")
    mod = _module(_reflected, (n,))
    assert _pattern(mod, relax.transform.AnnotateTIROpPattern) == op_patterns.OPAQUE  # TVM's
    assert _pattern(mod, op_patterns.annotate_op_patterns) == op_patterns.INJECTIVE
    fixed = _module(_reflected, (16,))  # as TVM finds it at a fixed size
    assert _pattern(fixed, relax.transform.AnnotateTIROpPattern) == op_patterns.INJECTIVE


def test_what_tvm_finds_otherwise_and_a_given_mark_are_kept():
    n = tirx.Var("n", "int64")
    reduction = _module(_row_sums, (n, 8))
    assert _pattern(reduction, op_patterns.annotate_op_patterns) == _pattern(
        reduction, relax.transform.AnnotateTIROpPattern
    )
    marked = _module(_reflected, (n,), attrs={"op_pattern": op_patterns.OPAQUE})
    assert _pattern(marked, op_patterns.annotate_op_patterns) == op_patterns.OPAQUE


def test_a_transposed_read_of_an_unstored_iteration_is_not_injective():
    # A block whose load uses an iteration variable its store does not: not injective.
    n = tirx.Var("n", "int64")
    mod = _module(_row_sums, (n, 8))
    (func,) = [f for gv, f in mod.functions_items() if gv.name_hint == "f"]
    assert not op_patterns.injective(func)


def _relu_pad_transpose() -> onnx.ModelProto:
    """ReLU, a reflect pad to a multiple of 8 computed from the length (EnCodec's), and a
    transpose to channels-last."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["x"], ["length"], start=2, end=3),
        helper.make_node("Mod", ["length", "eight"], ["rest"]),
        helper.make_node("Sub", ["eleven", "rest"], ["extra"]),
        helper.make_node("Concat", ["start", "extra"], ["pads"], axis=0),
        helper.make_node("Pad", ["r", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Transpose", ["padded"], ["y"], perm=[0, 2, 1]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("eight", [8]), ("eleven", [11]), ("start", [0, 0, 2, 0, 0]))]
    graph = helper.make_graph(
        nodes,
        "relu_pad_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_pad_at_a_symbolic_length_fuses_with_what_is_around_it():
    proto = _relu_pad_transpose()
    compiled = backend.compile(proto, "avx512")
    assert compiled.schedules is not None
    names = [*compiled.schedules.scheduled, *compiled.schedules.unscheduled]
    assert compiled.schedules.unscheduled == [], names
    fused = [name for name in names if "relu" in name]
    assert len(fused) == 1 and "pad" in fused[0] and "transpose" in fused[0], names
    rng = np.random.default_rng(0)
    for length in (13, 40):
        x = rng.standard_normal((2, 16, length)).astype(np.float32)
        expected, ours = run(proto, {"x": x})["y"], compiled.run({"x": x})["y"]
        assert ours.shape == expected.shape
        comparison = verify.compare("y", expected, ours)
        assert TOLERANCE.allows(comparison.max_abs_err, float(np.abs(expected).max()))


@pytest.mark.parametrize("dims", [None, {"length": 40}])
def test_fixed_and_symbolic_sizes_fuse_alike(dims):
    compiled = backend.compile(_relu_pad_transpose(), "avx512", dims=dims)
    assert compiled.schedules is not None
    assert len([*compiled.schedules.scheduled, *compiled.schedules.unscheduled]) == 1


def _gathered(x, i):
    return te.compute(i.shape, lambda j: x[tirx.min(tirx.Cast("int64", i[j]), x.shape[0] - 1)])


def _products(table):
    """A DFT matrix's entries read from a table of ``n`` angles at ``i * j mod n``."""
    (n,) = table.shape
    return te.compute((n, 8), lambda i, j: table[tirx.floormod(i * j, n)])


@pytest.mark.parametrize(("compute", "shapes"), [(_gathered, 2), (_products, 1)])
def test_a_gather_and_a_table_read_at_products_stay_opaque(compute, shapes):
    # Fused at symbolic sizes, T5's bucketed position bias (a gather) and FNet's DFT
    # matrix (folded to a constant at fixed sizes; fused, its entries computed their
    # angles' sines and cosines again) took more time.
    n = tirx.Var("n", "int64")
    mod = _module(compute, *[(n,)] * shapes)
    assert _pattern(mod, relax.transform.AnnotateTIROpPattern) == op_patterns.OPAQUE
    assert _pattern(mod, op_patterns.annotate_op_patterns) == op_patterns.OPAQUE
