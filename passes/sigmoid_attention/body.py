"""The ONNX function body of ``SigmoidAttention(Q, K, V, Mask)``: standard ops of the caller's opset."""

from __future__ import annotations

import onnx

from rewriter.function_body import FunctionBody
from rewriter.passes.attention import onnx_match as attention

OP_TYPE = "SigmoidAttention"


def function_proto(opset: int) -> onnx.FunctionProto:
    """The body of ``SigmoidAttention(Q, K, V, Mask)`` at ``opset``.

    Q [B, H, Nq, D], K [B, H, Nk, D], V [B, H, Nk, Dv], Mask additive, broadcastable to
    [B, H, Nq, Nk] (0 for none); attributes ``scale`` and ``bias``:
    ``Y = Where(Mask > -1e4, sigmoid(Q·scale·Kᵀ + bias + Mask), 0) · V``.

    >>> function_proto(18).name
    'SigmoidAttention'
    """
    body = FunctionBody(opset)
    scale = body.node("CastLike", [body.attribute("scale", "float"), "Q"], "scale")
    bias = body.node("CastLike", [body.attribute("bias", "float"), "Q"], "bias")
    scores = body.node(
        "MatMul", [body.node("Mul", ["Q", scale], "q_scaled"), attention.swap_last(body, "K", "k_t")], "scores"
    )
    logits = body.node("Add", [body.node("Add", [scores, bias], "biased"), "Mask"], "logits")
    probs = body.node("Sigmoid", [logits], "probs")
    keep = body.node(
        "Greater",
        ["Mask", body.const("masked_at", attention.MASKED_AT_OR_BELOW, like="Mask")],
        "keep",
    )
    kept = body.node("Where", [keep, probs, body.const("zero", 0.0, like="Q")], "kept")
    body.node("MatMul", [kept, "V"], "Y")
    return body.function(
        OP_TYPE,
        ["Q", "K", "V", "Mask"],
        ["Y"],
        attributes=["scale", "bias"],
        doc="Sigmoid attention (Ramapuram et al. 2024): sigmoid(QK^T*scale + bias + Mask) V.",
    )
