"""``ai.rewriter::SoftmaxAttention`` as ``call_tir`` to our fused exact attention kernel.

The op is the backend's own: :mod:`rewriter.backends.tvm.attention_fusion` writes it in
place of ``MatMul(TwoPassSoftmax(QKᵀ·s + mask), V)`` (float32) while it prepares a model
for import, so it has no function body. Where Q [B, H, N, D], K [B, H, M, D],
V [B, H, M, Dv] have known shapes with static head dimensions (B, H, N, M static or
symbolic) and the additive mask broadcasts to [B, H, N, M], they become the layout of
:mod:`rewriter.backends.tvm.ops.attention_layout` (keys not padded: the kernel takes any
number), then::

    y = R.call_tir(rewriter_softmax_attention, (q, kt, v[, mask]))  # [B*H, N, Dv]
    out = R.reshape(y, [B, H, N, Dv])

The kernel is :func:`rewriter.backends.tvm.kernels.softmax_attention.softmax_attention`
(scores, softmax and ``p·V`` per tile of query rows; the n x m matrix never exists).
Elsewhere (a symbolic head dimension, say) :func:`emit_unfused` writes the three kernels
the graph had (two matmuls and our two-pass softmax).

>>> y = emit_softmax_attention(bb, q, k, v, mask, scale=0.125, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rewriter.backends.tvm.ops import KernelFactory, OpCall, register, scheduled_kernel
from rewriter.backends.tvm.ops.attention_layout import all_zero, kernel_operands
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

OP_TYPE = "SoftmaxAttention"
# Name of the kernel's GlobalVar in the Relax module (tests look for it).
KERNEL_NAME = "rewriter_softmax_attention"


@register(OP_TYPE, cpu_only=True, option="fuse_attention")
def emit(call: OpCall) -> relax.Expr:
    """``SoftmaxAttention(q, k, v, mask; scale)``, from the fusion's rewrite."""
    q, k, v, mask = call.inputs[:4]
    scale = float(call.attrs.get("scale", 1.0))
    try:
        return emit_softmax_attention(call.bb, q, k, v, mask, scale=scale, target=call.target)
    except InputError as refusal:  # raised before anything is emitted
        logger.info("%s: three kernels", refusal)
        return emit_unfused(
            call.bb, q, k, v, mask, scale=scale, target=call.target, kernel=call.kernel
        )


def emit_unfused(
    bb: relax.BlockBuilder,
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    mask: relax.Expr | None,
    *,
    scale: float,
    target: tvm.target.Target,
    kernel: KernelFactory | None = None,
) -> relax.Expr:
    """The attention as the graph had it, for the shapes the kernel is not built for:
    ``matmul(TwoPassSoftmax(matmul(q, kᵀ) * scale + mask), v)``, the softmax our kernel
    (:func:`rewriter.backends.tvm.ops.two_pass_softmax.emit_two_pass_softmax`)."""
    from tvm import relax

    from rewriter.backends.tvm.ops.two_pass_softmax import emit_two_pass_softmax

    scores = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))))
    if scale != 1.0:
        scores = bb.emit(relax.op.multiply(scores, relax.const(scale, "float32")))
    if mask is not None and not all_zero(mask):
        scores = bb.emit(relax.op.add(scores, _sized_like(bb, mask, scores)))
    probs = emit_two_pass_softmax(bb, scores, log=False, target=target, kernel=kernel)
    return bb.emit(relax.op.matmul(probs, v))


def _sized_like(bb: relax.BlockBuilder, mask: relax.Expr, scores: relax.Expr) -> relax.Expr:
    """``mask`` cast (checked at run time) to the scores' size at each of its axes (the
    scores' last ones) where its own is not 1 and is another expression of the same
    length: a mask sized by a length the model's code computes (``(samples - 10) / 5 +
    1``, ONNX's truncating division), the keys by a convolution's output (``(samples -
    10) // 5 + 1``); TVM can neither size nor lower the sum of the two. A mask sized by
    an input dimension of its own (a bare variable) is left as it is: TVM's
    CanonicalizeBindings would replace one variable by the other in part of the function
    and drop the cast, and with it the check."""
    from tvm import relax, sym, tirx

    mask = bb.normalize(mask)
    mask_shape, shape = mask.ty.shape, scores.ty.shape
    if mask_shape is None or shape is None or len(mask_shape.values) > len(shape.values):
        return mask
    analyzer = sym.Analyzer()
    sized = []
    trailing = shape.values[len(shape.values) - len(mask_shape.values) :]  # broadcast from the right
    for dim, size in zip(mask_shape.values, trailing, strict=True):
        if (isinstance(dim, tirx.IntImm) and dim.value == 1) or analyzer.can_prove_equal(dim, size):
            sized.append(dim)
        elif isinstance(dim, tirx.Var):
            return mask
        else:
            sized.append(size)
    if all(a.same_as(b) for a, b in zip(sized, mask_shape.values, strict=True)):
        return mask
    return bb.match_cast(mask, relax.TensorType(sized, mask.ty.dtype))


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

    Raises :class:`~rewriter.errors.InputError`, before anything is emitted, unless Q, K,
    V are 4-D float32 of known shapes with static head dimensions and the mask
    broadcasts to [B, H, N, M]; B, H, N and M may be symbolic.
    """
    from tvm import relax

    from rewriter.backends.tvm.kernels import softmax_attention as kernel

    layout = kernel_operands(
        bb,
        q,
        k,
        v,
        mask,
        lanes=1,  # the kernel reads unpadded keys
        op_name=OP_TYPE,
        symbolic=True,
    )
    func = kernel.softmax_attention(
        **layout.kernel_sizes(),
        head_dim=layout.head_dim,
        target=target,
        has_mask=layout.has_mask,
        value_dim=layout.value_dim,
        scale=scale,
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    shape = [layout.batch * layout.heads, layout.q_len, layout.value_dim]
    y = bb.emit(relax.call_tir(gvar, layout.args, relax.TensorType(shape, "float32")))
    return layout.output(bb, y)
