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

import collections
import dataclasses
import math
from typing import Any

import onnx_ir as ir

from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN, RewritePass, RewriteResult, add_function
from rewriter.passes.attention import onnx_build as build
from rewriter.passes.attention import onnx_match as attention
from rewriter.passes.attention.onnx_match import AttentionMatch, AttentionRule
from rewriter.passes.sigmoid_attention.body import OP_TYPE, function_proto
from rewriter.registry import register


@dataclasses.dataclass
class SigmoidAttentionOptions:
    """Options of ``sigmoid-attention``.

    max_seq_len: n of the bias b = -ln(n), the longest sequence used in training
    (default: each attention's static key length, else its key length at run time).
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
        rule_set, instances = attention.rules(_ToSigmoid, n)
        replaced = rule_set.apply_to_model(model)
        attention.remove_replaced(model)
        if replaced:
            add_function(model, function_proto(opset))
        notes = attention.softmax_notes(model, instances)
        biases = collections.Counter(
            source for instance in instances for source in getattr(instance, "biases", [])
        )
        notes += [f"{count} attention(s): {source}" for source, count in sorted(biases.items())]
        stats = {
            "attention_replaced": replaced,
            "bias_from_run_time_length": biases[RUN_TIME],
            "softmax_left": len(notes) - len(biases),
        }
        return RewriteResult(model, bool(replaced), stats=stats, notes=notes)


RUN_TIME = (
    "b = -ln n, n the key length at run time (dynamic); max_seq_len=N fixes b = -ln N, "
    "the length the model was trained on"
)


class _ToSigmoid(AttentionRule):
    def __init__(self, max_seq_len: int | None) -> None:
        super().__init__("AttentionToSigmoid")
        self.max_seq_len = max_seq_len
        self.biases: list[str] = []  # per rewrite, where its b comes from

    def rewrite_attention(self, op: Any, match: AttentionMatch) -> ir.Value:
        q, k, v, mask = build.operands(op, match)
        n = self.max_seq_len or match.key_length()
        if n is not None:
            bias = -math.log(n)
            given = "max_seq_len" if self.max_seq_len else "the static key length"
            self.biases.append(f"b = -ln {n} ({given})")
        else:  # b = -ln n_k, computed from the keys' shape, added to the mask
            n_k = op.Gather(op.Shape(k), op.Constant(value_int=2))
            log_n = op.Log(op.Cast(n_k, to=ir.DataType.FLOAT))
            mask = op.Add(mask, op.CastLike(op.Neg(log_n), q))
            bias = 0.0
            self.biases.append(RUN_TIME)
        y = op.op(OP_TYPE, q, k, v, mask, _domain=DOMAIN, scale=match.scale, bias=bias)
        return build.restore(op, match, y)
