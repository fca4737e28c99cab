"""The shortest size of a symbolic input dimension that the model's windows accept.

A convolution or pooling window of kernel ``k``, dilation ``d``, stride ``s`` and pads
``p0 + p1`` needs ``L + p0 + p1 >= d * (k - 1) + 1`` along its axis and gives
``floor((L + p0 + p1 - d * (k - 1) - 1) / s) + 1`` (``ceil`` with ``ceil_mode``;
``ceil(L / s)`` with ``auto_pad=SAME_*``). A stack of them (wav2vec2's feature encoder:
kernels 10, 3, 3, 3, 3, 2, 2 with strides 5, 2, 2, 2, 2, 2, 2) needs its receptive
field, 400 samples, or ONNX Runtime fails on the first window that does not fit.

:func:`smallest_size` follows the axis a symbolic dimension names from the graph inputs
through the windows (Conv, MaxPool, AveragePool, LpPool), elementwise ops, Pad with
constant pads, Unsqueeze, Squeeze, Transpose, a Reshape or Expand to the ``Shape`` of
a value it follows (GroupNorm exported as Reshape, InstanceNormalization, Reshape back), and
a MatMul by a 2-D weight (a projection between convolutions: SEW's), a Reshape to a
constant shape of the same rank that keeps every other axis (``0``, or the
size the graph's shape inference recorded there) and puts ``0`` or ``-1`` at the axis (the
same GroupNorm once a fixed batch let the exporter's optimizer fold the ``Shape``:
``Reshape(x, [1, 256, -1])``). It stops where it cannot tell where the axis went (another
Reshape, a Slice, a reduction); it returns the smallest size, from a given
start, for which every window it reached has an output of at least one element (or ``keep``
elements). The output size only grows with the input's, so the search doubles, then
bisects.

>>> smallest_size(proto, [("input_values", 1, 2)], start=8)  # doctest: +SKIP
400
>>> smallest_size(proto, [("input_values", 1, 2)], start=8, keep=8)  # doctest: +SKIP
2640
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx
from onnx import numpy_helper

WINDOWS = ("Conv", "MaxPool", "AveragePool", "LpPool")
# Ops whose output has the shape of their inputs broadcast together: an axis counted
# from the end stays where it was.
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "And", "BatchNormalization", "Cast", "CastLike", "Ceil", "Clip", "Cos", "Div",
        "Dropout", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual",
        "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
        "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
        "Max", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or", "PRelu", "Pow", "Reciprocal",
        "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softmax", "Softplus", "Softsign",
        "Sqrt", "Sub", "Tanh", "ThresholdedRelu", "Where", "Xor",
    }
)
# How far the search goes: 2**24 samples is past any real signal a test would generate.
LIMIT = 1 << 24

Tracked = tuple[int, int | None, int]  # axis counted from the end (negative), rank, size


def smallest_size(
    proto: onnx.ModelProto, axes: Sequence[tuple[str, int, int]], *, start: int, keep: int = 1
) -> int | None:
    """The smallest size >= ``start`` of the input ``axes`` ((input, axis, rank) that one
    symbolic dimension names) at which every window reached gives at least ``keep``
    positions; None past :data:`LIMIT`."""
    graph = proto.graph
    if not any(node.op_type in WINDOWS for node in graph.node) or fits(graph, axes, start, keep):
        return start
    low, high = start, start * 2
    while not fits(graph, axes, high, keep):
        if high >= LIMIT:
            return None
        low, high = high, high * 2
    while high - low > 1:  # fits(high), not fits(low)
        middle = (low + high) // 2
        low, high = (low, middle) if fits(graph, axes, middle, keep) else (middle, high)
    return high


def fits(graph: onnx.GraphProto, axes: Sequence[tuple[str, int, int]], size: int, keep: int = 1) -> bool:
    """Whether every window that the ``axes`` reach, at ``size``, gives ``keep`` positions or more."""
    tracked: dict[str, Tracked] = {name: (axis - rank, rank, size) for name, axis, rank in axes}
    weights = {init.name: list(init.dims) for init in graph.initializer}
    constants = _constants(graph)
    static = _static_sizes(graph)
    shape_of: dict[str, str] = {}  # the output of Shape(v): v
    for node in graph.node:
        whole = _int(node, "start", 0) == 0 and not any(attribute.name == "end" for attribute in node.attribute)
        if node.op_type == "Shape" and whole:
            shape_of[node.output[0]] = node.input[0]
        # Reshape(y, Shape(x)) and Expand(y, Shape(x)) take x's shape: GroupNorm exported as
        # Reshape -> InstanceNormalization -> Reshape back.
        if node.op_type in ("Reshape", "Expand") and len(node.input) > 1 and shape_of.get(node.input[1]) in tracked:
            tracked[node.output[0]] = tracked[shape_of[node.input[1]]]
            continue
        found = next(((index, tracked[name]) for index, name in enumerate(node.input) if name in tracked), None)
        if found is None or node.domain not in ("", "ai.onnx"):
            continue
        index, (axis, rank, length) = found
        result: Tracked | None = None
        if node.op_type in WINDOWS and index == 0:
            window = _window(node, weights)
            if window is None:
                continue
            spatial = len(window[0])
            position = axis + spatial  # index among the spatial axes
            if position >= 0:
                out = _window_out(node, window, position, length)
                if out < keep:
                    return False
                result = (axis, spatial + 2, out)
            elif rank is not None and axis + rank == 0:  # the batch axis
                result = (-(spatial + 2), spatial + 2, length)
        elif node.op_type in ELEMENTWISE:
            result = (axis, rank, length)
        elif node.op_type in ("Unsqueeze", "Squeeze", "Transpose", "Pad") and rank is not None:
            result = _moved(node, (axis, rank, length), constants)
        elif node.op_type == "MatMul" and index == 0 and axis < -1 and len(weights.get(node.input[1], [])) == 2:
            result = (axis, rank, length)  # x @ W by a 2-D weight keeps every axis but the last
        elif node.op_type == "Reshape" and index == 0 and rank is not None:
            result = _kept_by_reshape(node, (axis, rank, length), constants, static.get(node.input[0]))
        if result is not None:
            for output in node.output[:1]:
                tracked[output] = result
    return True


def _constants(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Small integer constants (initializers with their data, Constant nodes) by name."""
    values: dict[str, list[int]] = {}
    for init in graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and not init.external_data:
            values[init.name] = [int(v) for v in numpy_helper.to_array(init).ravel()]
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value" and attribute.t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                values[node.output[0]] = [int(v) for v in numpy_helper.to_array(attribute.t).ravel()]
            elif attribute.name == "value_ints":
                values[node.output[0]] = list(attribute.ints)
    return values


def _static_sizes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    """Each value's dimensions as the graph records them (inputs, value_info, outputs): an
    int where static, None elsewhere."""
    sizes: dict[str, list[int | None]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            sizes[value.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in dims]
    return sizes


def _kept_by_reshape(
    node: onnx.NodeProto, tracked: Tracked, constants: dict[str, list[int]], shape: list[int | None] | None
) -> Tracked | None:
    """The tracked axis after a Reshape to a constant shape that keeps it where it was:
    same rank, ``0`` (a copy, unless ``allowzero``) or ``-1`` at the axis, and a copy or the
    input's static size at every other axis (so the ``-1`` is the axis's own size); None
    otherwise."""
    axis, rank, length = tracked
    target = constants.get(node.input[1]) if len(node.input) > 1 else None
    if target is None or shape is None or len(target) != rank or len(shape) != rank:
        return None
    position = axis + rank
    copy = 0 if _int(node, "allowzero", 0) == 0 else None  # with allowzero, a 0 is a 0
    others = (t == copy or (t > 0 and t == shape[i]) for i, t in enumerate(target) if i != position)
    if target[position] not in (copy, -1) or not all(others):
        return None
    return tracked


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    """An ints attribute of ``node``, or None when it is not set."""
    for attribute in node.attribute:
        if attribute.name == name:
            return [int(value) for value in attribute.ints]
    return None


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(attribute.i) for attribute in node.attribute if attribute.name == name), default)


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    return next((attribute.s.decode() for attribute in node.attribute if attribute.name == name), default)


def _window(node: onnx.NodeProto, weights: dict[str, list[int]]) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Kernel, strides, dilations and pads (begins then ends) of a window op, or None."""
    kernel = _ints(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
        kernel = weights[node.input[1]][2:]
    if not kernel:
        return None
    spatial = len(kernel)
    strides = _ints(node, "strides") or [1] * spatial
    dilations = _ints(node, "dilations") or [1] * spatial
    pads = _ints(node, "pads") or [0] * (2 * spatial)
    return kernel, strides, dilations, pads


def _window_out(node: onnx.NodeProto, window: tuple[list[int], list[int], list[int], list[int]], i: int, length: int) -> int:
    """The output size along spatial axis ``i`` of a window over ``length`` elements."""
    kernel, strides, dilations, pads = window
    spatial = len(kernel)
    auto_pad = _text(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return math.ceil(length / strides[i])
    padded = length if auto_pad == "VALID" else length + pads[i] + pads[i + spatial]
    reach = dilations[i] * (kernel[i] - 1) + 1
    if padded < reach:
        return 0
    steps = (padded - reach) / strides[i]
    return (math.ceil(steps) if _int(node, "ceil_mode", 0) else math.floor(steps)) + 1


def _moved(node: onnx.NodeProto, tracked: Tracked, constants: dict[str, list[int]]) -> Tracked | None:
    """Where the tracked axis is after an Unsqueeze, Squeeze, Transpose or Pad; None if unknown."""
    axis, rank, length = tracked
    assert rank is not None
    position = axis + rank
    if node.op_type == "Transpose":
        perm = _ints(node, "perm") or list(range(rank))[::-1]
        return (perm.index(position) - rank, rank, length) if position in perm else None
    if node.op_type == "Pad":
        pads = constants.get(node.input[1]) if len(node.input) > 1 else _ints(node, "pads")
        if pads is None or len(pads) != 2 * rank or len(node.input) > 3:  # computed pads, or an axes input
            return None
        return (axis, rank, length + pads[position] + pads[position + rank])
    given = _ints(node, "axes")
    if given is None and len(node.input) > 1:
        given = constants.get(node.input[1])
    if given is None:
        return None
    if node.op_type == "Unsqueeze":
        out_rank = rank + len(given)
        inserted = {a % out_rank for a in given}
        kept = [p for p in range(out_rank) if p not in inserted]
        return (kept[position] - out_rank, out_rank, length)
    removed = {a % rank for a in given}
    if position in removed:
        return None
    out_rank = rank - len(removed)
    return (position - sum(a < position for a in removed) - out_rank, out_rank, length)
