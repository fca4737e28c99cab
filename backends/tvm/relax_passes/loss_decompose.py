"""Loss ops TVM's ONNX importer lacks, rewritten into ops it has.

``NegativeLogLikelihoodLoss`` and ``SoftmaxCrossEntropyLoss`` (and so the function
bodies of our ``FusedCrossEntropy``/``FusedLinearCrossEntropy``, which use them) have no
converter in TVM's importer. This rewrite spells them out as ONNX defines them:

    picked = GatherElements(input, Unsqueeze(target', 1), axis=1)   # target' = 0 where ignored
    loss   = -picked * weight[target'] * (target != ignore_index)
    none: loss;  sum: ReduceSum(loss);  mean: ReduceSum(loss) / ReduceSum(weight[target'] * kept)

and ``SoftmaxCrossEntropyLoss(x, ...)`` as the above on ``LogSoftmax(x, axis=1)``.
Needs opset >= 13 (Squeeze/Unsqueeze/ReduceSum take axes as inputs), as the loss
fusion pass does.

>>> count = expand_losses(model)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

LOSSES = ("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss")


def expand_losses(model: ir.Model) -> int:
    """Rewrite every NLL / SCE loss node of the main graph; returns how many."""
    if model.opset_imports.get("", 1) < 13:
        return 0
    count = 0
    for node in list(model.graph):
        if node.op_type in LOSSES and node.domain in ("", "ai.onnx"):
            _expand(model.graph, node)
            count += 1
    return count


def _expand(graph: ir.Graph, node: ir.Node) -> None:
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    scores, target, weight = inputs[0], inputs[1], inputs[2]
    assert scores is not None and target is not None
    reduction = node.attributes.get_string("reduction", "mean")
    ignore = node.attributes.get_int("ignore_index")
    new: list[ir.Node] = []

    def add(op: str, args: list[ir.Value | None], **attributes: Any) -> ir.Value:
        created = ir.node(op, args, attributes=attributes)
        new.append(created)
        return created.outputs[0]

    def constant(array: np.ndarray) -> ir.Value:
        return add("Constant", [], value=ir.tensor(array))

    log_prob = add("LogSoftmax", [scores], axis=1) if node.op_type == "SoftmaxCrossEntropyLoss" else scores
    one = constant(np.array([1], dtype=np.int64))
    safe_target = target
    kept: ir.Value | None = None
    if ignore is not None:
        ignored = add("Equal", [target, constant(np.array(ignore, dtype=np.int64))])
        safe_target = add("Where", [ignored, constant(np.array(0, dtype=np.int64)), target])
        # Cast, not CastLike (opset 15): the scores' type, float32 when unknown.
        kept = add("Cast", [add("Not", [ignored])], to=scores.dtype or ir.DataType.FLOAT)
    picked = add("Squeeze", [add("GatherElements", [log_prob, add("Unsqueeze", [safe_target, one])], axis=1), one])
    loss = add("Neg", [picked])
    scale: ir.Value | None = add("Gather", [weight, safe_target]) if weight is not None else None
    if kept is not None:
        scale = kept if scale is None else add("Mul", [scale, kept])
    if scale is not None:
        loss = add("Mul", [loss, scale])
    if reduction == "sum":
        loss = add("ReduceSum", [loss], keepdims=0)
    elif reduction == "mean":
        total = add("ReduceSum", [loss], keepdims=0)
        if scale is None:
            loss = add("ReduceMean", [loss], keepdims=0)
        else:
            loss = add("Div", [total, add("ReduceSum", [scale], keepdims=0)])
    graph.insert_before(node, new)
    outputs = [loss, log_prob]
    for old, replacement in zip(node.outputs, outputs, strict=False):
        name = old.name
        ir.convenience.replace_all_uses_with(old, replacement, replace_graph_outputs=True)
        if replacement.is_graph_output():
            old.name = None
            replacement.name = name
    graph.remove(node, safe=True)
