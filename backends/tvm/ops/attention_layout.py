"""The layout the fused CPU attention kernels read, built in Relax from rank-4 Q, K, V.

Both fused attention lowerings (:mod:`.sigmoid_attention`, :mod:`.softmax_attention`)
take static 4-D float32 Q [B, H, N, D], K [B, H, M, D], V [B, H, M, Dv] and an additive
mask broadcastable to [B, H, N, M], and hand their kernels::

    q = R.reshape(Q, [B*H, N, D])
    kt = R.permute_dims(R.reshape(K, [B*H, M, D]), [0, 2, 1])      # keys padded to Mp
    v = R.reshape(V, [B*H, M, Dv])                                 # zero rows up to Mp
    mask = R.reshape(R.broadcast_to(Mask, [B|1, H|1, N|1, M]), ...)  # keys padded to Mp

``Mp`` is M rounded up to the kernel's vector width. Padded keys get ``pad_fill`` in the
mask: 0 for sigmoid attention (its padded V rows are zero, so they add 0), -inf for
softmax attention, which then always has a mask where keys are padded. A constant
all-zero mask (the rewrite's "no mask") is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm.ops import constant_value, static_shape
from rewriter.errors import InputError

if TYPE_CHECKING:
    from tvm import relax


@dataclasses.dataclass(frozen=True)
class KernelOperands:
    """The kernel's arguments (q, kt, v[, mask]) and the sizes it is built for."""

    args: list[Any]
    batch: int
    heads: int
    q_len: int
    k_len: int  # padded (Mp)
    head_dim: int
    value_dim: int
    mask_heads: int = 1  # 1 or B*H
    mask_rows: int = 1  # 1 or N

    @property
    def has_mask(self) -> bool:
        return len(self.args) == 4

    def output(self, bb: relax.BlockBuilder, y: relax.Expr) -> relax.Expr:
        """The kernel's [B*H, N, Dv] output ``y`` as [B, H, N, Dv]."""
        from tvm import relax

        return bb.emit(relax.op.reshape(y, [self.batch, self.heads, self.q_len, self.value_dim]))


def kernel_operands(
    bb: relax.BlockBuilder,
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    mask: relax.Expr | None,
    *,
    lanes: int,
    pad_fill: float,
    op_name: str,
) -> KernelOperands:
    """Emit the kernel layout of ``q, k, v, mask`` into ``bb`` (see the module docstring).

    Raises :class:`InputError` (naming ``op_name``) unless Q, K, V are static 4-D
    float32 and the mask's shape is static and broadcastable to [B, H, N, M].
    """
    from tvm import relax

    q, k, v = (bb.normalize(x) for x in (q, k, v))
    shapes = [static_shape(x) for x in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or any(
        x.ty.dtype != "float32" for x in (q, k, v)
    ):
        raise InputError(f"{op_name} kernel: Q, K, V must be static 4-D float32 tensors")
    (b, h, n, d), (bk, hk, m, dk), (bv, hv, mv, dv) = shapes  # type: ignore[misc]
    if (bk, hk, dk) != (b, h, d) or (bv, hv, mv) != (b, h, m):
        raise InputError(f"{op_name} kernel: incompatible shapes {shapes}")
    bh = b * h
    mp = -(-m // lanes) * lanes
    pad = mp - m

    def padded_keys(x: relax.Expr, axis: int, fill: float = 0.0) -> relax.Expr:
        if not pad:
            return x
        shape = static_shape(x)
        assert shape is not None
        shape[axis] = pad
        filler = relax.const(np.full(shape, fill, np.float32))
        return bb.emit(relax.op.concat([x, filler], axis=axis))

    q3 = bb.emit(relax.op.reshape(q, [bh, n, d]))
    kt = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(k, [bh, m, d])), [0, 2, 1]))
    kt = padded_keys(kt, 2)
    v3 = padded_keys(bb.emit(relax.op.reshape(v, [bh, m, dv])), 1)
    args = [q3, kt, v3]
    sizes = {"batch": b, "heads": h, "q_len": n, "k_len": mp, "head_dim": d, "value_dim": dv}
    mask = None if mask is None else bb.normalize(mask)
    if mask is None or all_zero(mask):
        if not pad or pad_fill == 0.0:
            return KernelOperands(args, **sizes)
        mask = relax.const(np.zeros([1, 1, 1, m], np.float32))
    mshape = static_shape(mask)
    if mshape is None or len(mshape) > 4 or mask.ty.dtype != "float32":
        raise InputError(f"{op_name} kernel: the mask must be static float32, rank <= 4")
    mshape = [1] * (4 - len(mshape)) + mshape
    for size, full in zip(mshape, (b, h, n, m), strict=True):
        if size not in (1, full):
            raise InputError(f"{op_name} kernel: mask {mshape} vs [{b}, {h}, {n}, {m}]")
    per_head = mshape[0] != 1 or mshape[1] != 1
    mask_heads = bh if per_head else 1
    mask_rows = n if mshape[2] != 1 else 1
    full = [b if per_head else 1, h if per_head else 1, mask_rows, m]
    mask4 = bb.emit(relax.op.reshape(mask, mshape))
    if mshape != full:
        mask4 = bb.emit(relax.op.broadcast_to(mask4, full))
    mask3 = bb.emit(relax.op.reshape(mask4, [mask_heads, mask_rows, m]))
    args.append(padded_keys(mask3, 2, pad_fill))
    return KernelOperands(args, **sizes, mask_heads=mask_heads, mask_rows=mask_rows)


def all_zero(mask: Any) -> bool:
    """Whether ``mask`` is a constant tensor of zeros (the rewrite's "no mask")."""
    data = constant_value(mask)
    return data is not None and not np.any(data)
