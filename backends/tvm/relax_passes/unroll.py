"""Unroll ONNX ``Loop`` nodes with a constant trip count, for TVM's importer (it has no
``Loop``).

Only the simple, common form is unrolled: a constant trip count (at most
:data:`MAX_TRIPS`), a constant true condition that the body passes through unchanged,
and no scan outputs — e.g. the Newton–Schulz iterations of ``SoftmaxFreeAttention``.
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
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


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
    passes_through = cond_out is body.inputs[1] or (
        cond_out.producer() is not None
        and cond_out.producer().op_type == "Identity"  # type: ignore[union-attr]
        and cond_out.producer().inputs[0] is body.inputs[1]  # type: ignore[union-attr]
    )
    if not passes_through:
        return False
    current: list[ir.Value] = [value for value in carried if value is not None]
    new_nodes: list[ir.Node] = []
    for iteration in range(int(trips)):
        mapping: dict[ir.Value, ir.Value] = dict(zip(body.inputs[2:], current, strict=True))
        index = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(iteration, dtype=np.int64))})
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
