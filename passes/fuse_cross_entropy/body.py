"""The ONNX function bodies of ``FusedCrossEntropy`` and ``FusedLinearCrossEntropy``.

The reference semantics, not the fused algorithm: ``log_prob = z - logsumexp(z)`` then
``NegativeLogLikelihoodLoss``, with the caller's attributes passed by reference (see
:mod:`rewriter.passes.fuse_cross_entropy.onnx`).
"""

from __future__ import annotations

import onnx
from onnx import helper

from rewriter.pass_base import DOMAIN

LOSS = "FusedCrossEntropy"
LINEAR_LOSS = "FusedLinearCrossEntropy"


def _ref(name: str, kind: str, caller_name: str | None = None) -> onnx.AttributeProto:
    """An attribute taking the value of the calling node's attribute ``caller_name`` (default: ``name``)."""
    attribute = helper.make_attribute_ref(name, onnx.AttributeProto.AttributeType.Value(kind))
    attribute.ref_attr_name = caller_name or name
    return attribute


def function_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """The ONNX function body of ``FusedCrossEntropy`` or ``FusedLinearCrossEntropy`` at ``opset``.

    ``log_prob = z - logsumexp(z)`` over axis 1 (max-shifted), then
    ``NegativeLogLikelihoodLoss`` with the caller's ``reduction`` and ``ignore_index``;
    the linear one first computes ``z = Gemm(Flatten(hidden, -1), weight, bias)``.

    >>> function_proto("FusedLinearCrossEntropy", 18).input
    ['hidden', 'weight', 'labels', 'bias', 'weights']
    """
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def reduce(op: str, x: str, output: str) -> str:
        # axes became an input in ReduceSum-13 and ReduceMax-18.
        if op == "ReduceSum" or opset >= 18:
            axes = node("Constant", [], output + "_axes", value=helper.make_tensor(output + "_axes", onnx.TensorProto.INT64, [1], [1]))
            return node(op, [x, axes], output, keepdims=1)
        return node(op, [x], output, axes=[1], keepdims=1)

    attributes = ["reduction", "ignore_index"]
    if op_type == LINEAR_LOSS:
        inputs, outputs = ["hidden", "weight", "labels", "bias", "weights"], ["loss"]
        flat = node("Flatten", ["hidden"], "flat_hidden", axis=-1)
        nodes.append(helper.make_node("Gemm", [flat, "weight", "bias"], ["scores"]))
        nodes[-1].attribute.append(_ref("transB", "INT", "transpose_weight"))
        attributes.append("transpose_weight")
    else:
        inputs, outputs = ["scores", "labels", "weights"], ["loss", "log_prob"]
    shifted = node("Sub", ["scores", reduce("ReduceMax", "scores", "row_max")], "shifted")
    total = reduce("ReduceSum", node("Exp", [shifted], "exp"), "row_sum")
    node("Sub", [shifted, node("Log", [total], "log_sum")], "log_prob")
    nodes.append(helper.make_node("NegativeLogLikelihoodLoss", ["log_prob", "labels", "weights"], ["loss"]))
    nodes[-1].attribute.extend([_ref("reduction", "STRING"), _ref("ignore_index", "INT")])
    return helper.make_function(
        DOMAIN,
        op_type,
        inputs,
        outputs,
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=attributes,
        doc_string=f"{op_type}: the reference semantics (logits computed in full); see passes/fuse_cross_entropy/.",
    )
