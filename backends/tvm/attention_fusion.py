"""MatMul(TwoPassSoftmax(QKᵀ·s + mask), V) -> ``ai.rewriter::SoftmaxAttention``, one fused kernel.

After ``two-pass-softmax`` an attention is still three kernels: the scores' matmul, the
softmax, the matmul with V, and the n x m scores make two round trips through memory
between them. :func:`fuse` finds each attention with the matcher the attention passes
share (:mod:`rewriter.passes.attention.onnx_match`: every export form it knows: scales on
Q, Kᵀ or the scores, biases, padding, causal and boolean masks, merged heads, the sdpa
exports' NaN guard), with ``TwoPassSoftmax`` as the softmax, and writes one
``SoftmaxAttention(Q, K, V, mask; scale)`` node in its place (operands built by
:mod:`rewriter.passes.attention.onnx_build`). Its lowering,
:mod:`rewriter.backends.tvm.ops.softmax_attention`, calls the fused kernel of
:mod:`rewriter.backends.tvm.kernels.softmax_attention`: the same function, exact.

Every float32 attention becomes the op; its lowering calls the kernel where Relax knows
Q, K and V as 4-D tensors with static head dimensions (batch and lengths static or
symbolic), and emits the graph's three kernels where it does not. The decision is the
lowering's because only Relax knows every shape: ONNX inference ran before the optimizer
folded the shape arithmetic, so a static dimension can still read ``unk__3`` here. The op is internal to
the backend: it exists only between ``prepare`` and the importer, so it has no function
body. ``prepare(fuse_attention=False)`` and GPU targets leave every attention as it
is.

>>> fuse(model)  # doctest: +SKIP
6
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from rewriter.backends.tvm.ops.softmax_attention import OP_TYPE
from rewriter.pass_base import DOMAIN
from rewriter.passes.attention import onnx_build as build
from rewriter.passes.attention import onnx_match as attention
from rewriter.passes.attention import static
from rewriter.passes.attention.onnx_match import AttentionMatch

logger = logging.getLogger(__name__)


class _FuseSoftmaxAttention(attention.AttentionRule):
    """Attention with ``TwoPassSoftmax`` in float32 to ``SoftmaxAttention``."""

    def __init__(self) -> None:
        super().__init__("FuseSoftmaxAttention")

    def softmax(self, op: Any, logits: Any) -> Any:
        return op.TwoPassSoftmax(logits, _domain=DOMAIN, _outputs=["probs"])

    def refuse(self, match: AttentionMatch) -> str:
        if any(v.dtype != ir.DataType.FLOAT for v in (match.query, match.value)):
            return "not float32"
        return ""

    def rewrite_attention(self, op: Any, match: AttentionMatch) -> ir.Value:
        q, k, v, mask = build.operands(op, match)
        output = op.op(OP_TYPE, q, k, v, mask, _domain=DOMAIN, scale=match.scale)
        # The op has no function body to infer its type from; restore may read its shape.
        output.type = ir.TensorType(ir.DataType.FLOAT)
        output.shape = _output_shape(match)
        return build.restore(op, match, output)


def _output_shape(match: AttentionMatch) -> ir.Shape | None:
    """[B, H, N, Dv] of the fused op's output as far as the match's shapes say, or None."""
    q_shape, v_shape = match.query.shape, match.value.shape
    if q_shape is None or v_shape is None:
        return None
    if match.heads is None:
        return ir.Shape([*q_shape[:-1], v_shape[-1]])
    entries = static.partial_value(match.heads)
    if entries is None or not all(isinstance(e, int) for e in entries[:2]):
        return None
    return ir.Shape([*entries[:2], q_shape[-2], v_shape[-1]])


def fuse(model: ir.Model) -> int:
    """Fuse every float32 ``TwoPassSoftmax`` attention of ``model`` (in place); returns
    how many. Each one left unfused is logged with the reason."""
    rule_set, instances = attention.rules(_FuseSoftmaxAttention, operator=False)
    count = rule_set.apply_to_model(model)
    if count:
        attention.remove_replaced(model)
    logger.info("%d attention(s) became %s", count, OP_TYPE)
    reasons = instances[0].reasons
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "TwoPassSoftmax" and node.domain == DOMAIN and node.name in reasons:
            logger.info("attention at %r left unfused: %s", node.name, reasons[node.name])
    return count
