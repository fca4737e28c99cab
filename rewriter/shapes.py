"""Shape and type inference for passes, in time linear in the graph, and only when needed.

Passes that decide by dtype or rank (two-pass-softmax, the attention rewrites, the loss
fusion) need their candidates' values typed. :func:`infer` runs ONNX's shape inference
only when one of the values a pass names lacks its dtype or shape (a model loaded with
``value_info``, or typed by an earlier pass, costs nothing), and fills in only the values
that lack them.

It does what ``onnx_ir.passes.common.ShapeInferencePass`` does, without its two costs
that grow faster than the graph: that pass checks each initializer against the graph
inputs with a list scan (``initializer not in graph.inputs``: quadratic, 22 of 31 s at
50k nodes) and deserializes the whole inferred model to merge it back. Here the big
initializers leave the serialized copy by a set lookup, and the inferred types are read
from the proto's ``value_info`` by name for the values that need them.

>>> infer(model, [node.inputs[0] for node in softmax_nodes])  # doctest: +SKIP
33333
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from rewriter.io import gc_paused

logger = logging.getLogger(__name__)

# Initializers above this size leave the copy that shape inference reads (as typed graph
# inputs), as onnx-ir does: inference needs their types, not their bytes. Small ones stay,
# since data propagation reads them (Reshape's shape, a Slice's bounds).
BIG_TENSOR_BYTES = 1000


def known(value: ir.Value, *, static: bool = False) -> bool:
    """True when ``value`` has a dtype and a shape (with ``static``: of integer dims only)."""
    if value.dtype is None or value.shape is None:
        return False
    return not static or all(isinstance(dim, int) for dim in value.shape)


def infer(
    model: ir.Model, values: Iterable[ir.Value | None] | None = None, *, static: bool = False
) -> int:
    """Give the values of ``model`` that lack a dtype or a shape the ones inference finds.

    ``values``: the values the caller needs typed (None: every value of the model's
    graphs). Nothing runs when all of them are typed. With ``static`` a shape with
    symbolic dims counts as unknown too, and an inferred shape of the same rank with
    more integer dims replaces it (a pass that needs static lengths). Returns how many
    values changed; a model inference fails on is left as it is (logged), as with
    onnx-ir's pass.
    """
    wanted = _all_values(model) if values is None else [v for v in values if v is not None]
    missing = [value for value in wanted if value.name and not known(value, static=static)]
    if not missing:
        return 0
    with gc_paused():  # it builds objects for every value, and frees them at the end
        return _infer(model, missing)


def _infer(model: ir.Model, missing: list[ir.Value]) -> int:
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _proto_for_inference(model), check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # InferenceError, and others from the C++ side
        logger.warning("shape inference failed: %s; the model is left unchanged", exc)
        return 0
    has_subgraphs = next(iter(model.graph.subgraphs()), None) is not None
    types = _inferred_types(inferred, {value.name or "" for value in missing}, subgraphs=has_subgraphs)
    filled = 0
    for value in missing:
        info = types.get(value.name or "")
        if info is None:
            continue
        if info.type.WhichOneof("value") is None:
            continue
        type_and_shape = ir.serde.deserialize_value_info_proto(info, None)
        changed = False
        if value.dtype is None and type_and_shape.dtype is not None:
            value.dtype = type_and_shape.dtype
            changed = True
        if type_and_shape.shape is not None and _better(type_and_shape.shape, value.shape):
            value.shape = type_and_shape.shape
            changed = True
        filled += changed
    return filled


def _better(inferred: ir.Shape, current: ir.Shape | None) -> bool:
    """Whether ``inferred`` says more than ``current``: a rank where none was known, or
    more integer dims at the same rank."""
    if current is None:
        return True
    if len(inferred) != len(current):
        return False
    return sum(isinstance(d, int) for d in inferred) > sum(isinstance(d, int) for d in current)


def _all_values(model: ir.Model) -> list[ir.Value]:
    values: list[ir.Value] = []
    for graph in model.graphs():
        values.extend(graph.inputs)
        for node in graph:
            values.extend(node.outputs)
    return values


def _proto_for_inference(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose big initializers are typed graph inputs without data.

    The model is left as it was, its initializers in their order.
    """
    graph = model.graph
    initializers = list(graph.initializers.values())
    big = [
        value
        for value in initializers
        if value.const_value is None or value.const_value.nbytes > BIG_TENSOR_BYTES
    ]
    for value in big:
        graph.initializers.pop(value.name or "")
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        if big:  # put them back in their order (a later save writes the same file)
            for value in initializers:
                graph.initializers.pop(value.name or "", None)
            for value in initializers:
                graph.initializers.add(value)
    inputs = {info.name for info in proto.graph.input}
    for value in big:
        if value.name in inputs:
            continue
        tensor = value.const_value
        dtype = value.dtype or (tensor.dtype if tensor is not None else None)
        shape = value.shape or (tensor.shape if tensor is not None else None)
        if dtype is None or shape is None:
            continue  # untyped and without data: inference will say what it cannot type
        dims = [dim if isinstance(dim, int) else dim.value for dim in shape]
        proto.graph.input.append(onnx.helper.make_tensor_value_info(value.name or "", int(dtype), dims))
    return proto


def _inferred_types(
    proto: onnx.ModelProto, names: set[str], *, subgraphs: bool
) -> dict[str, onnx.ValueInfoProto]:
    """The inferred types of the values ``names`` (first wins), from the main graph and,
    with ``subgraphs``, the graphs in node attributes."""
    types: dict[str, onnx.ValueInfoProto] = {}
    pending = [proto.graph]
    while pending:
        graph = pending.pop()
        for infos in (graph.input, graph.value_info, graph.output):
            for info in infos:
                if info.name in names and info.name not in types:
                    types[info.name] = info
        if not subgraphs:
            continue
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    pending.extend(attribute.graphs)
    return types
