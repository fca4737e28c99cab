"""``ai.rewriter::SoftmaxAttention`` as ``call_tir`` to our fused exact attention kernel.

The op is the backend's own: :mod:`rewriter.backends.tvm.attention_fusion` writes it in
place of ``MatMul(TwoPassSoftmax(QKᵀ·s + mask), V)`` while it prepares a model for
import, only where Q, K, V and the mask are static float32, so it has no function body
and every node of it gets the kernel. Q [B, H, N, D], K [B, H, M, D], V [B, H, M, Dv]
and the additive mask become the layout of :mod:`rewriter.backends.tvm.ops.attention_layout`
(padded keys masked with -inf), then::

    y = R.call_tir(rewriter_softmax_attention, (q, kt, v[, mask]))  # [B*H, N, Dv]
    out = R.reshape(y, [B, H, N, Dv])

The kernel is :func:`rewriter.backends.tvm.kernels.softmax_attention.softmax_attention`
(scores, softmax and ``p·V`` per tile of query rows; the n x m matrix never exists).

>>> y = emit_softmax_attention(bb, q, k, v, mask, scale=0.125, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rewriter.backends.tvm.ops import OpCall, register, scheduled_kernel
from rewriter.backends.tvm.ops.attention_layout import kernel_operands

if TYPE_CHECKING:
    import tvm
    from tvm import relax

OP_TYPE = "SoftmaxAttention"
# Name of the kernel's GlobalVar in the Relax module (tests look for it).
KERNEL_NAME = "rewriter_softmax_attention"


@register(OP_TYPE, cpu_only=True, option="fuse_attention")
def emit(call: OpCall) -> relax.Expr:
    """``SoftmaxAttention(q, k, v[, mask]; scale)``, from the fusion's rewrite."""
    q, k, v = call.inputs[:3]
    scale = float(call.attrs.get("scale", 1.0))
    return emit_softmax_attention(call.bb, q, k, v, call.input(3), scale=scale, target=call.target)


def emit_softmax_attention(
    bb: relax.BlockBuilder,
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    mask: relax.Expr | None,
    *,
    scale: float,
    target: tvm.target.Target,
) -> relax.Expr:
    """Emit ``SoftmaxAttention(q, k, v, mask; scale)`` as ``call_tir`` into ``bb``.

    Raises :class:`~rewriter.errors.InputError` unless Q, K, V are static 4-D float32 and
    the mask's shape is static and broadcastable to [B, H, N, M].
    """
    from tvm import relax

    from rewriter.backends.tvm.kernels import softmax_attention as kernel

    layout = kernel_operands(
        bb,
        q,
        k,
        v,
        mask,
        lanes=kernel.key_lanes(target),
        pad_fill=-math.inf,
        op_name=OP_TYPE,
    )
    func = kernel.softmax_attention(
        layout.batch * layout.heads,
        layout.q_len,
        layout.k_len,
        layout.head_dim,
        target=target,
        has_mask=layout.has_mask,
        value_dim=layout.value_dim,
        mask_heads=layout.mask_heads,
        mask_rows=layout.mask_rows,
        scale=scale,
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    shape = [layout.batch * layout.heads, layout.q_len, layout.value_dim]
    y = bb.emit(relax.call_tir(gvar, layout.args, relax.TensorType(shape, "float32")))
    return layout.output(bb, y)
