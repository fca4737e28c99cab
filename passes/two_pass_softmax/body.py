"""The ONNX function bodies of ``TwoPassSoftmax`` and ``TwoPassLogSoftmax``, and of their
float64 ops ``TwoPassSoftmaxDouble`` and ``TwoPassLogSoftmaxDouble``.

Standard ops of the caller's opset, float64 inside, along the last axis: the math of
:mod:`rewriter.passes.two_pass_softmax.math` (Dukhan & Ablavatski 2020, arXiv 2001.04438).
float32/float16/bfloat16 inputs use the (mantissa, power of 2) pairs with the degree-5
polynomial; float64 inputs the (e**t, power of e) pairs with ``Exp`` in double, exact at
double precision (the module docstring of ``math`` says why; one body cannot serve both,
since a function cannot branch on its input's type).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from rewriter.function_body import FunctionBody
from rewriter.passes.two_pass_softmax import math as tpm

# CastLike (opset 15) lets one body serve every float type; below it the body casts
# back to float32, so only float32 Softmax nodes are rewritten there.
CASTLIKE_OPSET = 15

# source op -> our op, for float32/float16/bfloat16 and for float64 inputs
TARGETS = {"Softmax": "TwoPassSoftmax", "LogSoftmax": "TwoPassLogSoftmax"}
DOUBLE_TARGETS = {"Softmax": "TwoPassSoftmaxDouble", "LogSoftmax": "TwoPassLogSoftmaxDouble"}


def function_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``op_type`` (a value of :data:`TARGETS` or
    :data:`DOUBLE_TARGETS`) at ``opset``.

    Computed in float64 along the last axis; see :mod:`rewriter.passes.two_pass_softmax.math`.

    >>> function_proto("TwoPassSoftmax", 17).name
    'TwoPassSoftmax'
    """
    if op_type in DOUBLE_TARGETS.values():
        return _double_proto(op_type, opset)
    body = FunctionBody(opset)
    node = body.node

    def const(name: str, value: float) -> str:
        return body.const(name, value, dtype=TensorProto.DOUBLE)

    def reduce(op: str, x: str, output: str) -> str:
        return body.reduce(op, x, [-1], output)

    xd = node("Cast", ["X"], "xd", to=TensorProto.DOUBLE)
    # Pass 1: n = round(x log2 e), t = x - n ln2 (Cody-Waite), m = p(t).
    scaled = node("Mul", [xd, const("log2e", tpm.LOG2E)], "x_log2e")
    n = node("Floor", [node("Add", [scaled, const("half", 0.5)], "x_log2e_half")], "n")
    t_hi = node("Sub", [xd, node("Mul", [n, const("ln2_hi", tpm.LN2_HI)], "n_ln2_hi")], "t_hi")
    t = node("Sub", [t_hi, node("Mul", [n, const("ln2_lo", tpm.LN2_LO)], "n_ln2_lo")], "t_raw")
    # -inf has no mantissa (t is NaN): give it m = 1, its 2**(n - N) = 0 removes it.
    neg_inf = node("Less", [xd, const("lowest", float(np.finfo(np.float64).min))], "is_neg_inf")
    t = node("Where", [neg_inf, const("zero", 0.0), t], "t_finite")
    t = node("Max", [t, const("t_min", -tpm.T_CLAMP)], "t_low")
    t = node("Min", [t, const("t_max", tpm.T_CLAMP)], "t")
    m = const("c5", tpm.EXP_POLY[5])
    for degree in range(4, -1, -1):
        m = node("Mul", [m, t], f"p{degree}_mul")
        m = node("Add", [m, const(f"c{degree}", tpm.EXP_POLY[degree])], f"p{degree}")
    n_max = reduce("ReduceMax", n, "n_max")
    delta = node("Sub", [n, n_max], "n_delta")
    scale = node("Pow", [const("two", 2.0), delta], "scale")
    contribution = node("Mul", [m, scale], "contribution")
    total = reduce("ReduceSum", contribution, "m_sum")
    # Pass 2: y = m / M * 2**(n - N).
    if op_type == "TwoPassSoftmax":
        yd = node("Div", [contribution, total], "yd")
    else:
        log_m = node("Log", [m], "log_m")
        shifted = node("Add", [log_m, node("Mul", [delta, const("ln2", tpm.LN2)], "delta_ln2")], "log_num")
        yd = node("Sub", [shifted, node("Log", [total], "log_sum")], "yd")
    if opset >= CASTLIKE_OPSET:
        node("CastLike", [yd, "X"], "Y")
    else:
        node("Cast", [yd], "Y", to=TensorProto.FLOAT)
    return body.function(
        op_type,
        ["X"],
        ["Y"],
        doc=f"{op_type} along the last axis (two-pass algorithm, float64 inside).",
    )


def _double_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """The float64 body: pairs ``m e**k`` with ``k = round(x)``, ``m = Exp(x - k)``."""
    body = FunctionBody(opset)
    node = body.node

    def const(name: str, value: float) -> str:
        return body.const(name, value, dtype=TensorProto.DOUBLE)

    # Pass 1: k = round(x), t = x - k (exact), m = e**t.
    k = node("Floor", [node("Add", ["X", const("half", tpm.HALF)], "x_half")], "k")
    t = node("Sub", ["X", k], "t_raw")
    # -inf has no mantissa (t is NaN): give it m = 1, its e**(k - K) = 0 removes it.
    neg_inf = node("Less", ["X", const("lowest", float(np.finfo(np.float64).min))], "is_neg_inf")
    t = node("Where", [neg_inf, const("zero", 0.0), t], "t")
    m = node("Exp", [t], "m")
    delta = node("Sub", [k, body.reduce("ReduceMax", k, [-1], "k_max")], "k_delta")
    contribution = node("Mul", [m, node("Exp", [delta], "scale")], "contribution")
    total = body.reduce("ReduceSum", contribution, [-1], "m_sum")
    # Pass 2: y = m e**(k - K) / M, or t + (k - K) - log M.
    if op_type == DOUBLE_TARGETS["Softmax"]:
        node("Div", [contribution, total], "Y")
    else:
        node("Sub", [node("Add", [t, delta], "log_num"), node("Log", [total], "log_sum")], "Y")
    return body.function(
        op_type,
        ["X"],
        ["Y"],
        doc=f"{op_type} of a float64 input along the last axis (two-pass, pairs m e**k).",
    )
