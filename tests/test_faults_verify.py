"""Fault cases of verification: a huge element must not hide an error in another row, and
NaN or inf where the original has a number is never a perfect cosine."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from rewriter import verify
from rewriter.errors import InputError

FP16 = verify.DEFAULT_TOLERANCE["float16"]


def _log_probs_next_to_a_mask_row() -> tuple[np.ndarray, np.ndarray]:
    """float16 log-probabilities: row 0 holds the -65504 of a masked row, row 1 is off by 2.1."""
    reference = np.log(np.full((2, 8), 1 / 8)).astype(np.float16)
    reference[0, 0] = -65504
    candidate = reference.copy()
    candidate[1, 3] -= np.float16(2.1)
    return reference, candidate


def test_a_huge_element_does_not_hide_an_error_in_another_row():
    reference, candidate = _log_probs_next_to_a_mask_row()
    comparison = verify.compare("logp", reference, candidate)
    # The old rule (one scale for the whole output) let this pass: 2.1 < 4e-3 * 65504.
    assert FP16.allows(comparison.max_abs_err, 65504)
    assert not verify.check_tolerance(comparison, reference, FP16)
    assert comparison.max_row_rel_err == pytest.approx(2.1 / np.log(8), rel=1e-2)


def test_rows_within_their_own_tolerance_pass():
    reference, _ = _log_probs_next_to_a_mask_row()
    candidate = reference.copy()
    candidate[1] += np.float16(1e-3)  # one float16 ulp at |x| ~ 2
    candidate[0, 0] = -65472  # one ulp at 65504
    assert verify.check_tolerance(verify.compare("logp", reference, candidate), reference, FP16)


def test_the_rule_is_per_row_along_the_last_axis():
    reference = np.array([[1000.0, 0.0], [1.0, 0.5]])
    candidate = reference + np.array([[0.001, 0.0], [0.001, 0.0]])
    tolerance = verify.Tolerance(rtol=1e-5, atol=0.0)
    # Row 0 passes on its scale (1e-6 relative); row 1's error is 1e-3 of its scale.
    assert not verify.check_tolerance(verify.compare("y", reference, candidate), reference, tolerance)
    candidate[1, 0] = 1.0
    assert verify.check_tolerance(verify.compare("y", reference, candidate), reference, tolerance)


def test_scalars_and_empty_outputs():
    tolerance = verify.Tolerance(rtol=1e-5, atol=0.0)
    assert verify.check_tolerance(verify.compare("s", np.float32(3.0), np.float32(3.0)), np.float32(3.0), tolerance)
    assert not verify.check_tolerance(verify.compare("s", np.float32(3.0), np.float32(3.1)), np.float32(3.0), tolerance)
    empty = np.zeros((0, 4), np.float32)
    assert verify.check_tolerance(verify.compare("e", empty, empty), empty, tolerance)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cosine_is_not_perfect_when_the_candidate_holds_nan_or_inf(bad):
    reference = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    candidate = reference.copy()
    candidate[1, 2] = bad
    comparison = verify.compare("y", reference, candidate)
    assert math.isnan(comparison.cosine)
    assert comparison.nan_mismatch == 1 and math.isinf(comparison.max_abs_err)
    assert not verify.check_tolerance(comparison, reference)
    assert comparison.to_json()["cosine"] == "nan"


def test_matching_nan_and_inf_keep_a_perfect_cosine():
    reference = np.array([[1.0, np.nan, np.inf, -np.inf]], np.float32)
    comparison = verify.compare("y", reference, reference.copy())
    assert comparison.cosine == 1.0 and verify.check_tolerance(comparison, reference)


def test_report_json_has_no_arrays():
    comparison = verify.compare("y", np.ones((2, 3)), np.ones((2, 3)))
    data = comparison.to_json()
    assert "row_errors" not in data and "row_scales" not in data
    assert data["max_row_rel_err"] == 0.0


def _save(tmp_path, name: str, nodes, inputs, outputs, initializers=()):
    from onnx import helper

    path = tmp_path / f"{name}.onnx"
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _mixed_precision_models(tmp_path):
    """A float32 softmax cast to a float64 output; a float16 softmax inside float32 I/O
    (the keep_io_types mixed-precision export); a float64 output of float64 work."""
    from onnx import TensorProto as T
    from onnx import helper

    x32 = helper.make_tensor_value_info("x", T.FLOAT, [4, 64])
    x64 = helper.make_tensor_value_info("x", T.DOUBLE, [4, 64])
    to_f64 = _save(
        tmp_path, "to_f64",
        [helper.make_node("Softmax", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=T.DOUBLE)],
        [x32], [helper.make_tensor_value_info("y", T.DOUBLE, [4, 64])],
    )
    f16_inside = _save(
        tmp_path, "f16_inside",
        [
            helper.make_node("Mul", ["x", "k"], ["xs"]),
            helper.make_node("Cast", ["xs"], ["xh"], to=T.FLOAT16),
            helper.make_node("Softmax", ["xh"], ["sh"]),
            helper.make_node("Cast", ["sh"], ["y"], to=T.FLOAT),
        ],
        [x32], [helper.make_tensor_value_info("y", T.FLOAT, [4, 64])],
        [helper.make_tensor("k", T.FLOAT, [], [4.0])],
    )
    # Two outputs: one through float16, one float32 throughout (keeps float32's tolerance).
    branches = _save(
        tmp_path, "branches",
        [
            helper.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16),
            helper.make_node("Softmax", ["xh"], ["sh"]),
            helper.make_node("Cast", ["sh"], ["y16"], to=T.FLOAT),
            helper.make_node("Softmax", ["x"], ["y32"]),
        ],
        [x32],
        [helper.make_tensor_value_info("y16", T.FLOAT, [4, 64]), helper.make_tensor_value_info("y32", T.FLOAT, [4, 64])],
    )
    pure_f64 = _save(
        tmp_path, "pure_f64", [helper.make_node("Softmax", ["x"], ["y"])],
        [x64], [helper.make_tensor_value_info("y", T.DOUBLE, [4, 64])],
    )
    return to_f64, f16_inside, branches, pure_f64


def test_tolerance_is_that_of_the_least_precise_type_an_output_is_computed_in(tmp_path):
    to_f64, f16_inside, branches, pure_f64 = _mixed_precision_models(tmp_path)
    fp32, fp64 = verify.DEFAULT_TOLERANCE["float32"], verify.DEFAULT_TOLERANCE["float64"]
    assert verify.output_tolerances(to_f64) == {"y": fp32}
    assert verify.output_tolerances(f16_inside) == {"y": FP16}
    assert verify.output_tolerances(branches) == {"y16": FP16, "y32": fp32}
    assert verify.output_tolerances(pure_f64) == {"y": fp64}


def test_exact_rewrites_of_mixed_precision_models_pass(tmp_path, capsys):
    from tests.faults import run_cli

    for path in _mixed_precision_models(tmp_path):
        out = tmp_path / f"{path.stem}.out.onnx"
        report = tmp_path / f"{path.stem}.json"
        code, lines = run_cli([path, "--passes", "two-pass-softmax", "-o", out, "--report-json", report, "-q"], capsys)
        assert code == 0, (path.stem, lines)
        outputs = json.loads(report.read_text())["verification"]["outputs"]
        assert all(output["passed"] for output in outputs)
    # The float32 output beside the float16 branch keeps float32's tolerance.
    by_name = {o["name"]: o for o in json.loads((tmp_path / "branches.json").read_text())["verification"]["outputs"]}
    assert by_name["y32"]["tolerance"] == {"rtol": 1e-5, "atol": 1e-6}
    assert by_name["y16"]["tolerance"] == {"rtol": FP16.rtol, "atol": FP16.atol}


def test_complex_outputs_compare_the_complex_difference():
    import warnings

    reference = np.array([[1 + 1j, 2 - 1j], [0.5j, 3.0]], np.complex64)
    candidate = reference.copy()
    candidate[1, 0] += 1e-3j  # the imaginary part alone differs
    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        comparison = verify.compare("spectrum", reference, candidate)
        assert comparison.max_abs_err == pytest.approx(1e-3, rel=1e-3)
        assert comparison.cosine < 1 and comparison.argmax_agreement is None
        assert not verify.check_tolerance(comparison, reference)
        assert comparison.tolerance == {"rtol": 1e-5, "atol": 1e-6}  # complex64: float32's
        same = verify.compare("spectrum", reference, reference.copy())
        assert same.max_abs_err == 0 and same.cosine == pytest.approx(1.0)
        assert verify.check_tolerance(same, reference)
    assert verify.default_tolerance("complex128") == verify.DEFAULT_TOLERANCE["float64"]


def _bf16_input_model(tmp_path):
    """``Softmax(x + float(b))`` with a float32 ``x`` and a bfloat16 ``b``, both [2, 8]."""
    from onnx import TensorProto as T
    from onnx import helper

    return _save(
        tmp_path, "bf16_in",
        [helper.make_node("Cast", ["b"], ["bf"], to=T.FLOAT), helper.make_node("Add", ["x", "bf"], ["s"]),
         helper.make_node("Softmax", ["s"], ["y"])],
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 8]), helper.make_tensor_value_info("b", T.BFLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2, 8])],
    )


def test_bfloat16_graph_inputs_and_outputs_are_verified(tmp_path, capsys):
    # Before: ONNX Runtime's numpy feeds and results have no bfloat16 ('Numpy_type 256
    # can't be converted'), so such models could not be verified (exit 2).
    import ml_dtypes
    from onnx import TensorProto as T
    from onnx import helper

    from tests.faults import run_cli

    bf16_in = _bf16_input_model(tmp_path)
    bf16_out = _save(
        tmp_path, "bf16_out",
        [helper.make_node("Softmax", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=T.BFLOAT16)],
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])], [helper.make_tensor_value_info("y", T.BFLOAT16, [2, 8])],
    )
    generated = verify.make_inputs(bf16_in)["b"]
    assert generated.dtype == ml_dtypes.bfloat16 and len(np.unique(generated.astype(np.float32))) > 2
    outputs = verify.run(bf16_out, {"x": np.ones((2, 8), np.float32)})
    assert outputs["y"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(outputs["y"].astype(np.float32), np.full((2, 8), 0.125, np.float32))
    for path in (bf16_in, bf16_out):
        code, lines = run_cli([path, "--passes", "two-pass-softmax", "-o", tmp_path / f"{path.stem}.out.onnx", "-q"], capsys)
        assert code == 0, (path.stem, lines)


def test_bfloat16_inputs_saved_with_np_savez_are_read_as_bfloat16(tmp_path, capsys):
    # np.savez stores a bfloat16 array as raw bytes ('|V2'): before, --inputs refused it
    # ("has dtype |V2, the model takes bfloat16").
    import ml_dtypes

    from tests.faults import run_cli

    model = _bf16_input_model(tmp_path)
    values = np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((2, 8), np.float32), b=values.astype(ml_dtypes.bfloat16))
    loaded = verify.load_inputs(inputs, model)
    assert loaded["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded["b"].astype(np.float32), values.astype(ml_dtypes.bfloat16).astype(np.float32))
    out = tmp_path / "out.onnx"
    code, lines = run_cli([model, "--passes", "two-pass-softmax", "-o", out, "--inputs", inputs, "-q"], capsys)
    assert code == 0, lines
    # Raw bytes of another width are still refused, naming the types.
    np.savez(inputs, x=np.zeros((2, 8), np.float32), b=np.zeros((2, 8), ml_dtypes.float8_e4m3fn))
    with pytest.raises(InputError, match="has dtype .V1, the model takes bfloat16"):
        verify.load_inputs(inputs, model)


def test_calibration_runs_take_bfloat16_inputs(tmp_path, capsys):
    # Before: prune's distortion probe fed ONNX Runtime numpy bfloat16 arrays, an internal
    # error ("Numpy_type 256 can't be converted to MLDataType"); quantize's importance
    # runs share the same runner.
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from tests.faults import run_cli

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (16, 32)), ("w2", (32, 8)))
    ]
    model = _save(
        tmp_path, "bf16_mlp",
        [helper.make_node("Cast", ["xb"], ["x"], to=T.FLOAT), helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [helper.make_tensor_value_info("xb", T.BFLOAT16, ["batch", 16])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["batch", 8])],
        weights,
    )
    for passes in ("prune", "quantize(activations=int8)", "quantize(avg_bits=6)"):
        report = tmp_path / "report.json"
        out = tmp_path / "out.onnx"
        code, lines = run_cli([model, "--passes", passes, "-o", out, "--report-json", report, "-q"], capsys)
        assert code == 0, (passes, lines)
        assert json.loads(report.read_text())["verification"]["outputs"][0]["cosine"] > 0.5
