"""Test data of the soft-nms tests: NonMaxSuppression models, crowded scenes, and a
comparison of selections that allows near-ties to break either way."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from rewriter.pass_base import DOMAIN
from rewriter.passes.soft_nms import OP_TYPE, function_proto

# Decayed scores computed in float32 by two implementations (ONNX Runtime's Exp or our
# polynomial vs numpy's expf; the same IoU arithmetic) drift by a few ulp per decay
# step: 1e-5 relative bounds ~80 steps of 1.2e-7, with room.
SCORE_RTOL = 1e-5


@functools.cache
def conformance_cases() -> dict[
    str, tuple[onnx.ModelProto, list[tuple[list[np.ndarray], list[np.ndarray]]]]
]:
    """The ONNX conformance cases of NonMaxSuppression, by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import onnx.backend.test.case.node as node_cases

        collected = node_cases.collect_testcases(None)
    return {
        case.name: (case.model, case.data_sets)
        for case in collected
        if case.name.startswith("test_nonmaxsuppression_")
    }


def feeds_of(proto: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {info.name: value for info, value in zip(proto.graph.input, inputs, strict=True)}


def soft_model(
    method: int, *, opset: int = 17, center_point_box: int = 0, sigma: float = 0.5
) -> onnx.ModelProto:
    """One ``SoftNonMaxSuppression`` node with its body (inputs boxes, scores, m, iou, score)."""
    node = helper.make_node(
        OP_TYPE,
        ["boxes", "scores", "m", "iou", "score"],
        ["selected", "decayed"],
        domain=DOMAIN,
        center_point_box=center_point_box,
        method=method,
        sigma=sigma,
    )
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "soft_nms",
        [
            value("boxes", TensorProto.FLOAT, ["b", "n", 4]),
            value("scores", TensorProto.FLOAT, ["b", "c", "n"]),
            value("m", TensorProto.INT64, [1]),
            value("iou", TensorProto.FLOAT, [1]),
            value("score", TensorProto.FLOAT, [1]),
        ],
        [
            value("selected", TensorProto.INT64, ["k", 3]),
            value("decayed", TensorProto.FLOAT, ["k"]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=[function_proto(opset)],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def crowded_scene(
    seed: int,
    *,
    batches: int = 2,
    classes: int = 2,
    objects: int = 6,
    per_object: int = 8,
    clutter: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [B, N, 4] (y1, x1, y2, x2) and scores [B, C, N]: heavily overlapping objects,
    each with jittered detections, plus false positives anywhere."""
    rng = np.random.default_rng(seed)
    count = objects * per_object + clutter
    boxes = np.empty((batches, count, 4), np.float32)
    for b in range(batches):
        centers = rng.uniform(30, 70, (objects, 2))  # a crowd: objects overlap each other
        sizes = rng.uniform(15, 40, (objects, 2))
        jitter = rng.normal(0, 0.08, (objects, per_object, 4)) * np.tile(sizes, 2)[:, None, :]
        lo = centers - sizes / 2
        hi = centers + sizes / 2
        true = np.concatenate([lo, hi], axis=1)[:, None, :] + jitter
        fake_lo = rng.uniform(0, 90, (clutter, 2))
        fake = np.concatenate([fake_lo, fake_lo + rng.uniform(5, 30, (clutter, 2))], axis=1)
        boxes[b] = np.concatenate([true.reshape(-1, 4), fake])
    scores = rng.uniform(0.05, 1.0, (batches, classes, count)).astype(np.float32)
    return boxes, scores


def assert_same_selection(
    got: tuple[np.ndarray, np.ndarray],
    expected: tuple[np.ndarray, np.ndarray],
    rtol: float = SCORE_RTOL,
) -> None:
    """The same triples in the same order and decayed scores within ``rtol``, except that
    from a near-tie on (two scores within ``rtol``, which rounding may order either way)
    the rest of that (batch, class) may differ."""
    got_idx, got_scores = got
    exp_idx, exp_scores = expected
    groups: dict[tuple[int, int], list[Any]] = {}
    for idx, scores, key in ((got_idx, got_scores, 0), (exp_idx, exp_scores, 1)):
        for row, score in zip(idx.tolist(), scores.tolist(), strict=True):
            groups.setdefault((row[0], row[1]), [[], []])[key].append((row[2], score))
    for group, (mine, theirs) in groups.items():
        for (box_a, score_a), (box_b, score_b) in zip(mine, theirs, strict=False):
            if box_a != box_b:
                assert abs(score_a - score_b) <= rtol * max(abs(score_a), abs(score_b)), (
                    f"{group}: box {box_a} ({score_a}) vs {box_b} ({score_b}): not a near-tie"
                )
                break
            assert abs(score_a - score_b) <= rtol * abs(score_b) + 1e-30, (
                group,
                box_a,
                score_a,
                score_b,
            )
        else:
            assert len(mine) == len(theirs), (group, len(mine), len(theirs))


def nms_model_text(opset: int = 17) -> str:
    """A torchvision-style export: NMS on 1-D scores unsqueezed, keep = selected[:, 2],
    keep[:2], then scores[keep] and boxes[keep]."""
    return f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[n, 4] boxes, float[n] scores) => (float[k] kept_scores, float[k, 4] kept_boxes) {{
            zero = Constant <value = int64[1] {{0}}> ()
            b3 = Unsqueeze (boxes, zero)
            s2 = Unsqueeze (scores, zero)
            s3 = Unsqueeze (s2, zero)
            most = Constant <value = int64[1] {{100}}> ()
            iou = Constant <value = float[1] {{0.5}}> ()
            selected = NonMaxSuppression (b3, s3, most, iou)
            two = Constant <value = int64[1] {{2}}> ()
            column = Gather <axis = 1> (selected, two)
            one = Constant <value = int64[1] {{1}}> ()
            keep = Squeeze (column, one)
            start = Constant <value = int64[1] {{0}}> ()
            stop = Constant <value = int64[1] {{2}}> ()
            top = Slice (keep, start, stop, zero)
            kept_scores = Gather <axis = 0> (scores, top)
            kept_boxes = Gather <axis = 0> (boxes, top)
        }}
        """


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)
