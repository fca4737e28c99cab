"""The softmax family's ONNX conformance cases (:mod:`tests.conformance_cases`), rewritten by
two-pass-softmax and compiled through TVM, give their expected outputs.

Our Softmax/LogSoftmax ops go to the two-pass kernel; the rest of each graph (the expanded
``Attention`` function: masks, causal, grouped heads, softcap) to TVM's importer and
legalization. The default suite compiles the cases that once disagreed (fully masked rows
and NaN robustness, an empty structure, softmax precision: TVM's ``max`` started from the
lowest finite float, see :mod:`rewriter.backends.tvm.relax_passes.reduce_identity`; the
float64 softmax two-pass-softmax used to skip) and one plain case of each kind; the whole
family (180 compiles, ~2-3 s each) is in the slow suite.

The ``Attention`` operator's own cases (93, opsets 23-25) compile twice: as they are
(the operator from its ONNX definition, :mod:`rewriter.backends.tvm.standard_functions`:
TVM's importer read it as the ``com.microsoft`` op) and after two-pass-softmax (which
writes out those the attention matcher takes: 4-D, no cache, softcap or local window);
both give the expected outputs. A few in the default suite, all of them in the slow one.
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
    attention_operator_cases,
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


# The Attention operator: written out (boolean mask, grouped heads with a causal mask, a
# fully masked row, bfloat16) or left to its definition (3-D inputs, a KV cache, a local
# window, the scores as an output next to absent ones).
OPERATOR_DEFAULT = [
    "test_attention_4d_attn_mask_bool",
    "test_attention_4d_gqa_causal",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness",
    "test_attention_4d_causal_bf16",
    "test_attention_3d_gqa",
    "test_attention_4d_gqa_with_past_and_present",
    "test_attention_local_window",
    "test_attention_4d_with_qk_matmul_softcap",
]


def test_operator_default_cases_exist():
    assert set(OPERATOR_DEFAULT) <= set(attention_operator_cases())


def _check_operator(name: str) -> None:
    proto, data_sets = all_cases()[name]
    model = ir.serde.deserialize_model(proto)
    result = create_pass("two-pass-softmax")(model)
    left = [note for note in result.notes if note.startswith("Attention")]
    assert result.stats["attention_expanded"] + len(left) == 1, result.notes
    for source in (proto, ir.serde.serialize_model(model)):
        compiled = backend.compile(source, target="llvm")
        for inputs, outputs in data_sets:
            assert_expected(compiled.run(feeds(proto, inputs)), proto, outputs, name)


@pytest.mark.parametrize("name", OPERATOR_DEFAULT)
def test_attention_operator_through_tvm(name: str) -> None:
    _check_operator(name)


@pytest.mark.slow  # 85 cases, two compiles of 2-3 s each
@pytest.mark.parametrize(
    "name", [name for name in attention_operator_cases() if name not in OPERATOR_DEFAULT]
)
def test_attention_operator_through_tvm_all_cases(name: str) -> None:
    _check_operator(name)
