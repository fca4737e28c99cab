"""Softmax(x) -> TwoPassSoftmax(x), LogSoftmax(x) -> TwoPassLogSoftmax(x).

Implements Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm" (2020,
arXiv 2001.04438): exponentials are kept as (mantissa, exponent) pairs so the
row needs no max pass. Exact: the rewritten model computes the same function
(float64 inside the function body; agreement with the original to ~2e-7 relative).
float64 Softmax/LogSoftmax become ``TwoPassSoftmaxDouble``/``TwoPassLogSoftmaxDouble``,
whose pairs ``e**t e**k`` (``k = round(x)``, ``Exp`` in double) are exact at double
precision: a few ulp from ONNX Runtime's softmax (see :mod:`.math`).

The new operators live in the ``ai.rewriter`` domain and carry model-local ONNX
function bodies written in standard ops (from the model's own opset), so ONNX
Runtime, ``onnx.reference`` and the checker accept the result as it is; the TVM
backend replaces them with its vectorized kernel. ``TwoPassSoftmax`` works along
the last axis: a Softmax over another axis is wrapped in Transpose (opset >= 13
semantics) or Flatten/Reshape (opset < 13, which coerces the input to 2-D).

The ``Attention`` operator (opset 23: what the dynamo exporter writes for
``scaled_dot_product_attention`` at opset >= 23) holds its softmax inside. Each one the
attention matcher takes (4-D Q, K, V, no KV cache, softcap or local window: see
:class:`rewriter.passes.attention.onnx_match.AttentionOpRule`) is first written out as
the operator's definition, ``Where(IsNaN(p), 0, p) @ V`` with ``p = Softmax(Q Kᵀ·scale +
mask)`` (grouped key/value heads repeated, a boolean or causal mask as an additive one;
the guard gives a fully masked row the zeros the operator's definition gives it), and
its Softmax is then swapped as any other (stat ``attention_expanded``, reported for a
model that has the operator). An ``Attention`` node left as it is gets a note that says
why, and counts as skipped.

Requires: default-domain opset >= 9 (for ``Where``). Ensures: no Softmax or
LogSoftmax is left except those reported as skipped, each new operator has its
function body, the model's IR version is >= 8 (model-local functions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from rewriter import shapes
from rewriter.pass_base import (
    DOMAIN,
    FUNCTIONS_IR_VERSION,
    RewritePass,
    RewriteResult,
    add_function,
    all_nodes,
)
from rewriter.passes.attention import onnx_build
from rewriter.passes.attention import onnx_match as attention
from rewriter.passes.two_pass_softmax.body import (
    CASTLIKE_OPSET,
    DOUBLE_TARGETS,
    TARGETS,
    function_proto,
)
from rewriter.registry import register

MIN_OPSET = 9
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
OUR_OPS = {*TARGETS.values(), *DOUBLE_TARGETS.values()}


@dataclasses.dataclass
class TwoPassSoftmaxOptions:
    """Options of ``two-pass-softmax``.

    log_softmax: also rewrite LogSoftmax into TwoPassLogSoftmax.
    """

    log_softmax: bool = True


@register
class TwoPassSoftmaxPass(RewritePass):
    """Replace Softmax and LogSoftmax by the exact two-pass algorithm."""

    name = "two-pass-softmax"
    exact = True
    description = "Softmax/LogSoftmax -> two-pass (mantissa, exponent) softmax (Dukhan & Ablavatski 2020)"
    min_opset = MIN_OPSET
    Options = TwoPassSoftmaxOptions

    def call(self, model: ir.Model) -> RewriteResult:
        opset = model.opset_imports.get("", 1)
        sources = ["Softmax", "LogSoftmax"] if self.options.log_softmax else ["Softmax"]
        stats, notes = _expand_attention_ops(model)
        # Dtype and rank decide how each node is rewritten.
        shapes.infer(model, [node.inputs[0] for source in sources for node in _find(model, source)])
        for source in sources:
            rules = RewriteRuleSet([_ToTwoPass.rule(source, opset)])
            stats[_stat_name(source)] = rules.apply_to_model(model)
        used = {node.op_type for node in all_nodes(model) if node.domain == DOMAIN} & OUR_OPS
        for op_type in sorted(used):
            add_function(model, function_proto(op_type, opset))
        in_functions = _function_nodes(model)
        notes += [
            f"{node.op_type} {node.name!r} left as is: "
            + _unsupported_reason(node, opset, in_function=node in in_functions)
            for source in sources
            for node in _find(model, source)
        ]
        stats["skipped"] = len(notes)
        modified = any(stats[_stat_name(source)] for source in sources) or bool(stats.get("attention_expanded"))
        return RewriteResult(model, modified, stats=stats, notes=notes)

    def ensures(self, model: ir.Model) -> None:
        super().ensures(model)
        if any(node.domain == DOMAIN for node in all_nodes(model)):
            assert model.ir_version >= FUNCTIONS_IR_VERSION


def _expand_attention_ops(model: ir.Model) -> tuple[dict[str, int], list[str]]:
    """Write out every ``Attention`` operator the matcher takes (see the module
    docstring); returns the stats (``attention_expanded``, only for a model that has the
    operator) and a note per one left."""
    if not _find(model, "Attention"):
        return {}, []
    attention.prepare(model)
    rule_set, instances = attention.rules(_ExpandAttention, subgraph=False)
    expanded = rule_set.apply_to_model(model)
    attention.remove_replaced(model)
    return {"attention_expanded": expanded}, attention.softmax_notes(model, instances, softmax=False)


class _ExpandAttention(attention.AttentionRule):
    """``Attention(Q, K, V, mask)`` -> ``Where(IsNaN(p), 0, p) @ V``, ``p = Softmax(Q Kᵀ·scale + mask)``."""

    def __init__(self) -> None:
        super().__init__("ExpandAttention")

    def rewrite_attention(self, op: Any, match: attention.AttentionMatch) -> ir.Value:
        q, k, v, mask = onnx_build.operands(op, match)
        scale = op.CastLike(op.Constant(value_float=match.scale), q)
        logits = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale)
        if match.mask is not None or match.causal:
            logits = op.Add(logits, mask)
        probs = op.Softmax(logits, axis=-1)
        zero = op.CastLike(op.Constant(value_float=0.0), probs)
        # (bfloat16 checked in float32: TVM has no bfloat16 isnan)
        checked = op.Cast(probs, to=ir.DataType.FLOAT) if match.query.dtype == ir.DataType.BFLOAT16 else probs
        kept = op.Where(op.IsNaN(checked), zero, probs)
        return onnx_build.restore(op, match, op.MatMul(kept, v))


def _stat_name(source: str) -> str:
    return {"Softmax": "softmax_replaced", "LogSoftmax": "log_softmax_replaced"}[source]


def _function_nodes(model: ir.Model) -> set[ir.Node]:
    return {node for function in model.functions.values() for node in ir.traversal.RecursiveGraphIterator(function)}


def _find(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [node for node in all_nodes(model) if node.op_type == op_type and node.domain in ("", "ai.onnx")]


class _ToTwoPass(RewriteRuleClassBase):
    """``Softmax(x, axis)`` -> ``TwoPassSoftmax`` along the last axis, moving ``axis`` there."""

    def __init__(self, source: str, opset: int) -> None:
        super().__init__(name=f"{source}ToTwoPass")
        self.source = source
        self.opset = opset

    def pattern(self, op, x):
        return getattr(op, self.source)(x, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y) -> MatchResult:
        del x
        in_function = isinstance(context.graph_or_function, ir.Function)
        reason = _unsupported_reason(y.producer(), self.opset, in_function=in_function)
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, x, y):
        target = (DOUBLE_TARGETS if x.dtype == ir.DataType.DOUBLE else TARGETS)[self.source]
        rank = _rank(x)
        axis = y.producer().attributes.get_int("axis", 1 if self.opset < 13 else -1)
        last = axis == -1 or (rank is not None and axis % rank == rank - 1)
        if last:
            return op.op(target, x, _domain=DOMAIN)
        if self.opset < 13:
            # Softmax-1/11 coerce the input to 2-D at `axis` (Flatten-9 takes no negative axis).
            flat = op.Flatten(x, axis=axis % rank if rank is not None else axis)
            return op.Reshape(op.op(target, flat, _domain=DOMAIN), op.Shape(x))
        assert rank is not None
        perm = list(range(rank))
        perm[axis % rank], perm[-1] = perm[-1], perm[axis % rank]
        moved = op.Transpose(x, perm=perm)
        return op.Transpose(op.op(target, moved, _domain=DOMAIN), perm=perm)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _unsupported_reason(node: ir.Node, opset: int, *, in_function: bool = False) -> str:
    """Why ``node`` cannot be rewritten, or "" when it can."""
    x = node.inputs[0]
    if x is None:
        return "no input"
    dtype = x.dtype
    axis = node.attributes.get_int("axis", 1 if opset < 13 else -1)
    if dtype is None and in_function and opset >= CASTLIKE_OPSET and axis == -1:
        # Shape inference does not type model-local function bodies. Softmax only takes
        # float types and the body (CastLike) serves each; a float64 call would lose
        # exactness, which verification reports.
        return ""
    if dtype is None:
        return "input type unknown (shape inference could not infer it)"
    if dtype not in FLOAT_TYPES:
        return f"input type {dtype} is not a float type"
    if opset < CASTLIKE_OPSET and dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return f"{dtype} input needs opset >= {CASTLIKE_OPSET} (CastLike); the model has {opset}"
    if opset >= 13 and axis != -1 and _rank(x) is None:
        return f"axis {axis} with input rank unknown"
    if opset < 11 and axis < -1 and _rank(x) is None:
        return f"negative axis {axis} with input rank unknown (Flatten-{opset} needs axis >= 0)"
    return ""
