"""``ai.rewriter::SigmoidAttention`` as ``call_tir`` to our fused kernel in a Relax module.

For static 4-D float32 inputs Q [B, H, N, D], K [B, H, M, D], V [B, H, M, Dv] and an
additive mask broadcastable to [B, H, N, M], in Relax::

    q = R.reshape(Q, [B*H, N, D])
    kt = R.permute_dims(R.reshape(K, [B*H, M, D]), [0, 2, 1])      # keys padded to Mp
    v = R.reshape(V, [B*H, M, Dv])                                 # zero rows up to Mp
    mask = R.reshape(R.broadcast_to(Mask, [B|1, H|1, N|1, M]), ...)  # unless all-zero
    y = R.call_tir(rewriter_sigmoid_attention, (q, kt, v[, mask]))  # [B*H, N, Dv]
    out = R.reshape(y, [B, H, N, Dv])

The kernel is :func:`rewriter.backends.tvm.kernels.sigmoid_attention.sigmoid_attention`
(sigmoid and ``p·V`` fused, no n x m matrix), on CUDA targets
:func:`rewriter.backends.tvm.kernels.sigmoid_attention_cuda.sigmoid_attention_cuda`. A
constant all-zero mask (the rewrite's "no mask") is dropped. Shapes that are not static
are not lowered here: :func:`rewriter.backends.tvm.import_onnx.prepare` inlines the op's ONNX
function body instead (:func:`refusal` says why); ``prepare(fuse_attention=False)`` always
does.

>>> y = emit_sigmoid_attention(bb, q, k, v, mask, scale=0.125, bias=-6.9, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from rewriter.backends.tvm.ops import OpCall, register, scheduled_kernel, static_shape
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

# Name of the kernel's GlobalVar in the Relax module (tests look for it).
KERNEL_NAME = "rewriter_sigmoid_attention"


def refusal(node: ir.Node) -> str:
    """Why the kernel cannot take ``node``, or "" when Q, K, V are static 4-D float32 and
    its mask static (or absent)."""
    return "" if _static_4d(node) else "shapes not static 4-D float32"


def _static_4d(node: ir.Node) -> bool:
    """Whether Q, K, V of ``node`` are static 4-D float32 and its mask static (or absent)."""
    if len(node.inputs) < 3 or any(value is None for value in node.inputs[:3]):
        return False
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        shape = value.shape
        if shape is None or not all(isinstance(dim, int) for dim in shape):
            return False
        if value.dtype != ir.DataType.FLOAT or (index < 3 and len(shape) != 4) or len(shape) > 4:
            return False
    return True


@register("SigmoidAttention", refusal=refusal, option="fuse_attention")
def emit(call: OpCall) -> relax.Expr:
    """``SigmoidAttention(q, k, v[, mask]; scale, bias)`` from the ONNX front."""
    q, k, v = call.inputs[:3]
    return emit_sigmoid_attention(
        call.bb,
        q,
        k,
        v,
        call.input(3),
        scale=float(call.attrs.get("scale", 1.0)),
        bias=float(call.attrs.get("bias", 0.0)),
        target=call.target,
    )


def emit_sigmoid_attention(
    bb: relax.BlockBuilder,
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    mask: relax.Expr | None,
    *,
    scale: float,
    bias: float,
    target: tvm.target.Target,
) -> relax.Expr:
    """Emit ``SigmoidAttention(q, k, v, mask; scale, bias)`` as ``call_tir`` into ``bb``.

    Raises :class:`InputError` unless Q, K, V are static 4-D float32 and the mask's
    shape is static and broadcastable to [B, H, N, M].
    """
    from tvm import relax

    from rewriter.backends.tvm.kernels import sigmoid_attention as cpu_kernel
    from rewriter.backends.tvm.kernels import sigmoid_attention_cuda as cuda_kernel

    key_lanes, sigmoid_attention = cpu_kernel.key_lanes, cpu_kernel.sigmoid_attention
    if target.kind.name == "cuda":
        key_lanes, sigmoid_attention = cuda_kernel.key_lanes, cuda_kernel.sigmoid_attention_cuda
    q, k, v = (bb.normalize(x) for x in (q, k, v))
    shapes = [static_shape(x) for x in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or any(
        x.ty.dtype != "float32" for x in (q, k, v)
    ):
        raise InputError("SigmoidAttention kernel: Q, K, V must be static 4-D float32 tensors")
    (b, h, n, d), (bk, hk, m, dk), (bv, hv, mv, dv) = shapes  # type: ignore[misc]
    if (bk, hk, dk) != (b, h, d) or (bv, hv, mv) != (b, h, m):
        raise InputError(f"SigmoidAttention kernel: incompatible shapes {shapes}")
    bh = b * h
    lanes = key_lanes(target)
    mp = -(-m // lanes) * lanes
    pad = mp - m

    def padded_keys(x: relax.Expr, axis: int) -> relax.Expr:
        if not pad:
            return x
        shape = static_shape(x)
        assert shape is not None
        shape[axis] = pad
        zeros = relax.const(np.zeros(shape, np.float32))
        return bb.emit(relax.op.concat([x, zeros], axis=axis))

    q3 = bb.emit(relax.op.reshape(q, [bh, n, d]))
    kt = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(k, [bh, m, d])), [0, 2, 1]))
    kt = padded_keys(kt, 2)
    v3 = padded_keys(bb.emit(relax.op.reshape(v, [bh, m, dv])), 1)
    args = [q3, kt, v3]
    mask_heads = mask_rows = 1
    if mask is not None and not _all_zero(mask):
        mask = bb.normalize(mask)
        mshape = static_shape(mask)
        if mshape is None or len(mshape) > 4 or mask.ty.dtype != "float32":
            raise InputError("SigmoidAttention kernel: the mask must be static float32, rank <= 4")
        mshape = [1] * (4 - len(mshape)) + mshape
        for size, full in zip(mshape, (b, h, n, m), strict=True):
            if size not in (1, full):
                raise InputError(f"SigmoidAttention kernel: mask {mshape} vs [{b}, {h}, {n}, {m}]")
        per_head = mshape[0] != 1 or mshape[1] != 1
        mask_heads = bh if per_head else 1
        mask_rows = n if mshape[2] != 1 else 1
        full = [b if per_head else 1, h if per_head else 1, mask_rows, m]
        mask4 = bb.emit(relax.op.reshape(mask, mshape))
        if mshape != full:
            mask4 = bb.emit(relax.op.broadcast_to(mask4, full))
        args.append(padded_keys(bb.emit(relax.op.reshape(mask4, [mask_heads, mask_rows, m])), 2))
    func = sigmoid_attention(
        bh,
        n,
        mp,
        d,
        target=target,
        has_mask=len(args) == 4,
        value_dim=dv,
        mask_heads=mask_heads,
        mask_rows=mask_rows,
        scale=float(scale),
        bias=float(bias),
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    y = bb.emit(relax.call_tir(gvar, args, relax.TensorType([bh, n, dv], "float32")))
    return bb.emit(relax.op.reshape(y, [b, h, n, dv]))


def _all_zero(mask: Any) -> bool:
    """Whether ``mask`` is a constant tensor of zeros (the rewrite's "no mask")."""
    from tvm import ir

    if not isinstance(mask, ir.expr.Constant):
        return False
    value = mask.value
    data = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return not np.any(data)
