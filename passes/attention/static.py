"""What the attention matcher can tell about a value without running the model.

* :func:`scalar`: the value of a scale the exporter computes from shapes at run time
  (the TorchScript exporter's ``scaled_dot_product_attention`` takes
  ``1/sqrt(Shape(q)[-1])``, DeBERTa divides by ``sqrt(Shape(q)[-1] * 3)``): constants and
  the static dimensions of shapes, followed through ``Shape``, ``Gather``, ``Slice``,
  ``Concat``, ``Squeeze``/``Unsqueeze``, ``Cast`` and the shape a ``Reshape`` was given,
  then the arithmetic evaluated by ``onnx.reference``. None when a dimension it needs is
  dynamic or a graph input takes part.
* :func:`is_mask`: whether an additive term of the scores is a mask (every entry 0 or
  <= :data:`MASKED_AT_OR_BELOW`) rather than a bias with finite values a model learned or
  computed (relative positions, ALiBi, Swin's -100 window mask). A constant is read; a
  computed term is followed through the ops exporters build masks with. A graph input is
  taken for a mask (the user feeds one), everything else is a bias.

>>> scalar(node.outputs[0])  # doctest: +SKIP
0.125
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

# An additive mask value at or below this masks its position. Exporters fill with -inf,
# finfo(float32).min (-3.4e38), finfo(float16).min (-65504) or, in older transformers,
# -10000; learned additive biases (ALiBi, relative positions) stay far above it.
MASKED_AT_OR_BELOW = -1e4
# How many producers :func:`scalar` follows back from the value it is asked about.
MAX_NODES = 64

# A partly known 1-D int tensor (a shape): one entry per element, an int where static, the
# name of a symbolic dimension (equal names, equal sizes), or None where nothing is known.
Partial = list[int | str | None]

# Ops that only move a shape's entries around.
_SHAPE_OPS = ("Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Identity", "Cast")
# Ops a mask passes through unchanged in value (moved, broadcast, cast or summed with another).
_MASK_MOVES = (
    "Cast",
    "CastLike",
    "Expand",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Transpose",
    "Identity",
    "Tile",
    "Concat",
    "Gather",
    "Add",
    "Min",
)


def scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element ``value`` computed from constants and static shapes.

    >>> scalar(ir.Value(const_value=ir.tensor(np.array([0.5], np.float32))))
    0.5
    """
    if value is None:
        return None
    found = _Evaluator().full(value)
    return float(found.ravel()[0]) if found is not None and found.size == 1 else None


def partial_value(value: ir.Value) -> Partial | None:
    """A shape-like 1-D int ``value`` entry by entry: ints where static, names of symbolic
    dimensions, None where unknown; None when not even its length is known."""
    return _Evaluator().partial(value)


class _Evaluator:
    def __init__(self) -> None:
        self.budget = MAX_NODES
        self.partials: dict[int, Partial | None] = {}
        self.fulls: dict[int, np.ndarray | None] = {}

    def full(self, value: ir.Value) -> np.ndarray | None:
        """The whole value, or None."""
        key = id(value)
        if key not in self.fulls:
            self.fulls[key] = self._full(value)
        return self.fulls[key]

    def _full(self, value: ir.Value) -> np.ndarray | None:
        if value.const_value is not None:
            return value.const_value.numpy()
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or self.budget <= 0:
            return None
        self.budget -= 1
        if node.op_type in _SHAPE_OPS:
            partial = self.partial(value)
            if partial is not None and _static(partial):
                shape = () if _rank(value) == 0 else (len(partial),)
                return np.array(partial, dtype=np.int64).reshape(shape).astype(_numpy_type(value))
            if node.op_type == "Shape":
                return None
        inputs = [self.full(x) if x is not None else None for x in node.inputs]
        if any(x is None for x, v in zip(inputs, node.inputs, strict=True) if v is not None):
            return None
        return _evaluate(node, inputs)

    def partial(self, value: ir.Value) -> Partial | None:
        """A shape-like int value entry by entry (a scalar as one entry), or None."""
        key = id(value)
        if key not in self.partials:
            self.partials[key] = self._partial(value)
        return self.partials[key]

    def _partial(self, value: ir.Value) -> Partial | None:
        if value.const_value is not None:
            array = value.const_value.numpy()
            if array.ndim > 1 or not np.issubdtype(array.dtype, np.integer):
                return None
            return [int(x) for x in array.ravel()]
        node = value.producer()
        if node is None or self.budget <= 0:
            return None
        handler = _PARTIAL_HANDLERS.get(node.op_type)
        if handler is None:  # arithmetic on shape entries (head_dim = hidden // heads)
            found = self.full(value)
            if found is None or found.ndim > 1 or not np.issubdtype(found.dtype, np.integer):
                return None
            return [int(x) for x in found.ravel()]
        self.budget -= 1
        return handler(self, node)


def _shape(evaluator: _Evaluator, node: ir.Node) -> Partial | None:
    source = node.inputs[0]
    if source is None or source.shape is None:
        return None
    dims = _dims(source.shape)
    reshape = source.producer()
    if reshape is not None and reshape.op_type == "Reshape" and not _static(dims):
        target = evaluator.partial(reshape.inputs[1]) if reshape.inputs[1] is not None else None
        data = reshape.inputs[0]
        if target is not None and len(target) == len(dims) and data is not None:
            given = _reshaped(_dims(data.shape) if data.shape is not None else None, target)
            dims = [_better(d, t) for d, t in zip(dims, given, strict=True)]
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    return dims[slice(start, end)]


def _static(entries: Partial) -> bool:
    return all(isinstance(entry, int) for entry in entries)


def _better(a: int | str | None, b: int | str | None) -> int | str | None:
    """What two facts about one dimension tell: an int over a symbol over nothing."""
    if isinstance(a, int) or b is None:
        return a
    return b if isinstance(b, int) or a is None else a


def _dims(shape: ir.Shape) -> Partial:
    return [d if isinstance(d, int) else d.value for d in shape]


def _reshaped(data: Partial | None, target: Partial) -> Partial:
    """The shape ``Reshape(data, target)`` gives (allowzero=0): 0 copies a dimension of the
    data, -1 is what the element count leaves, where the symbols cancel out."""
    out: Partial = [
        (data[i] if data is not None and i < len(data) else None) if t == 0 else t
        for i, t in enumerate(target)
    ]
    if out.count(-1) != 1 or data is None or None in data:
        return [None if t == -1 else t for t in out]
    rest = [t for t in out if t != -1]
    if None in rest:
        return [None if t == -1 else t for t in out]
    symbols = [d for d in data if isinstance(d, str)]
    for t in rest:
        if isinstance(t, str):
            if t not in symbols:
                return [None if x == -1 else x for x in out]
            symbols.remove(t)
    total = int(np.prod([d for d in data if isinstance(d, int)]))
    known = int(np.prod([t for t in rest if isinstance(t, int)]))
    missing: int | None = total // known if not symbols and known and total % known == 0 else None
    return [missing if t == -1 else t for t in out]


def _gather(evaluator: _Evaluator, node: ir.Node) -> Partial | None:
    if node.attributes.get_int("axis", 0) != 0 or node.inputs[1] is None:
        return None
    data = evaluator.partial(node.inputs[0]) if node.inputs[0] is not None else None
    indices = evaluator.full(node.inputs[1])
    if data is None or indices is None or indices.ndim > 1:
        return None
    return [data[int(i)] for i in indices.ravel()]


def _slice(evaluator: _Evaluator, node: ir.Node) -> Partial | None:
    data = evaluator.partial(node.inputs[0]) if node.inputs[0] is not None else None
    bounds = [evaluator.full(x) if x is not None else None for x in node.inputs[1:]]
    if data is None or len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    step = bounds[3] if len(bounds) > 3 and bounds[3] is not None else np.array([1])
    axes = bounds[2] if len(bounds) > 2 else None
    if axes is not None and int(axes.ravel()[0]) not in (0, -1):
        return None
    first, last, stride = (
        int(np.clip(b.ravel()[0], -(2**62), 2**62)) for b in (bounds[0], bounds[1], step)
    )
    return data[slice(first, last, stride)]


def _concat(evaluator: _Evaluator, node: ir.Node) -> Partial | None:
    parts = [evaluator.partial(x) if x is not None else None for x in node.inputs]
    if any(part is None for part in parts):
        return None
    return [entry for part in parts for entry in part or []]


def _same(evaluator: _Evaluator, node: ir.Node) -> Partial | None:
    """Squeeze, Unsqueeze, Identity and Cast of 0-D/1-D ints keep the entries."""
    if node.op_type == "Cast" and node.attributes.get_int("to", 0) not in (6, 7):  # int32/64
        return None
    return evaluator.partial(node.inputs[0]) if node.inputs[0] is not None else None


_PARTIAL_HANDLERS: dict[str, Callable[[_Evaluator, ir.Node], Partial | None]] = {
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Squeeze": _same,
    "Unsqueeze": _same,
    "Identity": _same,
    "Cast": _same,
}


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _numpy_type(value: ir.Value) -> np.dtype:
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.int64)


def _evaluate(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """One node on constant inputs, by ``onnx.reference`` (small tensors only)."""
    if any(x is not None and x.size > 64 for x in inputs):
        return None
    names = [f"i{i}" if x is not None else "" for i, x in enumerate(inputs)]
    attributes = {}
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.TENSOR:
            attributes[name] = ir.serde.serialize_tensor(attr.as_tensor())
        elif attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) or attr.is_ref():
            return None
        else:
            attributes[name] = attr.value
    try:
        proto = onnx.helper.make_node(node.op_type, names, ["out"], **attributes)
        feeds = {name: x for name, x in zip(names, inputs, strict=True) if x is not None}
        (result,) = _run(proto, tuple(feeds), tuple(feeds.values()))
    except Exception:  # an op onnx.reference lacks, or inputs it rejects: not constant
        return None
    return np.asarray(result)


def _run(node: onnx.NodeProto, names: tuple[str, ...], values: tuple[np.ndarray, ...]) -> list:
    graph = onnx.helper.make_graph(
        [node],
        "scalar",
        [onnx.helper.make_empty_tensor_value_info(name) for name in names],
        [onnx.helper.make_empty_tensor_value_info("out")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return list(_evaluator(model.SerializeToString()).run(None, dict(zip(names, values, strict=True))))


@functools.lru_cache(maxsize=256)
def _evaluator(serialized: bytes) -> onnx.reference.ReferenceEvaluator:
    return onnx.reference.ReferenceEvaluator(onnx.load_from_string(serialized))


# --------------------------------------------------------------------------------------
# Masks and biases
# --------------------------------------------------------------------------------------


def is_mask(value: ir.Value, *, depth: int = 24) -> bool:
    """Whether every entry of the additive term ``value`` is 0 or masks its position
    (<= :data:`MASKED_AT_OR_BELOW`), as far as the graph shows (see the module docstring).

    >>> is_mask(ir.Value(const_value=ir.tensor(np.array([0.0, -np.inf], np.float32))))
    True
    """
    if value.const_value is not None:
        return _mask_values(value.const_value.numpy())
    node = value.producer()
    if node is None:
        return value.is_graph_input()
    if depth == 0 or node.domain not in ("", "ai.onnx"):
        return False
    data = [x for x in node.inputs if x is not None]
    if node.op_type == "Where":  # Where(cond, a, b): both branches masks
        return all(is_mask(x, depth=depth - 1) for x in data[1:])
    if node.op_type == "Mul":  # (1 - m) * finfo.min: a 0/1 factor times a masking constant
        factors = [x.const_value.numpy() for x in data if x.const_value is not None]
        return any(f.size == 1 and float(f.ravel()[0]) <= MASKED_AT_OR_BELOW for f in factors)
    if node.op_type in _MASK_MOVES:
        moved = data[:1] if node.op_type not in ("Concat", "Add", "Min") else data
        return all(is_mask(x, depth=depth - 1) for x in moved)
    if node.op_type == "ConstantOfShape":
        fill = node.attributes.get("value")
        return fill is None or _mask_values(fill.as_tensor().numpy())
    if node.op_type == "Constant":
        tensor = node.attributes.get("value")
        return tensor is not None and _mask_values(tensor.as_tensor().numpy())
    return False


def _mask_values(array: np.ndarray) -> bool:
    values = np.asarray(array, dtype=np.float64)
    return bool(np.all((values == 0) | (values <= MASKED_AT_OR_BELOW)))
