"""Golden comparison of ONNX graphs for our ONNX-level passes (what ``prepare`` runs).

:func:`structure` writes a graph as data: each node, in order, with its domain, op type,
attributes and inputs, the inputs named by where they come from (a graph input or
initializer by its name, a node output by the node's position), so two graphs compare
equal when they compute the same thing in the same order, whatever their value names.

>>> assert structure(after) == structure(expected)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir


def structure(model: ir.Model) -> list[tuple[Any, ...]]:
    """``model``'s main graph as a list of rows: one per node, then the graph outputs."""
    graph = model.graph
    names: dict[ir.Value, str] = {value: str(value.name) for value in graph.inputs}
    names.update({value: str(value.name) for value in graph.initializers.values()})
    rows: list[tuple[Any, ...]] = []
    for index, node in enumerate(graph):
        inputs = tuple("" if value is None else names.get(value, "?") for value in node.inputs)
        attributes = tuple(sorted((name, _value(attr)) for name, attr in node.attributes.items()))
        rows.append((node.domain or "", node.op_type, inputs, attributes))
        for position, output in enumerate(node.outputs):
            names[output] = f"%{index}.{position}"
    rows.append(("outputs", tuple(names.get(value, "?") for value in graph.outputs)))
    return rows


def _value(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        array = value.numpy()
        return (str(array.dtype), array.shape, np.asarray(array).tolist())
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return int(value) if isinstance(value, ir.DataType) else value
