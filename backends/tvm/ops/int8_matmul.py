"""``ai.rewriter::Int8MatMul(u8, packed, scale, comp[, bias])`` as ``call_tir`` to the VNNI or AMX kernel.

The op is what :func:`rewriter.backends.tvm.relax_passes.qdq_matmul.fuse` makes of a QDQ
MatMul on targets with AVX-512 VNNI or AMX-INT8: ``u8`` the activation quantized to
uint8, ``packed`` the int8 weight in the kernel's ``[groups, K_pad/4, 16, 4]`` layout,
``scale`` and ``comp`` per output channel (see there). In Relax::

    a = R.reshape(u8, [M, K])                                   # M = prod(shape[:-1])
    y = R.call_tir(rewriter_int8_matmul, (a, packed, scale, comp[, bias]))  # [M, N]
    out = R.reshape(y, [..., N])

The kernel is AMX's (:func:`rewriter.backends.tvm.kernels.amx_matmul.amx_matmul`) where the
target has AMX-INT8 and the weight is packed for it (:func:`rewriter.backends.tvm.kernels.amx_matmul.packed_shape`),
else :func:`rewriter.backends.tvm.kernels.int8_matmul.int8_matmul` (``[ceil(N/16), K/4, 16, 4]``).

>>> y = emit_int8_matmul(bb, [u8, packed, scale, comp], target=target)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm.ops import OpCall, register, scheduled_kernel, static_shape
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

INT8_MATMUL = "Int8MatMul"
# Name prefix of the kernels' GlobalVars in the Relax module (tests look for it).
KERNEL_NAME = "rewriter_int8_matmul"


@register(INT8_MATMUL)
def emit(call: OpCall) -> relax.Expr:
    """``Int8MatMul(u8, packed, scale, comp[, bias])`` from the ONNX front."""
    return emit_int8_matmul(call.bb, call.inputs, target=call.target)


def emit_int8_matmul(
    bb: relax.BlockBuilder, inputs: list[Any], *, target: tvm.target.Target
) -> relax.Expr:
    """Emit ``Int8MatMul(u8, packed, scale, comp[, bias])`` as ``call_tir`` of the kernel into ``bb``.

    ``u8`` [..., K] is flattened to [M, K] around the kernel; ``N`` is the length of
    ``scale`` (the packed weight holds whole groups of 16 channels).
    """
    from tvm import relax

    from rewriter.backends.tvm.kernels import amx_matmul
    from rewriter.backends.tvm.kernels.int8_matmul import int8_matmul

    u8 = bb.normalize(inputs[0])
    shape = static_shape(u8)
    scale = static_shape(bb.normalize(inputs[2]))
    packed = static_shape(bb.normalize(inputs[1]))
    if shape is None or scale is None or len(shape) < 2:
        raise InputError(f"{INT8_MATMUL}: the activation's shape must be static (rank >= 2)")
    k, (n,) = shape[-1], scale
    m = int(np.prod(shape[:-1]))
    bias = len(inputs) > 4
    if amx_matmul.supported(target, "int8") and packed == list(
        amx_matmul.packed_shape("int8", k, n)
    ):
        func = amx_matmul.amx_matmul("int8", m, k, n, bias=bias, target=target)
    else:
        func = int8_matmul(m, k, n, bias=bias, target=target)
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    flat = u8 if len(shape) == 2 else bb.emit(relax.op.reshape(u8, [m, k]))
    y = bb.emit(relax.call_tir(gvar, [flat, *inputs[1:]], relax.TensorType([m, n], "float32")))
    return y if len(shape) == 2 else bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
