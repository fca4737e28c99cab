"""Rewire "the scores of the selected boxes" to a SoftNonMaxSuppression's decayed scores.

Exporters write ``keep = nms(boxes, scores)`` followed by ``scores[keep]`` as::

    selected = NonMaxSuppression(Unsqueeze(Unsqueeze(S, 0), 0) ...)   # [M, 3], B = C = 1
    keep = Squeeze(Gather(selected, [2], axis=1), [1])                # or Gather(selected, 2)
    ...  keep = Slice(keep, ...)                                      # keep[:k], any number
    out = Gather(S, keep, axis=0)                                     # scores[keep]

torchvision's ``batched_nms`` puts the first two lines in the ``else`` branch of an
``If`` (the ``then`` branch returns an empty tensor for no boxes) and the rest after it.
:func:`rewire` follows ``keep`` through ``Slice`` and out of ``If`` branches (adding an
output to the ``If``: the decayed scores in the branch with the NMS, an empty float
tensor in the other) and replaces each ``Gather(S, keep)`` by the decayed scores,
sliced as ``keep`` was. The decayed scores are the selected boxes' scores in the order
of selection, so with ``method=hard`` the values are the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

# Ops that only reshape or relabel the scores on their way into NonMaxSuppression.
_PASS_THROUGH = {"Unsqueeze", "Reshape", "Identity", "Cast"}


def branch_owners(model: ir.Model) -> dict[int, tuple[ir.Node, str]]:
    """``id(branch graph) -> (If node, attribute name)`` for every If of the model."""
    owners: dict[int, tuple[ir.Node, str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            for key in ("then_branch", "else_branch"):
                attribute = node.attributes.get(key)
                if attribute is not None:
                    owners[id(attribute.value)] = (node, key)
    return owners


def rewire(node: ir.Node, owners: dict[int, tuple[ir.Node, str]]) -> tuple[int, str]:
    """Replace the gathers of the selected boxes' scores after the SoftNonMaxSuppression
    ``node`` by its decayed scores: ``(gathers replaced, why none was)``."""
    source = _score_source(node.inputs[1])
    if source is None:
        return 0, "its scores are not a 1-D tensor unsqueezed to [1, 1, N]"
    selected, decayed = node.outputs
    keeps = list(_box_columns(selected))
    if not keeps:
        return 0, "nothing takes column 2 (the box indices) of its selected indices"
    replaced = sum(_follow(keep, decayed, source, owners) for keep in keeps)
    if not replaced:
        return 0, "no Gather(scores, selected box indices) follows it"
    return replaced, ""


def _score_source(value: ir.Value | None) -> ir.Value | None:
    """S when ``value`` is S [N] unsqueezed (reshaped, cast to float32) to [1, 1, N]."""
    while value is not None and value.producer() is not None:
        producer = value.producer()
        assert producer is not None
        if producer.op_type not in _PASS_THROUGH or producer.domain not in ("", "ai.onnx"):
            break
        value = producer.inputs[0]
    # TorchScript exports leave intermediate dtypes unknown; NonMaxSuppression takes float.
    if value is None or value.dtype not in (None, ir.DataType.FLOAT):
        return None
    if value.shape is not None and len(value.shape) != 1:
        return None
    return value


def _box_columns(selected: ir.Value) -> Iterator[ir.Value]:
    """The values ``selected[:, 2]`` ([M]): a Gather of index 2 on axis 1, squeezed."""
    for use in list(selected.uses()):
        gather = use.node
        if gather.op_type != "Gather" or use.idx != 0 or gather.attributes.get_int("axis", 0) != 1:
            continue
        index = _constant(gather.inputs[1])
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 2:
            continue
        if index.ndim == 0:
            yield gather.outputs[0]
            continue
        for squeeze_use in list(gather.outputs[0].uses()):
            squeeze = squeeze_use.node
            axes = _squeeze_axes(squeeze)
            if squeeze.op_type == "Squeeze" and axes in ([1], [-1]):
                yield squeeze.outputs[0]


def _follow(
    keep: ir.Value, decayed: ir.Value, source: ir.Value, owners: dict[int, tuple[ir.Node, str]]
) -> int:
    """Replace ``Gather(source, keep)`` after ``keep`` (``decayed`` is aligned with it)."""
    replaced = 0
    for use in list(keep.uses()):
        consumer = use.node
        graph = consumer.graph
        assert graph is not None
        if (
            consumer.op_type == "Gather"
            and use.idx == 1
            and consumer.inputs[0] is source
            and consumer.attributes.get_int("axis", 0) == 0
        ):
            identity = ir.node("Identity", [decayed])
            ir.convenience.replace_nodes_and_values(
                graph,
                consumer,
                [consumer],
                [identity],
                [consumer.outputs[0]],
                [identity.outputs[0]],
            )
            replaced += 1
        elif consumer.op_type == "Slice" and use.idx == 0 and _slices_axis_0(consumer):
            sliced = ir.node("Slice", [decayed, *consumer.inputs[1:]])
            graph.insert_after(consumer, sliced)
            replaced += _follow(consumer.outputs[0], sliced.outputs[0], source, owners)
    if keep.is_graph_output():
        replaced += _leave_branch(keep, decayed, source, owners)
    return replaced


def _leave_branch(
    keep: ir.Value, decayed: ir.Value, source: ir.Value, owners: dict[int, tuple[ir.Node, str]]
) -> int:
    """``keep`` is an output of an If branch: add ``decayed`` as an output beside it (an
    empty float tensor in the other branch, whose output must be an empty constant)."""
    branch = keep.graph
    if branch is None or id(branch) not in owners:
        return 0
    node, key = owners[id(branch)]
    other_key = "else_branch" if key == "then_branch" else "then_branch"
    other = node.attributes[other_key].value
    position = list(branch.outputs).index(keep)
    empty = _constant(other.outputs[position])
    if empty is None or empty.size != 0:
        return 0
    constant = ir.node(
        "Constant", [], attributes={"value": ir.tensor(np.zeros(0, np.float32), name="no_scores")}
    )
    other.append(constant)
    other.outputs.append(constant.outputs[0])
    branch.outputs.append(decayed)
    node.resize_outputs(len(node.outputs) + 1)
    out = node.outputs[-1]
    out.name = f"{node.outputs[position].name}_decayed_scores"
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape([None])
    return _follow(node.outputs[position], out, source, owners)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of ``value`` when it is an initializer or a Constant's output."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _squeeze_axes(node: ir.Node) -> list[int] | None:
    """The axes of a Squeeze (attribute before opset 13, input after)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


def _slices_axis_0(node: ir.Node) -> bool:
    """Whether a Slice (of a 1-D tensor) slices axis 0 only."""
    if len(node.inputs) < 4 or node.inputs[3] is None:
        return True
    axes = _constant(node.inputs[3])
    return axes is not None and [int(a) for a in axes.reshape(-1)] in ([0], [-1])
