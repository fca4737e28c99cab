"""Verification helpers: comparisons, generated inputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import verify


def test_compare_identical_and_nan_inf_positions():
    a = np.array([[1.0, np.nan, np.inf, -np.inf]], np.float32)
    c = verify.compare("y", a, a.copy())
    assert c.max_abs_err == 0 and c.nan_mismatch == 0 and c.cosine == 1.0


def test_compare_nan_where_reference_is_finite_is_infinite_error():
    c = verify.compare("y", np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert c.nan_mismatch == 1 and math.isinf(c.max_abs_err)


def test_scale_relative_error_and_argmax():
    ref = np.array([[0.1, 0.9], [0.6, 0.4]])
    cand = np.array([[0.1, 0.9], [0.4, 0.6]])
    c = verify.compare("p", ref, cand)
    assert math.isclose(c.max_abs_err, 0.2)
    assert math.isclose(c.max_rel_err, 0.2 / 0.9)
    assert c.argmax_agreement == 0.5


def test_masked_figures_ignore_padding():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8))
    cand = ref.copy()
    cand[:, 3] += 100.0  # only the padded position differs
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    c = verify.compare("h", ref, cand, mask=mask)
    assert c.max_abs_err == 100.0
    assert c.masked_max_abs_err == 0.0
    assert math.isclose(c.pooled_cosine_mean, 1.0) and math.isclose(c.pooled_cosine_min, 1.0)


def test_tolerance_is_relative_to_output_scale():
    c = verify.compare("y", np.array([1000.0, 0.0]), np.array([1000.001, 0.0]))
    assert verify.check_tolerance(c, np.array([1000.0, 0.0]), verify.Tolerance(rtol=1e-5, atol=0))
    assert not verify.check_tolerance(c, np.array([1000.0, 0.0]), verify.Tolerance(rtol=1e-7, atol=0))


def test_generated_token_ids_stay_inside_the_embedding_table():
    table = numpy_helper.from_array(np.zeros((7, 4), np.float32), "embeddings")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embeddings", "ids"], ["h"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = verify.make_inputs(model, dims={"sequence": 64}, seed=1)
    assert inputs["ids"].shape == (2, 64) and inputs["ids"].max() < 7 and inputs["ids"].max() >= 5
    assert (inputs["attention_mask"] == 1).all()
    assert [s.name for s in verify.input_specs(model)] == ["ids", "attention_mask"]
    onnx.checker.check_model(model)


def test_a_changed_leading_length_is_compared_over_the_common_rows():
    # Detections after NMS: a rewrite (Soft-NMS) may keep more or fewer of them.
    original = np.array([[1.0, 2.0], [3.0, 4.0]])
    rewritten = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 7.0]])
    comparison = verify.compare("boxes", original, rewritten)
    assert comparison.shape == [2, 2] and comparison.rewritten_shape == [3, 2]
    assert comparison.max_abs_err == 1.0  # over the two rows both have
    assert verify.compare("same", original, original).rewritten_shape is None
    with pytest.raises(ValueError, match="shape"):
        verify.compare("boxes", original, np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("values", "what"),
    [
        (np.zeros((2, 5), np.float32), "all zero"),
        (np.full((3, 4), 0.25), "constant (0.25 everywhere)"),
        (np.full((2, 2), np.nan), "all NaN"),
        (np.ones((2, 3), np.int64), "constant (1 everywhere)"),
    ],
)
def test_constant_outputs_are_warned(values, what):
    comparison = verify.compare("y", values, values)
    assert comparison.cosine == pytest.approx(1.0) or math.isnan(values.flat[0])  # "ok", and meaningless
    assert comparison.warning == f"output 'y' of the original model is {what} on the verification inputs: the comparison proves nothing"
    assert comparison.to_json()["warning"] == comparison.warning


@pytest.mark.parametrize("values", [np.array([[0.0, 1.0]]), np.array([3.0]), np.array(2.0), np.array([[np.nan, 1.0]])])
def test_varying_or_single_outputs_are_not_warned(values):
    assert verify.compare("y", values, values).warning is None
