"""The float types each graph output of a model is computed in.

An output is as precise as the least precise arithmetic behind it, not as its own type
says: a float32 softmax cast to a float64 output carries float32's rounding, and a
float16 softmax between float32 graph inputs and outputs (a ``keep_io_types``
mixed-precision export) carries float16's. Verification takes the tolerance of exact
passes from these types (:func:`rewriter.verify.output_tolerances`).

:func:`computed_types` follows each output back through the nodes it depends on and
collects the element types of the values those nodes compute: the types ONNX shape
inference and the model's ``value_info`` give, a ``Cast``'s target, the types inside
the subgraphs of an ``If``/``Loop``/``Scan`` (and the values they read from outside),
and the ``Cast`` targets in the body of a model-local function. Graph inputs and
initializers are held, not computed (a float16 weight cast to float32 before any
arithmetic rounds the same in both models): they count only where a node that reads
them has an output of unknown type (an op shape inference does not know). Complex types
count as their real component (complex64 as float32).

>>> computed_types(onnx.load("mixed.onnx", load_external_data=False))  # doctest: +SKIP
{'logits': {'float16', 'float32'}}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import onnx
from onnx import TensorProto

from rewriter.errors import first_line

logger = logging.getLogger(__name__)

# ONNX element types by the name of the float type whose rounding they carry.
FLOAT_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.COMPLEX64: "float32",
    TensorProto.COMPLEX128: "float64",
}


def computed_types(proto: onnx.ModelProto) -> dict[str, set[str]]:
    """Per graph output, the float types (``"float16"``, ...) of the values it is computed
    from, its own type included; the rules are the module's. Linear in the graph: the
    nodes are in topological order, as ONNX requires."""
    graph = _inferred(proto).graph
    known = {value.name: value.type.tensor_type.elem_type for value in _typed_values(graph)}
    held = {value.name: value.type.tensor_type.elem_type for value in graph.input}
    held.update({init.name: init.data_type for init in graph.initializer})
    functions = {(function.domain, function.name): function for function in proto.functions}
    reach: dict[str, set[str]] = {}
    for node in graph.node:
        types = _types_inside(node, functions).union(*(reach.get(name, set()) for name in _reads(node)))
        outputs = [name for name in node.output if name]
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            known.update(dict.fromkeys(outputs, _attribute(node, "to")))
        if not all(known.get(name) for name in outputs):  # an op shape inference does not know
            types |= _floats(held[name] for name in node.input if name in held)
        for name in outputs:
            reach[name] = types | _floats([known.get(name, TensorProto.UNDEFINED)])
    return {
        output.name: reach.get(output.name, set())
        | _floats([output.type.tensor_type.elem_type, held.get(output.name, TensorProto.UNDEFINED)])
        for output in graph.output
    }


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with ONNX shape inference's types; ``proto`` itself where it fails."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception as exc:  # onnx raises several types; the walk copes without inference
        logger.info("shape inference failed (%s): only declared types are known", first_line(exc))
        return proto


def _typed_values(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            yield value


def _floats(elem_types: Iterable[int]) -> set[str]:
    return {FLOAT_TYPES[elem_type] for elem_type in elem_types if elem_type in FLOAT_TYPES}


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), TensorProto.UNDEFINED)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        yield from attribute.graphs


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The values ``node`` reads: its inputs and those its subgraphs read from outside."""
    yield from node.input
    for graph in _subgraphs(node):
        for inner in graph.node:
            yield from _reads(inner)


def _types_inside(
    node: onnx.NodeProto,
    functions: dict[tuple[str, str], onnx.FunctionProto],
    seen: frozenset[tuple[str, str]] = frozenset(),
) -> set[str]:
    """The float types computed inside ``node``: its subgraphs' values and the ``Cast``
    targets of its (model-local) function body."""
    types: set[str] = set()
    for graph in _subgraphs(node):
        types |= _floats(value.type.tensor_type.elem_type for value in _typed_values(graph))
        types |= _floats(init.data_type for init in graph.initializer)
        for inner in graph.node:
            types |= _types_inside(inner, functions, seen) | _cast_target(inner)
    key = (node.domain, node.op_type)
    if key in functions and key not in seen:
        for inner in functions[key].node:
            types |= _types_inside(inner, functions, seen | {key}) | _cast_target(inner)
    return types


def _cast_target(node: onnx.NodeProto) -> set[str]:
    return _floats([_attribute(node, "to")]) if node.op_type == "Cast" else set()
