"""The ONNX function body of ``SoftNonMaxSuppression``: standard ops of the caller's opset (>= 11).

``SoftNonMaxSuppression(boxes, scores, max_output_boxes_per_class, iou_threshold,
score_threshold) -> (selected_indices, selected_scores)`` with the attributes
``center_point_box`` (0 or 1, as NonMaxSuppression's), ``method`` (an INT:
:data:`rewriter.passes.soft_nms.math.METHODS`) and ``sigma`` (float). The math is
:mod:`rewriter.passes.soft_nms.math`. Every input and attribute must be given (the pass
and the fx export give the defaults of NonMaxSuppression where the model left them out):
an optional input or an unset attribute cannot be tested for inside a body at opset 11.

All ``B x C`` (batch, class) rows run at once: a ``Loop`` of at most
``min(max_output_boxes_per_class, N)`` steps, each picking every row's best box
(``ArgMax``, first of equal scores), its IoU with the row's boxes (``[B*C, N]``) and the
decay, and ending early when no row has a box above ``score_threshold``. The picks of
each step are scan outputs; ``Compress`` keeps the valid ones, ordered by row (batch,
then class) and then by step. Only ops of opset 11 (``Reshape`` for every rank change:
``Unsqueeze`` changed signature at 13), all float32 (NonMaxSuppression takes float only).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from rewriter.function_body import FunctionBody, Ref
from rewriter.passes.soft_nms.math import METHODS

OP_TYPE = "SoftNonMaxSuppression"
INPUTS = ["boxes", "scores", "max_output_boxes_per_class", "iou_threshold", "score_threshold"]
OUTPUTS = ["selected_indices", "selected_scores"]
ATTRIBUTES = ["center_point_box", "method", "sigma"]
# The opset whose Loop, Range, GatherElements and Compress the body uses.
MIN_OPSET = 11


def function_proto(opset: int) -> onnx.FunctionProto:
    """The body of ``SoftNonMaxSuppression`` at ``opset`` (>= 11).

    >>> [o for o in function_proto(17).output]
    ['selected_indices', 'selected_scores']
    """
    if opset < MIN_OPSET:
        raise ValueError(f"the SoftNonMaxSuppression body needs opset >= {MIN_OPSET}, got {opset}")
    body = FunctionBody(opset)
    # Sizes (1-D int64 of one element): B, C, N, rows = B * C.
    shape = body.node("Shape", ["scores"], "shape")
    starts = [body.const(f"at{i}", [i]) for i in range(4)]
    b, c, n = (
        body.node("Slice", [shape, starts[i], starts[i + 1]], name) for i, name in enumerate("bcn")
    )
    rows = body.node("Mul", [b, c], "rows")
    minus_one = body.const("minus_one", [-1])
    row_shape = body.node("Concat", [rows, n], "row_shape", axis=0)

    # Box geometry per row [rows, N] (ONNX Runtime's: see math.corners).
    center = body.node(
        "Equal",
        [_int_attribute(body, "center_point_box"), body.const("center_code", [1])],
        "center",
    )
    coord = [
        body.node("Gather", ["boxes", body.const(f"k{i}", [i])], f"coord{i}", axis=2)
        for i in range(4)
    ]
    two = body.const("two", 2.0)
    half_a = body.node("Div", [coord[2], two], "half_a")
    half_b = body.node("Div", [coord[3], two], "half_b")
    geometry = {
        "a_min": ("Min", [coord[0], coord[2]], "Sub", [coord[0], half_a]),
        "b_min": ("Min", [coord[1], coord[3]], "Sub", [coord[1], half_b]),
        "a_max": ("Max", [coord[0], coord[2]], "Add", [coord[0], half_a]),
        "b_max": ("Max", [coord[1], coord[3]], "Add", [coord[1], half_b]),
    }
    per_batch = {}
    for name, (corner_op, corner_in, center_op, center_in) in geometry.items():
        corner = body.node(corner_op, corner_in, f"{name}_corner")
        centered = body.node(center_op, center_in, f"{name}_center")
        per_batch[name] = body.node("Where", [center, centered, corner], f"{name}_b")
    per_batch["area"] = body.node(
        "Mul",
        [
            body.node("Sub", [per_batch["a_max"], per_batch["a_min"]], "extent_a"),
            body.node("Sub", [per_batch["b_max"], per_batch["b_min"]], "extent_b"),
        ],
        "area_b",
    )
    one_c = body.const("one_c", [1])
    batch_shape = body.node("Concat", [b, one_c, n], "batch_shape", axis=0)
    per_row = {}
    for name, value in per_batch.items():
        spread = body.node(
            "Expand",
            [body.node("Reshape", [value, batch_shape], f"{name}_b1n"), shape],
            f"{name}_bcn",
        )
        per_row[name] = body.node("Reshape", [spread, row_shape], name)

    scores = body.node("Reshape", ["scores", row_shape], "scores_rows")
    pair = body.const("pair", [1, 1])
    iou_threshold = body.node("Reshape", ["iou_threshold", pair], "iou_thr")
    score_threshold = body.node("Reshape", ["score_threshold", pair], "score_thr")
    method = _int_attribute(body, "method")
    is_hard = body.node("Equal", [method, body.const("hard", [METHODS["hard"]])], "is_hard")
    is_gaussian = body.node(
        "Equal", [method, body.const("gaussian", [METHODS["gaussian"]])], "is_gaussian"
    )
    sigma = _float_attribute(body, "sigma")
    zero_i = body.const("zero_i", 0, dtype=TensorProto.INT64)
    one_i = body.const("one_i", 1, dtype=TensorProto.INT64)
    positions = body.node(
        "Reshape",
        [
            body.node(
                "Range",
                [
                    zero_i,
                    body.node("Reshape", [n, body.const("scalar_n", [])], "n_scalar"),
                    one_i,
                ],
                "range_n",
            ),
            body.node("Concat", [one_c, n], "one_n", axis=0),
        ],
        "positions",
    )

    # Trip count: min(max(max_output_boxes_per_class, 0), N), a scalar.
    limit = body.node("Reshape", ["max_output_boxes_per_class", one_c], "limit")
    limit = body.node("Where", [body.node("Less", [limit, n], "limit_lt_n"), limit, n], "limit_n")
    zero_c = body.const("zero_c", [0])
    limit = body.node(
        "Where", [body.node("Less", [limit, zero_c], "limit_neg"), zero_c, limit], "limit_pos"
    )
    trips = body.node("Reshape", [limit, body.const("scalar_shape", [])], "trips")
    keep_going = body.node(
        "Constant", [], "keep_going", value=helper.make_tensor("t", TensorProto.BOOL, [], [True])
    )

    step = _step_graph(
        opset,
        per_row,
        positions=positions,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        is_hard=is_hard,
        is_gaussian=is_gaussian,
        sigma=sigma,
    )
    loop = helper.make_node(
        "Loop",
        [trips, keep_going, scores],
        ["final_scores", "picks", "pick_scores", "pick_valid"],
        body=step,
    )
    body.nodes.append(loop)

    # Scan outputs [steps, rows] -> [rows, steps] -> flat, kept where valid.
    steps_by_rows = body.node("Concat", [minus_one, rows], "steps_by_rows", axis=0)
    flat = {}
    for name in ("picks", "pick_scores", "pick_valid"):
        grid = body.node("Reshape", [name, steps_by_rows], f"{name}_grid")
        by_row = body.node("Transpose", [grid], f"{name}_by_row", perm=[1, 0])
        flat[name] = body.node("Reshape", [by_row, minus_one], f"{name}_flat")
    grid_shape = body.node("Shape", ["picks_by_row"], "grid_shape")
    rows_scalar = body.node("Reshape", [rows, body.const("scalar_rows", [])], "rows_scalar")
    row = body.node("Range", [zero_i, rows_scalar, one_i], "row")
    row_col = body.node("Reshape", [row, body.const("col", [-1, 1])], "row_col")
    batch_of = body.node("Div", [row_col, c], "batch_of_row")
    class_of = body.node(
        "Sub", [row_col, body.node("Mul", [batch_of, c], "batch_times_c")], "class_of_row"
    )
    column = body.const("column", [-1, 1])
    triple = body.node(
        "Concat",
        [
            body.node(
                "Reshape",
                [body.node("Expand", [batch_of, grid_shape], "batch_grid"), column],
                "batch_col",
            ),
            body.node(
                "Reshape",
                [body.node("Expand", [class_of, grid_shape], "class_grid"), column],
                "class_col",
            ),
            body.node("Reshape", [flat["picks"], column], "box_col"),
        ],
        "triples",
        axis=1,
    )
    body.node("Compress", [triple, flat["pick_valid"]], "selected_indices", axis=0)
    body.node("Compress", [flat["pick_scores"], flat["pick_valid"]], "selected_scores", axis=0)
    return body.function(
        OP_TYPE,
        INPUTS,
        OUTPUTS,
        attributes=ATTRIBUTES,
        doc=(
            "Soft-NMS (Bodla et al. 2017): NonMaxSuppression whose overlapping boxes are "
            "decayed (method 2: gaussian, 1: linear) or removed (0: hard), and the decayed "
            "score of each selected box as a second output."
        ),
    )


def _int_attribute(body: FunctionBody, name: str) -> str:
    """The INT attribute ``name`` as a 1-D int64 tensor of one element.

    ``Constant<value_int>`` exists from opset 12; at 11, ``EyeLike<k=name>`` of a 1 x 4
    tensor has its one at column ``name`` and ``ArgMax`` finds it (exact for 0..3, which
    covers ``center_point_box`` and ``method``).
    """
    if body.opset >= 12:
        value = body.node("Constant", [], f"attr_{name}", value_int=Ref(name, "INT"))
        return body.node("Reshape", [value, body.const(f"attr_{name}_shape", [1])], f"{name}_value")
    row = helper.make_tensor(f"attr_{name}_row", TensorProto.FLOAT, [1, 4], [0.0] * 4)
    zeros = body.node("Constant", [], f"attr_{name}_row", value=row)
    eye = body.node("EyeLike", [zeros], f"attr_{name}_eye", k=Ref(name, "INT"))
    return body.node("ArgMax", [eye], f"{name}_value", axis=1, keepdims=0)


def _float_attribute(body: FunctionBody, name: str) -> str:
    """The FLOAT attribute ``name`` as a float32 scalar.

    ``Constant<value_float>`` exists from opset 12; at 11, ``LeakyRelu<alpha=name>(-1)``
    is ``-name`` exactly, and ``Neg`` gives it back.
    """
    if body.opset >= 12:
        return body.node("Constant", [], f"attr_{name}", value_float=Ref(name, "FLOAT"))
    minus_one = body.const(f"attr_{name}_minus_one", -1.0)
    negated = body.node("LeakyRelu", [minus_one], f"attr_{name}_negated", alpha=Ref(name, "FLOAT"))
    return body.node("Neg", [negated], f"attr_{name}")


def _step_graph(
    opset: int,
    per_row: dict[str, str],
    *,
    positions: str,
    iou_threshold: str,
    score_threshold: str,
    is_hard: str,
    is_gaussian: str,
    sigma: str,
) -> onnx.GraphProto:
    """The Loop body: one selection in every row (outer-scope values by name; the body's
    own names start with ``step_`` so that none shadows one of the function)."""
    step = FunctionBody(opset)
    best = step.node("ArgMax", ["s_in"], "step_best", axis=1, keepdims=1)
    best_score = step.node("GatherElements", ["s_in", best], "step_best_score", axis=1)
    valid = step.node("Greater", [best_score, score_threshold], "step_valid")
    chosen = {
        name: step.node("GatherElements", [value, best], f"step_chosen_{name}", axis=1)
        for name, value in per_row.items()
    }
    extent_a = step.node(
        "Sub",
        [
            step.node("Min", [per_row["a_max"], chosen["a_max"]], "step_top_a"),
            step.node("Max", [per_row["a_min"], chosen["a_min"]], "step_bottom_a"),
        ],
        "step_inter_a",
    )
    extent_b = step.node(
        "Sub",
        [
            step.node("Min", [per_row["b_max"], chosen["b_max"]], "step_top_b"),
            step.node("Max", [per_row["b_min"], chosen["b_min"]], "step_bottom_b"),
        ],
        "step_inter_b",
    )
    inter = step.node("Mul", [extent_a, extent_b], "step_inter")
    union = step.node(
        "Sub",
        [step.node("Add", [per_row["area"], chosen["area"]], "step_areas"), inter],
        "step_union",
    )
    zero = step.const("step_zero", 0.0)
    positive = [
        step.node("Greater", [value, zero], f"step_{value.removeprefix('step_')}_pos")
        for value in (extent_a, extent_b, inter, per_row["area"], chosen["area"], union)
    ]
    overlap = positive[0]
    for index, flag in enumerate(positive[1:]):
        overlap = step.node("And", [overlap, flag], f"step_overlap{index}")
    iou = step.node(
        "Where", [overlap, step.node("Div", [inter, union], "step_ratio"), zero], "step_iou"
    )
    over = step.node("Greater", [iou, iou_threshold], "step_over")
    one = step.const("step_one", 1.0)
    gaussian = step.node(
        "Exp",
        [
            step.node(
                "Div",
                [
                    step.node(
                        "Neg", [step.node("Mul", [iou, iou], "step_iou_sq")], "step_neg_iou_sq"
                    ),
                    sigma,
                ],
                "step_exponent",
            )
        ],
        "step_gaussian",
    )
    linear = step.node(
        "Where", [over, step.node("Sub", [one, iou], "step_one_minus_iou"), one], "step_linear"
    )
    weight = step.node("Where", [is_gaussian, gaussian, linear], "step_weight")
    decayed = step.node("Mul", ["s_in", weight], "step_decayed")
    # Removed: suppressed (hard), just picked, or removed before (-inf times a weight of 0,
    # linear's 1 - IoU of a duplicate box, would be NaN).
    minus_inf = step.const("step_minus_inf", float("-inf"))
    dropped = step.node(
        "Or",
        [
            step.node("And", [is_hard, over], "step_suppressed"),
            step.node("Equal", [positions, best], "step_picked"),
        ],
        "step_dropped",
    )
    stale = step.node("Equal", ["s_in", minus_inf], "step_stale")
    removed = step.node("Or", [dropped, stale], "step_removed")
    updated = step.node("Where", [removed, minus_inf, decayed], "step_updated")
    step.node("Where", [valid, updated, "s_in"], "s_out")
    flat = step.const("step_flat", [-1])
    step.node("Reshape", [best, flat], "pick")
    step.node("Reshape", [best_score, flat], "pick_score")
    step.node("Reshape", [valid, flat], "pick_valid_step")
    any_valid = step.node("Cast", [valid], "step_valid_i", to=TensorProto.INT32)
    step.node(
        "Cast",
        [
            step.node(
                "Reshape",
                [
                    step.reduce("ReduceMax", any_valid, [0, 1], "step_any_valid"),
                    step.const("step_scalar", []),
                ],
                "step_any_scalar",
            )
        ],
        "cond_out",
        to=TensorProto.BOOL,
    )
    value = helper.make_tensor_value_info
    return helper.make_graph(
        step.nodes,
        "soft_nms_step",
        [
            value("iteration", TensorProto.INT64, []),
            value("cond_in", TensorProto.BOOL, []),
            value("s_in", TensorProto.FLOAT, ["rows", "boxes"]),
        ],
        [
            value("cond_out", TensorProto.BOOL, []),
            value("s_out", TensorProto.FLOAT, ["rows", "boxes"]),
            value("pick", TensorProto.INT64, ["rows"]),
            value("pick_score", TensorProto.FLOAT, ["rows"]),
            value("pick_valid_step", TensorProto.BOOL, ["rows"]),
        ],
    )
