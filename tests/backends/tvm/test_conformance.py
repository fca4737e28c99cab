"""The softmax family's ONNX conformance cases (:mod:`tests.conformance_cases`), rewritten by
two-pass-softmax and compiled through TVM, give their expected outputs.

Our Softmax/LogSoftmax ops go to the two-pass kernel; the rest of each graph (the expanded
``Attention`` function: masks, causal, grouped heads, softcap) to TVM's importer and
legalization. The default suite compiles the cases that once disagreed (fully masked rows
and NaN robustness, an empty structure, softmax precision: TVM's ``max`` started from the
lowest finite float, see :mod:`rewriter.backends.tvm.relax_passes.reduce_identity`; the
float64 softmax two-pass-softmax used to skip) and one plain case of each kind; the whole
family (180 compiles, ~2-3 s each) is in the slow suite.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402
from tests.conformance_cases import (  # noqa: E402
    all_cases,
    assert_expected,
    feeds,
    softmax_family,
    softmax_nodes,
)

# The cases that disagreed through TVM before the reduction fix (issue 15), the float64
# Softmax among them, and a plain case of each kind.
DEFAULT = [
    "test_attention_causal_boolmask_nan_robustness_expanded",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness_expanded",
    "test_attention_23_fullymasked_qk_matmul_output_mode3_zero_expanded",
    "test_attention_24_fullymasked_qk_matmul_output_mode3_zero_expanded",
    "test_attention_4d_causal_nonpad_negative_offset_structural_empty_expanded",
    "test_attention_24_qk_matmul_output_mode3_softmax_precision_expanded",
    "test_attention_local_window_gqa_rank4_mask_expanded",
    "test_attention_4d_gqa_attn_mask_expanded",
    "test_softmax_large_number",
    "test_logsoftmax_axis_1",
]
CASE_NAMES = softmax_family()
# The expanded SoftmaxCrossEntropyLoss cases reduce their loss in TVM's own reductions (as
# in test_loss_lowering.py, whose UNFUSED_RTOL this is): float32 sums of up to ~1e3
# terms in another order, 1.7e-5 relative on the 5-D mean cases.
LOSS_TOLERANCE = verify.Tolerance(rtol=1e-4, atol=1e-6)


def test_default_cases_are_in_the_family():
    assert set(DEFAULT) <= set(CASE_NAMES)


def _check(name: str) -> None:
    proto, data_sets = all_cases()[name]
    model = ir.serde.deserialize_model(proto)
    stats = create_pass("two-pass-softmax")(model).stats
    assert stats["softmax_replaced"] + stats["log_softmax_replaced"] == softmax_nodes(proto)
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    compiled = backend.compile(rewritten, target="llvm")
    tolerance = LOSS_TOLERANCE if name.startswith("test_sce") else None
    for inputs, outputs in data_sets:
        assert_expected(compiled.run(feeds(proto, inputs)), proto, outputs, name, tolerance)


@pytest.mark.parametrize("name", DEFAULT)
def test_through_tvm(name: str) -> None:
    _check(name)


@pytest.mark.slow  # 170 compiles of 2-3 s each
@pytest.mark.parametrize("name", [name for name in CASE_NAMES if name not in DEFAULT])
def test_through_tvm_whole_family(name: str) -> None:
    _check(name)
