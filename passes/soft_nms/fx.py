"""torchvision.ops.nms / batched_nms -> torch.ops.rewriter.soft_nms, on torch.fx.

The fx twin of ``soft-nms`` (Bodla et al. 2017, arXiv 1704.04503), with the ONNX pass's
name and ``Options``. Every call of ``torchvision.ops.nms(boxes, scores, iou)`` or
``batched_nms(boxes, scores, idxs, iou)`` (the Python functions, as a traced graph may
hold them, or the ``torchvision::nms`` op they call; ``torch.export`` writes
``batched_nms`` as that op on class-offset boxes) becomes
``torch.ops.rewriter.soft_nms(boxes, scores, idxs, iou, method, sigma) -> (keep,
decayed)``: ``keep`` has ``nms``'s meaning (box indices in order of selection, here
every box that is not removed), ``decayed`` the selected boxes' decayed scores. Where
the graph then indexes the scores with ``keep`` (``scores[keep]``, also after
``keep[:k]``), that becomes ``decayed`` (sliced as ``keep`` was); where not, a note says
so. ``torch.ops.rewriter.soft_nms`` computes :func:`rewriter.passes.soft_nms.math.soft_nms`
(no score threshold: torchvision's ``nms`` has none), has a fake implementation
(a data-dependent length) and no gradient (as torchvision's ``nms``), and exports
(:func:`rewriter.fx.export_onnx`, dynamo) to ``ai.rewriter::SoftNonMaxSuppression`` with
the ONNX pass's body. Approximate; exact with ``method=hard``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from rewriter.fx.export import register_onnx_export
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes.soft_nms import body
from rewriter.passes.soft_nms import math as snms
from rewriter.passes.soft_nms import onnx as onnx_soft_nms


@torch.library.custom_op("rewriter::soft_nms", mutates_args=())
def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor | None,
    iou_threshold: float,
    method: int,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of ``boxes [N, 4]`` (x1, y1, x2, y2) and ``scores [N]``, per class of
    ``idxs`` when given: ``(keep, decayed)``.

    >>> boxes = torch.tensor([[0.0, 0, 10, 10], [0, 2, 10, 12]])
    >>> keep, decayed = torch.ops.rewriter.soft_nms(boxes, torch.tensor([0.9, 0.8]), None, 0.5, 1, 0.5)
    >>> keep.tolist(), [round(x, 4) for x in decayed.tolist()]
    ([0, 1], [0.9, 0.2667])
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((0,), dtype=torch.int64), scores.new_zeros((0,))
    work = boxes.detach().float()
    if idxs is not None:  # torchvision's coordinate trick: classes never overlap
        offsets = idxs.to(work) * (work.max() + 1)
        work = work + offsets[:, None]
    selected, decayed = snms.soft_nms(
        work.cpu().numpy()[None],
        scores.detach().float().cpu().numpy()[None, None],
        len(scores),
        iou_threshold,
        None,
        method=_METHOD_NAMES[method],
        sigma=sigma,
    )
    keep = torch.from_numpy(np.ascontiguousarray(selected[:, 2])).to(boxes.device)
    return keep, torch.from_numpy(decayed).to(device=scores.device, dtype=scores.dtype)


@soft_nms.register_fake
def _soft_nms_fake(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor | None,
    iou_threshold: float,
    method: int,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64), scores.new_empty((count,))


_METHOD_NAMES = {code: name for name, code in snms.METHODS.items()}


@register_fx_pass
class SoftNmsFxPass(FxPass):
    """``torchvision.ops.nms`` / ``batched_nms`` -> ``torch.ops.rewriter.soft_nms``.

    >>> gm = torch.fx.symbolic_trace(postprocess)  # doctest: +SKIP
    >>> SoftNmsFxPass(SoftNmsOptions(method="linear"))(gm).stats  # doctest: +SKIP
    {'nms_replaced': 1, 'scores_rewired': 1, 'scores_not_found': 0}
    """

    name = onnx_soft_nms.SoftNmsPass.name
    exact = onnx_soft_nms.SoftNmsPass.exact
    Options = onnx_soft_nms.SoftNmsOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.exact = self.options.method == "hard"  # type: ignore[misc]

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        try:
            method = snms.method_code(self.options.method)
            sigma = snms.check_sigma(float(self.options.sigma))
        except ValueError as exc:
            from rewriter.errors import InputError

            raise InputError(f"{self.name}: {exc}") from exc
        graph = gm.graph
        replaced = rewired = 0
        notes: list[str] = []
        for node in list(graph.nodes):
            arguments = _nms_arguments(node)
            if arguments is None:
                continue
            boxes, scores, idxs, iou = arguments
            with graph.inserting_before(node):
                soft = graph.call_function(
                    torch.ops.rewriter.soft_nms.default, (boxes, scores, idxs, iou, method, sigma)
                )
                keep = graph.call_function(operator.getitem, (soft, 0))
                decayed = graph.call_function(operator.getitem, (soft, 1))
            keep.meta = dict(node.meta)
            node.replace_all_uses_with(keep)
            graph.erase_node(node)
            replaced += 1
            count = _rewire(graph, keep, decayed, scores)
            rewired += count
            if not count:
                notes.append(
                    f"{soft.name!r}: scores of the selected boxes not rewired: no scores[keep] follows it"
                )
                graph.erase_node(decayed)
        stats = {
            "nms_replaced": replaced,
            "scores_rewired": rewired,
            "scores_not_found": len(notes),
        }
        return FxPassResult(gm, bool(replaced), stats, notes)


def _nms_arguments(node: fx.Node) -> tuple[Any, Any, Any, Any] | None:
    """``(boxes, scores, idxs or None, iou_threshold)`` of an nms / batched_nms call."""
    if node.op != "call_function":
        return None
    target = node.target
    qualified = getattr(target, "_qualified_op_name", None) or _op_name(target)
    python = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", "")
    args = list(node.args) + [node.kwargs[k] for k in ("idxs", "iou_threshold") if k in node.kwargs]
    if qualified == "torchvision::nms" or (python.startswith("torchvision.ops") and name == "nms"):
        boxes, scores, iou = args[:3]
        return boxes, scores, None, iou
    if python.startswith("torchvision.ops") and name == "batched_nms":
        boxes, scores, idxs, iou = args[:4]
        return boxes, scores, idxs, iou
    return None


def _op_name(target: Any) -> str:
    """``namespace::name`` of an OpOverload (``torch.ops.torchvision.nms.default``)."""
    name = getattr(target, "name", None)
    return name() if callable(name) and isinstance(target, torch._ops.OpOverload) else ""


def _rewire(graph: fx.Graph, keep: fx.Node, decayed: fx.Node, scores: Any) -> int:
    """Replace ``scores[keep]`` (after slices of ``keep``) by ``decayed``, sliced alike."""
    replaced = 0
    for user in list(keep.users):
        index = _index_of(user, keep)
        if index == "gather" and user.args[0] is scores:
            user.replace_all_uses_with(decayed)
            graph.erase_node(user)
            replaced += 1
        elif index == "slice" and callable(user.target):
            with graph.inserting_after(user):
                sliced = graph.call_function(
                    user.target, (decayed, *user.args[1:]), dict(user.kwargs)
                )
            replaced += _rewire(graph, user, sliced, scores)
            if not sliced.users:
                graph.erase_node(sliced)
    return replaced


def _index_of(user: fx.Node, keep: fx.Node) -> str | None:
    """``"gather"`` for ``x[keep]``, ``"slice"`` for ``keep[a:b]`` along dim 0, else None."""
    if user.op != "call_function":
        return None
    if user.target is operator.getitem:
        if user.args[1] is keep:
            return "gather"
        if user.args[0] is keep and isinstance(user.args[1], slice):
            return "slice"
    if user.target is torch.ops.aten.index.Tensor and list(user.args[1]) == [keep]:  # type: ignore[arg-type]
        return "gather"
    if user.target is torch.ops.aten.slice.Tensor and user.args[0] is keep:
        dim = user.args[1] if len(user.args) > 1 else 0
        return "slice" if dim == 0 else None
    return None


def _dynamo_translations() -> dict[Any, Any]:
    """The onnxscript translation of ``rewriter::soft_nms`` for the dynamo exporter."""
    import onnx
    from onnxscript import opset18
    from onnxscript.values import Op, Opset

    from rewriter.pass_base import DOMAIN, DOMAIN_VERSION

    schema_type = onnx.defs.OpSchema
    op: Any = opset18
    schema = schema_type(
        body.OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[
            schema_type.FormalParameter("boxes", "T"),
            schema_type.FormalParameter("scores", "T"),
            schema_type.FormalParameter("max_output_boxes_per_class", "I"),
            schema_type.FormalParameter("iou_threshold", "T"),
            schema_type.FormalParameter("score_threshold", "T"),
        ],
        outputs=[
            schema_type.FormalParameter("selected_indices", "I"),
            schema_type.FormalParameter("selected_scores", "T"),
        ],
        type_constraints=[("T", ["tensor(float)"], "float32"), ("I", ["tensor(int64)"], "int64")],
        attributes=[
            schema_type.Attribute("center_point_box", schema_type.AttrType.INT, ""),
            schema_type.Attribute("method", schema_type.AttrType.INT, ""),
            schema_type.Attribute("sigma", schema_type.AttrType.FLOAT, ""),
        ],
    )
    target = Op(Opset(DOMAIN, DOMAIN_VERSION), body.OP_TYPE, schema)

    def translate(
        boxes: Any, scores: Any, idxs: Any, iou_threshold: float, method: int, sigma: float
    ) -> Any:
        boxes = op.Cast(boxes, to=onnx.TensorProto.FLOAT)
        if idxs is not None:  # the coordinate trick of batched_nms
            top = op.Add(op.ReduceMax(boxes, keepdims=0), op.Constant(value_float=1.0))
            offsets = op.Mul(op.Cast(idxs, to=onnx.TensorProto.FLOAT), top)
            boxes = op.Add(boxes, op.Unsqueeze(offsets, op.Constant(value_ints=[1])))
        selected, decayed = target(
            op.Unsqueeze(boxes, op.Constant(value_ints=[0])),
            op.Unsqueeze(
                op.Cast(scores, to=onnx.TensorProto.FLOAT), op.Constant(value_ints=[0, 1])
            ),
            op.Shape(scores),
            op.Constant(value_floats=[float(iou_threshold)]),
            op.Constant(value_floats=[-math.inf]),
            center_point_box=0,
            method=method,
            sigma=sigma,
        )
        keep = op.Gather(selected, op.Constant(value_int=2), axis=1)
        return keep, decayed

    return {torch.ops.rewriter.soft_nms.default: translate}


register_onnx_export(_dynamo_translations, {body.OP_TYPE: body.function_proto})
