"""NonMaxSuppression(boxes, scores, ...) -> SoftNonMaxSuppression(boxes, scores, ...): Soft-NMS.

Implements Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code"
(ICCV 2017, arXiv 1704.04503): instead of deleting every box that overlaps a selected
one by more than ``iou_threshold``, decay its score, by ``exp(-IoU**2 / sigma)``
(``method=gaussian``, every box) or by ``1 - IoU`` (``method=linear``, where IoU >
``iou_threshold``). ``method=hard`` removes them: exactly ONNX NonMaxSuppression. The
math, ties and IoU are in :mod:`rewriter.passes.soft_nms.math`.

Every ``NonMaxSuppression`` node, in the main graph, its subgraphs (torchvision's
``batched_nms`` exports into an ``If`` branch) and model-local functions, becomes
``ai.rewriter::SoftNonMaxSuppression`` with the same inputs (absent optional ones given
their NonMaxSuppression defaults: 0 boxes, IoU threshold 0, no score threshold, i.e.
``-inf``), ``center_point_box``, the ``method`` code and ``sigma``. Output 0 has
NonMaxSuppression's meaning (selected ``[batch, class, box]``, in order of selection);
output 1 holds the decayed score of each selected box. Where the graph then gathers the
scores of the selected boxes (:mod:`rewriter.passes.soft_nms.scores`), the gather is
replaced by output 1; where that pattern is not found, a note says so.

Approximate (gaussian, linear): the detections change, which is the point; exact with
``method=hard``. Requires: default-domain opset >= 11 (Loop, Range, GatherElements).
Ensures: each ``ai.rewriter::SoftNonMaxSuppression`` has its function body
(:mod:`rewriter.passes.soft_nms.body`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN, RewritePass, RewriteResult, add_function, all_nodes
from rewriter.passes.soft_nms import math as snms
from rewriter.passes.soft_nms import scores as score_rewire
from rewriter.passes.soft_nms.body import MIN_OPSET, OP_TYPE, function_proto
from rewriter.registry import register


@dataclasses.dataclass
class SoftNmsOptions:
    """Options of ``soft-nms``.

    method: ``gaussian`` (decay every box by exp(-IoU**2 / sigma)), ``linear`` (by
    1 - IoU above the IoU threshold) or ``hard`` (remove them: ONNX NonMaxSuppression).
    sigma: of the Gaussian decay (the paper's 0.5).
    """

    method: str = snms.DEFAULT_METHOD
    sigma: float = snms.DEFAULT_SIGMA


@register
class SoftNmsPass(RewritePass):
    """Replace NonMaxSuppression by Soft-NMS (Bodla et al. 2017).

    >>> result = SoftNmsPass(SoftNmsOptions(method="linear"))(model)  # doctest: +SKIP
    >>> result.stats  # doctest: +SKIP
    {'nms_replaced': 1, 'scores_rewired': 1, 'scores_not_found': 0}
    """

    name = "soft-nms"
    exact = False
    description = (
        "NonMaxSuppression -> Soft-NMS, Gaussian or linear score decay (Bodla et al. 2017)"
    )
    min_opset = MIN_OPSET
    Options = SoftNmsOptions

    def __init__(self, options: SoftNmsOptions | None = None) -> None:
        super().__init__(options)
        # method=hard is ONNX NonMaxSuppression: verified as an exact rewrite.
        self.exact = self.options.method == "hard"  # type: ignore[misc]

    def applies_to(self, model: ir.Model) -> bool:
        return any(_is_nms(node) for node in all_nodes(model))

    def call(self, model: ir.Model) -> RewriteResult:
        try:
            method = snms.method_code(self.options.method)
            sigma = snms.check_sigma(float(self.options.sigma))
        except ValueError as exc:
            raise InputError(f"{self.name}: {exc}") from exc
        nodes = [node for node in all_nodes(model) if _is_nms(node)]
        owners = score_rewire.branch_owners(model)
        notes: list[str] = []
        rewired = not_found = 0
        for node in nodes:
            soft = _replace(node, method, sigma)
            count, why = score_rewire.rewire(soft, owners)
            rewired += count
            if why:
                not_found += 1
                notes.append(f"{soft.name!r}: scores of the selected boxes not rewired: {why}")
        if nodes:
            add_function(model, function_proto(model.opset_imports.get("", 1)))
        stats = {
            "nms_replaced": len(nodes),
            "scores_rewired": rewired,
            "scores_not_found": not_found,
        }
        return RewriteResult(model, bool(nodes), stats=stats, notes=notes)


def _is_nms(node: ir.Node) -> bool:
    return node.op_type == "NonMaxSuppression" and node.domain in ("", "ai.onnx")


# NonMaxSuppression's defaults of its optional inputs 2, 3 and 4 (no score threshold:
# every box is a candidate, which -inf gives the body: see math).
_DEFAULTS: tuple[tuple[str, np.ndarray], ...] = (
    ("max_output_boxes_per_class", np.array([0], np.int64)),
    ("iou_threshold", np.array([0.0], np.float32)),
    ("score_threshold", np.array([-np.inf], np.float32)),
)


def _replace(node: ir.Node, method: int, sigma: float) -> ir.Node:
    """Put a SoftNonMaxSuppression in the place of the NonMaxSuppression ``node``."""
    graph = node.graph
    assert graph is not None
    inputs: list[ir.Value | None] = list(node.inputs[:2])
    constants = []
    for index, (name, default) in enumerate(_DEFAULTS, start=2):
        given = node.inputs[index] if index < len(node.inputs) else None
        if given is None:
            constant = ir.node(
                "Constant", [], attributes={"value": ir.tensor(default, name=f"{node.name}_{name}")}
            )
            constants.append(constant)
            given = constant.outputs[0]
        inputs.append(given)
    soft = ir.node(
        OP_TYPE,
        inputs,
        attributes={
            "center_point_box": node.attributes.get_int("center_point_box", 0),
            "method": method,
            "sigma": sigma,
        },
        domain=DOMAIN,
        num_outputs=2,
        name=f"{node.name}_soft" if node.name else None,
    )
    decayed = soft.outputs[1]
    decayed.name = f"{node.outputs[0].name}_decayed_scores"
    decayed.dtype, decayed.shape = ir.DataType.FLOAT, ir.Shape([None])
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [*constants, soft], [node.outputs[0]], [soft.outputs[0]]
    )
    return soft
