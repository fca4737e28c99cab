"""``TwoPassSoftmax``/``TwoPassLogSoftmax`` as ``call_tir`` to our kernel: one lowering for both fronts.

``TwoPassSoftmax``/``TwoPassLogSoftmax`` (ONNX, domain ``ai.rewriter``, along the last
axis) and ``torch.ops.rewriter.two_pass_(log_)softmax`` (fx, along ``dim``) both become,
in Relax::

    flat = R.reshape(x, [rows, cols])                   # rows = prod(shape[:-1])
    y = R.call_tir(rewriter_two_pass_softmax, (flat,))  # our scheduled TIR kernel
    out = R.reshape(y, shape)

with a ``permute_dims`` around it when the axis is not the last one. The kernel is
:func:`rewriter.backends.tvm.kernels.softmax.two_pass_softmax`; there is no fallback to
TVM's stock softmax.

The float64 ops ``TwoPassSoftmaxDouble``/``TwoPassLogSoftmaxDouble`` become Relax ops, the
pairs ``e**t e**k`` of :mod:`rewriter.passes.two_pass_softmax.math` with ``exp`` in double
(TVM's fast-math ``exp`` is float32 only, so it stays libm's): our SIMD kernel is float32
inside and a float64 softmax is rare (``Attention``'s ``softmax_precision``).

>>> y = emit_two_pass_softmax(bb, x, log=False, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from functools import reduce
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.ops import (
    KernelFactory,
    OpCall,
    kernel_dim,
    register,
    scheduled_kernel,
)
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# Name prefix of the kernels' GlobalVars in the Relax module (tests look for it).
KERNEL_PREFIX = "rewriter_two_pass"


@register("TwoPassSoftmax", torch_op="rewriter::two_pass_softmax")
def emit_softmax(call: OpCall) -> relax.Expr:
    """``TwoPassSoftmax(x)`` (last axis) or ``two_pass_softmax(x, dim)``."""
    return _emit(call, log=False)


@register("TwoPassLogSoftmax", torch_op="rewriter::two_pass_log_softmax")
def emit_log_softmax(call: OpCall) -> relax.Expr:
    """``TwoPassLogSoftmax(x)`` (last axis) or ``two_pass_log_softmax(x, dim)``."""
    return _emit(call, log=True)


@register("TwoPassSoftmaxDouble")
def emit_softmax_double(call: OpCall) -> relax.Expr:
    """``TwoPassSoftmaxDouble(x)``: float64 softmax along the last axis, exact."""
    return _emit_double(call.bb, call.inputs[0], log=False)


@register("TwoPassLogSoftmaxDouble")
def emit_log_softmax_double(call: OpCall) -> relax.Expr:
    """``TwoPassLogSoftmaxDouble(x)``: float64 log-softmax along the last axis, exact."""
    return _emit_double(call.bb, call.inputs[0], log=True)


def _emit_double(bb: relax.BlockBuilder, x: relax.Expr, *, log: bool) -> relax.Expr:
    """The float64 two-pass body as Relax ops (the math of ``body._double_proto``)."""
    import numpy as np
    from tvm import relax

    from rewriter.passes.two_pass_softmax import math as tpm

    def const(value: float) -> relax.Expr:
        return relax.const(value, "float64")

    op = relax.op
    x = bb.normalize(x)
    k = bb.emit(op.floor(op.add(x, const(tpm.HALF))))
    lowest = op.less(x, const(float(np.finfo(np.float64).min)))
    t = bb.emit(op.where(lowest, const(0.0), op.subtract(x, k)))
    delta = bb.emit(op.subtract(k, op.max(k, axis=[-1], keepdims=True)))
    contribution = bb.emit(op.multiply(op.exp(t), op.exp(delta)))
    total = bb.emit(op.sum(contribution, axis=[-1], keepdims=True))
    if log:
        return bb.emit(op.subtract(op.add(t, delta), op.log(total)))
    return bb.emit(op.divide(contribution, total))


def _emit(call: OpCall, *, log: bool) -> relax.Expr:
    axis = int(call.attrs.get("dim", -1))  # the torch op's argument; the ONNX op has none
    return emit_two_pass_softmax(
        call.bb, call.inputs[0], log=log, target=call.target, kernel=call.kernel, axis=axis
    )


def default_kernel() -> KernelFactory:
    """The kernels' ``two_pass_softmax``, or a stand-in that raises a clear error.

    >>> default_kernel().__name__  # doctest: +SKIP
    'two_pass_softmax'
    """
    try:
        from rewriter.backends.tvm.kernels.softmax import two_pass_softmax
    except ImportError as exc:
        reason = str(exc)

        def missing_two_pass_softmax_kernel(*args: object, **kwargs: object) -> Any:
            raise InputError(
                "the TIR kernel rewriter.backends.tvm.kernels.softmax.two_pass_softmax is not "
                f"available ({reason}); refusing to fall back to stock softmax"
            )

        return missing_two_pass_softmax_kernel
    return two_pass_softmax


def emit_two_pass_softmax(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    *,
    log: bool,
    target: tvm.target.Target,
    kernel: KernelFactory | None = None,
    axis: int = -1,
) -> relax.Expr:
    """Emit (log-)softmax of ``x`` along ``axis`` as ``call_tir`` to our kernel into ``bb``.

    ``kernel(rows, cols, dtype=..., log=..., target=...)`` builds the PrimFunc
    ``(X[rows, cols], Y[rows, cols])``; ``rows``/``cols`` are ints, or ``tirx.Var``
    for symbolic sizes.

    >>> y = emit_two_pass_softmax(bb, x, log=True, target=target, axis=1)  # doctest: +SKIP
    """
    from tvm import relax, tirx

    x = bb.normalize(x)
    if x.ty.shape is None or not hasattr(x.ty.shape, "values"):
        raise InputError("two-pass softmax input has unknown rank; fix the input dimensions")
    shape = list(x.ty.shape.values)
    rank = len(shape)
    axis = axis % rank if rank else 0
    if rank and axis != rank - 1:
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        moved = bb.emit(relax.op.permute_dims(x, perm))
        y = emit_two_pass_softmax(bb, moved, log=log, target=target, kernel=kernel)
        return bb.emit(relax.op.permute_dims(y, perm))
    one = tirx.IntImm("int64", 1)
    rows_expr = reduce(lambda a, b: a * b, shape[:-1], one)
    cols_expr = shape[-1] if shape else one
    func = (kernel or default_kernel())(
        kernel_dim(rows_expr, "rows"),
        kernel_dim(cols_expr, "cols"),
        dtype=x.ty.dtype,
        log=log,
        target=target,
    )
    name = f"{KERNEL_PREFIX}_{'log_softmax' if log else 'softmax'}"
    gvar = bb.add_func(scheduled_kernel(func), name)
    flat_shape = [rows_expr, cols_expr]
    flat = x if rank == 2 else bb.emit(relax.op.reshape(x, flat_shape))
    y = bb.emit(relax.call_tir(gvar, [flat], relax.TensorType(flat_shape, x.ty.dtype)))
    return y if rank == 2 else bb.emit(relax.op.reshape(y, shape))
