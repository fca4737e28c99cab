"""two-pass-softmax on random graphs, checked against ONNX Runtime running the original.

Random Softmax/LogSoftmax nodes: opset 11 to 21 (Flatten semantics below 13), any axis
(negative ones too), rank 1 to 4, float32, float16 and float64, inputs mixing ordinary
values with +-inf, NaN, zeros and the largest finite values. NaN must appear exactly
where ONNX Runtime's original puts it; every other entry must pass the exact tolerance
(per row, see :class:`rewriter.verify.Tolerance`). One exception: ONNX Runtime's float64
LogSoftmax leaves the ONNX definition in rows holding NaN or +inf (it gives -inf and
finite values there, where ``x - max`` makes the row NaN, as its float32 LogSoftmax, its
float64 Softmax and ``onnx.reference`` do); those rows are expected NaN.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from rewriter import verify
from rewriter.registry import create_pass

DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float16": (np.float16, TensorProto.FLOAT16),
    "float64": (np.float64, TensorProto.DOUBLE),
}


@st.composite
def softmax_cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, np.ndarray, str]:
    op = draw(st.sampled_from(["Softmax", "LogSoftmax"]))
    opset = draw(st.integers(11, 21))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    dtype, elem_type = DTYPES[dtype_name]
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    if axis is None and opset < 13 and len(shape) == 1:
        axis = 0  # the default axis 1 does not exist
    biggest = float(np.finfo(dtype).max)
    special = st.sampled_from([np.inf, -np.inf, np.nan, biggest, -biggest, 0.0, -0.0])
    ordinary = st.floats(-30, 30, width=np.finfo(dtype).bits)
    huge = st.floats(-biggest, biggest, width=np.finfo(dtype).bits)
    elements = st.one_of(ordinary, ordinary, ordinary, special, huge)
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    attributes = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attributes)],
        "g",
        [helper.make_tensor_value_info("x", elem_type, list(shape))],
        [helper.make_tensor_value_info("y", elem_type, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model, x, dtype_name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(softmax_cases())
def test_two_pass_softmax_matches_onnx_runtime(case):
    model, x, dtype_name = case
    reference = verify.run(model.SerializeToString(), {"x": x})["y"]
    if dtype_name == "float64" and model.graph.node[0].op_type == "LogSoftmax":
        softmax = onnx.ModelProto()
        softmax.CopyFrom(model)
        softmax.graph.node[0].op_type = "Softmax"
        nan_rows = np.isnan(verify.run(softmax.SerializeToString(), {"x": x})["y"])
        reference = np.where(nan_rows, np.nan, reference)
    result = create_pass("two-pass-softmax")(ir.serde.deserialize_model(model))
    opset = model.opset_import[0].version
    rewritable = dtype_name != "float16" or opset >= 15  # float64: the double op
    assert result.modified == rewritable, result.notes
    rewritten = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    candidate = verify.run(rewritten.SerializeToString(), {"x": x})["y"]
    assert candidate.dtype == reference.dtype and candidate.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(candidate), np.isnan(reference))
    comparison = verify.compare("y", reference, candidate)
    assert verify.check_tolerance(comparison, reference, verify.DEFAULT_TOLERANCE[dtype_name]), (
        comparison,
        reference,
        candidate,
    )
