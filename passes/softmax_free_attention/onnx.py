"""MatMul(Softmax(QKᵀ·s + mask), V) -> SoftmaxFreeAttention(Q, K, V, mask) = K(Q,K̃)·pinv(K(Q̃,K̃))·K(Q̃,K)·V.

Implements SOFT: Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity"
(NeurIPS 2021, arXiv 2110.11945) and "Softmax-free Linear Transformers" (2022, arXiv
2207.03341). The softmax is replaced by the Gaussian kernel
k(a, b) = exp(-||a - b||²/2) = exp(a·b - ||a||²/2 - ||b||²/2) on Q and K scaled by
sqrt(s) (d^(-1/4) each for s = 1/sqrt(d)), approximated by Nyström with m landmarks
(option ``landmarks``, default 32): the landmarks are the average pools of the
sequence over m segments (the training-free choice; the paper learns a strided
convolution), and pinv of the m×m landmark kernel is taken by ``iterations`` (default
20) Newton–Schulz steps V ← 2V − V·A·V from V0 = Aᵀ / (||A||₁·||A||∞), which converges
for every A (Ben-Israel & Cohen 1966; ||A||₂² <= ||A||₁·||A||∞). The paper's start
α(A + εI) assumes a symmetric A, which the asymmetric form below does not have. Cost: O(n·m·d), linear in the sequence length n.

Asymmetric by default (``symmetric=false``): landmarks of Q and of K separately,
X = K(Q, K̃)·pinv(K(Q̃, K̃))·K(Q̃, K)·V. The paper ties K to Q (``symmetric=true``:
K(Q, Q̃)·pinv(K(Q̃, Q̃))·K(Q̃, Q)·V), which is how SOFT is trained from scratch; a
pretrained softmax model's keys carry what its queries match against, so rewriting
one with K := Q would throw its key projection away: the asymmetric form keeps it and
is the default here.

Approximate: the Gaussian kernel is not normalized as softmax is, so a pretrained
model needs the fine-tuning of its fx twin (:mod:`rewriter.passes.softmax_free_attention.fx`); verification reports the
fidelity it measures. Masks: masked keys (additive mask <= -1e4) contribute exactly 0
and are left out of the landmark pools. SOFT is bidirectional: a query-dependent
(causal) mask is reduced to its key padding (a key is kept if any query may see it);
the pass says so in its notes for masks whose query axis is not 1. An additive term
that is not a mask (a relative-position bias, Swin's -100 window mask) has no place in
the kernel: such an attention is left with a note. Queries and keys may differ in
number (SegFormer's spatially reduced keys): Q's landmarks pool the queries, K's the
keys; the symmetric form needs as many keys as queries.

Requires: default-domain opset >= 15. Ensures: each ``ai.rewriter::SoftmaxFreeAttention``
has its function body (computed in float32; standard ops with a ``Loop`` for the
Newton–Schulz steps), which ONNX Runtime, ``onnx.reference`` and the checker run as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN, RewritePass, RewriteResult, add_function
from rewriter.passes.attention import onnx_build as build
from rewriter.passes.attention import onnx_match as attention
from rewriter.passes.attention import static
from rewriter.passes.attention.onnx_match import AttentionMatch, AttentionRule
from rewriter.passes.softmax_free_attention.body import OP_TYPE, function_proto
from rewriter.registry import register


@dataclasses.dataclass
class SoftmaxFreeAttentionOptions:
    """Options of ``softmax-free-attention``.

    landmarks: m, the number of landmarks (average pools of the sequence).
    iterations: Newton–Schulz steps of the pseudo-inverse.
    symmetric: tie K to Q, as the paper trains SOFT (default: landmarks of Q and K apart).
    """

    landmarks: int = 32
    iterations: int = 20
    symmetric: bool = False


@register
class SoftmaxFreeAttentionPass(RewritePass):
    """Replace softmax attention by SOFT Gaussian-kernel Nyström attention (Lu et al.)."""

    name = "softmax-free-attention"
    exact = False
    description = (
        "softmax attention -> SOFT Gaussian-kernel Nystrom attention, linear in n (Lu et al. 2021)"
    )
    min_opset = attention.MIN_OPSET
    Options = SoftmaxFreeAttentionOptions

    def applies_to(self, model: ir.Model) -> bool:
        return attention.has_candidates(model)

    def call(self, model: ir.Model) -> RewriteResult:
        if self.options.landmarks < 1 or self.options.iterations < 0:
            raise InputError(f"{self.name}: landmarks must be >= 1 and iterations >= 0")
        opset = model.opset_imports.get("", 1)
        attention.prepare(model)
        rule_set, instances = attention.rules(_ToSoft, self.options)
        replaced = rule_set.apply_to_model(model)
        attention.remove_replaced(model)
        if replaced:
            add_function(model, function_proto(opset))
        notes = attention.softmax_notes(model, instances)
        stats = {"attention_replaced": replaced, "softmax_left": len(notes)}
        notes += [
            f"{name!r}: its mask may depend on the query (causal); SOFT is "
            "bidirectional and keeps only the key padding"
            for instance in instances
            for name in getattr(instance, "query_masks", [])
        ]
        return RewriteResult(model, bool(replaced), stats=stats, notes=notes)


class _ToSoft(AttentionRule):
    def __init__(self, options: SoftmaxFreeAttentionOptions) -> None:
        super().__init__("AttentionToSoft")
        self.options = options
        self.query_masks: list[str] = []

    def refuse(self, match: AttentionMatch) -> str:
        if any(not static.is_mask(term) for term in match.additive_terms()):
            return (
                "an additive term that is not a 0/-inf mask (a relative-position bias or a "
                "-100 window mask) is added to the scores: SOFT's kernel has no per-pair term"
            )
        n_q, n_k = match.lengths()
        if self.options.symmetric and (n_q is None or n_q != n_k):
            shown = "they differ" if isinstance(n_q, int) and isinstance(n_k, int) else (
                "the graph does not show they are equal"
            )
            return (
                f"symmetric SOFT (K := Q) needs as many keys as queries; {shown} "
                f"(n_q = {n_q}, n_k = {n_k})"
            )
        return ""

    def rewrite_attention(self, op: Any, match: AttentionMatch) -> ir.Value:
        q, k, v, mask = build.operands(op, match, rank4_mask=True)
        shape = match.mask.shape if match.mask is not None else None
        if match.causal or (match.mask is not None and (shape is None or shape[-2] != 1)):
            self.query_masks.append(match.name)
        y = op.op(
            OP_TYPE,
            q,
            q if self.options.symmetric else k,
            v,
            mask,
            _domain=DOMAIN,
            scale=match.scale,
            landmarks=self.options.landmarks,
            iterations=self.options.iterations,
        )
        return build.restore(op, match, y)
