"""Weights read through Identity/Transpose/Reshape of an initializer, folded for quantize.

Exports of models that share weights read one initializer through shape ops: ALBERT's
dynamo export feeds every MatMul from ``Transpose(W)`` of the shared layer's weight, its
TorchScript export reads the reuses through ``Identity``. :func:`fold_views` gives each
such view the initializer of its own values (computed here with numpy), so that the
quantizer sees an ordinary weight and ``DequantizeLinear`` feeds the MatMul directly:

* the file stays as small: the float source has no other reader, so it is dropped and
  the view is stored once (an ``Identity`` view, or a ``Reshape`` to the same shape, is
  the source itself and is not copied);
* ONNX Runtime fuses ``DequantizeLinear -> MatMul`` (MatMulNBits, QDQ MatMul) and the TVM
  backend's QDQ -> int8 matmul rewrite matches the same pair; a Transpose between them
  would dequantize and transpose the whole weight on every run, outside both.

A source also read by another op (a Gather of tied embeddings, an Add) stays in float:
a quantized copy beside it would grow the file. Every MatMul/Gemm/Conv weight that traces
back to a constant and stays in float is returned with its reason (:class:`FloatWeight`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from rewriter.analysis import WEIGHT_INPUT

VIEW_OPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze")
# Traced for the report only: a weight behind these stays in float.
TRACED_OPS = (*VIEW_OPS, "Cast")


@dataclasses.dataclass(frozen=True)
class FloatWeight:
    """A MatMul/Gemm/Conv weight left in float, and why."""

    op: str
    op_type: str
    weight: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def note(self) -> str:
        return f"{self.op_type} {self.op!r} left in float (weight {self.weight!r}): {self.reason}"


@dataclasses.dataclass
class Folded:
    """What :func:`fold_views` did: views given their own initializer, weights left in float."""

    views: int = 0
    excluded: int = 0
    left: list[FloatWeight] = dataclasses.field(default_factory=list)


def weight_readers(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """Each MatMul/Gemm/Conv of the main graph with its weight operand."""
    found = []
    for node in model.graph:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        if weight is not None:
            found.append((node, weight))
    return found


def trace(model: ir.Model, value: ir.Value) -> tuple[ir.Value | None, list[ir.Node]]:
    """The initializer ``value`` is computed from through ``TRACED_OPS``, and those nodes in order."""
    chain: list[ir.Node] = []
    while True:
        if value.name is not None and model.graph.initializers.get(value.name) is value:
            return value, chain[::-1]
        producer = value.producer()
        if (
            producer is None
            or producer.graph is not model.graph
            or producer.op_type not in TRACED_OPS
        ):
            return None, []
        if producer.domain not in ("", "ai.onnx") or producer.inputs[0] is None:
            return None, []
        chain.append(producer)
        value = producer.inputs[0]


def fold_views(model: ir.Model, exclude: Sequence[str] = ()) -> Folded:
    """Give each weight read through a chain of ``VIEW_OPS`` from an initializer its own initializer.

    >>> folded = fold_views(model)  # doctest: +SKIP
    >>> folded.views, [weight.reason for weight in folded.left]  # doctest: +SKIP
    (12, [])
    """
    folded = Folded()
    chains: list[ir.Node] = []
    made_by: dict[ir.Value, list[ir.Value]] = {}
    views: dict[ir.Value, tuple[ir.Value, list[ir.Node], list[ir.Node]]] = {}
    for node, weight in weight_readers(model):
        source, chain = trace(model, weight)
        if source is None or not chain:
            continue
        if weight in views:
            views[weight][2].append(node)
        else:
            views[weight] = (source, chain, [node])
    by_source: dict[ir.Value, list[ir.Value]] = {}
    for view, (source, _, _) in views.items():
        by_source.setdefault(source, []).append(view)
    for source, source_views in by_source.items():
        reason = _why_not(model, source, [views[view] for view in source_views])
        made = made_by.setdefault(source, [])  # the source's folded initializers, shared by equal views
        for view in source_views:
            _, chain, readers = views[view]
            why = reason
            if why is None and any(_excluded(exclude, reader, source) for reader in readers):
                folded.excluded += len(readers)
                continue
            array = _apply(chain, _array(source)) if why is None else None
            if why is None and array is None:
                why = f"{' -> '.join(node.op_type for node in chain)} with an operand that is not a constant"
            if (
                why is None
                and array is not None
                and any(r.op_type != "Conv" for r in readers)
                and array.ndim != 2
            ):
                why = f"weight of rank {array.ndim} (only 2-D MatMul/Gemm weights)"
            if why is not None or array is None:
                folded.left += [
                    FloatWeight(r.name or "", r.op_type, source.name or "", why or "")
                    for r in readers
                ]
                continue
            _replace(model, source, view, array, made)
            chains.extend(chain)
            folded.views += 1
    operands = [value for node in chains for value in node.inputs[1:] if value is not None]
    _drop_dead(model, chains)
    for value in [*by_source, *operands]:
        if not value.uses() and value not in model.graph.outputs and model.graph.initializers.get(value.name or "") is value:
            model.graph.initializers.pop(value.name or "")
    for source, made in made_by.items():
        if len(made) == 1 and source.name not in model.graph.initializers:  # the view replaces it
            model.graph.initializers.pop(made[0].name or "")
            made[0].name = source.name
            model.graph.register_initializer(made[0])
    return folded


def _why_not(
    model: ir.Model, source: ir.Value, views: list[tuple[ir.Value, list[ir.Node], list[ir.Node]]]
) -> str | None:
    """Why the views of ``source`` cannot get their own initializers, or None."""
    if source.dtype != ir.DataType.FLOAT:
        return f"weight type {source.dtype} (only float32 weights are quantized)"
    if source in model.graph.inputs:
        return "its weight is also a graph input"
    cast = next((node for _, chain, _ in views for node in chain if node.op_type == "Cast"), None)
    if cast is not None:
        return f"read through Cast {cast.name!r} (only Identity/Transpose/Reshape/Squeeze/Unsqueeze views are folded)"
    allowed = {id(node) for _, chain, readers in views for node in chain + readers}
    frontier = [source] + [node.outputs[0] for _, chain, _ in views for node in chain]
    for value in frontier:
        if value in model.graph.outputs:
            return f"initializer {source.name!r} (or a view of it) is also a graph output"
        for user, index in value.uses():
            if id(user) in allowed or (
                user.op_type in WEIGHT_INPUT and index == WEIGHT_INPUT[user.op_type]
            ):
                continue
            return (
                f"initializer {source.name!r} is also read by {user.op_type} {user.name!r}: "
                "a quantized copy beside the float one would grow the file"
            )
    return None


def _excluded(globs: Sequence[str], node: ir.Node, source: ir.Value) -> bool:
    return any(
        fnmatch.fnmatchcase(name, glob)
        for glob in globs
        for name in (node.name or "", source.name or "")
    )


def _array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None  # an initializer
    return value.const_value.numpy()


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The values of a constant operand (an initializer or a Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _apply(chain: list[ir.Node], array: np.ndarray) -> np.ndarray | None:
    """``array`` through the view ops of ``chain``; None when an operand is not constant."""
    for node in chain:
        if node.op_type == "Identity":
            continue
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            array = np.transpose(array, None if perm is None else list(perm))
            continue
        operand = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.op_type == "Reshape":
            if operand is None:
                return None
            shape = [int(size) for size in operand]
            if not node.attributes.get_int("allowzero", 0):
                shape = [array.shape[i] if size == 0 else size for i, size in enumerate(shape)]
            array = array.reshape(shape)
            continue
        axes = (
            node.attributes.get_ints("axes", None)
            if operand is None
            else [int(axis) for axis in operand]
        )
        if node.op_type == "Squeeze":
            array = np.squeeze(array, axis=None if axes is None else tuple(axes))
        elif axes is None:
            return None
        else:  # Unsqueeze
            array = np.expand_dims(
                array, tuple(axis if axis >= 0 else axis + array.ndim + len(axes) for axis in axes)
            )
    return array


def _replace(
    model: ir.Model, source: ir.Value, view: ir.Value, array: np.ndarray, made: list[ir.Value]
) -> None:
    """Make ``view``'s readers read an initializer holding ``array``: the source itself or
    one already ``made`` when equal, else a new one (appended to ``made``)."""
    for existing in [source, *made]:
        values = _array(existing)
        if values.shape == array.shape and np.array_equal(values, array):
            ir.convenience.replace_all_uses_with(view, existing)
            return
    name = f"{source.name}_{view.name or 'view'}"
    while name in model.graph.initializers:
        name += "_"
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor
    )
    model.graph.register_initializer(value)
    made.append(value)
    ir.convenience.replace_all_uses_with(view, value)


def _drop_dead(model: ir.Model, chains: list[ir.Node]) -> None:
    """Remove the folded views' nodes that are left without readers, last first."""
    folded = {id(node) for node in chains}
    for node in reversed(list(model.graph)):
        if id(node) in folded and not any(True for out in node.outputs for _ in out.uses()):
            model.graph.remove(node, safe=True)
