"""Integer tensors that are shape arithmetic, read back as TIR expressions.

Exports compute sizes from ``Shape`` with tensor ops: ``Range(0, Gather(Shape(x), 1), 1)``
for position ids, ``Shape -> Gather -> Mul -> Concat`` for a ``Reshape`` target. At fixed
input shapes the optimizer folds all of it. With symbolic dimensions TVM's importer keeps
it as tensor computations, and where a size comes out of a tensor it invents a fresh
variable (``range_len_0``) bound only at run time, by ``match_cast``. The shapes of
everything downstream then name that variable instead of ``sequence``; TVM cannot relate
the two, and the build fails (``PrimExpr ... has not been computed``) or schedules give
up on shapes they cannot prove equal.

:func:`prim_values` walks such a computation back through the block builder's bindings
to the shapes it started from, and returns its elements as TIR expressions of the input
dimensions, or ``None`` where it is not shape arithmetic. :func:`symbolic_range` uses it
for ``Range``: ``arange(0, sequence, 1)`` has the shape ``(sequence,)``.

Sizes computed in floats (EnCodec's and DAC's padding, ``ceil(float(n - k) / s + 1)``,
MobileViT's ``int(ceil(h / 2) * 2)``) are read as exact fractions, :class:`Ratio`: an
integer expression over a positive integer constant. ``Ceil``, ``Floor`` and the cast
back to an integer are then integer divisions, so the size is an integer expression of
the input dimensions like any other. This is what ONNX Runtime computes wherever float32
holds the sizes exactly (below 2**24) and the quotients are not within float32 rounding
of an integer without being one, which holds for divisors up to :data:`_MAX_DENOMINATOR`;
float constants with a larger denominator (``1 / 3``) are not read.

>>> symbolic_range(bb, [start, limit, delta])  # doctest: +SKIP
R.arange(0, sequence, 1, dtype="int64")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

# Deeper chains than this are not shape arithmetic an exporter writes.
_MAX_DEPTH = 64

_Values = list[Any]  # TIR expressions (tvm.tirx.PrimExpr), one per element
# The elements of a small integer tensor as int64 TIR expressions, in its shape.
_Array = np.ndarray


class Sizes:
    """The smallest size of each input dimension (a TIR variable) at which the model runs:
    the one its convolution and pooling windows accept (:mod:`rewriter.input_sizes`; ONNX
    Runtime fails below it), else 0. What holds at every such size holds for the
    library: ONNX's ``Div`` of integers truncates, and of a dividend that is nonnegative
    there it is the floor division that TVM's shape inference writes (``(samples - 400)
    // 320 + 1`` for wav2vec2's frames), so the two forms of one size compare equal.

    The largest size too, where the model reads a table of a fixed length by one
    (:meth:`limit`: BERT's 512 positions sliced to the sequence): past it ONNX Runtime
    fails and the library would read past the table, so the library refuses it
    (:attr:`largest`, by the variable's name, the signature's ``max_dims``).

    >>> Sizes({samples: 400}).divide(samples // 80 - 3, 2)  # doctest: +SKIP
    (samples // 80 - 3) // 2
    """

    def __init__(self, smallest: Mapping[Any, int] | None = None) -> None:
        import tvm
        from tvm import sym

        self._analyzer = sym.Analyzer()
        self._smallest = dict(smallest or {})
        self.largest: dict[str, int] = {}
        for var, size in self._smallest.items():
            self._analyzer.bind(var, tvm.ir.Range.from_min_extent(size, _LARGEST - size))

    def limit(self, value: Any, bound: int) -> bool:
        """Take ``value <= bound`` to hold from here on, where ``value`` is an input
        dimension plus a constant (``sequence``, ``sequence + 1``) and the bound leaves it
        its smallest size: the dimension's largest size is then recorded (:attr:`largest`,
        checked on every run) and known to the proofs. Whether it was taken."""
        import tvm

        value = self._analyzer.simplify(as_int64(value))
        offset = 0
        if isinstance(value, tvm.tirx.Add) and isinstance(value.b, tvm.tirx.IntImm):
            value, offset = value.a, int(value.b)
        if not isinstance(value, tvm.tirx.Var) or value not in self._smallest:
            return False
        smallest, largest = self._smallest[value], min(bound - offset, self.largest.get(value.name, _LARGEST))
        if largest < max(smallest, 1):
            return False
        self.largest[value.name] = largest
        self._analyzer.bind(value, tvm.ir.Range.from_min_extent(smallest, largest - smallest + 1), allow_override=True)
        return True

    def can_prove(self, condition: Any) -> bool:
        """Whether ``condition`` holds at every size the model runs at."""
        return bool(self._analyzer.can_prove(condition))

    def simplify(self, value: Any) -> Any:
        """``value`` simplified with what holds at every size the model runs at (a clamp
        to ``[0, n]`` of a bound that is in it there, dropped)."""
        return self._analyzer.simplify(value)

    def divide(self, a: Any, b: Any) -> Any:
        """ONNX ``Div`` of integer sizes: floor division where ``a >= 0`` and ``b > 0``
        hold at every size the model runs at, else the truncating division."""
        import tvm

        if self._analyzer.can_prove(a >= 0) and self._analyzer.can_prove(b > 0):
            return tvm.tirx.floordiv(a, b)
        return tvm.tirx.truncdiv(a, b)


# Past any real tensor's size: the upper end of the ranges Sizes binds.
_LARGEST = 1 << 48


def prim_values(bb: Any, expr: Any, *, max_elements: int = 8, sizes: Sizes | None = None) -> _Values | None:
    """The elements of the integer tensor ``expr`` (rank 0 or 1, at most ``max_elements``)
    as int64 TIR expressions, or ``None`` where they are not computed from shapes and
    constants by the ops this reads (integer division as ``sizes`` says, see there)."""
    array = _values(bb, expr, max_elements, 0, sizes or Sizes())
    if array is None or array.ndim > 1 or array.size > max_elements or _has_ratio(array):
        return None
    return list(array.reshape(-1))


def symbolic_range(bb: Any, inputs: Sequence[Any], sizes: Sizes | None = None) -> Any | None:
    """ONNX ``Range(start, limit, delta)`` as ``arange`` over TIR expressions, when all
    three are integer shape arithmetic and ``delta`` a nonzero constant; else ``None``
    (TVM's converter takes it)."""
    import tvm
    from tvm import relax

    dtypes = {_dtype(value) for value in inputs}
    if len(dtypes) != 1 or not dtypes.issubset({"int32", "int64"}):
        return None
    scalars = []
    for value in inputs:
        values = prim_values(bb, value, max_elements=1, sizes=sizes)
        if values is None or len(values) != 1:
            return None
        scalars.append(values[0])
    start, limit, delta = scalars
    if not isinstance(delta, tvm.tirx.IntImm) or delta.value == 0:
        return None
    (dtype,) = dtypes
    if delta.value < 0:
        # TVM sizes a descending arange as if it ascended (arange(s, -s, -1): 2s + 2
        # elements, XLNet's relative positions; an Expand to its shape then failed): the
        # ascending arange of the same elements, reversed.
        step = -delta.value
        count = simplify(tvm.tirx.floordiv(start - limit + step - 1, step))
        if not (sizes or Sizes()).can_prove(start - limit >= 0):
            count = tvm.tirx.max(count, 0)
        first = simplify(start - (count - 1) * step)
        ascending = bb.normalize(relax.op.arange(first, first + count * step, step, "int64"))
        positions = bb.normalize(relax.op.flip(ascending, axis=0))
    else:
        positions = bb.normalize(relax.op.arange(start, limit, delta, "int64"))
    if dtype != "int64":
        positions = bb.normalize(relax.op.astype(positions, dtype))
    return positions


def dtype_of(expr: Any) -> str | None:
    """The dtype of a tensor or a TIR expression (None when unknown)."""
    return _dtype(expr)


def _dtype(expr: Any) -> str | None:
    import tvm

    if tvm.ir.is_prim_expr(expr):
        return _prim_dtype(expr)
    ty = _type(expr)
    return str(getattr(ty, "dtype", None)) if ty is not None else None


def _array(items: Sequence[Any], shape: Sequence[int]) -> _Array:
    """An object array of ``items`` (TIR expressions) in ``shape``."""
    array = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        array[index] = item
    return array.reshape(tuple(shape))


def _constant_values(expr: Any, max_elements: int) -> _Array | None:
    import tvm

    data = getattr(expr, "data", None)
    if data is None:
        value = getattr(expr, "value", None)
        data = value if hasattr(value, "numpy") else None
    if data is None:
        return None
    array = np.asarray(data.numpy())
    if array.size > max_elements or array.dtype.kind not in "iubf":
        return None
    if array.dtype.kind == "f":
        ratios = [Ratio.of_float(float(item)) for item in array.reshape(-1)]
        return None if any(ratio is None for ratio in ratios) else _array(ratios, array.shape)
    items = [tvm.tirx.const(int(item), "int64") for item in array.reshape(-1)]
    return _array(items, array.shape)


def _static_shape(expr: Any) -> list[int] | None:
    """``expr``'s shape when every dimension is a constant."""
    import tvm

    shape = getattr(_type(expr), "shape", None)
    dims = getattr(shape, "values", None)
    if dims is None or not all(isinstance(dim, tvm.tirx.IntImm) for dim in dims):
        return None
    return [int(dim.value) for dim in dims]


def _ints(items: Any) -> list[int] | None:
    """A Relax tuple (or array) of constant TIR integers as Python ints."""
    import tvm

    values = getattr(items, "fields", items)
    if values is None or not all(isinstance(item, tvm.tirx.IntImm | int) for item in values):
        return None
    return [int(item) for item in values]


def _values(bb: Any, expr: Any, max_elements: int, depth: int, sizes: Sizes) -> _Array | None:
    import tvm
    from tvm import relax

    if depth > _MAX_DEPTH:
        return None
    if tvm.ir.is_prim_expr(expr):
        return _array([as_int64(expr)], ())
    if isinstance(expr, relax.Var):
        binding = bb.lookup_binding(expr)
        if binding is None:
            return None
        return _values(bb, binding, max_elements, depth + 1, sizes)
    if isinstance(expr, relax.ShapeExpr):
        return _array([as_int64(value) for value in expr.values], [len(expr.values)])
    if not isinstance(expr, relax.Call):
        return _constant_values(expr, max_elements)
    op = expr.op
    if not isinstance(op, tvm.ir.Op):
        return None
    args, attrs = expr.args, expr.attrs

    name = op.name
    floats = name in _RATIO_BINARY or name == "relax.where"
    if name in ("relax.astype", "relax.isfinite") or name in _FLOAT_OPS or (floats and _is_float(_dtype(expr))):
        operands = [_values(bb, operand, max_elements, depth + 1, sizes) for operand in args]
        return _float_op(name, operands, _dtype(expr), sizes)

    def arg(index: int) -> _Array | None:
        """An operand's values; None where it is not read, or is a fraction (the ops
        below are integer ops)."""
        values = _values(bb, args[index], max_elements, depth + 1, sizes)
        return None if values is None or _has_ratio(values) else values
    if name == "relax.shape_of":
        shape = getattr(_type(args[0]), "shape", None)
        if isinstance(shape, relax.ShapeExpr):
            return _array([as_int64(value) for value in shape.values], [len(shape.values)])
        return None
    if name == "relax.shape_to_tensor":
        return arg(0)
    if name in ("relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.broadcast_to"):
        data, shape = arg(0), _static_shape(expr)
        if data is None or shape is None:
            return None
        if name == "relax.broadcast_to":
            return np.broadcast_to(data, shape) if int(np.prod(shape)) <= max_elements else None
        return data.reshape(shape) if data.size == int(np.prod(shape)) else None
    if name == "relax.permute_dims":
        data = arg(0)
        return None if data is None else np.transpose(data, _ints(attrs.axes) if attrs.axes is not None else None)
    if name == "relax.take":
        data, indices = arg(0), arg(1)
        index_values = None if indices is None else _ints(list(indices.reshape(-1)))
        if data is None or indices is None or index_values is None or data.ndim == 0:
            return None
        axis = int(attrs.axis) % data.ndim
        extent = data.shape[axis]
        if not all(-extent <= index < extent for index in index_values):
            return None
        return np.take(data, np.array(index_values, np.int64).reshape(indices.shape), axis=axis)
    if name == "relax.strided_slice":
        return _strided_slice(arg(0), args)
    if name == "relax.concat":
        (parts,) = args
        fields = getattr(parts, "fields", None)
        if fields is None:
            return None
        joined = []
        for part in fields:
            part_values = _values(bb, part, max_elements, depth + 1, sizes)
            if part_values is None:
                return None
            joined.append(part_values)
        return np.concatenate(joined, axis=int(attrs.axis)) if joined else None
    if name == "relax.stack":  # ONNX's variadic Min and Max: stacked, then reduced
        (parts,) = args
        fields = getattr(parts, "fields", None)
        stacked: list[_Array] = []
        for part in fields or []:
            part_values = _values(bb, part, max_elements, depth + 1, sizes)
            if part_values is None:
                return None
            stacked.append(part_values)
        if not stacked:
            return None
        try:
            return np.stack(stacked, axis=int(attrs.axis))
        except ValueError:
            return None
    if name in ("relax.min", "relax.max"):
        return _reduce(arg(0), attrs, _minimum if name == "relax.min" else _maximum)
    if name == "relax.logical_not":
        condition = arg(0)
        return None if condition is None else _elementwise(lambda value: simplify(tvm.tirx.Not(value)), condition)
    if name == "relax.negative":
        negated = arg(0)
        return None if negated is None else _elementwise(lambda value: -value, negated)
    if name == "relax.where":
        condition, chosen, other = arg(0), arg(1), arg(2)
        if condition is None or chosen is None or other is None:
            return None
        try:
            return _elementwise(_select, condition, chosen, other)
        except ValueError:  # shapes that do not broadcast
            return None
    binary = _BINARY.get(name)
    if name == "relax.divide" and _dtype(expr) in ("int32", "int64"):
        binary = sizes.divide  # ONNX Div of integers truncates (see Sizes)
    if binary is not None:
        left, right = arg(0), arg(1)
        if left is None or right is None:
            return None
        try:
            return _elementwise(lambda a, b: simplify(binary(a, b)), left, right)
        except ValueError:  # shapes that do not broadcast
            return None
    return None


class Ratio:
    """A size computed in floats, exactly: ``num / den``, ``num`` an int64 TIR expression
    and ``den`` a positive int (see the module docstring).

    >>> Ratio(samples - 7, 2).ceil()  # doctest: +SKIP
    Ratio((samples - 6) // 2, 1)
    """

    __slots__ = ("den", "num")

    def __init__(self, num: Any, den: int = 1) -> None:
        self.num, self.den = as_int64(num), int(den)

    def __repr__(self) -> str:
        return f"Ratio({self.num}, {self.den})"

    @staticmethod
    def of(value: Any) -> Ratio:
        """``value`` (a Ratio, or an integer TIR expression) as a Ratio."""
        return value if isinstance(value, Ratio) else Ratio(value)

    @staticmethod
    def of_float(value: float) -> Ratio | None:
        """A float constant as a Ratio; None where it is not finite or its exact fraction's
        denominator is past :data:`_MAX_DENOMINATOR`."""
        if not math.isfinite(value):
            return None
        fraction = Fraction(value)
        if fraction.denominator > _MAX_DENOMINATOR or abs(fraction.numerator) >= _LARGEST:
            return None
        return Ratio(fraction.numerator, fraction.denominator)

    def _constant(self) -> int | None:
        import tvm

        return int(self.num.value) if isinstance(self.num, tvm.tirx.IntImm) else None

    def __add__(self, other: Ratio) -> Ratio:
        if self.den == other.den:
            return Ratio(simplify(self.num + other.num), self.den)
        return Ratio(simplify(self.num * other.den + other.num * self.den), self.den * other.den)

    def __sub__(self, other: Ratio) -> Ratio:
        return self + -other

    def __neg__(self) -> Ratio:
        return Ratio(simplify(-self.num), self.den)

    def __mul__(self, other: Ratio) -> Ratio | None:
        den = self.den * other.den
        return Ratio(simplify(self.num * other.num), den) if den <= _MAX_DENOMINATOR else None

    def __truediv__(self, other: Ratio) -> Ratio | None:
        """By a nonzero constant only (the quotient's denominator is an int)."""
        divisor = other._constant()
        if not divisor:
            return None
        sign = 1 if divisor > 0 else -1
        return self * Ratio(sign * other.den, abs(divisor))

    def floor(self) -> Ratio:
        import tvm

        return Ratio(simplify(tvm.tirx.floordiv(self.num, self.den)))

    def ceil(self) -> Ratio:
        import tvm

        return Ratio(simplify(tvm.tirx.floordiv(self.num + (self.den - 1), self.den)))

    def truncated(self, sizes: Sizes) -> Any:
        """The integer a cast to an integer type gives: truncation toward zero (ONNX's
        ``Div`` of integers, see :class:`Sizes`)."""
        return self.num if self.den == 1 else simplify(sizes.divide(self.num, as_int64(self.den)))


def _has_ratio(values: Any) -> bool:
    """Whether ``values`` (an array, or one element: a slice can index one out) has a
    :class:`Ratio`."""
    items = values.reshape(-1) if isinstance(values, np.ndarray) else [values]
    return any(isinstance(item, Ratio) for item in items)


def _is_float(dtype: str | None) -> bool:
    """A float type that holds sizes exactly (float16 rounds past 2048: not read)."""
    return dtype in ("float32", "float64")


def _float_op(name: str, operands: list[_Array | None], dtype: str | None, sizes: Sizes) -> _Array | None:
    """``name`` (a cast, a rounding or an arithmetic op in floats) over operands read as
    :class:`Ratio`; None where an operand is not read, or the result is not exact."""
    import tvm

    if any(operand is None for operand in operands):
        return None
    arrays = [operand for operand in operands if operand is not None]

    def exact(function: Callable[..., Any]) -> _Array | None:
        try:
            result = _elementwise(function, *arrays)
        except ValueError:  # shapes that do not broadcast
            return None
        return None if any(item is None for item in result.reshape(-1)) else result

    if name == "relax.astype":
        if _is_float(dtype):
            return exact(Ratio.of)
        if dtype in ("int32", "int64"):
            return exact(lambda value: value.truncated(sizes) if isinstance(value, Ratio) else as_int64(value))
        return arrays[0] if dtype == "bool" and not _has_ratio(arrays[0]) else None
    if name in _FLOAT_OPS:
        rounding = _FLOAT_OPS[name]
        return exact(lambda value: rounding(Ratio.of(value)))
    if name == "relax.isfinite":  # a size is (TVM's Cast to an integer asks, and zeroes the rest)
        return exact(lambda _value: tvm.tirx.const(True, "bool"))
    if name == "relax.where":  # of a condition that the sizes decide
        if _has_ratio(arrays[0]):
            return None
        return exact(lambda condition, a, b: _decided(condition, Ratio.of(a), Ratio.of(b)))
    binary = _RATIO_BINARY[name]
    return exact(lambda a, b: binary(Ratio.of(a), Ratio.of(b)))


def _decided(condition: Any, chosen: Any, other: Any) -> Any | None:
    """``chosen`` or ``other`` where ``condition`` simplifies to a constant, else None."""
    import tvm

    condition = simplify(condition)
    if not isinstance(condition, tvm.tirx.IntImm):
        return None
    return chosen if condition.value else other


def _elementwise(function: Callable[..., Any], *arrays: _Array) -> _Array:
    """``function`` of the arrays' elements, broadcast together (ValueError if they do not)."""
    result = np.frompyfunc(function, len(arrays), 1)(*arrays)
    return result if isinstance(result, np.ndarray) else _array([result], ())


def _reduce(data: _Array | None, attrs: Any, pair: Callable[[Any, Any], Any]) -> _Array | None:
    """A ``min``/``max`` reduction of ``data`` over ``attrs.axis`` (all axes where None),
    its items combined pairwise by ``pair``."""
    if data is None or data.size == 0:
        return None
    axes = _ints(attrs.axis) if attrs.axis is not None else list(range(data.ndim))
    if axes is None:
        return None
    result = data
    for axis in sorted((a % max(data.ndim, 1) for a in axes), reverse=True):
        moved = np.moveaxis(result, axis, 0)
        folded = moved[0]
        for item in moved[1:]:
            folded = _elementwise(lambda a, b: simplify(pair(a, b)), folded, item)
        result = np.expand_dims(folded, axis) if attrs.keepdims else folded
    return result if isinstance(result, np.ndarray) else _array([result], ())


def _strided_slice(data: _Array | None, args: Sequence[Any]) -> _Array | None:
    """``strided_slice`` with constant axes, begins, ends and strides, as Python slices
    (whose clamping is ONNX Slice's)."""
    if data is None or len(args) < 4:
        return None
    axes, begins, ends = _ints(args[1]), _ints(args[2]), _ints(args[3])
    strides = _ints(args[4]) if len(args) > 4 else None
    if axes is None or begins is None or ends is None:
        return None
    strides = strides or [1] * len(axes)
    index = [slice(None)] * data.ndim
    for axis, begin, end, stride in zip(axes, begins, ends, strides, strict=False):
        index[axis % data.ndim] = slice(begin, end, stride)
    return data[tuple(index)]


def _type(expr: Any) -> Any:
    """``expr``'s Relax type (``ty``; ``struct_info`` in TVMs that name it so), or None."""
    return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)


def _rank(expr: Any) -> int:
    ty = _type(expr)
    ndim = getattr(ty, "ndim", -1)
    return ndim if ndim is not None and ndim >= 0 else 99


def as_int64(value: Any) -> Any:
    """``value`` (an int or a TIR expression) as an int64 TIR expression."""
    import tvm

    if isinstance(value, int):
        return tvm.tirx.const(value, "int64")
    if _prim_dtype(value) != "int64":
        return tvm.tirx.Cast("int64", value)
    return value


def _prim_dtype(value: Any) -> str:
    # A TIR variable's dtype is its type (a dtype attribute is only a buffer's).
    return str(getattr(value, "dtype", None) or value.ty)


def simplify(value: Any) -> Any:
    """``value`` simplified by TVM's arithmetic analyzer."""
    from tvm import sym

    return sym.Analyzer().simplify(value)


def _floor_divide(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.floordiv(a, b)


def _select(condition: Any, chosen: Any, other: Any) -> Any:
    import tvm

    condition = simplify(condition)
    if isinstance(condition, tvm.tirx.IntImm):
        return chosen if condition.value else other
    return simplify(tvm.tirx.Select(condition, chosen, other))


def _floor_mod(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.floormod(a, b)


def _truncate_mod(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.truncmod(a, b)


def _maximum(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.max(a, b)


def _minimum(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.min(a, b)


# Ops on sizes in floats, read as Ratio (see there).
_FLOAT_OPS: dict[str, Callable[[Ratio], Ratio]] = {
    "relax.ceil": Ratio.ceil,
    "relax.floor": Ratio.floor,
}
_RATIO_BINARY: dict[str, Callable[[Ratio, Ratio], Ratio | None]] = {
    "relax.add": Ratio.__add__,
    "relax.subtract": Ratio.__sub__,
    "relax.multiply": Ratio.__mul__,
    "relax.divide": Ratio.__truediv__,
}
# The largest denominator a float constant is read with (see the module docstring).
_MAX_DENOMINATOR = 1 << 10

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": _floor_divide,
    "relax.maximum": _maximum,
    "relax.minimum": _minimum,
    "relax.floor_mod": _floor_mod,
    "relax.mod": _truncate_mod,
    "relax.equal": lambda a, b: a == b,
    "relax.not_equal": lambda a, b: a != b,
    "relax.less": lambda a, b: a < b,
    "relax.greater": lambda a, b: a > b,
}
