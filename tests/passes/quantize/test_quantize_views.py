"""quantize on weights read through Identity/Transpose/Reshape of an initializer.

``shared_model`` reads its weights the ways exports of weight-sharing models do: one
initializer through a Transpose feeding two MatMuls (ALBERT, dynamo), one directly and
through an Identity (ALBERT, TorchScript), one through a Reshape, and a tied embedding
read by a Gather and, transposed, by the output MatMul (left in float, with its reason).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.job import rewrite_file
from rewriter.passes.quantize import QuantizeOptions, QuantizePass
from tests.helpers import op_types, to_proto
from tests.passes.quantize.test_quantize import cosine, run_exact

HIDDEN, VOCAB = 32, 16
# Per-channel int8 of Gaussian weights: the output keeps cosine > 0.999 (the plain
# models' bound in test_quantize.py, measured 0.9999+ here).
COSINE_BOUND = 0.999


def shared_model() -> ir.Model:
    """ids -> Gather(E) -> MatMul(Transpose(W)) twice -> MatMul(V), MatMul(Identity(V))
    -> MatMul(Reshape(R)) -> MatMul(Transpose(E)) (tied embedding)."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(HIDDEN)).astype(np.float32), name)

    initializers = [
        weight("E", (VOCAB, HIDDEN)),
        weight("W", (HIDDEN, HIDDEN)),  # torch's [out, in]
        weight("V", (HIDDEN, HIDDEN)),
        weight("R", (HIDDEN * HIDDEN,)),
        numpy_helper.from_array(np.array([HIDDEN, HIDDEN], np.int64), "r_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="W_T", perm=[1, 0]),
        helper.make_node("MatMul", ["h0", "Wt"], ["h1"], name="layer0"),
        helper.make_node("Tanh", ["h1"], ["a1"], name="tanh0"),
        helper.make_node("MatMul", ["a1", "Wt"], ["h2"], name="layer1"),
        helper.make_node("MatMul", ["h2", "V"], ["h3"], name="v0"),
        helper.make_node("Identity", ["V"], ["V1"], name="V_again"),
        helper.make_node("MatMul", ["h3", "V1"], ["h4"], name="v1"),
        helper.make_node("Reshape", ["R", "r_shape"], ["R2"], name="R_2d"),
        helper.make_node("MatMul", ["h4", "R2"], ["h5"], name="r"),
        helper.make_node("Transpose", ["E"], ["Et"], name="E_T", perm=[1, 0]),
        helper.make_node("MatMul", ["h5", "Et"], ["y"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, VOCAB])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def ids() -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, VOCAB, (3, 4))}


def test_views_are_quantized_and_the_tied_embedding_is_reported():
    original = to_proto(shared_model())
    result = QuantizePass(QuantizeOptions())(shared_model())
    stats = result.stats
    assert result.modified
    assert stats["weights_quantized"] == 3  # W (once, for both layers), V, R
    assert stats["views_folded"] == 3  # Transpose(W), Identity(V), Reshape(R)
    assert stats["skipped"] == 1 and stats["excluded"] == 0
    graph = result.model.graph
    # Every quantized MatMul reads its DequantizeLinear directly; only the tied E stays float.
    for node in graph:
        if node.op_type == "MatMul" and node.name != "lm_head":
            assert node.inputs[1].producer().op_type == "DequantizeLinear", node.name
    assert op_types(result.model).count("DequantizeLinear") == 3
    assert "W_T" not in {node.name for node in graph} and "V_again" not in {node.name for node in graph}
    assert "E_T" in {node.name for node in graph} and graph.initializers["E"].dtype == ir.DataType.FLOAT
    assert set(graph.initializers) == {"E", "W_quantized", "W_scale", "V_quantized", "V_scale", "R_quantized", "R_scale"}
    # The one weight Transposed is stored transposed: the MatMul reads [in, out].
    w_t = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "W")).T
    dequantized = graph.initializers["W_quantized"].const_value.numpy() * graph.initializers["W_scale"].const_value.numpy()
    assert np.abs(dequantized - w_t).max() <= graph.initializers["W_scale"].const_value.numpy().max() / 2 + 1e-7
    (left,) = result.tables["float_weights"]
    assert left["op"] == "lm_head" and left["weight"] == "E"
    assert "also read by Gather 'embed'" in left["reason"]
    assert any(note.startswith("MatMul 'lm_head' left in float") for note in result.notes)
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert cosine(run_exact(proto, ids()), run_exact(original, ids())) > COSINE_BOUND


def test_second_run_changes_nothing_and_still_reports_the_float_weight():
    once = QuantizePass(QuantizeOptions())(shared_model()).model
    again = QuantizePass(QuantizeOptions())(once)
    assert not again.modified and again.stats["weights_quantized"] == 0
    assert [row["op"] for row in again.tables["float_weights"]] == ["lm_head"]


def test_excluded_views_stay_float_and_unfolded():
    result = QuantizePass(QuantizeOptions(exclude=["W"]))(shared_model())
    assert result.stats["excluded"] == 2 and result.stats["weights_quantized"] == 2
    assert "W_T" in {node.name for node in result.model.graph}
    assert result.model.graph.initializers["W"].dtype == ir.DataType.FLOAT


def test_report_json_lists_the_float_weights(tmp_path):
    source = tmp_path / "shared.onnx"
    onnx.save(to_proto(shared_model()), source)
    report = rewrite_file(source, tmp_path / "out.onnx", "quantize", report_json=tmp_path / "report.json")
    assert report.passes[0].stats["skipped"] == 1
    document = json.loads((tmp_path / "report.json").read_text())
    (record,) = document["passes"]
    assert [row["weight"] for row in record["tables"]["float_weights"]] == ["E"]


def _file_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_albert_shared_weights_are_all_quantized(real_model, tmp_path, exporter):
    # ALBERT's 3 layers share one layer's 6 weights; with the embedding projection the
    # export has 7 distinct MatMul weights and 1 + 3 * 6 = 19 MatMuls reading them.
    model = real_model(f"albert_{exporter}")
    output = tmp_path / "albert_int8.onnx"
    report = rewrite_file(model.path, output, "quantize", inputs=model.inputs)
    stats = report.passes[0].stats
    assert stats["weights_quantized"] == 7 and stats["skipped"] == 0
    quantized = onnx.load(output)
    weights = {node.input[1] for node in quantized.graph.node if node.op_type == "MatMul"}
    producers = {out: node.op_type for node in quantized.graph.node for out in node.output}
    assert sum(producers.get(weight) == "DequantizeLinear" for weight in weights) == 7
    assert report.verification is not None and report.verification.outputs[0].cosine > 0.99
    # The 7 matrices (32x96, 4 of 96x96, 96x192, 192x96) take a quarter of their float
    # bytes, plus a scale per output channel: the file loses at least 70% of their bytes.
    matrices = 4 * (32 * 96 + 4 * 96 * 96 + 2 * 96 * 192)
    assert _file_bytes(model.path) - _file_bytes(output) > 0.7 * matrices
