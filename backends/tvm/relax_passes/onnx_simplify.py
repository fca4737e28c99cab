"""ONNX ops that TVM's importer turns into slow or unconvertible Relax, rewritten first.

* ``Pow(x, c)`` with ``c`` a constant 1, 2, 3, 4 or 0.5 -> products of ``x`` (``Sqrt`` for
  0.5). TVM lowers ``pow`` to a libm call per element, and warns once per call site
  ("Detected pow(x, y) where y >= 3"): GPT-2's tanh-GELU (``x + 0.044715 x^3``) ran at 7x
  ONNX Runtime's time and printed hundreds of lines.
* ``Sum``/``Mean`` with several inputs -> chains of ``Add`` (``Mean`` then divided). The importer stacks the inputs into one rank+1 tensor and reduces it: a
  copy of every input, and a 5-D tensor that TVM's layout conversion cannot map, so a
  ResNet-50 export with ``Sum`` residuals kept its convolutions in NCHW.
* ``Dropout`` (inference: no ``training_mode``, or a constant false) whose mask is unused
  -> its input. The importer keeps it as a tuple-returning op, which the layout
  conversion rejects ("Expected nested to match tuple").
* ``ReduceMin``/``ReduceMax``/``ReduceSum``/``ReduceProd`` of an integer value built by
  shape ops (``Concat`` of a count and a constant: torchvision detectors' ``min(topk
  candidates, boxes above the score threshold)``) -> the reduction of ``Cast(x)`` to its own
  type. The importer keeps shape values as a ``ShapeExpr``, which only its shape ops take
  ("ReduceMin ... cannot handle ShapeExpr inputs"); its ``Cast`` makes an int64 tensor of it.
* ``Einsum`` of two operands that is a batched matrix product (each index a batch index
  of both operands and the output, the one contracted index, or one free index of each
  operand: CvT's attention ``bhlk,bhtk->bhlt`` and ``bhlt,bhtv->bhlv``) -> ``Transpose``s
  and ``MatMul``. The importer's einsum is a generic reduction that no matmul schedule
  recognizes (CvT-13's 3136 x 784 scores: 15 ms, 3.5x the same product as a matmul).
* The group norm both torch exporters write as ``Reshape(x, [N, G, -1])`` ->
  ``InstanceNormalization`` -> ``Reshape`` back (over static positions) -> per-channel
  statistics of ``x`` (``GlobalAveragePool``, the group's mean by a grouped
  1 x 1 ``Conv`` of weight ``1 / (C / G)``, or a ``ReduceMean`` over the channels for one
  group), then ``x * a - b`` per channel. The reshape to ``[N, G, -1]`` reads
  channels-first order: between channels-last convolutions each group norm was a
  transpose to channels-first and one back (BiT's 13: 8.4 of 37 ms at batch 1).

Exact up to rounding: ``x * x * x`` is within an ulp or two of ``pow(x, 3)``; sums are
added left to right; a norm's mean and variance are the same sums over the same elements
(per channel, then per group: each channel of a group has as many), its variance of
``x`` less its mean (two passes).

>>> stats = simplify(model)  # doctest: +SKIP
>>> stats  # doctest: +SKIP
{'pow_expanded': 12, 'variadic_split': 0, 'dropout_removed': 0, 'shape_reductions_cast': 0, 'einsum_matmul': 0, 'norms_per_channel': 0}
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# The exponents Pow(x, c) is expanded for, and how: products of x, or its square root.
POWERS = (1.0, 2.0, 3.0, 4.0, 0.5)
# (Max and Min have no binary ONNX twin that imports otherwise: they keep their form.)
VARIADIC = ("Sum", "Mean")
REDUCTIONS = ("ReduceMin", "ReduceMax", "ReduceSum", "ReduceProd")
# The ops whose integer outputs TVM's importer may keep as a ShapeExpr (its list of
# shape-compatible ops, and Shape/Unsqueeze, which make one).
SHAPE_OPS = frozenset(
    {"Shape", "Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Reshape", "Expand", "Cast", "CastLike", "Where"}
)


def simplify(model: ir.Model) -> dict[str, int]:
    """Rewrite the ops above in every graph of ``model``; returns how many of each."""
    stats = {
        "pow_expanded": 0,
        "variadic_split": 0,
        "dropout_removed": 0,
        "shape_reductions_cast": 0,
        "einsum_matmul": 0,
        "norms_per_channel": 0,
    }
    opset = model.opset_imports.get("", 1)
    if any(_unknown_group_norm_positions(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)):
        # A TorchScript export with a symbolic batch records no shapes past its inputs:
        # whether a group norm's positions are static (an image's) is inferred first.
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.domain not in ("", "ai.onnx") or node.graph is None:
            continue
        if node.op_type == "Pow" and _expand_pow(node):
            stats["pow_expanded"] += 1
        elif node.op_type in VARIADIC and len(node.inputs) > 1 and _split_variadic(node):
            stats["variadic_split"] += 1
        elif node.op_type == "Dropout" and _remove_dropout(node):
            stats["dropout_removed"] += 1
        elif node.op_type in REDUCTIONS and _cast_shape_input(node):
            stats["shape_reductions_cast"] += 1
        elif node.op_type == "Einsum" and _einsum_as_matmul(node):
            stats["einsum_matmul"] += 1
        elif node.op_type == "InstanceNormalization" and _norm_per_channel(node, opset):
            stats["norms_per_channel"] += 1

    return stats


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _replace(node: ir.Node, new: list[ir.Node], result: ir.Value) -> None:
    """Put ``new`` before ``node`` and ``result`` in place of its output; drop ``node``."""
    graph = node.graph
    assert graph is not None
    graph.insert_before(node, new)
    old = node.outputs[0]
    name = old.name
    result.type, result.shape = old.type, old.shape  # the same values
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    if result.is_graph_output():
        old.name = None
        result.name = name
    graph.remove(node, safe=True)


def _expand_pow(node: ir.Node) -> bool:
    base = node.inputs[0]
    exponent = _constant(node.inputs[1] if len(node.inputs) > 1 else None)
    if base is None or exponent is None or exponent.size != 1:
        return False
    if base.dtype is not None and not base.dtype.is_floating_point():
        return False
    power = float(exponent.reshape(()))
    if power not in POWERS or node.outputs[0].dtype not in (None, base.dtype):
        return False  # an exponent that promotes the type keeps its Pow
    new: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value) -> ir.Value:
        created = ir.node(op_type, list(args))
        new.append(created)
        return created.outputs[0]

    if power == 0.5:
        result = op("Sqrt", base)
    elif power == 1.0:
        result = op("Identity", base)
    else:
        square = op("Mul", base, base)
        result = square if power == 2.0 else op("Mul", square, base if power == 3.0 else square)
    _replace(node, new, result)
    return True


def _split_variadic(node: ir.Node) -> bool:
    inputs = list(node.inputs)
    if any(value is None for value in inputs):
        return False
    new: list[ir.Node] = []
    first = inputs[0]
    assert first is not None
    result: ir.Value = first
    for value in inputs[1:]:
        assert value is not None
        created = ir.node("Add", [result, value])
        new.append(created)
        result = created.outputs[0]
    if node.op_type == "Mean":
        dtype = (first.dtype or ir.DataType.FLOAT).numpy()
        count = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(len(inputs), dtype=dtype))})
        divided = ir.node("Div", [result, count.outputs[0]])
        new += [count, divided]
        result = divided.outputs[0]
    _replace(node, new, result)
    return True


def _cast_shape_input(node: ir.Node) -> bool:
    """Read a reduction's integer input, built by shape ops, through a Cast to its own type."""
    data = node.inputs[0] if node.inputs else None
    producer = data.producer() if data is not None else None
    if data is None or producer is None or producer.op_type not in SHAPE_OPS:
        return False
    dtype = _shape_dtype(data)
    if dtype is None or not dtype.is_integer() or producer.op_type in ("Cast", "CastLike"):
        return False
    graph = node.graph
    assert graph is not None
    cast = ir.node("Cast", [data], attributes={"to": int(dtype)})
    cast.outputs[0].dtype, cast.outputs[0].shape = dtype, data.shape
    cast.outputs[0].name = f"{data.name or node.name}__as_tensor"  # unnamed, serde may reuse a name
    graph.insert_before(node, cast)
    node.replace_input_with(0, cast.outputs[0])
    return True


def _shape_dtype(value: ir.Value, depth: int = 16) -> ir.DataType | None:
    """``value``'s type, or where it is not recorded (a model prepared once already), the
    type its shape ops carry through: int64 from ``Shape``, else their data input's."""
    if value.dtype is not None or depth == 0:
        return value.dtype
    producer = value.producer()
    if producer is None or producer.op_type not in SHAPE_OPS or producer.op_type in ("Cast", "CastLike"):
        return None
    if producer.op_type == "Shape":
        return ir.DataType.INT64
    sources = producer.inputs[1:] if producer.op_type == "Where" else producer.inputs
    if producer.op_type != "Concat":
        sources = sources[:1]
    return next((dtype for source in sources if source is not None and (dtype := _shape_dtype(source, depth - 1))), None)


def _remove_dropout(node: ir.Node) -> bool:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = _constant(node.inputs[2])
        if training is None or bool(training.reshape(())):
            return False
    source = node.inputs[0]
    if source is None:
        return False
    identity = ir.node("Identity", [source])
    _replace(node, [identity], identity.outputs[0])
    return True


def matmul_order(equation: str) -> tuple[list[int], list[int], list[int]] | None:
    """For an ``Einsum`` equation that is a batched matrix product, the permutations that
    put the first operand in ``[batch..., i, k]``, the second in ``[batch..., k, j]``, and
    the product ``[batch..., i, j]`` in the output's order; None for any other equation
    (an ellipsis, a repeated index, an index summed out of one operand, no free index).

    >>> matmul_order("bhlk,bhtk->bhlt")
    ([0, 1, 2, 3], [0, 1, 3, 2], [0, 1, 2, 3])
    >>> matmul_order("bij,bjk->bik"), matmul_order("ij,jk->ki"), matmul_order("bik,bjk->bk")
    (([0, 1, 2], [0, 1, 2], [0, 1, 2]), ([0, 1], [0, 1], [1, 0]), None)
    """
    from rewriter.backends.tvm.einsum import indices

    found = indices(equation) if "->" in equation else None
    if found is None:
        return None
    a, b, out = found.a, found.b, found.out
    batch, left, right, contracted = found.batch, found.left, found.right, found.contracted
    if len(contracted) != 1 or len(left) != 1 or len(right) != 1:
        return None  # the importer's einsum lowering takes these (reshapes by sizes)
    if set(a) | set(b) != {*batch, *left, *right, *contracted}:
        return None  # an index of one operand summed away
    product = [*batch, left[0], right[0]]
    return (
        [a.index(c) for c in [*batch, left[0], contracted[0]]],
        [b.index(c) for c in [*batch, contracted[0], right[0]]],
        [product.index(c) for c in out],
    )


def _einsum_as_matmul(node: ir.Node) -> bool:
    equation = node.attributes.get_string("equation")
    order = matmul_order(equation) if equation else None
    if order is None or len(node.inputs) != 2 or any(value is None for value in node.inputs):
        return False
    new: list[ir.Node] = []

    def transposed(value: ir.Value, perm: list[int]) -> ir.Value:
        if perm == sorted(perm):
            return value
        created = ir.node("Transpose", [value], attributes={"perm": perm})
        new.append(created)
        return created.outputs[0]

    first, second = node.inputs
    assert first is not None and second is not None
    product = ir.node("MatMul", [transposed(first, order[0]), transposed(second, order[1])])
    new.append(product)
    result = transposed(product.outputs[0], order[2])
    _replace(node, new, result)
    return True


def _norm_per_channel(node: ir.Node, opset: int) -> bool:
    """A group norm as exporters write it (``Reshape(x, [N, G, -1])`` ->
    ``InstanceNormalization`` -> ``Reshape`` back to ``x``'s shape), as per-channel
    statistics of ``x`` itself: ``y = x * a - b``, ``a`` and ``b`` per sample and channel.

    Each channel's mean over its pixels (``GlobalAveragePool``), averaged over the
    channels of its group by a grouped 1 x 1 convolution (all the same size: the group's
    mean, one value per channel); the same for the mean square of ``x`` less that mean
    (two passes, as the instance norm). Every op is one a channels-last layout converts:
    poolings, convolutions, element-wise ops and broadcasts of ``[N, C, 1, 1]``.
    """
    data, scale, bias = (list(node.inputs) + [None, None])[:3]
    scales, shifts = _constant(scale), _constant(bias)
    if data is None or scales is None or shifts is None or scales.ndim != 1:
        return False
    groups = scales.size
    reshape = data.producer()
    if reshape is None or reshape.op_type != "Reshape" or not _splits_groups(reshape, groups):
        return False  # an instance norm of its own: TVM's decomposition keeps its layout
    source = reshape.inputs[0]
    uses = list(node.outputs[0].uses())
    back = uses[0][0] if len(uses) == 1 and not node.outputs[0].is_graph_output() else None
    if source is None or back is None or back.op_type != "Reshape" or not _shape_of(back.inputs[1], source):
        return False
    shape = source.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[1], int) or source.dtype is None:
        return False
    if not all(isinstance(size, int) for size in shape[2:]):
        return False  # (the channels-last pooling schedule takes static pixel extents)
    channels, rank = shape[1], len(shape)
    if not source.dtype.is_floating_point() or channels % groups:
        return False
    width, dtype = channels // groups, source.dtype.numpy()
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    new: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value) -> ir.Value:
        created = ir.node(op_type, list(args))
        new.append(created)
        return created.outputs[0]

    def const(array: np.ndarray) -> ir.Value:
        created = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
        new.append(created)
        return created.outputs[0]

    def group_mean(per_channel: ir.Value) -> ir.Value:
        """The mean of each channel's group, repeated over the group's channels."""
        if width == 1:
            return per_channel
        if groups == 1:
            return reduce_channels(per_channel)
        weight = np.full([channels, width] + [1] * (rank - 2), 1 / width, dtype)
        created = ir.node("Conv", [per_channel, const(weight)], attributes={"group": groups})
        new.append(created)
        return created.outputs[0]

    def reduce_channels(per_channel: ir.Value) -> ir.Value:
        if opset >= 18:
            created = ir.node("ReduceMean", [per_channel, const(np.array([1], np.int64))], attributes={"keepdims": 1})
        else:
            created = ir.node("ReduceMean", [per_channel], attributes={"axes": [1], "keepdims": 1})
        new.append(created)
        return created.outputs[0]

    # Variables first and constants of the map's rank: TVM's layout conversion keeps a
    # binary op's layout from its first operand, and transposes a constant of lower rank.
    per_channel = [1, channels] + [1] * (rank - 2)
    mean = group_mean(op("GlobalAveragePool", source))
    centred = op("Sub", source, mean)
    variance = group_mean(op("GlobalAveragePool", op("Mul", centred, centred)))
    scaled = op("Reciprocal", op("Sqrt", op("Add", variance, const(np.array(epsilon, dtype)))))
    if not np.all(scales == 1):
        scaled = op("Mul", scaled, const(np.repeat(scales, width).reshape(per_channel).astype(dtype)))
    offset = op("Mul", mean, scaled)  # y = x * a - (mean * a - shift)
    if np.any(shifts != 0):
        offset = op("Sub", offset, const(np.repeat(shifts, width).reshape(per_channel).astype(dtype)))
    result = op("Sub", op("Mul", source, scaled), offset)
    target = back.inputs[1]
    _replace(back, new, result)
    for dead in (node, reshape, target.producer() if target is not None else None):
        if dead is not None and dead.graph is not None and not any(out.uses() or out.is_graph_output() for out in dead.outputs):
            dead.graph.remove(dead, safe=True)
    return True


def _unknown_group_norm_positions(node: ir.Node) -> bool:
    """Whether ``node`` is the instance norm of an exporter's group norm whose input's
    positions have no recorded size."""
    if node.op_type != "InstanceNormalization" or node.inputs[0] is None:
        return False
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0] is None:
        return False
    shape = reshape.inputs[0].shape
    return shape is None or any(dim is None or (not isinstance(dim, int) and dim.value is None) for dim in shape[2:])


def _splits_groups(reshape: ir.Node, groups: int) -> bool:
    """Whether ``reshape`` makes ``[N, groups, -1]`` of its input (batch copied or fixed)."""
    target, source = _constant(reshape.inputs[1]), reshape.inputs[0]
    if target is None or source is None or source.shape is None or target.shape != (3,):
        return False
    if reshape.attributes.get_int("allowzero", 0) or int(target[1]) != groups or int(target[2]) != -1:
        return False
    return int(target[0]) == 0 or int(target[0]) == source.shape[0]


def _shape_of(value: ir.Value | None, source: ir.Value) -> bool:
    """Whether ``value`` is ``source``'s full shape: ``Shape(source)``, or its static dims."""
    if value is None:
        return False
    producer = value.producer()
    if producer is not None and producer.op_type == "Shape" and producer.inputs[0] is source:
        start, end = producer.attributes.get_int("start", 0), producer.attributes.get_int("end", None)
        return start == 0 and end is None
    static = _constant(value)
    dims = source.shape
    return (
        static is not None
        and dims is not None
        and all(isinstance(dim, int) for dim in dims)
        and [int(v) for v in static.reshape(-1)] == list(dims)
    )
