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

>>> symbolic_range(bb, [start, limit, delta])  # doctest: +SKIP
R.arange(0, sequence, 1, dtype="int64")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Deeper chains than this are not shape arithmetic an exporter writes.
_MAX_DEPTH = 64

_Values = list[Any]  # TIR expressions (tvm.tirx.PrimExpr), one per element


def prim_values(bb: Any, expr: Any, *, max_elements: int = 8) -> _Values | None:
    """The elements of the integer tensor ``expr`` (rank 0 or 1, at most ``max_elements``)
    as int64 TIR expressions, or ``None`` where they are not computed from shapes and
    constants by the ops this reads."""
    values = _values(bb, expr, max_elements, 0)
    return values if values is not None and len(values) <= max_elements else None


def symbolic_range(bb: Any, inputs: Sequence[Any]) -> Any | None:
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
        values = prim_values(bb, value, max_elements=1)
        if values is None or len(values) != 1:
            return None
        scalars.append(values[0])
    start, limit, delta = scalars
    if not isinstance(delta, tvm.tirx.IntImm) or delta.value == 0:
        return None
    (dtype,) = dtypes
    positions = bb.normalize(relax.op.arange(start, limit, delta, "int64"))
    if dtype != "int64":
        positions = bb.normalize(relax.op.astype(positions, dtype))
    return positions


def _dtype(expr: Any) -> str | None:
    import tvm

    if tvm.ir.is_prim_expr(expr):
        return _prim_dtype(expr)
    ty = _type(expr)
    return str(getattr(ty, "dtype", None)) if ty is not None else None


def _constant_values(expr: Any, max_elements: int) -> _Values | None:
    import tvm

    data = getattr(expr, "data", None)
    if data is None:
        value = getattr(expr, "value", None)
        data = value if hasattr(value, "numpy") else None
    if data is None:
        return None
    array = np.asarray(data.numpy())
    if array.ndim > 1 or array.size > max_elements or array.dtype.kind not in "iu":
        return None
    return [tvm.tirx.const(int(item), "int64") for item in array.reshape(-1)]


def _values(bb: Any, expr: Any, max_elements: int, depth: int) -> _Values | None:
    import tvm
    from tvm import relax

    if depth > _MAX_DEPTH:
        return None
    if tvm.ir.is_prim_expr(expr):
        return [_int64(expr)]
    if isinstance(expr, relax.Var):
        binding = bb.lookup_binding(expr)
        if binding is None:
            return None
        return _values(bb, binding, max_elements, depth + 1)
    if isinstance(expr, relax.ShapeExpr):
        return [_int64(value) for value in expr.values]
    if not isinstance(expr, relax.Call):
        return _constant_values(expr, max_elements)
    op = expr.op
    if not isinstance(op, tvm.ir.Op):
        return None
    args = expr.args

    def arg(index: int) -> _Values | None:
        return _values(bb, args[index], max_elements, depth + 1)

    name = op.name
    if name == "relax.shape_of":
        shape = getattr(_type(args[0]), "shape", None)
        if isinstance(shape, relax.ShapeExpr):
            return [_int64(value) for value in shape.values]
        return None
    if name in ("relax.shape_to_tensor", "relax.reshape", "relax.squeeze", "relax.expand_dims"):
        return arg(0) if _rank(expr) <= 1 else None
    if name == "relax.astype":
        return arg(0) if _dtype(expr) in ("int32", "int64") else None
    if name == "relax.take":
        data, indices = arg(0), arg(1)
        if data is None or indices is None or _rank(args[0]) != 1:
            return None
        picked = []
        for index in indices:
            if not isinstance(index, tvm.tirx.IntImm):
                return None
            position = index.value + len(data) if index.value < 0 else index.value
            if not 0 <= position < len(data):
                return None
            picked.append(data[position])
        return picked
    if name == "relax.concat":
        (parts,) = args
        fields = getattr(parts, "fields", None)
        if fields is None:
            return None
        joined: _Values = []
        for part in fields:
            part_values = _values(bb, part, max_elements, depth + 1)
            if part_values is None:
                return None
            joined += part_values
        return joined
    if name == "relax.negative":
        negated = arg(0)
        return None if negated is None else [-value for value in negated]
    binary = _BINARY.get(name)
    if binary is not None:
        left, right = arg(0), arg(1)
        if left is None or right is None:
            return None
        if len(left) == 1:
            left = left * len(right)
        if len(right) == 1:
            right = right * len(left)
        if len(left) != len(right):
            return None
        return [_simplify(binary(a, b)) for a, b in zip(left, right, strict=True)]
    return None


def _type(expr: Any) -> Any:
    """``expr``'s Relax type (``ty``; ``struct_info`` in TVMs that name it so), or None."""
    return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)


def _rank(expr: Any) -> int:
    ty = _type(expr)
    ndim = getattr(ty, "ndim", -1)
    return ndim if ndim is not None and ndim >= 0 else 99


def _int64(value: Any) -> Any:
    import tvm

    if isinstance(value, int):
        return tvm.tirx.const(value, "int64")
    if _prim_dtype(value) != "int64":
        return tvm.tirx.Cast("int64", value)
    return value


def _prim_dtype(value: Any) -> str:
    # A TIR variable's dtype is its type (a dtype attribute is only a buffer's).
    return str(getattr(value, "dtype", None) or value.ty)


def _simplify(value: Any) -> Any:
    from tvm import sym

    return sym.Analyzer().simplify(value)


def _floor_divide(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.floordiv(a, b)


def _maximum(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.max(a, b)


def _minimum(a: Any, b: Any) -> Any:
    import tvm

    return tvm.tirx.min(a, b)


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "relax.add": lambda a, b: a + b,
    "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b,
    "relax.floor_divide": _floor_divide,
    "relax.maximum": _maximum,
    "relax.minimum": _minimum,
}
