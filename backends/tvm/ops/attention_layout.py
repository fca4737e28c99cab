"""The layout the fused CPU attention kernels read, built in Relax from rank-4 Q, K, V.

Both fused attention lowerings (:mod:`.sigmoid_attention`, :mod:`.softmax_attention`)
take 4-D float32 Q [B, H, N, D], K [B, H, M, D], V [B, H, M, Dv] and an additive mask
broadcastable to [B, H, N, M] (static shapes; for softmax attention B, H, N and M may be
symbolic), and hand their kernels::

    q = R.reshape(Q, [B*H, N, D])
    kt = R.permute_dims(R.reshape(K, [B*H, M, D]), [0, 2, 1])      # keys padded to Mp
    v = R.reshape(V, [B*H, M, Dv])                                 # zero rows up to Mp
    mask = R.reshape(R.broadcast_to(Mask, [B|1, H|1, N|1, M]), ...)  # keys padded to Mp

``Mp`` is M rounded up to ``lanes``, the kernel's keys per vector (the sigmoid kernel's
vector width, for static shapes only; 1 for the softmax kernel, which reads any number
of keys, so nothing is padded). Padded keys are zeros in Kᵀ, V and the mask: the sigmoid
kernel's padded V rows are zero, so they add 0. A constant all-zero mask (the rewrite's
"no mask") is dropped. A mask computed from broadcasts (an ``Expand`` to the batch, then
the ``Where`` that makes it additive) is computed before them (:func:`narrowed`): the
kernel broadcasts it over the heads and rows itself.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from rewriter.backends.tvm.ops import constant_value, kernel_dim
from rewriter.errors import InputError

if TYPE_CHECKING:
    from tvm import relax


@dataclasses.dataclass(frozen=True)
class KernelOperands:
    """The kernel's arguments (q, kt, v[, mask]) and the sizes it is built for (ints, or
    TIR expressions of the model's symbolic dimensions)."""

    args: list[Any]
    batch: Any
    heads: Any
    q_len: Any
    k_len: Any  # padded (Mp)
    head_dim: int
    value_dim: int
    per_head: bool = False  # the mask is [B*H, ., Mp], else [1, ., Mp]
    per_row: bool = False  # the mask is [., N, Mp], else [., 1, Mp]

    @property
    def has_mask(self) -> bool:
        return len(self.args) == 4

    def kernel_sizes(self) -> dict[str, Any]:
        """``batch_heads``, ``q_len``, ``k_len``, ``mask_heads``, ``mask_rows`` for the
        kernel: ints where static, else one ``tirx.Var`` each (a mask's size the same Var
        as the size it stands for)."""
        batch_heads = kernel_dim(self.batch * self.heads, "batch_heads")
        q_len = kernel_dim(self.q_len, "queries")
        return {
            "batch_heads": batch_heads,
            "q_len": q_len,
            "k_len": kernel_dim(self.k_len, "keys"),
            "mask_heads": batch_heads if self.per_head else 1,
            "mask_rows": q_len if self.per_row else 1,
        }

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
    op_name: str,
    symbolic: bool = False,
) -> KernelOperands:
    """Emit the kernel layout of ``q, k, v, mask`` into ``bb`` (see the module docstring).

    Raises :class:`InputError` (naming ``op_name``), before anything is emitted, unless
    Q, K, V are 4-D float32 of static shapes and the mask's shape is static and
    broadcastable to [B, H, N, M]. With ``symbolic``, B, H, N and M may be symbolic
    (D and Dv stay static) where no key is padded (``lanes`` 1).
    """
    from tvm import relax, sym

    analyzer = sym.Analyzer()
    q, k, v = (bb.normalize(x) for x in (q, k, v))
    shapes = [_shape(x) for x in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or any(
        x.ty.dtype != "float32" for x in (q, k, v)
    ):
        raise InputError(f"{op_name} kernel: Q, K, V must be 4-D float32 tensors of known shape")
    (b, h, n, d), (bk, hk, m, dk), (bv, hv, mv, dv) = shapes  # type: ignore[misc]
    if not (_static(d) and _static(dv)) or not (
        symbolic or all(_static(size) for shape in shapes for size in shape)  # type: ignore[union-attr]
    ):
        raise InputError(f"{op_name} kernel: shapes {shapes} are not static")
    pairs = ((bk, b), (hk, h), (dk, d), (bv, b), (hv, h), (mv, m))
    if not all(analyzer.can_prove_equal(x, y) for x, y in pairs):
        raise InputError(f"{op_name} kernel: incompatible shapes {shapes}")
    mask = None if mask is None else bb.normalize(mask)
    mshape: list[Any] | None = None
    if mask is not None and not all_zero(mask):
        mshape = _shape(mask)
        if mshape is None or len(mshape) > 4 or mask.ty.dtype != "float32":
            raise InputError(f"{op_name} kernel: the mask must be float32, rank <= 4")
        if not symbolic and not all(_static(size) for size in mshape):
            raise InputError(f"{op_name} kernel: the mask's shape {mshape} is not static")
        mshape = [1] * (4 - len(mshape)) + mshape
        for size, full in zip(mshape, (b, h, n, m), strict=True):
            if not (_is_one(size) or analyzer.can_prove_equal(size, full)):
                raise InputError(f"{op_name} kernel: mask {mshape} vs [{b}, {h}, {n}, {m}]")
    d, dv = int(d), int(dv)
    bh = analyzer.simplify(b * h)
    mp = analyzer.simplify((m + lanes - 1) // lanes * lanes)
    pad = analyzer.simplify(mp - m)
    if not _static(pad):
        raise InputError(f"{op_name} kernel: keys of symbolic length cannot be padded")

    def padded_keys(x: relax.Expr, axis: int) -> relax.Expr:
        if not int(pad):
            return x
        shape = [int(size) for size in x.ty.shape.values]
        shape[axis] = int(pad)
        zeros = relax.const(np.zeros(shape, np.float32))
        return bb.emit(relax.op.concat([x, zeros], axis=axis))

    q3 = bb.emit(relax.op.reshape(q, [bh, n, d]))
    kt = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(k, [bh, m, d])), [0, 2, 1]))
    kt = padded_keys(kt, 2)
    v3 = padded_keys(bb.emit(relax.op.reshape(v, [bh, m, dv])), 1)
    args = [q3, kt, v3]
    sizes = {"batch": b, "heads": h, "q_len": n, "k_len": mp, "head_dim": d, "value_dim": dv}
    if mask is None or mshape is None:
        return KernelOperands(args, **sizes)
    narrow = narrowed(bb, mask)
    nshape = _shape(narrow)
    if nshape is not None and len(nshape) <= 4:
        nshape = [1] * (4 - len(nshape)) + nshape
        if all(_is_one(x) or analyzer.can_prove_equal(x, y) for x, y in zip(nshape, mshape, strict=True)):
            mask, mshape = narrow, nshape
    per_head = not (_is_one(mshape[0]) and _is_one(mshape[1]))
    per_row = not _is_one(mshape[2])
    full = [b if per_head else 1, h if per_head else 1, n if per_row else 1, m]
    mask4 = bb.emit(relax.op.reshape(mask, mshape))
    if not all(analyzer.can_prove_equal(x, y) for x, y in zip(mshape, full, strict=True)):
        mask4 = bb.emit(relax.op.broadcast_to(mask4, full))
    mask3 = bb.emit(relax.op.reshape(mask4, [bh if per_head else 1, full[2], m]))
    args.append(padded_keys(mask3, 2))
    return KernelOperands(args, **sizes, per_head=per_head, per_row=per_row)


# Elementwise Relax ops (their output the broadcast of their operands): a mask they make
# of broadcast operands is made of the operands before the broadcast (narrowed).
ELEMENTWISE = frozenset(
    f"relax.{name}"
    for name in (
        *("add", "subtract", "multiply", "divide", "maximum", "minimum", "negative", "where"),
        *("astype", "logical_not", "logical_and", "logical_or", "equal", "not_equal"),
        *("less", "less_equal", "greater", "greater_equal"),
    )
)


def narrowed(bb: relax.BlockBuilder, mask: relax.Expr, depth: int = 8) -> relax.Expr:
    """``mask`` computed before the broadcasts it reads: the same values at every index of
    an axis that a ``broadcast_to`` (or an elementwise op of broadcast operands) made, so
    that the kernel reads one row, or one head, for all (a dynamo export's constant mask
    broadcast to the batch and then to the heads: AST's [batch x 4, 1214, 1214], 6 ms of
    a run made and read at a symbolic batch, where a fixed batch folds it). Emits the
    elementwise ops again on the narrowed operands; ``mask`` itself where nothing
    narrows."""
    import tvm
    from tvm import relax

    if depth == 0:
        return mask
    value = bb.lookup_binding(mask) if isinstance(mask, relax.Var) else mask
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return mask
    if value.op.name == "relax.broadcast_to":
        return narrowed(bb, value.args[0], depth - 1)
    if value.op.name not in ELEMENTWISE:
        return mask
    args = [narrowed(bb, arg, depth - 1) for arg in value.args]
    if all(new.same_as(old) for new, old in zip(args, value.args, strict=True)):
        return mask
    return bb.emit(relax.Call(value.op, args, value.attrs, value.ty_args))


def _shape(x: relax.Expr) -> list[Any] | None:
    """The shape of a Relax tensor as TIR expressions, or None when it is not known."""
    shape = getattr(x.ty, "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def _static(size: Any) -> bool:
    from tvm import tirx

    return isinstance(size, (int, tirx.IntImm))


def _is_one(size: Any) -> bool:
    return _static(size) and int(size) == 1


def all_zero(mask: Any) -> bool:
    """Whether ``mask`` is a constant tensor of zeros (the rewrite's "no mask")."""
    data = constant_value(mask)
    return data is not None and not np.any(data)
