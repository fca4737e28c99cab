"""Fault cases of verification: a huge element must not hide an error in another row, and
NaN or inf where the original has a number is never a perfect cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewriter import verify

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
