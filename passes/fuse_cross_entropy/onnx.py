"""SoftmaxCrossEntropyLoss / NLL(LogSoftmax) / decomposed CE -> FusedCrossEntropy; fed by MatMul/Gemm -> FusedLinearCrossEntropy.

The ONNX side of the cross-entropy fusion (the training side, a chunked autograd
function and its fx rewrite, are :mod:`.loss` and :mod:`.fx`). Recognized, by
one rule class per loss form with pattern alternatives (``OrValue``) for the variants:

* ``SoftmaxCrossEntropyLoss(scores, labels[, weights])``, with or without its
  ``log_prob`` output;
* the forms below whose log-probabilities are also used elsewhere (a graph output, as
  in the expanded ``SoftmaxCrossEntropyLoss`` with ``log_prob``): the fused node's
  ``log_prob`` output takes over those uses;
* ``NegativeLogLikelihoodLoss(P(scores), labels[, weights])`` where ``P`` is
  ``LogSoftmax``, ``Log(Softmax)`` (over the class axis 1) or the
  ``Reshape -> Transpose -> LogSoftmax -> Transpose -> Reshape`` expansion of the
  ``SoftmaxCrossEntropyLoss`` function body;
* hand-written forms: ``ReduceMean|ReduceSum(Neg(GatherElements(P(scores),
  Unsqueeze(labels))))`` (``Squeeze`` optional), and its ignore-index masked form
  ``ReduceSum(Where(valid, Neg(picked), 0)) [/ ReduceSum(Cast(valid))]`` with
  ``valid = Not(Equal(labels, ii))`` and ``picked`` gathered at ``Where(valid, labels, 0)``.

Each becomes one ``ai.rewriter::FusedCrossEntropy(scores, labels[, weights]) -> (loss,
log_prob)`` node with ONNX's ``reduction`` and ``ignore_index`` attributes. When the
scores are an LM head, ``MatMul(h, W)``, ``Add(MatMul(h, W), b)`` or ``Gemm(h, W, b)``
(optionally flattened by ``Reshape(., [-1, V])``) whose logits have no other use, the
node is ``FusedLinearCrossEntropy(hidden, weight, labels[, bias[, weights]]) -> loss``
with ``transpose_weight`` (0: W is [H, V], 1: [V, H]): a runtime implementing it never
holds the ``[tokens x vocab]`` logits (Liger-Kernel, Hsu et al. 2024, arXiv 2410.10989;
Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009; the chunked algorithm is
:func:`rewriter.passes.fuse_cross_entropy.loss.fused_linear_cross_entropy`).

Exact. The function bodies are the reference semantics, not the fused algorithm: the
linear body computes the logits (``Flatten`` + ``Gemm``), then both compute
``log_prob = z - logsumexp(z)`` (max-shifted, over axis 1) and hand it to
``NegativeLogLikelihoodLoss``, which defines ``reduction``, ``ignore_index`` and
``weights``. Attributes are passed by reference (``ref_attr_name``), so one function per
operator serves every attribute combination, and an attribute the source node leaves
unset (``ignore_index``) stays unset in the body, exactly ONNX's semantics; generating
one function per combination would multiply names (three reductions x every
ignore index) for no gain. ``onnx.reference`` cannot run a body whose referenced
attribute is absent (ONNX Runtime can), nor a call that omits trailing optional inputs
(which onnx-ir's serializer drops), so it evaluates rewritten models only where
``ignore_index`` is set, with the omitted inputs written back as "".

Requires: default-domain opset >= 13 (axes as ReduceSum input). Ensures: every new
operator has its function body; the model's IR version is >= 8.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.pattern import OrValue

from rewriter import shapes
from rewriter.pass_base import (
    DOMAIN,
    FUNCTIONS_IR_VERSION,
    RewritePass,
    RewriteResult,
    add_function,
)
from rewriter.passes.fuse_cross_entropy.body import LINEAR_LOSS, LOSS, function_proto
from rewriter.registry import register

MIN_OPSET = 13
# Op types whose presence means a loss may be there to fuse.
CANDIDATES = {"SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss", "GatherElements"}
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class FuseCrossEntropyOptions:
    """Options of ``fuse-cross-entropy``.

    linear: also fuse the LM head (MatMul/Gemm) feeding the loss.
    chunk_size: tokens per chunk of the fused training loss (fx front); 0 picks it
    from the vocabulary size.
    """

    linear: bool = True
    chunk_size: int = 0


@register
class FuseCrossEntropyPass(RewritePass):
    """Replace cross-entropy losses (and their LM head) by one fused operator."""

    name = "fuse-cross-entropy"
    exact = True
    description = "cross-entropy forms (+ LM head) -> FusedCrossEntropy / FusedLinearCrossEntropy (Liger, CCE)"
    min_opset = MIN_OPSET
    Options = FuseCrossEntropyOptions

    def call(self, model: ir.Model) -> RewriteResult:
        opset = model.opset_imports.get("", 1)
        stats = {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 0}
        if any(node.op_type in CANDIDATES for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            # The checks need dtypes, ranks and the LM head's shapes.
            shapes.infer(model, static=True)
        heads = [True, False] if self.options.linear else [False]
        shared: list[tuple[ir.Value, ir.Value]] = []
        for linear in heads:  # the LM-head forms first: they cover the plain ones
            for rule in _rules(linear, shared):
                count = RewriteRuleSet([rule]).apply_to_model(model)
                stats["linear_cross_entropy_fused" if linear else "cross_entropy_fused"] += count
        _move_shared_uses(shared)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == DOMAIN and node.op_type in (LOSS, LINEAR_LOSS):
                add_function(model, function_proto(node.op_type, opset))
        if stats["cross_entropy_fused"] or stats["linear_cross_entropy_fused"]:
            # The matched subgraphs leave their constants (Reshape shapes, axes) unused.
            ir.passes.common.RemoveUnusedNodesPass()(model)
        notes = _skipped(model)
        stats["skipped"] = len(notes)
        modified = stats["cross_entropy_fused"] + stats["linear_cross_entropy_fused"] > 0
        return RewriteResult(model, modified, stats=stats, notes=notes)

    def ensures(self, model: ir.Model) -> None:
        super().ensures(model)
        if any(node.domain == DOMAIN for node in ir.traversal.RecursiveGraphIterator(model.graph)):
            assert model.ir_version >= FUNCTIONS_IR_VERSION


# --------------------------------------------------------------------------------------
# Patterns: one rule class, parameterized by loss form and by whether an LM head feeds it
# --------------------------------------------------------------------------------------

FORMS = ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss", "ReduceMean", "ReduceSum", "masked-sum", "masked-mean")


def _log_prob(op, scores, flat_shape):
    """``log softmax(scores)`` over the class axis, in each form exporters write it."""
    flat = op.Transpose(op.Reshape(scores, flat_shape), perm=[0, 2, 1])
    expanded = op.Reshape(op.Transpose(op.LogSoftmax(flat, _outputs=["inner"]), perm=[0, 2, 1]), op.Shape(scores), _outputs=["log_prob"])
    return OrValue(
        [op.LogSoftmax(scores, _outputs=["softmax"]), op.Log(op.Softmax(scores, _outputs=["softmax"]), _outputs=["log_prob"]), expanded],
        tag_var="log_prob_form",
        tag_values=["LogSoftmax", "Log(Softmax)", "expanded"],
    )


def _head(op, hidden, weight, bias, shape):
    """An LM head ``hidden @ W (+ b)`` producing the scores, maybe flattened to [-1, V]."""
    logits = OrValue(
        [
            op.MatMul(hidden, weight),
            op.Add(op.MatMul(hidden, weight), bias),
            op.Add(bias, op.MatMul(hidden, weight)),
            op.Gemm(hidden, weight, _allow_other_inputs=True, _outputs=["gemm"]),
        ],
        tag_var="head",
        tag_values=["MatMul", "Add", "Add", "Gemm"],
    )
    return OrValue([op.Reshape(logits, shape), logits], tag_var="flattened", tag_values=[True, False])


def _picked(op, log_prob, index):
    """``log_prob[i, index[i]]``: GatherElements at Unsqueeze(index, 1), maybe squeezed back."""
    gathered = op.GatherElements(log_prob, op.Unsqueeze(index, _allow_other_inputs=True, _outputs=["unsqueezed"]), _outputs=["gathered"])
    return OrValue([op.Squeeze(gathered, _allow_other_inputs=True, _outputs=["squeezed"]), gathered])


class _FuseLoss(RewriteRuleClassBase):
    """One loss ``form`` (see FORMS) -> FusedCrossEntropy, or FusedLinearCrossEntropy with ``linear``.

    With ``shared`` (a list), the form's log-probabilities have other uses: the matched
    nodes are not removed by the match, and each rewrite appends (log-probabilities,
    the fused node's ``log_prob`` output) to ``shared``, for the pass to move those uses
    over (:func:`_move_shared_uses`); the old nodes are then dead.
    """

    def __init__(
        self,
        form: str,
        linear: bool,
        log_prob_output: bool = False,
        shared: list[tuple[ir.Value, ir.Value]] | None = None,
    ) -> None:
        suffix = "+log_prob" if log_prob_output else "+shared_log_prob" if shared is not None else ""
        super().__init__(
            name=f"{'LinearHead+' if linear else ''}{form}{suffix}ToFused", remove_nodes=shared is None
        )
        self.form, self.linear, self.log_prob_output, self.shared = form, linear, log_prob_output, shared

    def pattern(self, op, scores, labels, hidden, weight, bias, shape, flat_shape, ignore, index_zero, loss_zero):
        scores = _head(op, hidden, weight, bias, shape) if self.linear else scores
        if self.form == "SoftmaxCrossEntropyLoss":
            outputs = ["loss", "log_prob"] if self.log_prob_output else ["loss"]
            return op.SoftmaxCrossEntropyLoss(scores, labels, _allow_other_inputs=True, _outputs=outputs)
        log_prob = _log_prob(op, scores, flat_shape)
        if self.form == "NegativeLogLikelihoodLoss":
            return op.NegativeLogLikelihoodLoss(log_prob, labels, _allow_other_inputs=True, _outputs=["loss"])
        if self.form in ("ReduceMean", "ReduceSum"):
            picked = _picked(op, log_prob, labels)
            return getattr(op, self.form)(op.Neg(picked), _allow_other_inputs=True, _outputs=["loss"])
        valid = op.Not(op.Equal(labels, ignore))
        picked = _picked(op, log_prob, op.Where(valid, labels, index_zero))
        if self.form == "masked-sum":
            return op.ReduceSum(op.Where(valid, op.Neg(picked), loss_zero), _allow_other_inputs=True, _outputs=["loss"])
        total = op.ReduceSum(op.Where(valid, op.Neg(picked), loss_zero), _allow_other_inputs=True, _outputs=["total"])
        count = op.ReduceSum(op.Cast(valid), _allow_other_inputs=True, _outputs=["count"])
        return op.Div(total, count, _outputs=["loss"])

    def check(self, op, *args, **kwargs) -> MatchResult:
        del op, args
        reason = _reason(self, kwargs)
        return MatchResult().fail(reason) if reason else MatchResult()

    def rewrite(self, op, **bindings):
        root = bindings["loss"].producer()
        attributes = _attributes(self.form, root, bindings)
        weights = _input(root, 2) if self.form in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss") else None
        if self.linear:
            head = _linear_head(bindings)
            assert isinstance(head, _Head)
            inputs = [bindings["hidden"], bindings["weight"], bindings["labels"], head.bias, weights]
            return op.op(LINEAR_LOSS, *inputs, _domain=DOMAIN, transpose_weight=head.transpose_weight, **attributes)
        inputs = [bindings["scores"], bindings["labels"], weights]
        loss, log_prob = op.op(LOSS, *inputs, _domain=DOMAIN, _outputs=2, **attributes)
        if self.shared is not None:
            self.shared.append((_log_prob_value(bindings), log_prob))
        return (loss, log_prob) if self.log_prob_output else loss


def _rules(linear: bool, shared: list[tuple[ir.Value, ir.Value]]) -> list[RewriteRule]:
    """The rules in the order they are tried (each once over the whole model); the
    shared-log-probabilities rules append to ``shared`` (see :class:`_FuseLoss`)."""
    rules = [_FuseLoss.rule(form, linear) for form in FORMS]
    if not linear:  # the fused linear loss has no log_prob: it never holds the logits
        rules.insert(0, _FuseLoss.rule("SoftmaxCrossEntropyLoss", linear, log_prob_output=True))
        rules += [_FuseLoss.rule(form, linear, shared=shared) for form in FORMS[1:]]
    return rules


def _log_prob_value(bindings: dict) -> ir.Value:
    """The log-probabilities a NLL-like form reads (LogSoftmax's output, or Log's, or the
    expansion's last Reshape's)."""
    return bindings["softmax"] if bindings.get("log_prob_form") == "LogSoftmax" else bindings["log_prob"]


def _move_shared_uses(shared: list[tuple[ir.Value, ir.Value]]) -> None:
    """Every other use of fused log-probabilities reads the fused node's ``log_prob``; the
    graphs are sorted again (the fused node sits where the loss was, after those uses)."""
    graphs = {}
    for old, new in shared:
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        name = old.name  # a graph output keeps its name
        old.name = f"{name}_unfused"
        new.name = name
        new.type = new.type or old.type  # the same tensor: a graph output needs its type
        new.shape = new.shape or old.shape
        producer = new.producer()
        if producer is not None and producer.graph is not None:
            graphs[id(producer.graph)] = producer.graph
    for graph in graphs.values():
        graph.sort()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Head:
    """A matched LM head: its bias (or None) and whether W is [V, H]."""

    bias: ir.Value | None
    transpose_weight: int


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integers of a constant (initializer or Constant node), or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    array = tensor.numpy()
    return [int(x) for x in np.ravel(array)] if np.issubdtype(array.dtype, np.integer) else None


def _is_zero(value: ir.Value | None) -> bool:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor is not None and tensor.numpy().size == 1 and float(tensor.numpy().ravel()[0]) == 0.0


def _is_axis(axis: int | None, target: int, rank: int | None) -> bool:
    """Whether ``axis`` (maybe negative) is ``target`` in a tensor of ``rank``."""
    if axis is None:
        return False
    return axis == target or (rank is not None and axis % rank == target)


def _reduces_everything(node: ir.Node) -> str:
    """"" when the Reduce* node reduces all axes to a scalar, else why not."""
    if _input(node, 1) is not None or node.attributes.get_ints("axes"):
        return f"{node.op_type} over some axes only"
    if node.attributes.get_int("noop_with_empty_axes", 0):
        return f"{node.op_type} with noop_with_empty_axes=1 is the identity"
    if node.attributes.get_int("keepdims", 1):
        return f"{node.op_type} keeps dims (keepdims=1): the loss is not a scalar"
    return ""


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    axes = _ints(_input(node, 1))
    return axes if axes is not None else list(node.attributes.get_ints("axes") or []) or None


def _reason(rule: _FuseLoss, b: dict) -> str:
    """Why the matched ``rule`` cannot be rewritten, or "" when it can."""
    scores = b.get("hidden") if rule.linear else b.get("scores")
    if scores is None or scores.dtype is None:
        return "scores type unknown (shape inference could not infer it)"
    if scores.dtype not in FLOAT_TYPES:
        return f"scores type {scores.dtype} is not a float type"
    rank = 2 if rule.linear else _rank(b.get("scores"))
    root = b["loss"].producer()
    has_log_prob = len(root.outputs) > 1 and (bool(root.outputs[1].uses()) or root.outputs[1].is_graph_output())
    if has_log_prob != rule.log_prob_output:
        return "the log_prob output is used" if has_log_prob else "no log_prob output"
    if rule.shared is not None:
        # Only where the plain rule could not fire: the log-probabilities have other uses.
        # (A loss already fused leaves its old nodes dead until the cleanup: skip them.)
        log_prob = _log_prob_value(b)
        if not (b["loss"].uses() or b["loss"].is_graph_output()):
            return "the loss is not used"
        if len(log_prob.uses()) < 2 and not log_prob.is_graph_output():
            return "the log-probabilities have no other use"
    if rule.linear:
        head = _linear_head(b)
        if isinstance(head, str):
            return head
    if rule.form != "SoftmaxCrossEntropyLoss":
        reason = _log_prob_reason(b, rank)
        if reason:
            return reason
    if rule.form in ("ReduceMean", "ReduceSum", "masked-sum", "masked-mean"):
        reason = _gather_reason(b, rank)
        if reason:
            return reason
        total = b["loss"].producer() if rule.form != "masked-mean" else b["total"].producer()
        reasons = [_reduces_everything(total)]
        if rule.form == "masked-mean":
            reasons.append(_reduces_everything(b["count"].producer()))
        if rule.form.startswith("masked"):
            if _ints(b.get("ignore")) is None or len(_ints(b["ignore"]) or []) != 1:
                reasons.append("the ignored label is not a constant scalar")
            if not (_is_zero(b.get("index_zero")) and _is_zero(b.get("loss_zero"))):
                reasons.append("masked entries are not set to 0")
        return next((reason for reason in reasons if reason), "")
    return ""


def _log_prob_reason(b: dict, rank: int | None) -> str:
    form = b.get("log_prob_form")
    if form == "expanded":
        if _ints(b["flat_shape"]) != [0, 0, -1]:
            return "Reshape before LogSoftmax is not to [N, C, -1]"
        if b["inner"].producer().attributes.get_int("axis", -1) not in (2, -1):
            return "expanded LogSoftmax is not over the classes"
        return ""
    axis = b["softmax"].producer().attributes.get_int("axis", -1)
    if not _is_axis(axis, 1, rank):
        where = f"axis {axis}" + ("" if rank is not None else " with the rank unknown")
        return f"{form} over {where}, not the class axis 1"
    return ""


def _gather_reason(b: dict, rank: int | None) -> str:
    if not _is_axis(b["gathered"].producer().attributes.get_int("axis", 0), 1, rank):
        return "GatherElements is not along the class axis 1"
    axes = _unsqueeze_axes(b["unsqueezed"].producer())
    if axes is None or len(axes) != 1 or not _is_axis(axes[0], 1, rank):
        return "labels are not unsqueezed at the class axis 1"
    squeezed = b.get("squeezed")
    if squeezed is not None:
        axes = _unsqueeze_axes(squeezed.producer())
        if not (axes is not None and len(axes) == 1 and _is_axis(axes[0], 1, rank)) and not (axes is None and rank == 2):
            return "the gathered values are not squeezed at the class axis 1"
    return ""


def _linear_head(b: dict) -> _Head | str:
    """The LM head's parts, or why it cannot be fused (then the plain rule still applies)."""
    weight, hidden = b["weight"], b["hidden"]
    if _rank(weight) != 2 or weight.shape is None or not all(isinstance(d, int) for d in weight.shape):
        return "LM head weight is not a 2-D tensor of known shape"
    transpose, bias = 0, b.get("bias")
    if b["head"] == "Gemm":
        gemm = b["gemm"].producer()
        attrs = gemm.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta"
        transpose, bias = attrs.get_int("transB", 0), _input(gemm, 2)
    vocab = weight.shape[0] if transpose else weight.shape[1]
    if bias is not None and (bias.shape is None or list(bias.shape) != [vocab]):
        return f"LM head bias is not a vector of {vocab}"
    if b["flattened"]:
        shape = _ints(b["shape"])
        if shape is None or len(shape) != 2 or shape[1] != vocab or shape[0] == 0:
            return f"Reshape of the logits is not to [-1, {vocab}]"
    elif _rank(hidden) != 2:
        return "logits are not 2-D (class axis 1 would not be the vocabulary)"
    return _Head(bias, transpose)


def _attributes(form: str, root: ir.Node, b: dict) -> dict[str, object]:
    """``reduction`` and (when set) ``ignore_index`` of the fused node."""
    if form in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"):
        attributes: dict[str, object] = {"reduction": root.attributes.get_string("reduction", "mean")}
        if "ignore_index" in root.attributes:
            attributes["ignore_index"] = root.attributes.get_int("ignore_index")
        return attributes
    reduction = {"ReduceMean": "mean", "ReduceSum": "sum", "masked-sum": "sum", "masked-mean": "mean"}[form]
    attributes = {"reduction": reduction}
    if form.startswith("masked"):
        attributes["ignore_index"] = (_ints(b["ignore"]) or [0])[0]
    return attributes


def _skipped(model: ir.Model) -> list[str]:
    """Notes for losses left in the graph that look like cross-entropy."""
    notes = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "SoftmaxCrossEntropyLoss":
            dtype = node.inputs[0].dtype if node.inputs[0] is not None else None
            why = "scores type unknown" if dtype is None else f"scores type {dtype} is not a float type"
            if dtype in FLOAT_TYPES:
                why = "no rule matched (onnxscript's MatchingTracer tells why)"
            notes.append(f"SoftmaxCrossEntropyLoss {node.name!r} left as is: {why}")
        elif node.op_type == "NegativeLogLikelihoodLoss":
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is not None and producer.op_type in ("LogSoftmax", "Log"):
                axis = producer.attributes.get_int("axis", -1)
                notes.append(
                    f"NegativeLogLikelihoodLoss {node.name!r} left as is: its {producer.op_type} input is not a "
                    f"log-softmax over the class axis 1 (axis {axis}), or Log of probabilities used elsewhere"
                )
    return notes
