"""Unroll ONNX ``Loop`` nodes with a constant trip count, for TVM's importer (it has no
``Loop``).

Only the simple, common form is unrolled: a constant trip count (at most
:data:`MAX_TRIPS`; a 0-d tensor or, as TorchScript writes it, one of shape ``[1]``), a
constant true condition that the body passes through unchanged or replaces with a
constant true, and no scan outputs — e.g. the Newton–Schulz iterations of
``SoftmaxFreeAttention``, or TorchScript's loops over a list (MViT's pooling). The
iteration number is a constant of the rank the body declares for it.
Each iteration's body nodes are copied with the loop-carried values threaded through.

>>> unrolled = unroll_loops(model)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MAX_TRIPS = 64


def unroll_loops(model: ir.Model) -> int:
    """Unroll every simple constant-trip ``Loop`` of the main graph; returns how many."""
    count = 0
    for node in list(model.graph):
        if node.op_type == "Loop" and node.domain in ("", "ai.onnx") and _unroll(model.graph, node):
            count += 1
    return count


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """``value``'s constant as a scalar array, or None where it has none or more than one
    element (a trip count or condition of shape ``[1]``, as TorchScript exports them, is
    its element)."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return array.reshape(()) if array.size == 1 else None


def _unroll(graph: ir.Graph, loop: ir.Node) -> bool:
    trips = _constant(loop.inputs[0] if loop.inputs else None)
    condition = _constant(loop.inputs[1]) if len(loop.inputs) > 1 and loop.inputs[1] is not None else np.array(True)
    body = loop.attributes["body"].as_graph()
    carried = list(loop.inputs[2:])
    if trips is None or condition is None or not bool(condition) or int(trips) > MAX_TRIPS:
        return False
    if len(body.outputs) != 1 + len(carried) or any(value is None for value in carried):
        return False  # scan outputs
    cond_out = body.outputs[0]
    source = cond_out
    producer = cond_out.producer()
    if producer is not None and producer.op_type == "Identity":
        source = producer.inputs[0]  # type: ignore[assignment]
    # The condition passed through, or a constant true (TorchScript's, from outside the body).
    constant = _constant(source)
    if source is not body.inputs[1] and (constant is None or not bool(constant)):
        return False
    # The iteration number as the body declares it: 0-d, or [1] (TorchScript's; ONNX
    # Runtime feeds that rank, and the body's Gathers by it then give 1-D Slice bounds).
    declared = body.inputs[0].shape
    shape = (1,) if declared is not None and declared.rank() == 1 else ()
    current: list[ir.Value] = [value for value in carried if value is not None]
    new_nodes: list[ir.Node] = []
    for iteration in range(int(trips)):
        mapping: dict[ir.Value, ir.Value] = dict(zip(body.inputs[2:], current, strict=True))
        number = np.array(iteration, dtype=np.int64).reshape(shape)
        index = ir.node("Constant", [], attributes={"value": ir.tensor(number)})
        new_nodes.append(index)
        mapping[body.inputs[0]] = index.outputs[0]
        for original in body:
            if original is cond_out.producer():
                continue
            inputs = [mapping.get(value, value) if value is not None else None for value in original.inputs]
            copy = ir.Node(
                original.domain,
                original.op_type,
                inputs,
                attributes=list(original.attributes.values()),
                num_outputs=len(original.outputs),
                version=original.version,
            )
            new_nodes.append(copy)
            mapping.update(zip(original.outputs, copy.outputs, strict=True))
        current = [mapping.get(value, value) for value in body.outputs[1:]]
    graph.insert_before(loop, new_nodes)
    for old, new in zip(loop.outputs, current, strict=False):
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if new.is_graph_output():
            old.name = None
            new.name = name
    graph.remove(loop, safe=True)
    return True
