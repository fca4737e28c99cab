"""The ONNX conformance cases of the softmax family, shared by the ONNX Runtime tests
(``tests/test_conformance.py``) and the TVM tests (``tests/backends/tvm/test_conformance.py``).

The family is every node test case of ``Softmax`` and ``LogSoftmax`` (with their
expansions into ``Exp``/``ReduceSum``), and every case whose graph holds a ``Softmax`` or
a ``LogSoftmax``: the expanded ``Attention`` cases (opsets 23 to 25: masks, causal,
grouped heads, softcap, ``softmax_precision``, fully masked rows), the expanded
``FlexAttention`` cases and the expanded ``SoftmaxCrossEntropyLoss`` cases. The loss
operators' cases for fuse-cross-entropy are :mod:`tests.loss_models`. Outputs are compared with the cases'
expected outputs by :func:`assert_expected`, at the per-row tolerance of the output's
dtype that verification uses for exact passes.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx

from rewriter import verify

SOFTMAX_OPS = ("Softmax", "LogSoftmax")
Case = tuple[onnx.ModelProto, list[tuple[list[np.ndarray], list[np.ndarray]]]]


@functools.cache
def all_cases() -> dict[str, Case]:
    """Every node test case of the onnx package, by name: (model, data sets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx.backend.test.case.node as node_cases

        collected = node_cases.collect_testcases(None)
    return {case.name: (case.model, case.data_sets) for case in collected}


def softmax_nodes(proto: onnx.ModelProto) -> int:
    """How many Softmax/LogSoftmax nodes the main graph holds."""
    return sum(node.op_type in SOFTMAX_OPS for node in proto.graph.node)


@functools.cache
def softmax_family() -> list[str]:
    """The names of the softmax family's cases (see the module docstring), sorted."""
    names = []
    for name, (proto, _) in all_cases().items():
        if name.startswith(("test_softmax", "test_logsoftmax")) or softmax_nodes(proto):
            names.append(name)
    return sorted(names)


@functools.cache
def attention_operator_cases() -> list[str]:
    """The names of the cases of the ``Attention`` operator itself (opsets 23-25: not the
    ``_expanded`` ones, which hold its function body), sorted."""
    return sorted(
        name for name in all_cases() if name.startswith("test_attention") and not name.endswith("_expanded")
    )


def feeds(proto: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The graph inputs of ``proto`` by name."""
    return {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}


def assert_expected(
    got: dict[str, np.ndarray],
    proto: onnx.ModelProto,
    outputs: list[np.ndarray],
    name: str,
    tolerance: verify.Tolerance | None = None,
) -> None:
    """Each output of ``got`` matches the expected one: NaN where it has NaN, and per row
    within ``tolerance``, by default verification's exact tolerance of the output's dtype
    (float32: 1e-5 of the row's largest magnitude + 1e-6; float16 4e-3 + 1e-4; bfloat16
    3e-2 + 1e-3; float64 1e-9 + 1e-12)."""
    for info, expected in zip(proto.graph.output, outputs, strict=True):
        value = np.asarray(got[info.name])
        expected = np.asarray(expected)
        assert value.shape == expected.shape, (
            f"{name}: {info.name} {value.shape} != {expected.shape}"
        )
        if value.dtype.kind != "f" and str(value.dtype) != "bfloat16":
            np.testing.assert_array_equal(value, expected, err_msg=f"{name}: {info.name}")
            continue
        comparison = verify.compare(info.name, expected, value)
        assert verify.check_tolerance(comparison, expected, tolerance), (
            f"{name}: {info.name} differs (max abs {comparison.max_abs_err:.3g}, worst row "
            f"{comparison.max_row_rel_err:.3g}, NaN mismatches {comparison.nan_mismatch})"
        )
