"""ONNX ops rewritten before TVM's import (:mod:`rewriter.backends.tvm.relax_passes.onnx_simplify`).

Each rewrite is checked on a small graph: it fires (its statistic), the op is gone, and
ONNX Runtime gives the same outputs before and after (products of x instead of pow: a
few ulp; sums added left to right: exact here).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends.tvm.relax_passes import onnx_simplify


def _model(nodes: list[onnx.NodeProto], inputs: list[str], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 8]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(model: onnx.ModelProto, stat: str, count: int, gone: str) -> None:
    work = ir.serde.deserialize_model(model)
    stats = onnx_simplify.simplify(work)
    assert stats[stat] == count
    rewritten = ir.serde.serialize_model(work)
    onnx.checker.check_model(rewritten, full_check=True)
    assert gone not in {node.op_type for node in rewritten.graph.node}
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.uniform(0.5, 2.0, (2, 8)).astype(np.float32) for i in model.graph.input}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)


@pytest.mark.parametrize("power", [2.0, 3.0, 4.0, 0.5, 1.0])
def test_pow_by_a_small_constant_becomes_products(power):
    exponent = numpy_helper.from_array(np.array(power, np.float32), "p")
    _check(_model([helper.make_node("Pow", ["x", "p"], ["y"])], ["x"], [exponent]), "pow_expanded", 1, "Pow")


def test_pow_by_another_constant_is_kept():
    exponent = numpy_helper.from_array(np.array(2.5, np.float32), "p")
    work = ir.serde.deserialize_model(_model([helper.make_node("Pow", ["x", "p"], ["y"])], ["x"], [exponent]))
    assert onnx_simplify.simplify(work)["pow_expanded"] == 0


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_and_mean_become_adds(op):
    _check(_model([helper.make_node(op, ["a", "b", "c"], ["y"])], ["a", "b", "c"], []), "variadic_split", 1, op)


def test_inference_dropout_becomes_its_input():
    nodes = [helper.make_node("Dropout", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    _check(_model(nodes, ["x"], []), "dropout_removed", 1, "Dropout")


def test_dropout_whose_mask_is_used_is_kept():
    nodes = [
        helper.make_node("Dropout", ["x"], ["d", "mask"]),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["d", "m"], ["y"]),
    ]
    work = ir.serde.deserialize_model(_model(nodes, ["x"], []))
    assert onnx_simplify.simplify(work)["dropout_removed"] == 0


EINSUMS = [
    ("bhlk,bhtk->bhlt", [2, 3, 5, 8], [2, 3, 7, 8]),  # CvT's attention scores
    ("bhlt,bhtv->bhlv", [2, 3, 5, 7], [2, 3, 7, 4]),  # ... and their values
    ("bij,bjk->bki", [2, 5, 6], [2, 6, 3]),  # the product transposed
    ("ik,jk->ij", [5, 6], [3, 6]),
]


def _einsum(equation: str, a: list[int], b: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a), helper.make_tensor_value_info("b", TensorProto.FLOAT, b)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("equation", "a", "b"), EINSUMS)
def test_an_einsum_that_is_a_matmul_becomes_one_and_compiles_to_the_matmul_rule(equation, a, b):
    from rewriter.backends import tvm as backend

    model = _einsum(equation, a, b)
    work = ir.serde.deserialize_model(model)
    assert onnx_simplify.simplify(work)["einsum_matmul"] == 1
    rewritten = ir.serde.serialize_model(work)
    assert "Einsum" not in {node.op_type for node in rewritten.graph.node}
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal(a).astype(np.float32), "b": rng.standard_normal(b).astype(np.float32)}
    expected = np.einsum(equation, feeds["a"], feeds["b"])
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    compiled = backend.compile(model, "avx512")
    np.testing.assert_allclose(compiled.run(feeds)["y"], expected, rtol=1e-5, atol=1e-5)
    assert compiled.schedules is not None
    assert "einsum" not in " ".join(compiled.schedules.scheduled), compiled.schedules.scheduled
    assert "matmul" in compiled.schedules.scheduled.values(), compiled.schedules.scheduled


@pytest.mark.parametrize("equation", ["bik,bjk->bk", "ii,ij->j", "...ij,...jk->...ik", "ij,jk,kl->il"])
def test_other_einsums_are_kept(equation):
    assert onnx_simplify.matmul_order(equation) is None


def _norm(shape: list[int], groups: int | None, back: list[int] | None = None) -> onnx.ModelProto:
    """An instance norm of ``x`` (``groups=None``), or a group norm as the torch exporters
    write it: ``Reshape(x, [0, G, -1])``, ``InstanceNormalization``, ``Reshape`` back to
    ``Shape(x)`` (or to the constant ``back``). Batch symbolic."""
    rng = np.random.default_rng(3)
    norms = shape[1] if groups is None else groups
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, norms).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, norms).astype(np.float32), "shift"),
        numpy_helper.from_array(np.array([0, norms, -1], np.int64), "grouped"),
    ]
    if groups is None:
        nodes = [helper.make_node("InstanceNormalization", ["x", "scale", "shift"], ["y"], epsilon=1e-5)]
    else:
        nodes = [
            helper.make_node("Reshape", ["x", "grouped"], ["g"]),
            helper.make_node("InstanceNormalization", ["g", "scale", "shift"], ["n"], epsilon=1e-5),
        ]
        if back is None:
            nodes += [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Reshape", ["n", "shape"], ["y"])]
        else:
            inits.append(numpy_helper.from_array(np.array(back, np.int64), "back"))
            nodes.append(helper.make_node("Reshape", ["n", "back"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *shape[1:]] if back is None else back)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("shape", "groups"),
    [([2, 16, 5, 6], 4), ([2, 16, 5, 6], 1), ([2, 16, 5, 6], 16), ([3, 8, 7], 8), ([2, 8, 9], 2)],
)
def test_group_norms_become_per_channel_statistics(shape, groups):
    model = _norm(shape, groups)
    work = ir.serde.deserialize_model(model)
    assert onnx_simplify.simplify(work)["norms_per_channel"] == 1
    rewritten = ir.serde.serialize_model(work)
    onnx.checker.check_model(rewritten)
    ops = {node.op_type for node in rewritten.graph.node}
    assert not ops & {"InstanceNormalization", "Reshape", "Shape"}, ops  # no reshape of the map
    x = (np.random.default_rng(4).standard_normal(shape) + 3.0).astype(np.float32)  # a mean away from zero
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _norm([2, 16, 5, 6], 4, back=[2, 16, 30]), id="reshaped-to-another-shape"),
        # An instance norm of its own: TVM's decomposition reduces over the positions,
        # whose layout the conversion carries.
        pytest.param(lambda: _norm([2, 16, 5, 6], None), id="instance-norm"),
    ],
)
def test_other_norms_are_kept(model):
    work = ir.serde.deserialize_model(model())
    assert onnx_simplify.simplify(work)["norms_per_channel"] == 0


def test_a_norm_over_symbolic_positions_is_kept():
    # wav2vec2's group norm over frames of any length: the channels-last pooling schedule
    # takes static pixel extents, and the frames' sums strided across the channels ran
    # at twice the time of TVM's own norm.
    work = ir.serde.deserialize_model(_norm([2, 8, "frames"], 8))  # type: ignore[list-item]
    assert onnx_simplify.simplify(work)["norms_per_channel"] == 0


def test_a_group_norm_of_a_value_with_no_recorded_shape_is_rewritten():
    # TorchScript exports with a symbolic batch record no shapes past the inputs; the
    # positions (an image's, static) are inferred before the rewrite decides.
    model = _norm([2, 16, 5, 6], 4)
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    for node in model.graph.node[1:]:
        node.input[:] = ["r" if name == "x" else name for name in node.input]
    work = ir.serde.deserialize_model(model)
    reshape = next(node for node in work.graph if node.op_type == "Reshape")
    assert reshape.inputs[0].shape is None  # nothing recorded
    assert onnx_simplify.simplify(work)["norms_per_channel"] == 1
    x = np.random.default_rng(5).standard_normal([2, 16, 5, 6]).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(ir.serde.serialize_model(work).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=2e-5)


def test_two_flattens_of_one_tensor_compile_and_agree():
    # onnxscript's Flatten2Reshape named the Shape it inserts after the input, so two
    # Flattens of one tensor left a Reshape reading a value no node produced (BART's
    # TorchScript export, its mask flattened by encoder and decoder: a KeyError).
    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import import_onnx

    nodes = [
        helper.make_node("Flatten", ["x"], ["a"], axis=2),
        helper.make_node("Flatten", ["x"], ["b"], axis=2),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Add", ["a", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto = import_onnx.prepare(model)
    produced = {value.name for value in proto.graph.input} | {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        assert all(name in produced for name in node.input if name), node
        produced.update(node.output)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    got = backend.compile(model, "avx512").run({"x": x})["y"]
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
def test_a_scatter_of_no_updates_compiles_at_a_symbolic_batch_and_agrees(op):
    # Swin3D-T's shifted-window mask: 54 ScatterNDs, some over an empty region. TVM's
    # scatter lowering indexed modulo the zero extent ("Divide by zero"): the symbolic
    # compile was refused. No update leaves the data as it is.
    from rewriter.backends import tvm as backend

    index_shape = (0, 1) if op == "ScatterND" else (0, 4)
    nodes = [helper.make_node(op, ["x", "index", "update"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(np.zeros(index_shape, np.int64), "index"),
            numpy_helper.from_array(np.zeros((0, 4), np.float32), "update"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled = backend.compile(model, "avx512")
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, rtol=1e-6)
