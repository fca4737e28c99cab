"""softmax-free-attention: MatMul(Softmax(QKᵀ·s + mask), V) -> SoftmaxFreeAttention(Q, K, V, mask), approximate.

SOFT: Lu et al. 2021 (arXiv 2110.11945) and 2022 (arXiv 2207.03341).

* :mod:`.onnx`: the ONNX pass (registered as ``softmax-free-attention``), on the
  attentions :mod:`rewriter.passes.attention.onnx_match` finds;
* :mod:`.fx`: its torch.fx twin and the custom op
  ``torch.ops.rewriter.softmax_free_attention``;
* :mod:`.body`: the ONNX function body of ``SoftmaxFreeAttention``.

The math in torch is :func:`rewriter.passes.attention.math.softmax_free_attention`.
"""

from __future__ import annotations

from rewriter.passes.softmax_free_attention.body import OP_TYPE, function_proto
from rewriter.passes.softmax_free_attention.onnx import (
    SoftmaxFreeAttentionOptions,
    SoftmaxFreeAttentionPass,
)

__all__ = ["OP_TYPE", "SoftmaxFreeAttentionOptions", "SoftmaxFreeAttentionPass", "function_proto"]
