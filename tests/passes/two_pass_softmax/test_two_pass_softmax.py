"""The two-pass-softmax pass: structure, negatives, idempotence, validity, numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest

from rewriter.pass_base import DOMAIN
from rewriter.passes.two_pass_softmax import math as tpm
from rewriter.registry import create_pass
from tests import attention_models as am
from tests.helpers import model_from_text, op_types, run, softmax_model, to_proto

# The float32 rewrite agrees with ONNX Runtime's Softmax to the polynomial's error
# (7.5e-8 relative, twice: numerator and sum) plus float32 rounding of the result.
RTOL_F32 = 1e-6


def rewrite(model, **options):
    return create_pass("two-pass-softmax", options)(model)


def reference(model, feeds):
    return onnx.reference.ReferenceEvaluator(to_proto(model)).run(None, feeds)[0]


@pytest.mark.parametrize("op,target", [("Softmax", "TwoPassSoftmax"), ("LogSoftmax", "TwoPassLogSoftmax")])
def test_structure(op, target):
    model = softmax_model(op)
    result = rewrite(model)
    assert result.modified
    key = "softmax_replaced" if op == "Softmax" else "log_softmax_replaced"
    assert result.stats[key] == 1 and result.stats["skipped"] == 0
    assert op_types(result.model) == [target]
    assert result.model.graph[0].domain == DOMAIN
    assert (DOMAIN, target, "") in result.model.functions
    assert result.model.opset_imports[DOMAIN] == 1


def test_log_softmax_option_off_leaves_log_softmax():
    result = rewrite(softmax_model("LogSoftmax"), log_softmax="false")
    assert not result.modified
    assert op_types(result.model) == ["LogSoftmax"]
    assert result.stats == {"softmax_replaced": 0, "skipped": 0}


def test_negative_near_miss_is_unchanged_and_explained():
    # An integer "softmax" input cannot be rewritten: Hardmax is a near miss that must not match.
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            y = Hardmax(x)
        }
        """
    )
    result = rewrite(model)
    assert not result.modified
    assert result.stats == {"softmax_replaced": 0, "log_softmax_replaced": 0, "skipped": 0}
    assert op_types(result.model) == ["Hardmax"]


def test_unsupported_dtype_is_skipped_with_reason():
    # float16 below opset 15 has no CastLike for the function body to cast back.
    model = softmax_model(opset=13, dtype="float16")
    result = rewrite(model)
    assert result.stats["softmax_replaced"] == 0 and result.stats["skipped"] == 1
    assert "opset >= 15" in result.notes[0]
    assert op_types(result.model) == ["Softmax"]


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [9, 13, 18])
def test_float64_becomes_the_double_op(op, opset):
    result = rewrite(softmax_model(op, dtype="double", opset=opset, axis=-1))
    key = "softmax_replaced" if op == "Softmax" else "log_softmax_replaced"
    assert result.stats[key] == 1 and result.stats["skipped"] == 0
    assert op_types(result.model) == [f"TwoPass{op}Double"]
    assert set(result.model.functions) == {(DOMAIN, f"TwoPass{op}Double", "")}
    onnx.checker.check_model(to_proto(result.model), full_check=True)


def test_float64_and_float32_in_one_model_get_their_own_ops():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, double[2, 3] d) => (float[2, 3] y, double[2, 3] z) {
            y = Softmax(x)
            z = Softmax(d)
        }
        """
    )
    result = rewrite(model)
    assert op_types(result.model) == ["TwoPassSoftmax", "TwoPassSoftmaxDouble"]
    assert len(result.model.functions) == 2


# float64 rows the float path gets wrong: magnitudes where x - n ln2 is no longer exact
# (1e7: a 5e-10 relative error there), past exp's range, at the float64 maximum.
EDGE_ROWS_64 = np.array(
    [
        [1.0, 2.0, 3.0, 4.0],
        [-np.inf, 0.0, 1.0, -np.inf],
        [-np.inf, -np.inf, -np.inf, -np.inf],  # fully masked row -> NaN
        [np.inf, 0.0, 1.0, 2.0],  # +inf -> NaN row
        [np.nan, 0.0, 1.0, 2.0],  # NaN -> NaN row
        [1e7, 1e7 + 1.5, 1e7 - 0.25, 1e7 + 3.0],  # large, close values: exact reduction
        [4e15 + 0.5, 4e15, 4e15 + 2.0, 4e15 - 1.0],  # integers and halves only
        [1.7e308, 1.79e308, -1.79e308, 0.0],  # near the float64 maximum -> one-hot
        [-1.79e308, -1.79e308, -1e300, -1.7e308],  # all hugely negative
        [709.0, 710.0, -745.0, 0.0],  # around exp's overflow and underflow in double
        [1e-300, -1e-300, 0.0, 5e-324],  # tiny magnitudes
    ],
    dtype=np.float64,
)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_float64_is_exact_at_double_precision(op):
    model = softmax_model(op, dtype="double", shape="[11, 4]", axis=-1)
    feeds = {"x": EDGE_ROWS_64}
    log = op == "LogSoftmax"
    expected = three_pass_float64(EDGE_ROWS_64, log=log)
    result = rewrite(model)
    actual = run(result.model, feeds)["y"]
    assert actual.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    # a few ulp (2.2e-16 each): two Exp, a product, a sum and a division
    np.testing.assert_allclose(actual, expected, rtol=1e-14, atol=1e-300, equal_nan=True)
    np.testing.assert_allclose(actual, run(model, feeds)["y"], rtol=1e-14, atol=1e-300, equal_nan=True)
    np.testing.assert_allclose(tpm.reference_softmax_double(EDGE_ROWS_64, log=log), expected, rtol=1e-14, atol=1e-300, equal_nan=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 257)) * 10 ** rng.uniform(-3, 6, (64, 1))
    model = softmax_model(op, dtype="double", shape="[64, 257]", axis=-1)
    # log-probabilities near 0 (the row's largest) carry an absolute error of an ulp of 1
    atol = 1e-15 if log else 1e-300
    np.testing.assert_allclose(run(rewrite(model).model, {"x": x})["y"], three_pass_float64(x, log=log), rtol=1e-13, atol=atol)


def test_idempotent():
    model = softmax_model()
    rewrite(model)
    again = rewrite(model)
    assert not again.modified
    assert again.stats == {"softmax_replaced": 0, "log_softmax_replaced": 0, "skipped": 0}


@pytest.mark.parametrize("opset", [9, 11, 13, 15, 17, 18, 21])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, -2])
def test_numbers_every_opset_and_axis(opset, op, axis):
    model = softmax_model(op, opset=opset, shape="[3, 4, 6]", axis=axis)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32) * 4}
    expected = run(model, feeds)["y"]
    result = rewrite(model)
    assert result.stats["skipped"] == 0
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(run(proto, feeds)["y"], expected, rtol=RTOL_F32, atol=1e-7)
    np.testing.assert_allclose(reference(result.model, feeds), expected, rtol=RTOL_F32, atol=1e-7)


@pytest.mark.parametrize("dtype,np_dtype,rtol", [("float16", np.float16, 5e-4)])
def test_numbers_other_float_types(dtype, np_dtype, rtol):
    model = softmax_model(dtype=dtype, opset=17)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np_dtype)}
    # The float64 truth: the onnx reference computes float16 softmax in float16.
    expected = tpm.reference_softmax(feeds["x"].astype(np.float64))
    result = rewrite(model)
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    actual = run(result.model, feeds)["y"]
    assert actual.dtype == np_dtype
    # float16: the function computes in float64 and rounds once, so it is within half
    # an ulp (4.9e-4) of the float64 truth.
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol)


EDGE_ROWS = np.array(
    [
        [1.0, 2.0, 3.0, 4.0],
        [-np.inf, 0.0, 1.0, -np.inf],  # masked entries -> exactly 0
        [-np.inf, -np.inf, -np.inf, -np.inf],  # fully masked row -> NaN (x - max is NaN)
        [np.inf, 0.0, 1.0, 2.0],  # +inf -> NaN row
        [np.nan, 0.0, 1.0, 2.0],  # NaN -> NaN row
        [3e38, 2.5e38, -3e38, 0.0],  # near the float maximum -> one-hot
        [-3e38, -3e38, -3.4e38, -1e30],  # all hugely negative -> no underflow to 0/0
        [88.0, 89.0, -104.0, 0.0],  # around expf's overflow and underflow
        [1e-30, -1e-30, 0.0, 1e-45],  # tiny magnitudes
    ],
    dtype=np.float32,
)


def three_pass_float64(x: np.ndarray, *, log: bool) -> np.ndarray:
    """The ONNX definition, evaluated in float64: x - max, exp, sum, divide (or log)."""
    xd = x.astype(np.float64)
    with np.errstate(all="ignore"):
        shifted = xd - xd.max(-1, keepdims=True)
        total = np.exp(shifted).sum(-1, keepdims=True)
        out = shifted - np.log(total) if log else np.exp(shifted) / total
    return out.astype(x.dtype)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [9, 13, 18])
def test_edge_cases_match_reference_semantics(op, opset):
    # onnx.reference computes LogSoftmax as log(softmax) and loses range (it gives -inf
    # where x - max - log(sum) is -5e37); ONNX Runtime and the float64 definition agree.
    model = softmax_model(op, opset=opset, shape="[9, 4]", axis=1)
    feeds = {"x": EDGE_ROWS}
    expected = three_pass_float64(EDGE_ROWS, log=op == "LogSoftmax")
    ort_expected = run(model, feeds)["y"]
    result = rewrite(model)
    actual = run(result.model, feeds)["y"]
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual, expected, rtol=RTOL_F32, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(actual, ort_expected, rtol=RTOL_F32, atol=1e-7, equal_nan=True)
    if op == "Softmax":
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(actual, reference(model, feeds), rtol=RTOL_F32, atol=1e-7, equal_nan=True)


def test_masked_entries_are_exactly_zero():
    model = softmax_model(shape="[1, 4]", axis=-1)
    result = rewrite(model)
    y = run(result.model, {"x": EDGE_ROWS[1:2]})["y"]
    assert y[0, 0] == 0.0 and y[0, 3] == 0.0


def test_reference_math_matches_three_pass_softmax():
    x = np.random.default_rng(2).standard_normal((16, 257)) * 30
    three_pass = np.exp(x - x.max(-1, keepdims=True))
    three_pass /= three_pass.sum(-1, keepdims=True)
    np.testing.assert_allclose(tpm.reference_softmax(x), three_pass, rtol=2 * tpm.EXP_POLY_MAX_REL_ERROR + 1e-12)


def test_polynomial_error_bound_holds():
    t = np.linspace(-np.log(2) / 2, np.log(2) / 2, 100_001)
    p = np.polynomial.polynomial.polyval(t, tpm.EXP_POLY)
    assert np.max(np.abs(p / np.exp(t) - 1)) <= tpm.EXP_POLY_MAX_REL_ERROR


def test_softmax_inside_if_subgraph_is_rewritten():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2, 3] x) => (float[2, 3] y) {
            y = If(c) <
                then_branch = t () => (float[2, 3] a) { a = Softmax(x) },
                else_branch = e () => (float[2, 3] b) { b = Identity(x) }
            >
        }
        """
    )
    feeds = {"c": np.array(True), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    expected = run(model, feeds)["y"]
    result = rewrite(model)
    assert result.stats["softmax_replaced"] == 1
    assert "Softmax" not in op_types(result.model)
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=RTOL_F32)


def test_requires_opset_9():
    from onnx_ir.passes import PreconditionError

    with pytest.raises(PreconditionError, match="opset >= 9"):
        rewrite(softmax_model(opset=8))


# --- The Attention operator (opset 23) ----------------------------------------------

@pytest.mark.parametrize("form", sorted(am.OPERATOR_FORMS))
def test_attention_operator_is_written_out_and_its_softmax_swapped(form):
    model = am.operator_model(form)
    feeds = am.operator_feeds(model)
    expected = run(to_proto(model), feeds)["y"]
    result = rewrite(model)
    assert result.stats["attention_expanded"] == 1 and result.stats["softmax_replaced"] == 1
    assert "Attention" not in op_types(result.model) and "TwoPassSoftmax" in op_types(result.model)
    got = run(to_proto(result.model), feeds)["y"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_attention_operator_it_cannot_write_out_gets_a_note():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v) => (float[2, 2, 8, 4] y) {
            y = Attention<softcap = 30.0>(q, k, v)
        }
        """
    )
    result = rewrite(model)
    assert result.stats["attention_expanded"] == 0 and not result.modified
    assert op_types(result.model) == ["Attention"]
    assert any("softcap" in note for note in result.notes)
