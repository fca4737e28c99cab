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


def _conv_front_end(*, group_norm: bool = True, back: list[int] | None = None) -> onnx.ModelProto:
    """wav2vec2's feature encoder in small: [batch, samples] -> Unsqueeze -> Conv(k=10, s=5)
    -> GroupNorm as exported (Reshape, InstanceNormalization, Reshape to Shape(x)) ->
    Conv(k=3, s=2) -> MaxPool(k=2, s=2): 10 + 5 * (2 + 2 * 1) = 30 samples at the least.

    ``back``: as the exporter's optimizer leaves it at a fixed batch of 1, with a group per
    channel: the Reshape back to the constant ``back``, not to ``Shape(x)`` (the model
    shape-inferred, as exports are)."""
    rng = np.random.default_rng(0)
    groups = 2 if back is None else 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 10)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "groups"),
        numpy_helper.from_array(np.ones(groups, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["samples", "axis1"], ["x"]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[10], strides=[5]),
    ]
    if group_norm:
        nodes += [
            helper.make_node("Reshape", ["c1", "groups"], ["g"]),
            helper.make_node("InstanceNormalization", ["g", "gamma", "beta"], ["n"]),
        ]
        if back is None:
            nodes.append(helper.make_node("Shape", ["c1"], ["c1_shape"]))
        else:
            inits.append(numpy_helper.from_array(np.array(back, np.int64), "c1_shape"))
        nodes.append(helper.make_node("Reshape", ["n", "c1_shape"], ["c1n"]))
    nodes += [
        helper.make_node("Gelu", ["c1n" if group_norm else "c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], strides=[2]),
        helper.make_node("Transpose", ["c2"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["t"], ["c2b"], perm=[0, 2, 1]),
        helper.make_node("MaxPool", ["c2b"], ["y"], kernel_shape=[2], strides=[2]),
    ]
    batch = "batch" if back is None else 1
    graph = helper.make_graph(
        nodes,
        "front_end",
        [helper.make_tensor_value_info("samples", TensorProto.FLOAT, [batch, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model if back is None else onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("group_norm", [True, False])
def test_generated_length_fits_the_windows(group_norm):
    from rewriter import input_sizes

    model = _conv_front_end(group_norm=group_norm)
    assert input_sizes.smallest_size(model, [("samples", 1, 2)], start=8) == 30
    # 8 positions after every window: MaxPool out 8 <- Conv2 out 16 <- Conv1 out 33 <- 170.
    assert input_sizes.smallest_size(model, [("samples", 1, 2)], start=8, keep=8) == 170
    inputs = verify.make_inputs(model)
    assert inputs["samples"].shape == (2, 170)
    assert verify.run(model.SerializeToString(), inputs)["y"].shape == (2, 4, 8)
    # A size given with --dim is used as it is.
    assert verify.make_inputs(model, dims={"samples": 12})["samples"].shape == (2, 12)


def test_the_length_is_followed_through_reshapes_to_constant_shapes_that_keep_it():
    from rewriter import input_sizes

    # [1, 4, -1] and [0, 0, -1] keep the frames where they were (shape inference records
    # the 4 channels): the second window is reached, 30 samples.
    for back in ([1, 4, -1], [0, 0, -1]):
        assert input_sizes.smallest_size(_conv_front_end(back=back), [("samples", 1, 2)], start=8) == 30
    # [-1, 4, 0] keeps them too, but the search reads a -1 only at the axis: it stops at
    # the Reshape (the first window's 10 samples) where it cannot tell.
    assert input_sizes.smallest_size(_conv_front_end(back=[-1, 4, 0]), [("samples", 1, 2)], start=8) == 10


def test_the_length_is_followed_through_a_projection_by_a_2d_weight():
    from rewriter import input_sizes

    # SEW's squeeze: Conv(k=10, s=5) -> frames last-but-one -> a linear projection ->
    # back -> AveragePool(k=2, s=2), which needs 2 frames: 15 samples, not the conv's 10.
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[10], strides=[5]),
        helper.make_node("Transpose", ["c1"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "projection"], ["p"]),
        helper.make_node("Transpose", ["p"], ["back"], perm=[0, 2, 1]),
        helper.make_node("AveragePool", ["back"], ["y"], kernel_shape=[2], strides=[2]),
    ]
    graph = helper.make_graph(
        nodes,
        "squeeze",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((4, 1, 10)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "projection"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert input_sizes.smallest_size(model, [("x", 2, 3)], start=1) == 15


def test_windows_pads_dilation_ceil_and_same():
    from rewriter import input_sizes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def smallest(node: onnx.NodeProto) -> int | None:
        w = numpy_helper.from_array(np.ones((1, 1, 5), np.float32), "w")
        model = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))
        return input_sizes.smallest_size(model, [("x", 2, 3)], start=1)

    # Reach d * (k - 1) + 1 = 9 less the pads 1 + 2.
    assert smallest(helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2], pads=[1, 2])) == 6
    assert smallest(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")) == 1
    assert smallest(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[4], strides=[3], ceil_mode=1)) == 4


def test_original_failing_on_generated_inputs_is_exit_2_with_a_dim_hint(tmp_path, capsys):
    from rewriter.cli import main

    # A Reshape to 3 rows of 6 fits only 18 samples: no window to derive that from.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["samples", "shape"], ["rows"]), helper.make_node("Softmax", ["rows"], ["y"])],
        "rows",
        [helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["length_of_it"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(np.array([3, 6], np.int64), "shape")],
    )
    path = tmp_path / "rows.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = main([str(path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "out.onnx")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("rewrite: error: ONNX Runtime cannot run the original model on the generated inputs (samples[16])")
    assert lines[0].endswith("give the sizes of its symbolic dimensions (length_of_it) with --dim NAME=SIZE, or real inputs with --inputs")
    assert not (tmp_path / "out.onnx").exists()
    assert main([str(path), "--passes", "two-pass-softmax", "-o", str(tmp_path / "out.onnx"), "--dim", "length_of_it=18", "-q"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_wav2vec2_generated_inputs_fit_its_feature_encoder(real_model, tmp_path, exporter):
    from rewriter.job import rewrite_file

    model = real_model(f"wav2vec2_{exporter}")
    # 8 frames after the encoder: its receptive field, 30, and 20 (its stride) per frame
    # after the first: 30 + 20 * 7 samples (the 8-sample default fails in ORT).
    assert verify.make_inputs(model.path)["input_values"].shape == (2, 170)
    report = rewrite_file(model.path, tmp_path / "out.onnx", "two-pass-softmax")
    assert report.verification is not None and report.verification.passed
    assert report.verification.inputs == {"input_values": [2, 170]}
