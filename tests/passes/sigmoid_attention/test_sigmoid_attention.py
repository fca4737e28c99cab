"""The sigmoid-attention pass: structure, negatives, idempotence, validity, numbers."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.reference
import pytest

from rewriter.job import rewrite_file
from rewriter.pass_base import DOMAIN
from rewriter.passes.sigmoid_attention import OP_TYPE, SigmoidAttentionPass, function_proto
from rewriter.passes.sigmoid_attention.onnx import RUN_TIME as SIGMOID_RUN_TIME
from tests import attention_models as am
from tests.helpers import model_from_text, op_types, run, to_proto
from tests.real_models import count_ops

# The body computes in float32 what the numpy oracle computes in float64: a dot product
# of 4 terms, a sigmoid and a sum of 8 products of values up to ~5, each rounded to
# float32 (1.2e-7 relative): 2e-6 absolute leaves a few ulp of room on outputs ~10.
ATOL = 2e-6


def rewrite(model, **options):
    return SigmoidAttentionPass(SigmoidAttentionPass.Options(**options))(model)


@pytest.mark.parametrize("form", list(am.FORMS))
def test_every_form_is_rewritten_and_matches_the_formula(form):
    model = am.attention_model(form)
    result = rewrite(model)  # static shapes: n defaults to the key length, 8
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    assert "Softmax" not in op_types(result.model)
    assert op_types(result.model).count(OP_TYPE) == 1
    assert (DOMAIN, OP_TYPE, "") in result.model.functions
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = am.feeds(form)
    expected = am.sigmoid_reference(feeds, scale=0.5, n=am.N)
    np.testing.assert_allclose(run(proto, feeds)["y"], expected, rtol=0, atol=ATOL)
    reference = onnx.reference.ReferenceEvaluator(proto).run(None, feeds)[0]
    np.testing.assert_allclose(reference, expected, rtol=0, atol=ATOL)


def test_max_seq_len_sets_the_bias():
    result = rewrite(am.attention_model("div_transpose_additive"), max_seq_len=1024)
    node = next(n for n in result.model.graph if n.op_type == OP_TYPE)
    assert node.attributes["bias"].value == pytest.approx(-math.log(1024))
    assert node.attributes["scale"].value == pytest.approx(0.5)
    feeds = am.feeds("div_transpose_additive")
    expected = am.sigmoid_reference(feeds, scale=0.5, n=1024)
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("fill", [-math.inf, float(np.finfo(np.float32).min), -1e4])
def test_masked_positions_contribute_exactly_zero(fill):
    # V is huge at the masked keys: any nonzero weight there would show.
    model = onnx.load_model_from_string(
        am.op_model(OP_TYPE, function_proto(18), {"scale": 0.5, "bias": 0.0}).SerializeToString()
    )
    feeds = am.feeds("div_transpose_additive")
    feeds["v"][1, :, am.N - 3 :, :] = 1e30
    feeds["mask"] = np.where(am.keep_of(feeds), 0.0, fill).astype(np.float32)
    y = run(model, feeds)["y"]
    assert np.all(np.abs(y[1]) < 1e3)
    expected = am.sigmoid_reference(
        {**feeds, "v": np.where(am.keep_of(feeds).transpose(0, 1, 3, 2), feeds["v"], 0)},
        scale=0.5,
        n=1,
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=ATOL)


def test_attention_operator_of_opset_23_with_causal_and_boolean_mask():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v, bool[2, 1, 8, 8] keep) => (float[2, 2, 8, 4] y) {
            y = Attention<is_causal = 1>(q, k, v, keep)
        }
        """
    )
    result = rewrite(model, max_seq_len=8)
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    assert "Attention" not in op_types(result.model)
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = am.feeds("scale_in_q_boolean_mask_cast")
    feeds["keep"] = np.broadcast_to(feeds["keep"], (2, 1, 8, 8)).copy()
    causal = {**feeds, "keep": feeds["keep"] & np.tril(np.ones((8, 8), dtype=bool))}
    np.testing.assert_allclose(
        run(proto, feeds)["y"], am.sigmoid_reference(causal, scale=0.5, n=8), rtol=0, atol=ATOL
    )


def test_grouped_attention_operator_repeats_key_and_value_heads():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 4, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v) => (float[2, 4, 8, 4] y) {
            y = Attention(q, k, v)
        }
        """
    )
    result = rewrite(model)
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    rng = np.random.default_rng(3)
    feeds = {
        "q": rng.standard_normal((2, 4, 8, 4)).astype(np.float32),
        "k": rng.standard_normal((2, 2, 8, 4)).astype(np.float32),
        "v": rng.standard_normal((2, 2, 8, 4)).astype(np.float32),
    }
    # Query heads 0, 1 read key/value head 0; heads 2, 3 read head 1.
    repeated = {**feeds, "k": feeds["k"].repeat(2, axis=1), "v": feeds["v"].repeat(2, axis=1)}
    expected = am.sigmoid_reference(repeated, scale=0.5, n=8)
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


def test_negative_softmax_not_feeding_values_is_left_and_noted():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 2, 8, 4] q, float[2, 2, 4, 8] kt) => (float[2, 2, 8, 8] y) {
            s = MatMul(q, kt)
            y = Softmax<axis = -1>(s)
        }
        """
    )
    result = rewrite(model)
    assert not result.modified
    assert result.stats == {"attention_replaced": 0, "bias_from_run_time_length": 0, "softmax_left": 1}
    assert "not attention" in result.notes[0]
    assert op_types(result.model) == ["MatMul", "Softmax"]


def test_negative_softmax_over_queries_is_refused_with_reason():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 2, 8, 4] q, float[2, 2, 4, 8] kt, float[2, 2, 8, 4] v) => (float[2, 2, 8, 4] y) {
            s = MatMul(q, kt)
            p = Softmax<axis = 2>(s)
            y = MatMul(p, v)
        }
        """
    )
    result = rewrite(model)
    assert result.stats == {"attention_replaced": 0, "bias_from_run_time_length": 0, "softmax_left": 1}
    assert "axis 2" in result.notes[0]


DYNAMIC = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 2, n, 4] q, float[2, 2, 4, n] kt, float[2, 2, n, 4] v, float[2, 1, 1, n] mask) => (float[2, 2, n, 4] y) {
        s = MatMul(q, kt)
        c = Constant<value = float {0.5}>()
        z = Mul(s, c)
        a = Add(z, mask)
        p = Softmax<axis = -1>(a)
        y = MatMul(p, v)
    }
"""


@pytest.mark.parametrize("n", [8, 13])
def test_dynamic_sequence_takes_b_from_the_run_time_key_length(n):
    model = model_from_text(DYNAMIC)
    result = rewrite(model)
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 1, "softmax_left": 0}
    assert result.notes == ["1 attention(s): " + SIGMOID_RUN_TIME]
    node = next(node for node in result.model.graph if node.op_type == OP_TYPE)
    assert node.attributes["bias"].value == 0.0  # b is in the mask input, from Shape(K)
    types = op_types(result.model)
    assert types.index("Shape") < types.index("Gather") < types.index("Log") < types.index("Neg")
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    rng = np.random.default_rng(n)
    feeds = {name: rng.standard_normal((2, 2, n, 4)).astype(np.float32) for name in "qv"}
    k = rng.standard_normal((2, 2, n, 4)).astype(np.float32)
    feeds["kt"] = k.transpose(0, 1, 3, 2).copy()
    keep = np.ones((2, 1, 1, n), dtype=bool)
    keep[1, ..., n - 3 :] = False
    feeds["mask"] = np.where(keep, 0.0, -np.inf).astype(np.float32)
    expected = am.sigmoid_reference({**feeds, "k": k}, scale=0.5, n=n)
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


def test_max_seq_len_fixes_b_of_a_dynamic_sequence():
    result = rewrite(model_from_text(DYNAMIC), max_seq_len=64)
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    assert result.notes == ["1 attention(s): b = -ln 64 (max_seq_len)"]
    node = next(node for node in result.model.graph if node.op_type == OP_TYPE)
    assert node.attributes["bias"].value == pytest.approx(-math.log(64))
    assert "Log" not in op_types(result.model)


def test_idempotent():
    model = am.attention_model("mul_mask_first")
    rewrite(model)
    again = rewrite(model)
    assert not again.modified
    assert again.stats == {"attention_replaced": 0, "bias_from_run_time_length": 0, "softmax_left": 0}


def test_old_opset_is_refused():
    model = am.attention_model("div_transpose_additive", opset=14)
    with pytest.raises(Exception, match="opset >= 15"):
        rewrite(model)


# Real exports: (name, attention layers, other Softmax nodes). Dynamo exports cost
# ~30 s each on 2 cores; the default run covers one (Llama: causal mask, grouped
# heads, rotary q); the others are slow.
REAL = [
    ("bert_eager_torchscript", 2, 0),
    ("bert_sdpa_torchscript", 2, 0),
    ("vit_torchscript", 2, 1),
    ("llama_eager_dynamo", 2, 0),
    pytest.param("bert_eager_dynamo", 2, 0, marks=pytest.mark.slow),
    pytest.param("bert_sdpa_dynamo", 2, 0, marks=pytest.mark.slow),
    pytest.param("llama_sdpa_dynamo", 2, 0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("max_seq_len", [128, None])
@pytest.mark.parametrize("name,layers,other", REAL)
def test_real_export(real_model, tmp_path, name, layers, other, max_seq_len):
    source = real_model(name)
    out = tmp_path / "sigmoid.onnx"
    report = rewrite_file(
        source.path,
        out,
        [SigmoidAttentionPass(SigmoidAttentionPass.Options(max_seq_len=max_seq_len))],
        inputs=source.inputs,
    )
    record = report.passes[0]
    dynamic = layers if max_seq_len is None and "sequence" in source.dims else 0
    assert record.stats == {"attention_replaced": layers, "bias_from_run_time_length": dynamic, "softmax_left": other}
    left = [note for note in record.notes if "left as is" in note]
    assert len(left) == other and all("not attention" in note for note in left)
    (bias_note,) = [note for note in record.notes if note not in left]
    if dynamic:
        assert bias_note == f"{layers} attention(s): {SIGMOID_RUN_TIME}"
    elif max_seq_len:
        assert bias_note == f"{layers} attention(s): b = -ln 128 (max_seq_len)"
    else:  # ViT: 16 patches and the class token
        assert bias_note == f"{layers} attention(s): b = -ln 17 (the static key length)"
    proto = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert count_ops(proto, "Softmax") == other
    assert sum(node.op_type == OP_TYPE for node in proto.graph.node) == layers
    # Approximate: verification measures (and does not enforce) the fidelity.
    assert report.verification is not None and not report.verification.enforced
    for output in report.verification.outputs:
        assert np.isfinite(output.cosine) and -1.0 <= output.cosine <= 1.0


def test_model_without_softmax_is_a_no_op_at_any_opset():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 9]>
        g (float[2, 4] x) => (float[2, 4] y) {
            y = Relu(x)
        }
        """
    )
    result = rewrite(model)
    assert not result.modified and result.stats == {"attention_replaced": 0, "bias_from_run_time_length": 0, "softmax_left": 0}
