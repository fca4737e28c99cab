"""ONNX ``DFT`` for the importer: a transform along one axis as one matmul.

TVM's ONNX importer has no ``DFT``, and the dynamo exporter writes every ``torch.fft``
call as one (FNet's token mixing, spectral layers, FFT-based convolutions), so such a
model was refused. Here a node is a matmul with the transform's matrix, which the
matmul rules schedule like any other::

    Y = [Xr | Xi] @ W,   W = [[C, s·S], [-s·S, C]] / scale

where ``C[n, k] = cos(2π·nk/N)``, ``S[n, k] = sin(2π·nk/N)``, ``s`` is -1 forward and +1
inverse (``scale`` = N, else 1), and ``k`` runs over the ``N // 2 + 1`` first bins when
``onesided``. The real and imaginary parts of the input (the last axis, 1 or 2) are
moved beside the transformed axis so that the product reads them as one operand:

* along the last signal axis, ``[..., N, c] -> [..., c·N] @ W -> [..., 2, K] -> [..., K, 2]``;
* along an inner axis, ``[A, N, T, c] -> [A, c·N, T]``, ``Wᵀ @`` it (a batched product
  with the matrix on the left) ``-> [A, 2, K, T] -> [A, K, T, 2]``.

At a fixed length the matrix is a constant computed in float64 (``nk`` reduced modulo N
first), so the weight is packed once; at a symbolic length a small kernel builds it at
run time from a table of N angles. O(N²) work against an FFT's O(N log N), but at the
lengths models transform (hundreds) the matmul kernel's rate wins: see the README's
survey figures.

An inverse one-sided transform (``torch.fft.irfft``: the first ``N // 2 + 1`` bins of a
Hermitian spectrum in, ``N`` real values out, ``N`` = ``dft_length`` or twice the bins
less one) is the same product with ``W[k, t] = w_k·cos(2π·kt/N) / N`` on the real rows
and ``-w_k·sin(2π·kt/N) / N`` on the imaginary ones, ``w_k`` 2 for the bins whose
conjugate is implied, 1 for bin 0 and bin N/2, 0 for bins past ``N // 2`` (as numpy and
ONNX Runtime read them).

Refused with one line naming the op (``InputError``): an ``axis`` that is not a constant,
a ``dft_length`` that is neither a constant nor shape arithmetic, one that cuts or pads
an axis of symbolic size, an input of unknown rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rewriter.backends.tvm.ops import constant_value
from rewriter.backends.tvm.relax_passes import dims_of, product
from rewriter.errors import InputError

OPS = frozenset({"DFT"})


def convert(bb: Any, inputs: list, attrs: dict, opset: int, sizes: Any) -> Any:
    """The Relax expression of the ``DFT`` node's output (``[..., K, ..., 2]``; ``[..., N,
    ..., 1]`` for an inverse one-sided transform). ``sizes``: the importer's symbolic
    sizes, which read a ``dft_length`` computed from shapes."""
    from tvm import tirx

    x = bb.normalize(inputs[0])
    dims = dims_of(x)
    if dims is None or not isinstance(dims[-1], tirx.IntImm) or int(dims[-1]) not in (1, 2):
        raise InputError("TVM cannot import the model: DFT needs an input of known rank whose last axis is 1 or 2")
    rank = len(dims)
    axis = _axis(inputs, attrs, opset, rank)
    inverse = bool(int(attrs.get("inverse", 0)))
    onesided = bool(int(attrs.get("onesided", 0)))
    if inverse and onesided:
        # irfft: the first N // 2 + 1 bins of a Hermitian spectrum in, N real values out
        length = _given_length(bb, inputs, sizes)
        if length is None:
            length = 2 * (dims[axis] - 1)
        length = int(length) if isinstance(length, tirx.IntImm) else length
        matrix = _irfft_matrix(bb, dims[axis], length, int(dims[-1]), str(x.ty.dtype))
        return _apply(bb, x, axis, matrix, length, 1)
    x, length = _fit_length(bb, x, dims, axis, _given_length(bb, inputs, sizes))
    bins = length // 2 + 1 if onesided else length
    matrix = _matrix(bb, length, bins, int(dims[-1]), inverse, str(x.ty.dtype))
    return _apply(bb, x, axis, matrix, bins, 2)


def _apply(bb: Any, x: Any, axis: int, matrix: Any, bins: Any, out_parts: int) -> Any:
    """``x`` transformed along ``axis`` by ``matrix`` (``[c·N, out_parts·K]``): ``[...,
    K, ..., out_parts]``."""
    from tvm import relax

    dims = dims_of(x)
    assert dims is not None
    rank, parts, signal = len(dims), int(dims[-1]), dims[:-1]
    length = dims[axis]
    if axis == rank - 2:
        # [..., N, c] -> [..., c, N] -> [..., c·N] @ W -> [..., o, K] -> [..., K, o]
        rows = bb.emit(relax.op.permute_dims(x, [*range(rank - 2), rank - 1, rank - 2]))
        rows = bb.emit(relax.op.reshape(rows, [*signal[:-1], parts * length]))
        result = bb.emit(relax.op.matmul(rows, matrix))
        result = bb.emit(relax.op.reshape(result, [*signal[:-1], out_parts, bins]))
        return bb.emit(relax.op.permute_dims(result, [*range(rank - 2), rank - 1, rank - 2]))
    # [A..., N, T..., c] -> [A..., c, N, T...] -> [a, c·N, t]; Wᵀ @ -> [a, o·K, t]
    # -> [A..., o, K, T...] -> [A..., K, T..., o]
    before, after = signal[:axis], signal[axis + 1 :]
    moved = bb.emit(relax.op.permute_dims(x, [*range(axis), rank - 1, *range(axis, rank - 1)]))
    columns = bb.emit(relax.op.reshape(moved, [product(before), parts * length, product(after)]))
    result = bb.emit(relax.op.matmul(bb.emit(relax.op.permute_dims(matrix, [1, 0])), columns))
    result = bb.emit(relax.op.reshape(result, [*before, out_parts, bins, *after]))
    return bb.emit(relax.op.permute_dims(result, [*range(axis), *range(axis + 1, rank), axis]))


def _axis(inputs: list, attrs: dict, opset: int, rank: int) -> int:
    """The transformed axis, counted over the input's dimensions (the last is the real and
    imaginary part, which is never transformed)."""
    if opset < 20:
        axis = int(attrs.get("axis", 1))
    elif len(inputs) > 2 and inputs[2] is not None:
        value = constant_value(inputs[2])
        if value is None:
            raise InputError("TVM cannot import the model: DFT's axis is computed at run time (it must be a constant)")
        axis = int(value.reshape(-1)[0])
    else:
        axis = -2
    if axis < 0:
        axis += rank
    if not 0 <= axis <= rank - 2:
        raise InputError(f"TVM cannot import the model: DFT axis {axis} is out of range for a rank-{rank} input")
    return axis


def _fit_length(bb: Any, x: Any, dims: list, axis: int, length: Any) -> tuple[Any, Any]:
    """``x`` cut or zero-padded along ``axis`` to ``length`` (the ``dft_length``) when one
    is given, and the signal length (an int, or a symbolic size)."""
    from tvm import relax, sym, tirx

    size = dims[axis]
    if length is None or (not isinstance(length, int) and sym.Analyzer().can_prove_equal(length, size)):
        return x, int(size) if isinstance(size, tirx.IntImm) else size
    if not isinstance(length, int) or not isinstance(size, tirx.IntImm):
        raise InputError(
            "TVM cannot import the model: DFT with a dft_length on an axis whose size is known only at run time"
        )
    if length < int(size):
        x = bb.emit(relax.op.strided_slice(x, axes=[axis], begin=[0], end=[length]))
    elif length > int(size):
        pads = [0] * (2 * len(dims))
        pads[2 * axis + 1] = length - int(size)
        x = bb.emit(relax.op.nn.pad(x, pads))
    return x, length


def _given_length(bb: Any, inputs: list, sizes: Any) -> Any:
    """The ``dft_length`` input's value (an int, or a symbolic size where it is computed
    from shapes: the dynamo exporter's ``Shape`` of the signal), None where absent."""
    from tvm import tirx

    from rewriter.backends.tvm import shape_ops

    given = inputs[1] if len(inputs) > 1 else None
    if given is None:
        return None
    value = constant_value(given)
    if value is not None:
        return int(value.reshape(-1)[0])
    read = shape_ops.values(bb, given, sizes)
    if read is None or len(read) != 1:
        raise InputError("TVM cannot import the model: DFT's dft_length is computed at run time (it must be a constant)")
    return int(read[0]) if isinstance(read[0], tirx.IntImm) else read[0]


def _matrix(bb: Any, length: Any, bins: Any, parts: int, inverse: bool, dtype: str) -> Any:
    """``W`` of the module docstring, ``[parts·N, 2·K]``: a constant at a fixed length, a
    kernel's output at a symbolic one."""
    from tvm import relax

    sign = 1.0 if inverse else -1.0
    if isinstance(length, int):
        angle = 2.0 * np.pi * (np.outer(np.arange(length), np.arange(bins)) % length) / length
        cos, sin = np.cos(angle), sign * np.sin(angle)
        rows = [np.concatenate([cos, sin], axis=1)]
        if parts == 2:
            rows.append(np.concatenate([-sin, cos], axis=1))
        matrix = np.concatenate(rows, axis=0) / (length if inverse else 1)
        return relax.const(matrix.astype(dtype))
    table = bb.emit_te(_angles, length, sign, dtype, primfunc_name_hint="dft_angles")
    return bb.emit_te(_symbolic_matrix, table, length, bins, parts, inverse, primfunc_name_hint="dft_matrix")


def _symbolic_matrix(table: Any, length: Any, bins: Any, parts: int, inverse: bool) -> Any:
    """The TE compute of ``W`` at a run-time length: a table of the N angles' cosines and
    sines (N trigonometric calls, not N·K), read at ``nk mod N``."""
    from tvm import te, tirx

    dtype = table.dtype
    scale = tirx.const(1.0, dtype) / tirx.Cast(dtype, length) if inverse else tirx.const(1.0, dtype)

    def entry(row: Any, column: Any) -> Any:
        n, real_in = tirx.floormod(row, length), row < length
        k, real_out = tirx.floormod(column, bins), column < bins
        j = tirx.floormod(tirx.Cast("int64", n) * tirx.Cast("int64", k), tirx.Cast("int64", length))
        cos, sin = table[0, j], table[1, j]
        # rows of the real part: [C, s·S]; of the imaginary part: [-s·S, C]
        value = tirx.Select(real_in, tirx.Select(real_out, cos, sin), tirx.Select(real_out, -sin, cos))
        return value * scale

    return te.compute((parts * length, 2 * bins), entry, name="dft_matrix")


def _irfft_weight(k: Any, length: Any, select: Any, either: Any) -> Any:
    """``w_k`` of the module docstring (numpy's or TIR's ``select`` and ``either``)."""
    edge = either(k == 0, 2 * k == length)
    return select(edge, 1.0, select(k < length // 2 + 1, 2.0, 0.0))


def _irfft_matrix(bb: Any, bins: Any, length: Any, parts: int, dtype: str) -> Any:
    """``[parts·B, N]``: the inverse one-sided transform of ``B`` bins to ``N`` values."""
    from tvm import relax, tirx

    if isinstance(length, int) and isinstance(bins, tirx.IntImm):
        k, t = np.arange(int(bins))[:, None], np.arange(length)[None, :]
        angle = 2.0 * np.pi * ((k * t) % length) / length
        weight = _irfft_weight(k, length, np.where, np.logical_or) / length
        rows = [weight * np.cos(angle)] + ([-weight * np.sin(angle)] if parts == 2 else [])
        return relax.const(np.concatenate(rows, axis=0).astype(dtype))
    table = bb.emit_te(_angles, length, 1.0, dtype, primfunc_name_hint="dft_angles")
    return bb.emit_te(_symbolic_irfft_matrix, table, bins, length, parts, primfunc_name_hint="dft_matrix")


def _angles(length: Any, sign: float, dtype: str) -> Any:
    """``[2, N]``: cos and ``sign``·sin of the N angles ``2π·j/N``."""
    from tvm import te, tirx

    step = tirx.const(2.0 * math.pi, "float64") / tirx.Cast("float64", length)
    return te.compute(
        (2, length),
        lambda part, j: tirx.Cast(
            dtype,
            tirx.Select(
                part == 0,
                tirx.cos(tirx.Cast("float64", j) * step),
                tirx.const(sign, "float64") * tirx.sin(tirx.Cast("float64", j) * step),
            ),
        ),
        name="dft_angles",
    )


def _tir_select(dtype: str) -> Any:
    from tvm import tirx

    def select(condition: Any, a: Any, b: Any) -> Any:
        as_expr = [tirx.const(value, dtype) if isinstance(value, float) else value for value in (a, b)]
        return tirx.Select(condition, *as_expr)

    return select


def _symbolic_irfft_matrix(table: Any, bins: Any, length: Any, parts: int) -> Any:
    from tvm import te, tirx

    dtype = table.dtype

    def entry(row: Any, t: Any) -> Any:
        k = tirx.floormod(row, bins)
        j = tirx.floormod(tirx.Cast("int64", k) * tirx.Cast("int64", t), tirx.Cast("int64", length))
        weight = _irfft_weight(k, length, _tir_select(dtype), tirx.Or)
        value = tirx.Select(row < bins, table[0, j], -table[1, j])
        return value * weight / tirx.Cast(dtype, length)

    return te.compute((parts * bins, length), entry, name="dft_matrix")
