"""The ONNX function bodies of ``FusedCrossEntropy`` and ``FusedLinearCrossEntropy``.

The reference semantics, not the fused algorithm: ``log_prob = z - logsumexp(z)`` then
``NegativeLogLikelihoodLoss``, with the caller's attributes passed by reference (see
:mod:`rewriter.passes.fuse_cross_entropy.onnx`).
"""

from __future__ import annotations

import onnx

from rewriter.function_body import FunctionBody, Ref

LOSS = "FusedCrossEntropy"
LINEAR_LOSS = "FusedLinearCrossEntropy"


def function_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``FusedCrossEntropy`` or ``FusedLinearCrossEntropy`` at ``opset``.

    ``log_prob = z - logsumexp(z)`` over axis 1 (max-shifted), then
    ``NegativeLogLikelihoodLoss`` with the caller's ``reduction`` and ``ignore_index``;
    the linear one first computes ``z = Gemm(Flatten(hidden, -1), weight, bias)``.

    >>> function_proto("FusedLinearCrossEntropy", 18).input
    ['hidden', 'weight', 'labels', 'bias', 'weights']
    """
    body = FunctionBody(opset)
    node = body.node
    attributes = ["reduction", "ignore_index"]
    if op_type == LINEAR_LOSS:
        inputs, outputs = ["hidden", "weight", "labels", "bias", "weights"], ["loss"]
        flat = node("Flatten", ["hidden"], "flat_hidden", axis=-1)
        node("Gemm", [flat, "weight", "bias"], "scores", transB=Ref("transpose_weight", "INT"))
        attributes.append("transpose_weight")
    else:
        inputs, outputs = ["scores", "labels", "weights"], ["loss", "log_prob"]
    shifted = node("Sub", ["scores", body.reduce("ReduceMax", "scores", [1], "row_max")], "shifted")
    total = body.reduce("ReduceSum", node("Exp", [shifted], "exp"), [1], "row_sum")
    node("Sub", [shifted, node("Log", [total], "log_sum")], "log_prob")
    node(
        "NegativeLogLikelihoodLoss",
        ["log_prob", "labels", "weights"],
        "loss",
        reduction=Ref("reduction", "STRING"),
        ignore_index=Ref("ignore_index", "INT"),
    )
    return body.function(
        op_type,
        inputs,
        outputs,
        attributes=attributes,
        doc=f"{op_type}: the reference semantics (logits computed in full); see passes/fuse_cross_entropy/.",
    )
