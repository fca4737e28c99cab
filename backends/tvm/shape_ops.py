"""ONNX ops over shape arithmetic that TVM's converters refuse with symbolic dimensions.

With symbolic input dimensions an export's computed shapes reach TVM's importer as
``R.shape`` values, TIR expressions, or int64 tensors built from them. TVM's node loop
rejects an ``R.shape`` input of most ops ("cannot handle ShapeExpr inputs"); its
converters take a shape operand only as a constant (``Pad``'s pads, ``Resize``'s sizes,
``Tile``'s repeats) or, in a few ops, as an ``R.shape``, and a scalar TIR expression not
at all (``Reshape``); where a size comes out of a tensor they invent a fresh run-time
variable that the build cannot relate to the input dimensions.

Each function here reads the operand back with :func:`shape_values.prim_values` and
gives TVM what it takes:

* :func:`as_tensors`: an ``R.shape`` input of an op whose converter does not take one
  becomes the int64 tensor ``shape_to_tensor(shape)`` (which ``shape_values`` reads).
* :func:`operands`: a shape operand that is shape arithmetic becomes a constant where it
  folds to one, else an ``R.shape`` for the ops that take one (``Reshape``, ``Expand``,
  ``ConstantOfShape``); ``Resize``'s sizes become constants when its spatial sizes are.
* :func:`lower`: the ops lowered here instead: ``Tile`` by repeats of the input
  dimensions (a broadcast between two reshapes), a ``Reshape`` of one shape value, a
  ``Concat`` of an ``R.shape`` with tensors of shape arithmetic, a ``Div`` of sizes.
* :func:`unclamped_slice`: a ``Slice`` that stops a constant distance before the end of
  a symbolic axis keeps the size it has whenever the axis is at least that long
  (checked at run time), not ONNX's clamp ``min(max(n - k, 0), n)``, which no other
  shape equals, so every elementwise op after it lost its shape.

An operand that stays symbolic where TVM takes only constants (``Pad``, ``Resize``) is
refused with a ``ValueError`` naming the op (which :func:`compile` reports as a
:class:`SymbolicDimsError`: fixed sizes fold it).

>>> lower(bb, "Tile", [x, repeats], Sizes())  # doctest: +SKIP
R.reshape(R.broadcast_to(R.reshape(x, (1, n, 1, 4)), (n // 2, n, 1, 4)), (n // 2 * n, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import Any

import numpy as np

from rewriter.backends.tvm import shape_values
from rewriter.backends.tvm.shape_values import Sizes

# The ops whose TVM converters take an R.shape input (TVM's node loop names them, in
# ONNXGraphImporter._construct_nodes, and rejects one for every other op).
TAKES_SHAPE = frozenset(
    {
        "Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand",
        "Concat", "Equal", "Where", "Cast", "CastLike", "Squeeze",
    }
)  # fmt: skip

# Elementwise ops: a scalar operand beside a tensor broadcasts like a rank-0 tensor.
_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Equal", "Less", "LessOrEqual",
        "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where", "BitShift",
    }
)  # fmt: skip
# Float ops of one input that a size reaches as a TIR expression (sigmoid attention's
# bias -ln n_k at a symbolic key length: Log(Cast(Gather(Shape(k), 2)))).
_UNARY = frozenset(
    {"Log", "Exp", "Sqrt", "Reciprocal", "Neg", "Abs", "Floor", "Ceil", "Sin", "Cos", "Tanh", "Sigmoid", "Erf"}
)

# Shape operands longer than this are not shapes (a rank-8 Pad has 16 pads).
_MAX_ELEMENTS = 16

# The operand each op takes as a shape: as an R.shape or a constant (first table), or
# only as a constant (second: refused when it stays symbolic).
_SHAPE_OPERAND = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}
_CONSTANT_OPERAND = {"Pad": 1, "Tile": 1}


def as_tensors(bb: Any, op_name: str, inputs: Sequence[Any]) -> dict[int, Any]:
    """The inputs (by position) that TVM's converter of ``op_name`` needs as tensors, each
    as a tensor of its values: an ``R.shape`` where the converter takes none (int64), and
    an integer or constant TIR expression beside a tensor in an elementwise op (rank 0:
    TVM keeps it a scalar operand, which ``ConvertLayout`` crashes on), and such an
    expression as the one input of a float op (:data:`_UNARY`: its converter takes a
    tensor only)."""
    import tvm
    from tvm import relax

    tensors = {}
    if op_name not in TAKES_SHAPE:
        for index, value in enumerate(inputs):
            if isinstance(getattr(value, "ty", None), relax.ShapeType):
                tensors[index] = bb.emit(relax.op.shape_to_tensor(value))
    if op_name in _UNARY or op_name in _ELEMENTWISE and any(
        isinstance(getattr(value, "ty", None), relax.TensorType) for value in inputs
    ):
        for index, value in enumerate(inputs):
            if value is not None and tvm.ir.is_prim_expr(value):
                scalar = _scalar_tensor(bb, value)
                if scalar is not None:
                    tensors[index] = scalar
    return tensors


def _scalar_tensor(bb: Any, value: Any) -> Any | None:
    """A TIR expression as a rank-0 tensor of its dtype: a constant where it is one, the
    value of an integer one (through the int64 shape tensor) or of one cast to a float
    type, else None."""
    import tvm
    from tvm import relax

    dtype = shape_values.dtype_of(value)
    if isinstance(value, tvm.tirx.IntImm | tvm.tirx.FloatImm):
        return relax.const(value.value, dtype)
    if isinstance(value, tvm.tirx.Cast) and dtype is not None and dtype.startswith(("float", "bfloat")):
        integer = _scalar_tensor(bb, value.value)  # a size cast to float
        return None if integer is None else bb.emit(relax.op.astype(integer, dtype))
    if dtype is None or not dtype.startswith(("int", "uint", "bool")):
        return None
    element = bb.emit(
        relax.op.reshape(
            relax.op.shape_to_tensor(relax.ShapeExpr([shape_values.as_int64(value)])), []
        )
    )
    return element if dtype == "int64" else bb.emit(relax.op.astype(element, dtype))


def values(bb: Any, value: Any, sizes: Sizes) -> list[Any] | None:
    """The elements of a shape operand as int64 TIR expressions (None: not shape arithmetic)."""
    if value is None:
        return None
    return shape_values.prim_values(bb, value, max_elements=_MAX_ELEMENTS, sizes=sizes)


def operands(
    bb: Any, op_name: str, inputs: list[Any], attrs: dict[str, Any], sizes: Sizes
) -> list[Any]:
    """``inputs`` with the op's shape operand in the form TVM's converter takes, where it
    is shape arithmetic (the same list where there is nothing to change)."""
    import tvm
    from tvm import relax

    if op_name == "Resize":
        return _resize_sizes(bb, inputs, sizes)
    if op_name == "Slice":
        # Bounds computed from static sizes (``x.chunk(2, dim=1)`` in a TorchScript
        # export: the channels read by Shape and Gather, halved): constants, so that TVM's
        # converter knows the slice's shape (from tensors it loses it, and a later
        # Reshape by computed sizes fails at a symbolic batch: ShuffleNetV2).
        for position in range(1, min(len(inputs), 5)):
            if _settled(inputs[position]):
                continue
            bounds = values(bb, inputs[position], sizes)
            if bounds is not None and _all_constant(bounds):
                array = np.array([item.value for item in bounds], np.int64)
                inputs = _with(inputs, position, relax.const(array, "int64"))
        return inputs
    index = _SHAPE_OPERAND.get(op_name, _CONSTANT_OPERAND.get(op_name))
    if op_name == "Reshape" and len(inputs) > 1 and isinstance(inputs[1], relax.ShapeExpr):
        # A target of sizes (a Concat of them, lowered here) with a -1: resolved here,
        # where the sizes both sides share cancel (see _reshape_target).
        target = list(inputs[1].values)
        if any(isinstance(item, tvm.tirx.IntImm) and item.value in (0, -1) for item in target):
            resolved = _reshape_target(inputs[0], target, attrs)
            if resolved is not None:
                return _with(inputs, 1, relax.ShapeExpr(resolved))
    if index is None or index >= len(inputs) or _settled(inputs[index]):
        return inputs
    read = values(bb, inputs[index], sizes)
    if read is None:
        return inputs
    if _all_constant(read):
        rank = getattr(getattr(inputs[index], "ty", None), "ndim", 1)
        array = np.array([item.value for item in read], np.int64)
        return _with(inputs, index, relax.const(array.reshape(()) if rank == 0 else array, "int64"))
    if op_name in _SHAPE_OPERAND:
        if op_name == "Reshape":
            read = _reshape_target(inputs[0], read, attrs)
            if read is None:
                return inputs
        return _with(inputs, index, relax.ShapeExpr(read))
    if op_name in ("Tile", "Pad"):
        return inputs  # lowered here (lower), or by the importer (its _pad)
    raise ValueError(
        f"{op_name} with sizes of the input dimensions ({_symbolic(read)}): TVM takes constants only"
    )


def lower(bb: Any, op_name: str, inputs: list[Any], sizes: Sizes) -> Any | None:
    """The ops lowered here rather than by TVM's converter; None for the others."""
    if op_name == "Div":
        return _divide_sizes(inputs, sizes)
    if op_name == "Concat":
        return _concat_sizes(bb, inputs, sizes)
    if op_name == "Tile":
        return _tile(bb, inputs, sizes)
    if op_name == "Reshape":
        return _reshape_scalar(bb, inputs, sizes)
    if op_name == "Expand":
        return _expand_symbolic(bb, inputs)
    return None


def _expand_symbolic(bb: Any, inputs: list[Any]) -> Any | None:
    """``Expand`` of a tensor with symbolic dimensions to a constant shape, by ONNX's
    broadcasting (right-aligned; a target 1 keeps the input's dimension, an input 1
    takes the target's); TVM's converter reads every input dimension as a constant
    (GPT-J's dynamo export: ``'Var' object has no attribute 'value'``). None elsewhere
    (static inputs, a computed shape): TVM's converter."""
    import tvm
    from tvm import relax, tirx

    data, shape = inputs[0], inputs[1] if len(inputs) > 1 else None
    dims = getattr(getattr(data, "ty", None), "shape", None)
    if not isinstance(shape, tvm.ir.GenericConst) or not isinstance(dims, relax.ShapeExpr):
        return None
    if all(isinstance(dim, tirx.IntImm) for dim in dims.values):
        return None
    target = [int(v) for v in shape.value.numpy().reshape(-1)]
    have = list(dims.values)
    rank = max(len(target), len(have))
    have = [tirx.IntImm("int64", 1)] * (rank - len(have)) + have
    target = [1] * (rank - len(target)) + target
    out = []
    for dim, wanted in zip(have, target, strict=True):
        if wanted in (1, -1) or (isinstance(dim, tirx.IntImm) and int(dim) == wanted):  # -1 kept, as TVM does
            out.append(dim)
        elif isinstance(dim, tirx.IntImm) and int(dim) != 1:
            return None  # not broadcastable: TVM's converter says so
        else:
            out.append(tirx.IntImm("int64", wanted))
    return bb.normalize(relax.op.broadcast_to(data, relax.ShapeExpr(out)))


def symbolic_slice(bb: Any, inputs: list[Any], sizes: Sizes) -> Any | None:
    """A ``Slice`` whose start or end is computed from the input sizes (shape arithmetic:
    a conformer's relative positions, ``pe[:, c - n + 1 : c + n]``) as a slice by those
    sizes, clamped as ONNX clamps, whose shape is known (:func:`unclamped_slice` then
    states it unclamped); TVM's converter slices by tensors to a shape it does not know,
    and a later ``Reshape`` failed at symbolic sizes. None where the bounds are constants
    or not shape arithmetic, or the axes or steps not constants, or a step not 1 (TVM's
    converter then)."""
    import tvm
    from tvm import relax, te

    data = inputs[0]
    shape = getattr(getattr(data, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or len(inputs) < 3 or inputs[1] is None or inputs[2] is None:
        return None
    params = [values(bb, value, sizes) if value is not None else None for value in inputs[1:5]]
    starts, ends = params[0], params[1]
    if starts is None or ends is None or _all_constant(starts + ends):
        return None
    rank = len(shape.values)
    axes = params[2] if params[2] is not None else [tvm.tirx.const(axis, "int64") for axis in range(len(starts))]
    steps = params[3] if params[3] is not None else [tvm.tirx.const(1, "int64")] * len(starts)
    if not _all_constant(axes + steps) or not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    if any(step.value != 1 for step in steps):
        return None
    # An axis sliced from 0 to its own size or past it (read back from the shape: a
    # conformer's rotary table, ``[:frames]``) stays as it is: clamped, its size would
    # read max(frames, 0), which a later broadcast against the frames cannot match; and
    # past it, TVM's converter would slice as if in bounds (DAC's output read 8 samples
    # past its decoder's).
    sliced = [
        (start, end, axis)
        for start, end, axis in zip(starts, ends, axes, strict=True)
        if not _whole_axis(start, end, shape.values[int(axis.value) % rank], sizes)
    ]
    if not sliced:
        return data
    starts, ends, axes = ([bound[i] for bound in sliced] for i in range(3))
    for start, end, axis in zip(starts, ends, axes, strict=True):
        extent = shape_values.as_int64(shape.values[int(axis.value) % rank])
        begin, stop = _bound(start, extent, _begin, sizes), _bound(end, extent, _stop, sizes)
        size = None if begin is None or stop is None else shape_values.simplify(stop - begin)
        if size is not None and _limited(begin, stop, extent, sizes):
            continue  # a table read to an input's size, in bounds where the library runs
        if isinstance(size, tvm.tirx.Var) and not isinstance(data, tvm.ir.GenericConst) and _inside(begin, stop, extent, sizes):
            continue  # a computed tensor's part to an input's size, in bounds (torch.chunk: RAFT's frames)
        if size is None or isinstance(size, tvm.tirx.Var):
            # A slice to an input's size that no table bounds (of a symbolic axis):
            # TVM's converter, whose shape the later passes bind (TVM's
            # CanonicalizeBindings crashed on a match_cast of this slice to a size
            # another input defines).
            return None
    # The bounds clamped as ONNX clamps them (a negative one counted from the end), so
    # the slice is in bounds (Relax's own clamping types the shape with if_then_else,
    # which later Relax passes cannot type).
    out_shape = list(shape.values)
    positions, begins, stops = [], [], []
    for start, end, axis in zip(starts, ends, axes, strict=True):
        position = int(axis.value) % rank
        extent = shape_values.as_int64(shape.values[position])
        begin = _clamped(start, extent, sizes)
        stop = _clamped(end, extent, sizes)
        if not sizes.can_prove(stop >= begin):
            stop = sizes.simplify(tvm.tirx.max(stop, begin))
        positions.append(position)
        begins.append(begin)
        stops.append(stop)
        out_shape[position] = sizes.simplify(stop - begin)
    if not isinstance(data, tvm.ir.GenericConst):
        return bb.normalize(relax.op.strided_slice(data, positions, begins, stops, assume_inbound=True))

    # A constant (a table of positions): as a kernel of our own; ConvertLayout lost the
    # binding of Relax's strided_slice of a constant by such sizes.
    def slice_(x: Any) -> Any:
        offset = dict(zip(positions, begins, strict=True))

        def element(*at: Any) -> Any:
            return x[tuple(at[i] + offset[i] if i in offset else at[i] for i in range(rank))]

        return te.compute(out_shape, element, name="T_strided_slice")

    return bb.normalize(bb.call_te(slice_, data, primfunc_name_hint="strided_slice"))


def _inside(begin: Any, stop: Any, extent: Any, sizes: Sizes) -> bool:
    """Whether ``0 <= begin <= stop <= extent`` at every size (no clamp to type)."""
    return all(sizes.can_prove(fact) for fact in (begin >= 0, begin <= stop, stop <= extent))


def _limited(begin: Any, stop: Any, extent: Any, sizes: Sizes) -> bool:
    """Whether a slice from ``begin`` to ``stop`` of a fixed ``extent`` is in bounds
    where the library runs, its stop bounded by the extent if need be (:meth:`Sizes.limit`):
    a table of positions read to the sequence's length (BERT's 512, ``[:, :sequence]``;
    GPT-2's causal mask, ``[:, :, :sequence, :sequence]`` of 1024). ONNX clamps the
    slice, and then fails where its rows meet the sequence's; TVM's converter slices as if
    in bounds, reading past the table."""
    import tvm

    if not isinstance(extent, tvm.tirx.IntImm) or not sizes.can_prove(begin >= 0):
        return False
    if not sizes.can_prove(stop <= extent) and not sizes.limit(stop, int(extent)):
        return False
    return bool(sizes.can_prove(begin <= stop))


def _whole_axis(start: Any, end: Any, extent: Any, sizes: Sizes) -> bool:
    """Whether a slice from ``start`` to ``end`` (step 1) takes all of an axis of
    ``extent``: from 0 to the extent or past it (ONNX clamps the end: DAC's decoder
    output, ``(n - 312) // 320 * 320 + 312`` samples, sliced to the input's ``n``)."""
    import tvm

    start = shape_values.as_int64(start)
    if not isinstance(start, tvm.tirx.IntImm) or int(start) != 0:
        return False
    return bool(sizes.can_prove(shape_values.as_int64(end) >= shape_values.as_int64(extent)))


def _clamped(index: Any, extent: Any, sizes: Sizes) -> Any:
    """ONNX's slice bound ``index`` on an axis of ``extent``: counted from the end where
    negative (a select only where its sign is not known), then clamped to ``[0,
    extent]``."""
    import tvm

    zero = tvm.tirx.const(0, "int64")
    index = shape_values.as_int64(index)
    if isinstance(index, tvm.tirx.IntImm) and int(index) >= 1 << 62:
        return extent
    if sizes.can_prove(index >= zero):
        wrapped = index
    elif sizes.can_prove(index <= zero):  # negative but where 0 (x[:, -k:] at k = 0)
        wrapped = index + extent
    else:
        wrapped = tvm.tirx.Select(index < zero, index + extent, index)
    # Each clamp only where it can bind: TVM's simplifier keeps min(b, 2b) (RAFT's chunk
    # of a doubled batch), and the slice's size then matched its unclamped one in a
    # match_cast that crashed the compile.
    if not sizes.can_prove(wrapped <= extent):
        wrapped = tvm.tirx.min(wrapped, extent)
    if not sizes.can_prove(wrapped >= zero):
        wrapped = tvm.tirx.max(wrapped, zero)
    return sizes.simplify(wrapped)


def unclamped_slice(bb: Any, inputs: list[Any], sliced: Any, sizes: Sizes) -> Any:
    """``sliced``, TVM's ``Slice`` of ``inputs[0]``, cast to the shape it has whenever each
    sliced axis is long enough that ONNX's clamps change nothing (a ``match_cast``: the
    run checks it). Taken so: a constant start or end counted from the end of a symbolic
    axis (a negative constant, or one past the end), and a start or end computed from the
    input sizes where :func:`symbolic_slice` sliced (a conformer's relative positions,
    ``pe[:, c - n + 1 : c + n]``: 2n - 1 rows, not the clamped form); the others stay as
    they are."""
    import tvm
    from tvm import relax

    data = inputs[0]
    shape = getattr(getattr(data, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or len(inputs) < 3:
        return sliced
    params = [values(bb, value, sizes) if value is not None else None for value in inputs[1:5]]
    starts, ends = params[0], params[1]
    if starts is None or ends is None:
        return sliced
    rank = len(shape.values)
    axes = (
        params[2]
        if params[2] is not None
        else [tvm.tirx.const(axis, "int64") for axis in range(len(starts))]
    )
    steps = params[3] if params[3] is not None else [tvm.tirx.const(1, "int64")] * len(starts)
    if not _all_constant(axes + steps) or not len(starts) == len(ends) == len(axes) == len(steps):
        return sliced
    sliced = bb.normalize(sliced)
    out = getattr(sliced.ty, "shape", None)
    if not isinstance(out, relax.ShapeExpr):
        return sliced
    exact = list(out.values)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        position = axis.value % rank
        extent = shape_values.as_int64(shape.values[position])
        computed = not (_all_constant([start, end]))
        if step.value != 1 or (isinstance(extent, tvm.tirx.IntImm) and not computed):
            continue
        if _whole_axis(start, end, extent, sizes):  # to the axis's end or past it: all of it
            exact[position] = extent
            continue
        begin, stop = _bound(start, extent, _begin, sizes), _bound(end, extent, _stop, sizes)
        if begin is not None and stop is not None:
            exact[position] = shape_values.simplify(stop - begin)
    if all(a.same_as(b) for a, b in zip(exact, out.values, strict=True)):
        return sliced
    if not isinstance(sliced, relax.Var):  # bound first: a call_tir inside a match_cast
        sliced = bb.emit(sliced)  # crashed TVM's CanonicalizeTIRVariables
    return bb.match_cast(sliced, relax.TensorType(exact, sliced.ty.dtype))


def _bound(index: Any, extent: Any, constant: Any, sizes: Sizes) -> Any | None:
    """A slice bound where the axis is long enough: a constant one by ``constant``
    (:func:`_begin` or :func:`_stop`), or clamped on a static axis, as ONNX does; a
    computed one counted from the end where it is provably at most 0 (``x[:, -n:]``),
    else as it is (a conformer's ``c - n + 1``: at run time ``match_cast`` checks the
    slice's size, so a bound that ONNX clamps is an error, not a wrong answer)."""
    import tvm

    if not isinstance(index, tvm.tirx.IntImm):
        zero = tvm.tirx.const(0, "int64")
        if not sizes.can_prove(index >= zero) and sizes.can_prove(index <= zero):
            return shape_values.simplify(index + extent)
        return index
    if isinstance(extent, tvm.tirx.IntImm):
        size = int(extent)
        value = int(index) + size if int(index) < 0 else int(index)
        return tvm.tirx.const(min(max(value, 0), size), "int64")
    return constant(int(index), extent)


def _begin(index: int, extent: Any) -> Any | None:
    """A slice's start on an axis of symbolic ``extent``, where the axis is long enough:
    a nonnegative one as it is, a negative one counted from the end."""
    import tvm

    if index >= 1 << 62:
        return None
    return tvm.tirx.const(index, "int64") if index >= 0 else extent + tvm.tirx.const(index, "int64")


def _stop(index: int, extent: Any) -> Any | None:
    """A slice's end on an axis of symbolic ``extent``, where the axis is long enough: a
    negative one counted from the end, one past any real extent (INT64_MAX, the
    exporters' "to the end") the extent; None for the others (``x[:, :512]`` clamps to a
    shorter axis in real use, and keeps ONNX's clamp)."""
    import tvm

    if index >= 1 << 62:
        return extent
    return extent + tvm.tirx.const(index, "int64") if index < 0 else None


def _resize_sizes(bb: Any, inputs: list[Any], sizes: Sizes) -> list[Any]:
    """Resize's ``sizes`` (input 3) as a constant when its spatial sizes are constants and
    its batch and channel sizes are the input's (TVM's converter reads the spatial ones
    only, and only from a constant or an R.shape of constants)."""
    import tvm
    from tvm import relax

    if len(inputs) < 4 or inputs[3] is None or isinstance(inputs[3], tvm.ir.GenericConst):
        return inputs
    read = values(bb, inputs[3], sizes)
    shape = getattr(getattr(inputs[0], "ty", None), "shape", None)
    if read is None or not isinstance(shape, relax.ShapeExpr) or len(read) != len(shape.values):
        return inputs
    kept = [shape_values.as_int64(dim) for dim in shape.values[:2]]
    if not all(_equal(a, b) for a, b in zip(read[:2], kept, strict=True)):
        raise ValueError("Resize of the batch or channel axis: TVM resizes the spatial axes only")
    if not _all_constant(read[2:]):
        raise ValueError(
            f"Resize to sizes of the input dimensions ({_symbolic(read[2:])}): TVM takes constant sizes only"
        )
    # The converter drops the first two (checked equal to the input's above).
    spatial = [item.value for item in read[2:]]
    return _with(inputs, 3, relax.const(np.array([1, 1, *spatial], np.int64), "int64"))


def _reshape_target(data: Any, target: list[Any], attrs: dict[str, Any]) -> list[Any] | None:
    """A Reshape's target with ONNX's 0 (copy the input's size, unless ``allowzero``) and
    -1 (the size left) resolved against ``data``'s shape; None where it cannot be."""
    import tvm
    from tvm import relax

    shape = getattr(getattr(data, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr):
        return None
    dims = [shape_values.as_int64(dim) for dim in shape.values]
    resolved: list[Any] = []
    for position, item in enumerate(target):
        if isinstance(item, tvm.tirx.IntImm) and item.value == 0 and not attrs.get("allowzero", 0):
            if position >= len(dims):
                return None
            item = dims[position]
        resolved.append(item)
    unknown = [
        i
        for i, item in enumerate(resolved)
        if isinstance(item, tvm.tirx.IntImm) and item.value == -1
    ]
    if len(unknown) > 1:
        return None
    if unknown:
        # The sizes both sides share cancel first: TVM's simplifier does not factor, and
        # ((2n + 1) * 256) // ((2n + 1) * 64) stayed a quotient where it is 4 (a
        # conformer's relative positions split into heads), which a later broadcast
        # could not match.
        numerator = list(dims)
        denominator = []
        for i, item in enumerate(resolved):
            if i == unknown[0]:
                continue
            shared = next((k for k, dim in enumerate(numerator) if _equal(dim, item)), None)
            if shared is None:
                denominator.append(item)
            else:
                del numerator[shared]
        total = reduce(lambda a, b: a * b, numerator, tvm.tirx.const(1, "int64"))
        rest = reduce(lambda a, b: a * b, denominator, tvm.tirx.const(1, "int64"))
        resolved[unknown[0]] = shape_values.simplify(tvm.tirx.floordiv(total, rest))
    return resolved


def _tile(bb: Any, inputs: list[Any], sizes: Sizes) -> Any | None:
    """``Tile(x, repeats)`` with repeats of the input dimensions: ``x`` reshaped to
    ``(1, d0, 1, d1, ...)``, broadcast to ``(r0, d0, r1, d1, ...)``, and reshaped to
    ``(r0 * d0, r1 * d1, ...)`` (each axis holds ``r`` whole copies)."""
    from tvm import relax

    data, repeats = inputs[0], inputs[1]
    if _settled(repeats):
        return None
    read = values(bb, repeats, sizes)
    shape = getattr(getattr(data, "ty", None), "shape", None)
    if read is None or not isinstance(shape, relax.ShapeExpr) or len(read) != len(shape.values):
        return None
    dims = [shape_values.as_int64(dim) for dim in shape.values]
    spread = [item for dim in dims for item in (1, dim)]
    copies = [item for pair in zip(read, dims, strict=True) for item in pair]
    tiled = [shape_values.simplify(count * dim) for count, dim in zip(read, dims, strict=True)]
    spread_data = bb.normalize(relax.op.reshape(data, relax.ShapeExpr(spread)))
    copied = bb.normalize(relax.op.broadcast_to(spread_data, relax.ShapeExpr(copies)))
    return bb.normalize(relax.op.reshape(copied, relax.ShapeExpr(tiled)))


def _reshape_scalar(bb: Any, inputs: list[Any], sizes: Sizes) -> Any | None:
    """``Reshape`` of one shape value (a TIR expression: dynamo exports a size as a
    scalar and reshapes it to ``[1]`` before a ``Concat``): an ``R.shape`` of it for a
    target of one element, itself for a scalar target."""
    import tvm
    from tvm import relax

    data = inputs[0]
    if not tvm.ir.is_prim_expr(data):
        return None
    target = values(bb, inputs[1], sizes)
    if target is None or len(target) > 1 or not _all_constant(target):
        return None
    if not target:
        return data
    if target[0].value not in (1, -1):
        return None
    return relax.ShapeExpr([shape_values.as_int64(data)])


def _divide_sizes(inputs: list[Any], sizes: Sizes) -> Any | None:
    """``Div`` of two int64 scalars, one of them a TIR expression (dynamo exports a size
    as a scalar): floor division where it equals ONNX's truncation at every size the
    model runs at (:class:`Sizes`), so it compares equal to TVM's shape inference."""
    import tvm
    from tvm import relax

    if not any(tvm.ir.is_prim_expr(value) for value in inputs[:2]):
        return None
    scalars = []
    for value in inputs[:2]:
        if tvm.ir.is_prim_expr(value) and shape_values.dtype_of(value) == "int64":
            scalars.append(value)
        elif (
            isinstance(value, tvm.ir.GenericConst)
            and value.value.numpy().dtype == np.int64
            and value.value.numpy().size == 1
        ):
            scalars.append(tvm.tirx.const(int(value.value.numpy().item()), "int64"))
        else:
            return None
    if isinstance(scalars[1], tvm.tirx.IntImm) and scalars[1].value == 0:
        return None  # TVM's converter says why
    return relax.prim_value(shape_values.simplify(sizes.divide(*scalars)))


def _concat_sizes(bb: Any, inputs: list[Any], sizes: Sizes) -> Any | None:
    """``Concat`` of an ``R.shape`` with int64 tensors of shape arithmetic (TVM's converter
    joins R.shapes with constants, not with tensors): one ``R.shape`` of all their values."""
    from tvm import relax

    if not any(isinstance(value, relax.ShapeExpr) for value in inputs):
        return None
    joined: list[Any] = []
    for value in inputs:
        read = values(bb, value, sizes)
        if read is None:
            return None
        joined += read
    return relax.ShapeExpr(joined)


def _settled(value: Any) -> bool:
    """Whether a shape operand is already in a form TVM's converters take as it is."""
    import tvm
    from tvm import relax

    return value is None or isinstance(value, tvm.ir.GenericConst | relax.ShapeExpr)


def _all_constant(items: Sequence[Any]) -> bool:
    import tvm

    return all(isinstance(item, tvm.tirx.IntImm) for item in items)


def _equal(a: Any, b: Any) -> bool:
    import tvm

    difference = shape_values.simplify(a - b)
    return isinstance(difference, tvm.tirx.IntImm) and difference.value == 0


def _symbolic(items: Sequence[Any]) -> str:
    import tvm

    return ", ".join(str(item) for item in items if not isinstance(item, tvm.tirx.IntImm))


def _with(inputs: list[Any], index: int, value: Any) -> list[Any]:
    """``inputs`` with ``value`` at ``index``, in the list type it came in (TVM's
    converters index past the end of theirs for omitted optional inputs)."""
    changed = list(inputs)
    changed[index] = value
    return type(inputs)(changed)
