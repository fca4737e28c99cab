"""MatMul(Softmax(QKᵀ·s + mask), V) -> SigmoidAttention(Q, K, V, mask) = sigmoid(QKᵀ·s - ln n + mask)·V.

Implements Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention" (2024, arXiv 2409.04431): the row softmax is replaced by an elementwise
sigmoid with the scalar bias b = -ln(n), n the longest sequence the model is trained on
(option ``max_seq_len``; by default the graph's static key length, else the option is
required). Approximate: the rewritten model computes another function; verification
reports the fidelity it measures, and the torch.fx twin (:mod:`rewriter.passes.sigmoid_attention.fx`)
fine-tunes the rewritten model to recover accuracy.

Every attention :mod:`rewriter.passes.attention.onnx_match` finds is rewritten (subgraphs of the torch
exporters and the ``Attention`` operator of opset 23). A masked position contributes
exactly 0: sigmoid(-inf) is 0, and ONNX Runtime's float32 Sigmoid gives 0 for
``finfo.min`` masks too, but a backend's approximate sigmoid (a clamped polynomial, or
0.5·(1 + tanh(x/2)) with an approximate tanh) need not, so the body also zeroes
positions whose additive mask is <= :data:`rewriter.passes.attention.onnx_match.MASKED_AT_OR_BELOW`
with ``Where``. A Softmax that is not attention (a classifier's output) is left as is
and noted.

Requires: default-domain opset >= 15 (CastLike, Shape(start, end)). Ensures: each
``ai.rewriter::SigmoidAttention`` has its function body (standard ops of the model's
opset, so ONNX Runtime, ``onnx.reference`` and the checker run it as is).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import onnx_ir as ir

from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN, RewritePass, RewriteResult, add_function
from rewriter.passes.attention import onnx_match as attention
from rewriter.passes.attention.onnx_match import AttentionMatch, AttentionRule
from rewriter.passes.sigmoid_attention.body import OP_TYPE, function_proto
from rewriter.registry import register


@dataclasses.dataclass
class SigmoidAttentionOptions:
    """Options of ``sigmoid-attention``.

    max_seq_len: n of the bias b = -ln(n), the longest sequence used in training
    (default: each attention's static key length; required when it is dynamic).
    """

    max_seq_len: int | None = None


@register
class SigmoidAttentionPass(RewritePass):
    """Replace softmax attention by sigmoid attention (Ramapuram et al. 2024)."""

    name = "sigmoid-attention"
    exact = False
    description = "softmax attention -> sigmoid(QK^T/sqrt(d) - ln n)V (Ramapuram et al. 2024)"
    min_opset = attention.MIN_OPSET
    Options = SigmoidAttentionOptions

    def applies_to(self, model: ir.Model) -> bool:
        return attention.has_candidates(model)

    def call(self, model: ir.Model) -> RewriteResult:
        opset = model.opset_imports.get("", 1)
        n = self.options.max_seq_len
        if n is not None and n < 1:
            raise InputError(f"{self.name}: max_seq_len must be >= 1, got {n}")
        attention.prepare(model)
        if n is None:
            dynamic = [m.name for m in attention.find_attention(model) if m.key_length() is None]
            if dynamic:
                raise InputError(
                    f"{self.name}: the sequence length of {dynamic[0]!r} is dynamic; give "
                    "max_seq_len=N (the longest sequence the model is trained on: b = -ln N)"
                )
        rule_set, instances = attention.rules(_ToSigmoid, n)
        replaced = rule_set.apply_to_model(model)
        if replaced:
            add_function(model, function_proto(opset))
        notes = attention.softmax_notes(model, instances)
        stats = {"attention_replaced": replaced, "softmax_left": len(notes)}
        return RewriteResult(model, bool(replaced), stats=stats, notes=notes)


class _ToSigmoid(AttentionRule):
    def __init__(self, max_seq_len: int | None) -> None:
        super().__init__("AttentionToSigmoid")
        self.max_seq_len = max_seq_len

    def refuse(self, match: AttentionMatch) -> str:
        if self.max_seq_len is None and match.key_length() is None:
            return "dynamic sequence length and no max_seq_len"
        return ""

    def rewrite_attention(self, op: Any, match: AttentionMatch) -> ir.Value:
        n = self.max_seq_len or match.key_length()
        assert n is not None
        return op.op(
            OP_TYPE,
            match.query,
            attention.key(op, match),
            attention.value(op, match),
            attention.additive_mask(op, match),
            _domain=DOMAIN,
            scale=match.scale,
            bias=-math.log(n),
        )
