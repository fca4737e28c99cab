"""``ai.rewriter::SigmoidAttention`` as ``call_tir`` to our fused kernel in a Relax module.

For static 4-D float32 inputs Q [B, H, N, D], K [B, H, M, D], V [B, H, M, Dv] and an
additive mask broadcastable to [B, H, N, M], in Relax (q, kt, v, mask in the layout of
:mod:`rewriter.backends.tvm.ops.attention_layout`, padded keys masked with 0)::

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

from typing import TYPE_CHECKING

import onnx_ir as ir

from rewriter.backends.tvm.ops import OpCall, register, scheduled_kernel
from rewriter.backends.tvm.ops.attention_layout import kernel_operands

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
    layout = kernel_operands(
        bb, q, k, v, mask, lanes=key_lanes(target), op_name="SigmoidAttention"
    )
    func = sigmoid_attention(
        **layout.kernel_sizes(),
        head_dim=layout.head_dim,
        target=target,
        has_mask=layout.has_mask,
        value_dim=layout.value_dim,
        scale=float(scale),
        bias=float(bias),
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    shape = [layout.batch * layout.heads, layout.q_len, layout.value_dim]
    y = bb.emit(relax.call_tir(gvar, layout.args, relax.TensorType(shape, "float32")))
    return layout.output(bb, y)
