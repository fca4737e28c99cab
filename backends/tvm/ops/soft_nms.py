"""``ai.rewriter::SoftNonMaxSuppression`` as ``call_tir`` to our Soft-NMS kernels.

For static float32 ``boxes [B, N, 4]`` and ``scores [B, C, N]``, in Relax::

    picks, picked, counts, total = R.call_tir(rewriter_soft_nms,
        (boxes, scores, limit, iou, threshold))      # [B*C, K] per row, K <= N
    m = R.match_cast(R.tensor_to_shape(total), R.Shape([m]))
    selected, scores = R.call_tir(rewriter_soft_nms_compact,
        (picks, picked, counts, m), [R.Tensor((m, 3), "int64"), R.Tensor((m,), "float32")])

The kernels are :mod:`rewriter.backends.tvm.kernels.soft_nms` (CPU) and
:mod:`rewriter.backends.tvm.kernels.soft_nms_cuda` (CUDA); ``K`` is
``min(max_output_boxes_per_class, N)`` when that input is a constant, else ``N``.
Nodes whose boxes or scores are not static float32 are refused (:func:`refusal`) and
left to the op's function body, whose data-dependent ``Loop`` TVM's importer cannot take:
the compile stops with a clean error (fix the shapes with ``dims`` / ``--dim``).

>>> selected, scores = emit_soft_nms(bb, boxes, scores, limit, iou, threshold, ...)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from rewriter.backends.tvm.ops import (
    OpCall,
    constant_value,
    register,
    scheduled_kernel,
    static_shape,
)
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm
    from tvm import relax

# Names of the kernels' GlobalVars in the Relax module (tests look for them).
KERNEL_NAME = "rewriter_soft_nms"
COMPACT_NAME = "rewriter_soft_nms_compact"


def refusal(node: ir.Node) -> str:
    """Why the kernel cannot take ``node``: "" when boxes [B, N, 4] and scores [B, C, N]
    are static float32."""
    if len(node.inputs) < 5 or any(value is None for value in node.inputs[:5]):
        return "inputs missing"
    for value, rank in zip(node.inputs[:2], (3, 3), strict=True):
        assert value is not None
        shape = value.shape
        if shape is None or len(shape) != rank or not all(isinstance(d, int) for d in shape):
            return "boxes or scores not static"
        if value.dtype != ir.DataType.FLOAT:
            return "boxes or scores not float32"
    return ""


@register("SoftNonMaxSuppression", refusal=refusal)
def emit(call: OpCall) -> relax.Expr:
    """``SoftNonMaxSuppression(boxes, scores, limit, iou, threshold; center_point_box,
    method, sigma)`` from the ONNX front."""
    boxes, scores, limit, iou, threshold = call.inputs[:5]
    assert boxes is not None and scores is not None
    return emit_soft_nms(
        call.bb,
        boxes,
        scores,
        limit,
        iou,
        threshold,
        method=int(call.attrs.get("method", 2)),
        sigma=float(call.attrs.get("sigma", 0.5)),
        center_point_box=int(call.attrs.get("center_point_box", 0)),
        target=call.target,
    )


def emit_soft_nms(
    bb: relax.BlockBuilder,
    boxes: relax.Expr,
    scores: relax.Expr,
    limit: relax.Expr | None,
    iou: relax.Expr | None,
    threshold: relax.Expr | None,
    *,
    method: int,
    sigma: float,
    center_point_box: int,
    target: tvm.target.Target,
) -> relax.Expr:
    """Emit the op into ``bb``: a tuple ``(selected [m, 3] int64, scores [m] float32)``."""
    from tvm import relax, tirx

    from rewriter.backends.tvm.kernels import soft_nms as cpu_kernel
    from rewriter.backends.tvm.kernels import soft_nms_cuda as cuda_kernel

    boxes, scores = bb.normalize(boxes), bb.normalize(scores)
    box_shape, score_shape = static_shape(boxes), static_shape(scores)
    if (
        box_shape is None
        or score_shape is None
        or len(box_shape) != 3
        or len(score_shape) != 3
        or box_shape[2] != 4
        or box_shape[0] != score_shape[0]
        or box_shape[1] != score_shape[2]
        or boxes.ty.dtype != "float32"
        or scores.ty.dtype != "float32"
    ):
        raise InputError(
            "SoftNonMaxSuppression kernel: boxes [B, N, 4], scores [B, C, N], static float32"
        )
    batches, count, _ = box_shape
    classes = score_shape[1]
    bound = constant_value(limit)
    k = count if bound is None else int(min(max(int(bound.reshape(-1)[0]), 0), count))
    scalars = [
        _one(bb, value, dtype, default)
        for value, dtype, default in (
            (limit, "int64", 0),
            (iou, "float32", 0.0),
            (threshold, "float32", -np.inf),
        )
    ]
    cuda = target.kind.name == "cuda"
    factory = cuda_kernel.soft_nms_cuda if cuda else cpu_kernel.soft_nms
    func = factory(
        batches,
        classes,
        count,
        k,
        method=method,
        sigma=sigma,
        center_point_box=center_point_box,
        target=target,
    )
    rows, width = batches * classes, max(1, k)
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    picks = bb.emit(
        relax.call_tir(
            gvar,
            [boxes, scores, *scalars],
            [
                relax.TensorType([rows, width], "int64"),
                relax.TensorType([rows, width], "float32"),
                relax.TensorType([rows], "int64"),
                relax.TensorType([1], "int64"),
                # CUDA: the rows' current scores (scratch, dropped)
                *([relax.TensorType([rows, count], "float32")] if cuda else []),
            ],
        )
    )
    total = bb.emit(relax.TupleGetItem(picks, 3))  # read by the host: it decides a shape
    m = tirx.Var("m", "int64")
    bb.match_cast(bb.emit(relax.op.tensor_to_shape(total)), relax.ShapeType([m]))
    compact = cuda_kernel.compact_cuda if cuda else cpu_kernel.compact
    cvar = bb.add_func(scheduled_kernel(compact(batches, classes, k)), COMPACT_NAME)
    return bb.emit(
        relax.call_tir(
            cvar,
            [*(bb.emit(relax.TupleGetItem(picks, i)) for i in range(3)), relax.prim_value(m)],
            [relax.TensorType([m, 3], "int64"), relax.TensorType([m], "float32")],
        )
    )


def _one(
    bb: relax.BlockBuilder, value: relax.Expr | None, dtype: str, default: float
) -> relax.Expr:
    """A scalar input (shape [] or [1]) as a [1] tensor of ``dtype`` (``default`` if absent)."""
    from tvm import relax

    if value is None:
        return relax.const(np.array([default], dtype))
    value = bb.normalize(value)
    if value.ty.dtype != dtype:
        value = bb.emit(relax.op.astype(value, dtype))
    return bb.emit(relax.op.reshape(value, [1]))
