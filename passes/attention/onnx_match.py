"""MatMul(Softmax(QKᵀ·s + mask), V) -> AttentionMatch: one attention matcher for every pass.

Scaled dot-product attention as real exporters emit it, written once as an onnxscript
pattern with alternatives (``OrValue``) and applied with ``commute=True``:

* the scale as ``Mul`` or ``Div`` of the scores, folded into Q, or applied to both Q and
  Kᵀ as sqrt(scale) (the dynamo exporter's ``scaled_dot_product_attention``); every
  constant factor is multiplied into :attr:`AttentionMatch.scale`;
* Kᵀ from any producer (``Transpose(k, perm)``, ``Reshape(Transpose(k3))``, ...): the
  matcher keeps the Kᵀ value; :func:`key` turns it back into K, composing with a
  producing ``Transpose`` so no transpose pair is left;
* an additive mask (``Add``; ``-inf`` or ``finfo.min`` fills, padding or causal) or a
  boolean one (``Where(keep, scores, fill)`` with a fill <= :data:`MASKED_AT_OR_BELOW`);
* an optional ``Cast`` before the Softmax and ``Cast``\\ s after it, and the
  ``Where(IsNaN(p), 0, p)`` guard of the sdpa exports;
* grouped/multi-query heads: K and V are taken after the model's own ``Expand``/
  ``Reshape`` (the values the MatMuls read), so they have as many heads as Q;
* the ONNX ``Attention`` operator (opset 23) with 4-D inputs and no KV cache; its
  grouped heads (fewer key/value heads) are repeated by :func:`key` and :func:`value`.

A rule class derives from :class:`AttentionRule` and implements ``rewrite_attention(op,
match)``; both ``sigmoid-attention`` and ``softmax-free-attention`` rewrite from the same
:class:`AttentionMatch`. :func:`find_attention` lists the matches without rewriting and
:func:`softmax_notes` explains every Softmax that is not attention (a classifier's
output softmax), so the passes can report them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, pattern
from onnxscript.rewriter import _ir_utils as ir_utils

from rewriter import shapes
from rewriter.function_body import FunctionBody

# An additive mask value at or below this masks its position. Exporters fill with -inf,
# finfo(float32).min (-3.4e38), finfo(float16).min (-65504) or, in older transformers,
# -10000; learned additive biases (ALiBi, relative positions) stay far above it.
MASKED_AT_OR_BELOW = -1e4
# The functions use CastLike (15) and Shape(start, end) (15).
MIN_OPSET = 15
RANK = 4  # [batch, heads, sequence, head_dim]


@dataclasses.dataclass
class AttentionMatch:
    """One scaled dot-product attention: ``output = attn(query·key_transposed·scale + mask) @ value``.

    ``query`` is Q without any scale, ``key_transposed`` is Kᵀ ([..., d, n_k]) without
    any scale, ``mask`` is additive (float) or boolean (True = attend), ``softmax`` the
    Softmax node (None for the ``Attention`` operator), ``output`` the attention output.
    """

    query: ir.Value
    key_transposed: ir.Value | None
    value: ir.Value
    scale: float
    mask: ir.Value | None
    mask_kind: str  # "none", "additive" or "boolean"
    softmax: ir.Node | None
    output: ir.Value
    causal: bool = False  # Attention(is_causal=1): the causal mask is not a graph value
    key: ir.Value | None = None  # K itself, when the match has it (the Attention op)
    kv_groups: int = 1  # query heads per key/value head (the Attention op's grouped heads)

    @property
    def name(self) -> str:
        node = self.softmax if self.softmax is not None else self.output.producer()
        return node.name if node is not None and node.name else self.output.name or "?"

    def key_length(self) -> int | None:
        """The static number of keys, or None when it is dynamic."""
        source = self.key if self.key is not None else self.key_transposed
        axis = -2 if self.key is not None else -1
        if source is None or source.shape is None or len(source.shape) == 0:
            return None
        dim = source.shape[axis]
        return dim if isinstance(dim, int) else None


def _scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    found = ir_utils.get_singleton_value(value)
    return float(found) if found is not None else None


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


class AttentionRule(RewriteRuleClassBase):
    """The attention pattern; subclasses implement :meth:`rewrite_attention`.

    ``reasons`` collects, per Softmax node name, why a candidate that matched the
    structure was refused by ``check`` (read by :func:`softmax_notes`).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.reasons: dict[str, str] = {}

    def pattern(self, op, query, key_t, value, q_factor, k_factor, factor, mask, keep, fill, zero):
        q = pattern.OrValue([op.Mul(query, q_factor), query], tag_var="q_scaled")
        kt = pattern.OrValue([op.Mul(key_t, k_factor), key_t], tag_var="k_scaled")
        scores = op.MatMul(q, kt)
        scaled = pattern.OrValue(
            [op.Mul(scores, factor), op.Div(scores, factor), scores], tag_var="scale_op"
        )
        masked = pattern.OrValue(
            [op.Add(scaled, mask), op.Where(keep, scaled, fill), scaled], tag_var="mask_op"
        )
        # (every OrValue is tagged: onnxscript 0.7 cannot commute an untagged BacktrackingOr)
        logits = pattern.OrValue(
            [op.Cast(masked, _allow_other_attributes=True), masked], tag_var="pre_cast"
        )
        probs = op.Softmax(logits, _allow_other_attributes=True, _outputs=["probs"])
        kept = pattern.OrValue(
            [
                op.Where(op.IsNaN(probs), zero, probs),
                op.Cast(op.Cast(probs, _allow_other_attributes=True), _allow_other_attributes=True),
                op.Cast(probs, _allow_other_attributes=True),
                probs,
            ],
            tag_var="post",
        )
        return op.MatMul(kept, value, _outputs=["output"])

    def check(self, op: Any, *args: Any, **bindings: Any) -> MatchResult:
        del op, args
        match = self.match_from(bindings)
        if isinstance(match, str):
            self.reasons[bindings["probs"].producer().name or ""] = match
            return MatchResult().fail(match)
        reason = self.refuse(match)
        if reason:
            self.reasons[bindings["probs"].producer().name or ""] = reason
            return MatchResult().fail(reason)
        return MatchResult()

    def rewrite(self, op, **bindings):
        match = self.match_from(bindings)
        assert not isinstance(match, str)
        return self.rewrite_attention(op, match)

    def refuse(self, match: AttentionMatch) -> str:
        """Why a subclass cannot rewrite ``match`` ("" when it can)."""
        del match
        return ""

    def rewrite_attention(self, op: Any, match: AttentionMatch) -> ir.Value:
        raise NotImplementedError

    @staticmethod
    def match_from(bindings: dict[str, Any]) -> AttentionMatch | str:
        """The structured match of a pattern's bindings, or why it is not attention."""
        softmax = bindings["probs"].producer()
        axis = softmax.attributes.get_int("axis", -1)
        rank = _rank(bindings["probs"])
        if axis != -1 and (rank is None or axis != rank - 1):
            return f"softmax over axis {axis}, not over the keys"
        scale = 1.0
        for tag, var, invert in (
            ("q_scaled", "q_factor", False),
            ("k_scaled", "k_factor", False),
            ("scale_op", "factor", None),
        ):
            index = bindings.get(tag)
            if (
                index is None
                or (tag == "scale_op" and index == 2)
                or (tag != "scale_op" and index == 1)
            ):
                continue
            found = _scalar(bindings.get(var))
            if found is None or found == 0.0:
                return f"the {var.replace('_', ' ')} is not a nonzero constant scalar"
            divide = invert if invert is not None else index == 1
            scale *= 1.0 / found if divide else found
        mask_op = bindings.get("mask_op", 2)
        mask, kind = None, "none"
        if mask_op == 0:
            mask, kind = bindings["mask"], "additive"
        elif mask_op == 1:
            fill = _scalar(bindings.get("fill"))
            if fill is None or fill > MASKED_AT_OR_BELOW:
                return f"Where(cond, scores, fill) with fill {fill} is not a mask"
            mask, kind = bindings["keep"], "boolean"
        if bindings.get("post") == 0 and _scalar(bindings.get("zero")) != 0.0:
            return "Where(IsNaN(p), x, p) with x != 0"
        query, key_t = bindings["query"], bindings["key_t"]
        for name, value in (("query", query), ("key", key_t), ("value", bindings["value"])):
            if _rank(value) not in (None, RANK):
                return f"{name} has rank {_rank(value)}; the fused operators take rank {RANK}"
        return AttentionMatch(
            query=query,
            key_transposed=key_t,
            value=bindings["value"],
            scale=scale,
            mask=mask,
            mask_kind=kind,
            softmax=softmax,
            output=bindings["output"],
        )


class AttentionOpRule(AttentionRule):
    """The ONNX ``Attention`` operator (opset 23) with 4-D Q, K, V and no KV cache."""

    def pattern(self, op, query, key, value):  # type: ignore[override]
        return op.Attention(
            query,
            key,
            value,
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=["output"],
        )

    def check(self, op: Any, *args: Any, **bindings: Any) -> MatchResult:
        del op, args
        match = self.match_from(bindings)
        reason = match if isinstance(match, str) else self.refuse(match)
        if reason:
            self.reasons[bindings["output"].producer().name or ""] = reason
            return MatchResult().fail(reason)
        return MatchResult()

    @staticmethod
    def match_from(bindings: dict[str, Any]) -> AttentionMatch | str:
        node = bindings["output"].producer()
        inputs = list(node.inputs) + [None] * 6
        if inputs[4] is not None or inputs[5] is not None or (len(node.inputs) > 6 and inputs[6]):
            return "Attention with a KV cache (past_key/past_value) or nonpad_kv_seqlen"
        if any(output.uses() for output in node.outputs[1:]):
            return "Attention's present_key/present_value/qk outputs are used"
        if node.attributes.get_float("softcap", 0.0) != 0.0:
            return "Attention with softcap"
        query, key, value = bindings["query"], bindings["key"], bindings["value"]
        if any(_rank(v) != RANK for v in (query, key, value)):
            return "Attention with 3-D inputs (q_num_heads/kv_num_heads) or unknown ranks"
        assert query.shape is not None and key.shape is not None
        heads_q, heads_k = query.shape[1], key.shape[1]
        if heads_q != heads_k and not (
            isinstance(heads_q, int) and isinstance(heads_k, int) and heads_q % heads_k == 0
        ):
            return f"Attention with {heads_q} query heads and {heads_k} key heads"
        scale = node.attributes.get_float("scale", 0.0)
        if not scale:
            head_dim = query.shape[-1]
            if not isinstance(head_dim, int):
                return "Attention without scale and with a dynamic head dimension"
            scale = 1.0 / math.sqrt(head_dim)
        mask = inputs[3]
        kind = "none"
        if mask is not None:
            kind = "boolean" if mask.dtype == ir.DataType.BOOL else "additive"
        return AttentionMatch(
            query=query,
            key_transposed=None,
            value=value,
            scale=scale,
            mask=mask,
            mask_kind=kind,
            softmax=None,
            output=bindings["output"],
            causal=bool(node.attributes.get_int("is_causal", 0)),
            key=key,
            kv_groups=heads_q // heads_k
            if isinstance(heads_q, int) and isinstance(heads_k, int)
            else 1,
        )


def _repeat_heads(op: Any, x: ir.Value, groups: int) -> ir.Value:
    """[B, Hk, N, D] -> [B, Hk·groups, N, D], each head repeated ``groups`` times in a row."""
    if groups == 1:
        return x
    b_h = op.Shape(x, start=0, end=2)
    n_d = op.Shape(x, start=2, end=4)
    group = op.Constant(value_ints=[groups])
    expanded = op.Expand(
        op.Unsqueeze(x, op.Constant(value_ints=[2])), op.Concat(b_h, group, n_d, axis=0)
    )
    heads = op.Constant(value_ints=[0, -1])
    return op.Reshape(expanded, op.Concat(heads, n_d, axis=0))


def value(op: Any, match: AttentionMatch) -> ir.Value:
    """V ([..., n_k, d_v]) for ``match``, with as many heads as Q."""
    return _repeat_heads(op, match.value, match.kv_groups)


def key(op: Any, match: AttentionMatch) -> ir.Value:
    """K ([..., n_k, d]) for ``match``: its key, or Kᵀ transposed back (one Transpose)."""
    if match.key is not None:
        return _repeat_heads(op, match.key, match.kv_groups)
    key_t = match.key_transposed
    assert key_t is not None
    swap = [0, 1, 3, 2]
    producer = key_t.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get_ints("perm")
        if perm is not None and len(perm) == RANK:
            composed = [perm[i] for i in swap]
            source = producer.inputs[0]
            assert source is not None
            if composed == list(range(RANK)):
                return source
            return op.Transpose(source, perm=composed)
    return op.Transpose(key_t, perm=swap)


def additive_mask(op: Any, match: AttentionMatch, *, rank4: bool = False) -> ir.Value:
    """The mask as an additive float tensor of Q's type (0 when there is none).

    Boolean masks become ``Where(keep, 0, -inf)``; the causal mask of the
    ``Attention`` operator (``is_causal=1``, lower triangle aligned top-left) is built
    from the shapes of Q and K and added. With ``rank4`` the result has rank 4
    (``[1, 1, 1, 1]`` when there is no mask), as the SOFT body's reductions need.
    """
    zero = op.CastLike(op.Constant(value_float=0.0), match.query)
    minus_inf = op.CastLike(op.Constant(value_float=-math.inf), match.query)
    mask: ir.Value | None = None
    if match.mask is not None:
        mask = (
            op.Where(match.mask, zero, minus_inf)
            if match.mask_kind == "boolean"
            else op.CastLike(match.mask, match.query)
        )
        if rank4 and _rank(match.mask) not in (None, RANK):
            rank = _rank(match.mask)
            assert rank is not None
            mask = op.Unsqueeze(mask, op.Constant(value_ints=list(range(RANK - rank))))
    if match.causal:
        k = match.key if match.key is not None else key(op, match)
        lengths = op.Concat(
            op.Shape(match.query, start=2, end=3), op.Shape(k, start=2, end=3), axis=0
        )
        ones = op.ConstantOfShape(lengths, value=ir.tensor(np.array([1], dtype=np.int64)))
        lower = op.Cast(op.Trilu(ones, upper=0), to=ir.DataType.BOOL)
        causal = op.Where(lower, zero, minus_inf)
        mask = causal if mask is None else op.Add(mask, causal)
    if mask is None:
        shape = [1] * RANK if rank4 else []
        return op.CastLike(
            op.Constant(value=ir.tensor(np.zeros(shape, dtype=np.float32))), match.query
        )
    return mask


def rules(
    rule_class: type[AttentionRule], *args: Any
) -> tuple[RewriteRuleSet, list[AttentionRule]]:
    """The rule set (subgraph pattern and ``Attention`` operator) of ``rule_class``.

    ``rule_class`` derives from :class:`AttentionRule`; the ``Attention`` operator rule
    is the same class with :class:`AttentionOpRule`'s pattern mixed in. Returns the
    set (with ``commute=True``) and the two rule instances (for their ``reasons``).
    """
    subgraph = rule_class(*args)
    op_class = type(f"{rule_class.__name__}OnAttentionOp", (AttentionOpRule, rule_class), {})
    attention_op = op_class(*args)
    built = [_to_rule(subgraph), _to_rule(attention_op)]
    return RewriteRuleSet(built, commute=True), [subgraph, attention_op]


def _to_rule(instance: RewriteRuleClassBase) -> Any:
    return pattern.RewriteRule(
        instance.pattern,
        instance.rewrite,
        instance.check,
        name=instance.name,
        remove_nodes=instance.remove_nodes,
        graph_pre_visitor=instance.setup,
        graph_post_visitor=instance.cleanup,
    )


class _Collect(AttentionRule):
    """Records every match and rewrites nothing (used by :func:`find_attention`)."""

    def __init__(self, found: list[AttentionMatch]) -> None:
        super().__init__("FindAttention")
        self.found = found

    def refuse(self, match: AttentionMatch) -> str:
        if all(m.output is not match.output for m in self.found):
            self.found.append(match)
        return "collected"


def find_attention(model: ir.Model) -> list[AttentionMatch]:
    """Every attention of ``model``'s graph, without rewriting it.

    >>> len(find_attention(ir.load("bert.onnx")))  # doctest: +SKIP
    2
    """
    prepare(model)
    found: list[AttentionMatch] = []
    rule_set, _ = rules(_Collect, found)
    rule_set.apply_to_model(model)
    return found


def softmax_notes(model: ir.Model, instances: Sequence[AttentionRule]) -> list[str]:
    """One note per Softmax left in the graph: why it is not (rewritten) attention."""
    reasons: dict[str, str] = {}
    for instance in instances:
        reasons.update(instance.reasons)
    notes = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            why = reasons.get(node.name or "", "not attention (not MatMul(Softmax(QKᵀ...), V))")
            notes.append(f"Softmax {node.name!r} left as is: {why}")
        elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            why = reasons.get(node.name or "", "not matched")
            notes.append(f"Attention {node.name!r} left as is: {why}")
    return notes


def has_candidates(model: ir.Model) -> bool:
    """Whether ``model`` has a Softmax or an ``Attention`` node (a pass has work to try)."""
    return any(
        node.op_type in ("Softmax", "Attention") and node.domain in ("", "ai.onnx")
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def prepare(model: ir.Model) -> None:
    """Shape inference, so ranks, dtypes and the static sequence length are known."""
    if has_candidates(model):
        shapes.infer(model, static=True)


# --------------------------------------------------------------------------------------
# Function bodies: what the passes' attention operators share
# --------------------------------------------------------------------------------------


def swap_last(body: FunctionBody, x: str, output: str) -> str:
    """``output = x`` with its last two axes swapped (rank 4, as the operators' inputs)."""
    return body.node("Transpose", [x], output, perm=[0, 1, 3, 2])
