"""ONNX conformance cases for Softmax and LogSoftmax still give their expected outputs
after the rewrite, at the opset they were written for and re-stamped to older and
newer opsets (where Softmax-1/11 coerce to 2-D, the expected output is the original
model's at that opset, run by ONNX Runtime)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter.registry import create_pass
from tests.helpers import run

# Two-pass in float64 against the conformance data computed by numpy in float32.
RTOL = 1e-6
ATOL = 1e-7


@functools.cache
def _cases() -> dict[str, tuple[onnx.ModelProto, list[tuple[list[np.ndarray], list[np.ndarray]]]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx.backend.test.case.node as node_cases

        collected = node_cases.collect_testcases(None)
    return {
        case.name: (case.model, case.data_sets)
        for case in collected
        if len(case.model.graph.node) == 1 and case.model.graph.node[0].op_type in ("Softmax", "LogSoftmax")
    }


CASE_NAMES = sorted(_cases())


def test_cases_were_found():
    assert len(CASE_NAMES) >= 14  # 7 Softmax and 7 LogSoftmax cases in onnx 1.17+


def _rewrite(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    result = create_pass("two-pass-softmax")(model)
    assert result.stats["softmax_replaced"] + result.stats["log_softmax_replaced"] == 1
    rewritten = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten


def _feeds(proto: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_expected_outputs_after_rewrite(name):
    proto, data_sets = _cases()[name]
    rewritten = _rewrite(proto)
    for inputs, outputs in data_sets:
        got = run(rewritten, _feeds(proto, inputs))
        for info, expected in zip(proto.graph.output, outputs, strict=True):
            np.testing.assert_allclose(got[info.name], expected, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("opset", [9, 11, 18, 21])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_restamped_opsets(name, opset):
    proto, data_sets = _cases()[name]
    restamped = onnx.ModelProto()
    restamped.CopyFrom(proto)
    del restamped.opset_import[:]
    restamped.opset_import.append(onnx.helper.make_opsetid("", opset))
    rewritten = _rewrite(restamped)
    for inputs, _ in data_sets:
        feeds = _feeds(proto, inputs)
        expected = run(restamped, feeds)
        got = run(rewritten, feeds)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{name} @ {opset}")
