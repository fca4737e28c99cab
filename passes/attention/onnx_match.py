"""MatMul(Softmax(QKᵀ·s + mask), V) -> AttentionMatch: one attention matcher for every pass.

Scaled dot-product attention as real exporters emit it, written once as an onnxscript
pattern with alternatives (``OrValue``) and applied with ``commute=True``:

* the scale as ``Mul`` or ``Div`` of the scores, folded into Q (or Kᵀ), or applied to
  both Q and Kᵀ as sqrt(scale) (the exporters' ``scaled_dot_product_attention``); every
  factor is multiplied into :attr:`AttentionMatch.scale`, a constant or a scalar the
  exporter computes from static shapes (:func:`rewriter.passes.attention.static.scalar`:
  ``1/sqrt(Shape(q)[-1])``, DeBERTa's ``sqrt(3 d)``);
* Kᵀ from any producer (``Transpose(k, perm)``, ``Reshape(Transpose(k3))``, ...): the
  matcher keeps the Kᵀ value; :mod:`.onnx_build` turns it back into K, composing with a
  producing ``Transpose`` so no transpose pair is left;
* additive terms: a bias (``Add``: relative positions of DeBERTa's disentangled
  attention, of Swin and T5), Swin's shifted-window mask added to the scores viewed per
  window (``Reshape(Add(Reshape(scores, [B, nW, H, n, n]), mask), [-1, H, n, n])``) and a
  mask: additive (``-inf`` or ``finfo.min`` fills, padding or causal) or boolean
  (``Where(keep, scores, fill)`` or ``Where(drop, fill, scores)`` with a fill <=
  :data:`MASKED_AT_OR_BELOW`); :func:`rewriter.passes.attention.static.is_mask` tells a
  mask from a bias, for SOFT, whose kernel has no per-pair term;
* heads merged into the batch (``nn.MultiheadAttention``'s and DeBERTa's [B·H, n, d]
  tensors): the scores reshaped to [B, H, n_q, n_k] before the mask and the
  probabilities back to [B·H, n_q, n_k] after the Softmax;
* an optional ``Cast`` before the Softmax and ``Cast``\\ s after it, and the
  ``Where(IsNaN(p), 0, p)`` guard of the sdpa exports;
* grouped/multi-query heads: K and V are taken after the model's own ``Expand``/
  ``Reshape`` (the values the MatMuls read), so they have as many heads as Q;
* the ONNX ``Attention`` operator (opset 23) with 4-D inputs, no KV cache, no softcap
  and no local window (opset 25's ``left_window_size``/``right_window_size``); its
  grouped heads (fewer key/value heads) are repeated by :func:`key` and :func:`value`.

A rule class derives from :class:`AttentionRule` and implements ``rewrite_attention(op,
match)`` (and ``softmax`` where it matches another op of the softmax's function: the TVM
backend's fusion matches ``ai.rewriter::TwoPassSoftmax``); both ``sigmoid-attention`` and ``softmax-free-attention`` rewrite from the same
:class:`AttentionMatch`, through :func:`rewriter.passes.attention.onnx_build.operands`
(Q, K, V and one additive mask of rank 4) and :func:`~.onnx_build.restore` (the output
in the graph's layout). Values of the matched subgraph may have other uses that only
compute shapes for the subgraph's own ``Reshape`` nodes (the TorchScript exporter reads
the shape of the scores and of the probabilities): the matched nodes are then left in
place by the rule and removed with those uses by :func:`remove_replaced`. :func:`find_attention` lists the matches without rewriting and
:func:`softmax_notes` explains every Softmax that is not attention (a classifier's
output softmax), so the passes can report them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, pattern
from onnxscript.rewriter import _ir_utils as ir_utils

from rewriter import shapes
from rewriter.function_body import FunctionBody
from rewriter.passes.attention import static
from rewriter.passes.attention.static import MASKED_AT_OR_BELOW

__all__ = ["MASKED_AT_OR_BELOW", "AttentionMatch", "AttentionRule", "find_attention", "rules"]

# The functions use CastLike (15) and Shape(start, end) (15).
MIN_OPSET = 15
RANK = 4  # [batch, heads, sequence, head_dim]
MERGED_RANK = 3  # [batch·heads, sequence, head_dim]
# Ops that compute shapes from a Shape of a matched value, for the match's own Reshapes.
SHAPE_OPS = frozenset(
    {"Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"}
    | {"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Where", "ConstantOfShape"}
)


@dataclasses.dataclass
class AttentionMatch:
    """One scaled dot-product attention: ``output = attn(query·key_transposed·scale + mask) @ value``.

    ``query`` is Q without any scale, ``key_transposed`` is Kᵀ ([..., d, n_k]) without
    any scale, both of rank 4, or 3 with ``heads`` (the [B, H, n_q, n_k] shape the scores
    of [B·H, n, d] inputs are reshaped to); ``mask`` is additive (float), boolean (True =
    attend) or ``"dropping"`` (True = masked); ``bias`` an additive term before the heads
    split, ``windows`` Swin's (per-window shape, mask, shape back); ``softmax`` the
    Softmax node (None for the ``Attention`` operator), ``output`` the attention output.
    """

    query: ir.Value
    key_transposed: ir.Value | None
    value: ir.Value
    scale: float
    mask: ir.Value | None
    mask_kind: str  # "none", "additive", "boolean" (True = attend) or "dropping" (True = masked)
    softmax: ir.Node | None
    output: ir.Value
    causal: bool = False  # Attention(is_causal=1): the causal mask is not a graph value
    key: ir.Value | None = None  # K itself, when the match has it (the Attention op)
    kv_groups: int = 1  # query heads per key/value head (the Attention op's grouped heads)
    bias: ir.Value | None = None  # added to the scores before the heads split and the mask
    windows: tuple[ir.Value, ir.Value, ir.Value] | None = None  # (to windows, mask, back)
    heads: ir.Value | None = None  # the [B, H, n_q, n_k] shape of merged-heads scores
    fill: ir.Value | None = None  # what Where(keep, scores, fill) puts at masked positions

    def additive_terms(self) -> list[ir.Value]:
        """The float tensors added to the scores: bias, window mask, additive mask."""
        terms = [self.bias, self.windows[1] if self.windows else None]
        terms.append(self.mask if self.mask_kind == "additive" else None)
        return [term for term in terms if term is not None]

    def lengths(self) -> tuple[int | str | None, int | str | None]:
        """(n_q, n_k): ints where static, the names of symbolic dimensions, or None."""
        source = self.key if self.key is not None else self.key_transposed
        return _dim(self.query, -2), _dim(source, -2 if self.key is not None else -1)

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


def _dim(value: ir.Value | None, axis: int) -> int | str | None:
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else dim.value


def _scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    found = ir_utils.get_singleton_value(value)
    return float(found) if found is not None else static.scalar(value)


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


class AttentionRule(RewriteRuleClassBase):
    """The attention pattern; subclasses implement :meth:`rewrite_attention`.

    ``reasons`` collects, per Softmax node name, why a candidate that matched the
    structure was refused by ``check`` (read by :func:`softmax_notes`). Of the reasons of
    one Softmax (the commuted variants of the pattern bind its parts differently) the one
    that got furthest is kept: a refusal of the pass's over a value left in use over
    a part that is not attention.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name=name, remove_nodes=False)  # see _leftover_use
        self.reasons: dict[str, str] = {}
        self._ranks: dict[str, int] = {}

    def record(self, node: ir.Node | None, reason: str, rank: int) -> MatchResult:
        """Keep ``reason`` for ``node`` unless one of a higher ``rank`` is kept; fail."""
        name = node.name if node is not None and node.name else ""
        if rank > self._ranks.get(name, -1):
            self.reasons[name], self._ranks[name] = reason, rank
        return MatchResult().fail(reason)

    def pattern(  # noqa: PLR0913 (one variable per part of the pattern)
        self,
        op,
        query,
        key_t,
        value,
        q_factor,
        k_factor,
        factor,
        bias,
        heads,
        to_windows,
        window_mask,
        from_windows,
        mask,
        keep,
        fill,
        zero,
        merged,
    ):
        q = pattern.OrValue(
            [op.Mul(query, q_factor), op.Div(query, q_factor), query], tag_var="q_scaled"
        )
        kt = pattern.OrValue(
            [op.Mul(key_t, k_factor), op.Div(key_t, k_factor), key_t], tag_var="k_scaled"
        )
        scores = op.MatMul(q, kt)
        scaled = pattern.OrValue(
            [op.Mul(scores, factor), op.Div(scores, factor), scores], tag_var="scale_op"
        )
        biased = pattern.OrValue([op.Add(scaled, bias), scaled], tag_var="bias_op")
        split = pattern.OrValue([op.Reshape(biased, heads), biased], tag_var="heads_op")
        per_window = op.Add(op.Reshape(split, to_windows), window_mask)
        windowed = pattern.OrValue(
            [op.Reshape(per_window, from_windows), split], tag_var="windows_op"
        )
        masked = pattern.OrValue(
            [
                op.Add(windowed, mask),
                op.Where(keep, windowed, fill),
                op.Where(keep, fill, windowed),
                windowed,
            ],
            tag_var="mask_op",
        )
        # (every OrValue is tagged: onnxscript 0.7 cannot commute an untagged BacktrackingOr)
        logits = pattern.OrValue(
            [op.Cast(masked, _allow_other_attributes=True), masked], tag_var="pre_cast"
        )
        probs = self.softmax(op, logits)
        kept = pattern.OrValue(
            [
                op.Where(op.IsNaN(probs), zero, probs),
                op.Cast(op.Cast(probs, _allow_other_attributes=True), _allow_other_attributes=True),
                op.Cast(probs, _allow_other_attributes=True),
                probs,
            ],
            tag_var="post",
        )
        joined = pattern.OrValue([op.Reshape(kept, merged), kept], tag_var="merge_op")
        return op.MatMul(joined, value, _outputs=["output"])

    def softmax(self, op: Any, logits: Any) -> Any:
        """The pattern's softmax of the scores, bound as ``probs``: ONNX ``Softmax`` (a
        subclass may match another op of the same function, along the last axis)."""
        return op.Softmax(logits, _allow_other_attributes=True, _outputs=["probs"])

    def check(self, op: Any, *args: Any, **bindings: Any) -> MatchResult:  # op: the MatchContext
        del args
        softmax = bindings["probs"].producer()
        match = self.match_from(bindings)
        if isinstance(match, str):
            return self.record(softmax, match, 0)
        reason = _leftover_use(op.nodes, bindings["output"])
        if reason:
            return self.record(softmax, reason, 1)
        reason = self.refuse(match)
        return self.record(softmax, reason, 2) if reason else MatchResult()

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
        scale = _scale(bindings)
        if isinstance(scale, str):
            return scale
        mask, kind = None, "none"
        mask_op = bindings.get("mask_op", 3)
        if mask_op == 0:
            mask, kind = bindings["mask"], "additive"
        elif mask_op in (1, 2):
            fill = _scalar(bindings.get("fill"))
            if fill is None or fill > MASKED_AT_OR_BELOW:
                return f"Where(cond, scores, fill) with fill {fill} is not a mask"
            mask, kind = bindings["keep"], "boolean" if mask_op == 1 else "dropping"
        if bindings.get("post") == 0 and _scalar(bindings.get("zero")) != 0.0:
            return "Where(IsNaN(p), x, p) with x != 0"
        heads = bindings.get("heads") if bindings.get("heads_op") == 0 else None
        if (heads is None) != (bindings.get("merge_op", 1) == 1):
            return "the scores' heads are split from the batch, but not merged back (or the reverse)"
        rank = MERGED_RANK if heads is not None else RANK
        query, key_t = bindings["query"], bindings["key_t"]
        for name, value in (("query", query), ("key", key_t), ("value", bindings["value"])):
            if _rank(value) not in (None, rank):
                return f"{name} has rank {_rank(value)}; the fused operators take rank {RANK}"
        if heads is not None and any(entry == 0 for entry in _head_split(heads)):
            return "the heads split copies a dimension (Reshape with 0)"
        windows = None
        if bindings.get("windows_op") == 0:
            windows = (bindings["to_windows"], bindings["window_mask"], bindings["from_windows"])
        return AttentionMatch(
            query=query,
            key_transposed=key_t,
            value=bindings["value"],
            scale=scale,
            mask=mask,
            mask_kind=kind,
            softmax=softmax,
            output=bindings["output"],
            bias=bindings.get("bias") if bindings.get("bias_op") == 0 else None,
            windows=windows,
            heads=heads,
            fill=bindings.get("fill") if kind in ("boolean", "dropping") else None,
        )


def _scale(bindings: dict[str, Any]) -> float | str:
    """The product of the constant factors on Q, Kᵀ and the scores, or why there is none."""
    scale = 1.0
    for tag, var, absent in (("q_scaled", "q_factor", 2), ("k_scaled", "k_factor", 2), ("scale_op", "factor", 2)):
        index = bindings.get(tag, absent)
        if index == absent:
            continue
        found = _scalar(bindings.get(var))
        if found is None or found == 0.0:
            return f"the {var.replace('_', ' ')} is not a nonzero constant scalar"
        scale *= 1.0 / found if index == 1 else found
    return scale


def _head_split(heads: ir.Value) -> list[int | str | None]:
    """The first two entries (B, H) of the heads-split shape, as far as they are known."""
    entries = static.partial_value(heads)
    return entries[:2] if entries is not None else [None, None]


def _leftover_use(nodes: Sequence[ir.Node], output: ir.Value) -> str:
    """Why the matched ``nodes`` cannot all go once ``output`` is replaced ("" when they can).

    Uses inside the match are fine, and so are ``Shape`` nodes (and the shape arithmetic
    after them) whose results only reach the match itself (the TorchScript exporter's
    ``Reshape`` targets): those die with it.
    """
    if not (output.uses() or output.is_graph_output()):
        return "already replaced"  # a match left in place, before its cleanup
    matched = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is output:
                continue
            if value.is_graph_output():
                return f"{value.name!r} of the attention is a graph output"
            for use in value.uses():
                user = use.node
                if user not in matched and not (user.op_type == "Shape" and _shapes_only(user, matched)):
                    return f"{value.name!r} of the attention has another use ({user.op_type})"
    return ""


def _shapes_only(node: ir.Node, matched: set[ir.Node], depth: int = 12) -> bool:
    """Whether the results of ``node`` (a Shape or shape arithmetic) reach only ``matched``."""
    if depth == 0 or node.op_type not in SHAPE_OPS:
        return False
    for value in node.outputs:
        if value.is_graph_output():
            return False
        for use in value.uses():
            if use.node not in matched and not _shapes_only(use.node, matched, depth - 1):
                return False
    return True


class AttentionOpRule(AttentionRule):
    """The ONNX ``Attention`` operator (opset 23) with 4-D Q, K, V, no KV cache, no
    softcap and no local window (opset 25)."""

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
        node = bindings["output"].producer()
        match = self.match_from(bindings)
        if isinstance(match, str):
            return self.record(node, match, 0)
        output = bindings["output"]
        if not (output.uses() or output.is_graph_output()):
            return self.record(node, "already replaced", 1)  # left in place until cleanup
        reason = self.refuse(match)
        return self.record(node, reason, 2) if reason else MatchResult()

    @staticmethod
    def match_from(bindings: dict[str, Any]) -> AttentionMatch | str:
        node = bindings["output"].producer()
        inputs = list(node.inputs) + [None] * 6
        if inputs[4] is not None or inputs[5] is not None or (len(node.inputs) > 6 and inputs[6]):
            return "Attention with a KV cache (past_key/past_value) or nonpad_kv_seqlen"
        if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
            return "Attention's present_key/present_value/qk outputs are used"
        if node.attributes.get_float("softcap", 0.0) != 0.0:
            return "Attention with softcap"
        if any(node.attributes.get_int(side, -1) >= 0 for side in ("left_window_size", "right_window_size")):
            return "Attention with a local window (left_window_size/right_window_size, opset 25)"
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


def rules(
    rule_class: type[AttentionRule], *args: Any, operator: bool = True, subgraph: bool = True
) -> tuple[RewriteRuleSet, list[AttentionRule]]:
    """The rule set (subgraph pattern and ``Attention`` operator) of ``rule_class``.

    ``rule_class`` derives from :class:`AttentionRule`; the ``Attention`` operator rule
    is the same class with :class:`AttentionOpRule`'s pattern mixed in (left out with
    ``operator=False``; the subgraph rule with ``subgraph=False``). Returns the set
    (with ``commute=True``) and the rule instances (for their ``reasons``).
    """
    instances = [rule_class(*args)] if subgraph else []
    if operator:
        op_class = type(f"{rule_class.__name__}OnAttentionOp", (AttentionOpRule, rule_class), {})
        instances.append(op_class(*args))
    return RewriteRuleSet([_to_rule(i) for i in instances], commute=True), instances


def remove_replaced(model: ir.Model) -> None:
    """Remove what the rules left in place: the replaced attention subgraphs and the shape
    computations that only served them (see :func:`_leftover_use`)."""
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)


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


def softmax_notes(
    model: ir.Model, instances: Sequence[AttentionRule], *, softmax: bool = True
) -> list[str]:
    """One note per Softmax and ``Attention`` node left in the graph: why it is not
    (rewritten) attention; ``softmax=False``: the ``Attention`` nodes only."""
    reasons: dict[str, str] = {}
    for instance in instances:
        reasons.update(instance.reasons)
    notes = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if softmax and node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
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
