"""sigmoid-attention: MatMul(Softmax(QKᵀ·s + mask), V) -> SigmoidAttention(Q, K, V, mask), approximate.

Ramapuram et al. 2024 (arXiv 2409.04431).

* :mod:`.onnx`: the ONNX pass (registered as ``sigmoid-attention``), on the attentions
  :mod:`rewriter.passes.attention.onnx_match` finds;
* :mod:`.fx`: its torch.fx twin and the custom op ``torch.ops.rewriter.sigmoid_attention``;
* :mod:`.body`: the ONNX function body of ``SigmoidAttention``.

The math in torch is :func:`rewriter.passes.attention.math.sigmoid_attention`.
"""

from __future__ import annotations

from rewriter.passes.sigmoid_attention.body import OP_TYPE, function_proto
from rewriter.passes.sigmoid_attention.onnx import SigmoidAttentionOptions, SigmoidAttentionPass

__all__ = ["OP_TYPE", "SigmoidAttentionOptions", "SigmoidAttentionPass", "function_proto"]
