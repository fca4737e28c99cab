"""``ai.rewriter::FusedCrossEntropy`` / ``FusedLinearCrossEntropy`` as ``call_tir`` to our loss kernels.

For static float32 inputs on CPU targets (``import_onnx.prepare`` inlines the op's ONNX
function body for anything else: :func:`refusal` says why; and for GPU targets, or with
``prepare(fuse_loss=False)``), in Relax::

    # FusedCrossEntropy(scores [N, C, d...], labels [N, d...][, weights [C]])
    x = R.reshape(R.permute_dims(scores, [0, 2.., 1]), [rows, C])   # class axis last
    loss[, lp] = R.call_tir(rewriter_cross_entropy, (x, labels'[, weights]))
    log_prob = R.permute_dims(R.reshape(lp, [N, d..., C]), ...)      # only when used

    # FusedLinearCrossEntropy(hidden [..., H], weight, labels [T][, bias[, weights]])
    loss = R.call_tir(rewriter_linear_cross_entropy, (R.reshape(hidden, [T, H]), Wp, labels'[, Bp][, weights]))

``labels'`` is the labels flattened, as int64. ``Wp`` is the weight in vocabulary panels and
``Bp`` the bias padded with ``-inf`` (:mod:`rewriter.backends.tvm.kernels.linear_cross_entropy`):
computed once in numpy when the weight (bias) is a constant of the module, as it is for an
exported model's initializers, else by ``permute_dims``/``concat``/``reshape`` at run time
(a copy of the weight, never of the logits). ``sum``/``mean`` losses come out of the kernel
as ``[1]`` and are reshaped to a scalar. The kernels are
:func:`rewriter.backends.tvm.kernels.cross_entropy.cross_entropy` and
:func:`rewriter.backends.tvm.kernels.linear_cross_entropy.linear_cross_entropy`.

>>> loss = emit_linear_cross_entropy(bb, h, w, y, None, None, attrs, target=target)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from rewriter.backends.tvm.ops import (
    OpCall,
    attribute_text,
    constant_value,
    register,
    scheduled_kernel,
    static_shape,
)
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# Names of the kernels' GlobalVars in the Relax module (tests look for them).
KERNEL_NAMES = {
    "FusedCrossEntropy": "rewriter_cross_entropy",
    "FusedLinearCrossEntropy": "rewriter_linear_cross_entropy",
}


def refusal(node: ir.Node) -> str:
    """Why our loss kernel cannot take ``node`` (a FusedCrossEntropy or
    FusedLinearCrossEntropy), or "" when it can: static float32 inputs, int64 or int32
    labels, a 2-D weight."""
    labels = 2 if node.op_type == "FusedLinearCrossEntropy" else 1
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        shape = value.shape
        if shape is None or not all(isinstance(dim, int) for dim in shape):
            return f"input {index} has no static shape"
        wanted = (ir.DataType.INT64, ir.DataType.INT32) if index == labels else (ir.DataType.FLOAT,)
        if value.dtype not in wanted:
            return f"input {index} is {value.dtype}, not {' or '.join(str(w) for w in wanted)}"
    if len(node.inputs) <= labels or node.inputs[0] is None or node.inputs[labels] is None:
        return "missing inputs"
    if node.op_type == "FusedLinearCrossEntropy" and (
        node.inputs[1] is None or len(node.inputs[1].shape or ()) != 2
    ):
        return "the weight is not 2-D"
    return ""


def drop_unused_log_prob(node: ir.Node) -> None:
    """Replace ``node`` (a FusedCrossEntropy) by one without its second output when nothing
    reads it, so that the kernel does not write the log-probabilities."""
    log_prob = node.outputs[1] if len(node.outputs) > 1 else None
    if log_prob is None or log_prob.uses() or log_prob.is_graph_output():
        return
    graph = node.graph
    assert graph is not None
    new = ir.node(
        node.op_type,
        list(node.inputs),
        attributes=dict(node.attributes),
        domain=node.domain,
        name=node.name,
        num_outputs=1,
    )
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
    )


@register(
    "FusedCrossEntropy",
    refusal=refusal,
    cpu_only=True,
    option="fuse_loss",
    before_import=drop_unused_log_prob,
)
def emit_fused_cross_entropy(call: OpCall) -> relax.Expr:
    """``FusedCrossEntropy(scores, labels[, weights])``: the loss, and the log-probabilities
    when the node has its second output."""
    return emit_cross_entropy(
        call.bb,
        call.input(0),
        call.input(1),
        call.input(2),
        call.attrs,
        log_prob=call.attrs["tvm_custom"]["num_outputs"] > 1,
        target=call.target,
    )


@register("FusedLinearCrossEntropy", refusal=refusal, cpu_only=True, option="fuse_loss")
def emit_fused_linear_cross_entropy(call: OpCall) -> relax.Expr:
    """``FusedLinearCrossEntropy(hidden, weight, labels[, bias[, weights]])``: the loss."""
    return emit_linear_cross_entropy(
        call.bb,
        call.input(0),
        call.input(1),
        call.input(2),
        call.input(3),
        call.input(4),
        call.attrs,
        target=call.target,
    )


def loss_options(attrs: Mapping[str, Any], weighted: bool) -> Any:
    """The kernels' ``LossOptions`` from the ONNX node's attributes."""
    from rewriter.backends.tvm.kernels.cross_entropy import LossOptions

    reduction = attribute_text(attrs.get("reduction", b"mean"))
    ignore = attrs.get("ignore_index")
    return LossOptions(reduction, None if ignore is None else int(ignore), weighted)


def _add_kernel(bb: relax.BlockBuilder, func: Any, name: str) -> Any:
    return bb.add_func(scheduled_kernel(func), name)


def _labels(bb: relax.BlockBuilder, labels: relax.Expr, rows: int) -> relax.Expr:
    from tvm import relax

    labels = bb.normalize(labels)
    if labels.ty.dtype not in ("int32", "int64"):
        raise InputError(f"loss kernel: labels must be int32 or int64, not {labels.ty.dtype}")
    flat = bb.emit(relax.op.reshape(labels, [rows]))
    return flat if labels.ty.dtype == "int64" else bb.emit(relax.op.astype(flat, "int64"))


def _shape(expr: relax.Expr, what: str) -> list[int]:
    shape = static_shape(expr)
    if shape is None or expr.ty.dtype != "float32":
        raise InputError(f"loss kernel: {what} must be a static float32 tensor")
    return shape


def _reshaped(bb: relax.BlockBuilder, loss: relax.Expr, shape: list[int]) -> relax.Expr:
    """The kernel's ``[rows]`` (``none``) or ``[1]`` loss in the op's output shape."""
    from tvm import relax

    return bb.emit(relax.op.reshape(loss, shape))


def emit_cross_entropy(
    bb: relax.BlockBuilder,
    scores: relax.Expr,
    labels: relax.Expr,
    weights: relax.Expr | None,
    attrs: Mapping[str, Any],
    *,
    log_prob: bool,
    target: tvm.target.Target,
) -> relax.Expr:
    """Emit ``FusedCrossEntropy`` into ``bb``: the loss, or ``(loss, log_prob)`` with ``log_prob``."""
    from tvm import relax

    from rewriter.backends.tvm.kernels.cross_entropy import cross_entropy

    scores = bb.normalize(scores)
    shape = _shape(scores, "scores")
    if len(shape) < 2:
        raise InputError("FusedCrossEntropy kernel: scores need a batch and a class axis")
    classes, rank = shape[1], len(shape)
    rows = int(np.prod([shape[0], *shape[2:]]))
    perm = [0, *range(2, rank), 1]
    moved = scores if rank == 2 else bb.emit(relax.op.permute_dims(scores, perm))
    x = moved if rank == 2 else bb.emit(relax.op.reshape(moved, [rows, classes]))
    args = [x, _labels(bb, labels, rows)]
    if weights is not None:
        _shape(weights, "weights")
        args.append(bb.normalize(weights))
    options = loss_options(attrs, weights is not None)
    func = cross_entropy(rows, classes, options=options, log_prob_output=log_prob, target=target)
    gvar = _add_kernel(bb, func, KERNEL_NAMES["FusedCrossEntropy"])
    loss_type = relax.TensorType([options.loss_rows(rows)], "float32")
    loss_shape = [shape[0], *shape[2:]] if options.reduction == "none" else []
    if not log_prob:
        loss = bb.emit(relax.call_tir(gvar, args, loss_type))
        return _reshaped(bb, loss, loss_shape)
    out_types = [loss_type, relax.TensorType([rows, classes], "float32")]
    both = bb.emit(relax.call_tir(gvar, args, out_types))
    loss = _reshaped(bb, bb.emit(relax.TupleGetItem(both, 0)), loss_shape)
    lp = bb.emit(relax.TupleGetItem(both, 1))
    if rank > 2:
        lp = bb.emit(relax.op.reshape(lp, [shape[0], *shape[2:], classes]))
        lp = bb.emit(relax.op.permute_dims(lp, [perm.index(axis) for axis in range(rank)]))
    return relax.Tuple([loss, lp])


def emit_linear_cross_entropy(
    bb: relax.BlockBuilder,
    hidden: relax.Expr,
    weight: relax.Expr,
    labels: relax.Expr,
    bias: relax.Expr | None,
    weights: relax.Expr | None,
    attrs: Mapping[str, Any],
    *,
    target: tvm.target.Target,
) -> relax.Expr:
    """Emit ``FusedLinearCrossEntropy`` into ``bb`` (its one output, the loss)."""
    from tvm import relax

    from rewriter.backends.tvm.kernels import linear_cross_entropy as kernel

    hidden, weight = bb.normalize(hidden), bb.normalize(weight)
    h_shape, w_shape = _shape(hidden, "hidden"), _shape(weight, "weight")
    transposed = bool(int(attrs.get("transpose_weight", 0)))
    if len(w_shape) != 2:
        raise InputError("FusedLinearCrossEntropy kernel: the weight must be 2-D")
    vocab, size = (w_shape[0], w_shape[1]) if transposed else (w_shape[1], w_shape[0])
    if h_shape[-1] != size:
        raise InputError(f"FusedLinearCrossEntropy kernel: hidden {h_shape} vs weight {w_shape}")
    tokens = int(np.prod(h_shape[:-1]))
    width = kernel.panel_width(target)
    padding = -vocab % width
    args = [
        bb.emit(relax.op.reshape(hidden, [tokens, size])),
        _packed_weight(bb, weight, transposed, vocab, size, width),
        _labels(bb, labels, tokens),
    ]
    biased = bias is not None or padding > 0
    if biased:
        args.append(_padded_bias(bb, bias, vocab, width))
    if weights is not None:
        _shape(weights, "weights")
        args.append(bb.normalize(weights))
    options = loss_options(attrs, weights is not None)
    func = kernel.linear_cross_entropy(
        tokens, size, vocab, options=options, biased=biased, target=target
    )
    gvar = _add_kernel(bb, func, KERNEL_NAMES["FusedLinearCrossEntropy"])
    loss = bb.emit(
        relax.call_tir(gvar, args, relax.TensorType([options.loss_rows(tokens)], "float32"))
    )
    labels_shape = static_shape(bb.normalize(labels)) or [tokens]
    return _reshaped(bb, loss, labels_shape if options.reduction == "none" else [])


def _packed_weight(
    bb: relax.BlockBuilder, weight: relax.Expr, transposed: bool, vocab: int, size: int, width: int
) -> relax.Expr:
    """``weight`` in ``[panels, hidden, width]`` panels: numpy for a constant, else Relax ops."""
    from tvm import relax

    from rewriter.backends.tvm.kernels.linear_cross_entropy import pack_weight

    constant = constant_value(weight)
    if constant is not None:
        return relax.const(pack_weight(constant, transposed=transposed, width=width))
    w = bb.emit(relax.op.permute_dims(weight, [1, 0])) if transposed else weight
    padding = -vocab % width
    if padding:
        zeros = relax.const(np.zeros((size, padding), np.float32))
        w = bb.emit(relax.op.concat([w, zeros], axis=1))
    panels = (vocab + padding) // width
    w = bb.emit(relax.op.reshape(w, [size, panels, width]))
    return bb.emit(relax.op.permute_dims(w, [1, 0, 2]))


def _padded_bias(
    bb: relax.BlockBuilder, bias: relax.Expr | None, vocab: int, width: int
) -> relax.Expr:
    """The bias (zeros when absent) padded with ``-inf`` to whole panels."""
    from tvm import relax

    from rewriter.backends.tvm.kernels.linear_cross_entropy import padded_bias

    if bias is None or constant_value(bias) is not None:
        return relax.const(padded_bias(constant_value(bias), vocab, width))
    bias = bb.normalize(bias)
    if static_shape(bias) != [vocab]:
        raise InputError(f"FusedLinearCrossEntropy kernel: the bias must be [{vocab}]")
    padding = -vocab % width
    if not padding:
        return bias
    pad = relax.const(np.full(padding, -np.inf, np.float32))
    return bb.emit(relax.op.concat([bias, pad], axis=0))
