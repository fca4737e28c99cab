"""The loss decomposition the TVM import uses: a golden Before/Expected graph, exact on the
ONNX conformance cases, and the fused training loss compiles."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter import verify
from rewriter.backends.tvm.relax_passes.loss_decompose import expand_losses
from tests.backends.tvm.onnx_golden import structure
from tests.helpers import model_from_text


@functools.cache
def _cases() -> dict[str, tuple[onnx.ModelProto, list]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx.backend.test.case.node as node_cases

        collected = node_cases.collect_testcases(None)
    losses = ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss")
    return {
        case.name: (case.model, case.data_sets)
        for case in collected
        if len(case.model.graph.node) == 1 and case.model.graph.node[0].op_type in losses
    }


NAMES = sorted(_cases())


def _feeds(proto: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}


def test_golden_softmax_cross_entropy_with_ignore_index():
    before = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3, 5] scores, int64[3] labels) => (float loss) {
            loss = SoftmaxCrossEntropyLoss<reduction = "mean", ignore_index = -100>(scores, labels)
        }
        """
    )
    # As ONNX defines it: the ignored labels point at class 0 and weigh 0, the mean is over
    # the kept rows.
    expected = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3, 5] scores, int64[3] labels) => (float loss) {
            log_prob = LogSoftmax<axis = 1>(scores)
            one = Constant<value = int64[1] {1}>()
            ignore = Constant<value = int64 {-100}>()
            ignored = Equal(labels, ignore)
            zero = Constant<value = int64 {0}>()
            safe = Where(ignored, zero, labels)
            not_ignored = Not(ignored)
            kept = Cast<to = 1>(not_ignored)
            index = Unsqueeze(safe, one)
            gathered = GatherElements<axis = 1>(log_prob, index)
            picked = Squeeze(gathered, one)
            negated = Neg(picked)
            losses = Mul(negated, kept)
            total = ReduceSum<keepdims = 0>(losses)
            count = ReduceSum<keepdims = 0>(kept)
            loss = Div(total, count)
        }
        """
    )
    assert expand_losses(before) == 1
    assert structure(before) == structure(expected)
    assert expand_losses(before) == 0  # idempotent: no loss op left


def test_cases_were_found():
    assert len(NAMES) >= 50


@pytest.mark.parametrize("name", NAMES)
def test_decomposition_gives_the_expected_outputs(name):
    proto, data_sets = _cases()[name]
    model = ir.serde.deserialize_model(proto)
    assert expand_losses(model) == 1
    ops = {node.op_type for node in model.graph}
    assert not ops & {"SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"}
    rewritten = ir.serde.serialize_model(model)
    for inputs, outputs in data_sets:
        got = verify.run(rewritten.SerializeToString(), _feeds(proto, inputs))
        for info, expected in zip(proto.graph.output, outputs, strict=True):
            # float32 sums in a different order than numpy's reference.
            np.testing.assert_allclose(got[info.name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "name", ["test_sce_mean_weight_ii_3d_log_prob", "test_nllloss_NCd1d2_with_weight_reduction_mean"]
)
def test_loss_models_compile_with_tvm(name):
    from rewriter.backends import tvm as backend

    proto, data_sets = _cases()[name]
    inputs, outputs = data_sets[0]
    got = backend.compile(proto, target="llvm").run(_feeds(proto, inputs))
    for info, expected in zip(proto.graph.output, outputs, strict=True):
        np.testing.assert_allclose(got[info.name], expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_fused_training_loss_compiles_and_agrees(tmp_path):
    # The exported tiny LM's loss, fused by fuse-cross-entropy, compiles (from the fused
    # op's function body, its NLL spelled out) and gives ONNX Runtime's loss.
    from rewriter.backends import tvm as backend
    from rewriter.registry import create_pass
    from tests.loss_models import export_tiny_lm

    proto, arrays = export_tiny_lm(tmp_path, dynamo=False, bias=True)
    feeds = {info.name: value for info, value in zip(proto.graph.input, arrays.values(), strict=True)}
    model = ir.serde.deserialize_model(proto)
    assert create_pass("fuse-cross-entropy")(model).stats["linear_cross_entropy_fused"] == 1
    fused = ir.serde.serialize_model(model)
    expected = verify.run(fused.SerializeToString(), feeds)
    got = backend.compile(fused, target="llvm").run(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
