"""The math of Soft-NMS, shared by the ONNX body, the fx custom op, the kernels and tests.

Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code" (ICCV 2017,
arXiv 1704.04503). Per batch ``b`` and class ``c``, with ``s`` the class's scores:

1. pick the box ``i`` with the highest current score (ties to the lower box index);
2. stop when ``s[i]`` is not above ``score_threshold`` or when
   ``max_output_boxes_per_class`` boxes are kept; else keep ``(b, c, i)`` and ``s[i]``
   (its *decayed* score) and remove ``i``;
3. decay the other boxes by their IoU ``o`` with box ``i``:

   * ``gaussian``: ``s *= exp(-o**2 / sigma)`` for every box;
   * ``linear``: ``s *= 1 - o`` where ``o > iou_threshold``;
   * ``hard``: remove the boxes where ``o > iou_threshold`` (ONNX NonMaxSuppression).

A removed box has score ``-inf``: it is never picked again. So a box whose score is
``-inf`` (or NaN) to begin with is never selected, where ONNX Runtime's
NonMaxSuppression without a ``score_threshold`` selects ``-inf`` boxes last. Scores are
detection confidences (>= 0): a negative score decayed by a factor < 1 would rise.

IoU is ONNX Runtime's, in float32 and in its order of operations, so that ``hard`` is
bit for bit ONNX NonMaxSuppression: coordinates ``[y1, x1, y2, x2]`` in any corner order
(``center_point_box=0``; min and max per axis) or ``[x_center, y_center, width,
height]`` (``center_point_box=1``: ``x_min = x_c - w / 2``); the intersection is 0
unless both its extents are > 0; ``union = (area_a + area_b) - intersection``; the IoU
is 0 when an area, the intersection or the union is <= 0 (a degenerate box overlaps
nothing), else ``intersection / union``.

:func:`soft_nms` is the reference (numpy, float32 arithmetic as the body's) with the
inputs and outputs of ``ai.rewriter::SoftNonMaxSuppression``.
"""

from __future__ import annotations

import math

import numpy as np

# The ``method`` attribute of ai.rewriter::SoftNonMaxSuppression (an INT enum, as
# center_point_box is: a function body at opset 11 cannot compare strings).
METHODS = {"hard": 0, "linear": 1, "gaussian": 2}
DEFAULT_METHOD = "gaussian"
# sigma of the Gaussian decay exp(-iou**2 / sigma); the paper's default.
DEFAULT_SIGMA = 0.5


def method_code(method: str) -> int:
    """The ``method`` attribute's value for ``"gaussian"``, ``"linear"`` or ``"hard"``.

    >>> method_code("linear")
    1
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return METHODS[method]


def check_sigma(sigma: float) -> float:
    """``sigma`` when it is a positive finite number, else ValueError."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma}")
    return float(sigma)


def corners(boxes: np.ndarray, center_point_box: int) -> tuple[np.ndarray, ...]:
    """``(a_min, b_min, a_max, b_max, area)`` of ``boxes [..., 4]`` in float32, as ONNX
    Runtime computes them (``a``, ``b``: the two axes; IoU is symmetric in them)."""
    f = np.asarray(boxes, np.float32)
    if center_point_box:
        half_a, half_b = f[..., 2] / np.float32(2), f[..., 3] / np.float32(2)
        a_min, a_max = f[..., 0] - half_a, f[..., 0] + half_a
        b_min, b_max = f[..., 1] - half_b, f[..., 1] + half_b
    else:
        a_min, a_max = np.minimum(f[..., 0], f[..., 2]), np.maximum(f[..., 0], f[..., 2])
        b_min, b_max = np.minimum(f[..., 1], f[..., 3]), np.maximum(f[..., 1], f[..., 3])
    return a_min, b_min, a_max, b_max, (a_max - a_min) * (b_max - b_min)


def iou_with(box: int, geometry: tuple[np.ndarray, ...]) -> np.ndarray:
    """IoU (float32) of box ``box`` with every box of ``geometry`` (from :func:`corners`)."""
    a_min, b_min, a_max, b_max, area = geometry
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ia = np.minimum(a_max, a_max[box]) - np.maximum(a_min, a_min[box])
        ib = np.minimum(b_max, b_max[box]) - np.maximum(b_min, b_min[box])
        inter = ia * ib
        union = (area + area[box]) - inter
        overlap = (ia > 0) & (ib > 0) & (inter > 0) & (area > 0) & (area[box] > 0) & (union > 0)
        return np.where(overlap, inter / union, np.float32(0)).astype(np.float32)


def decay(
    scores: np.ndarray, iou: np.ndarray, method: int, iou_threshold: float, sigma: float
) -> np.ndarray:
    """The scores after a selection, by method code (removed boxes get ``-inf``)."""
    over = iou > np.float32(iou_threshold)
    if method == METHODS["hard"]:
        return np.where(over, np.float32(-np.inf), scores)
    if method == METHODS["linear"]:
        with np.errstate(invalid="ignore"):
            return np.where(over, scores * (np.float32(1) - iou), scores)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return scores * np.exp(-(iou * iou) / np.float32(sigma))


def soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    max_output_boxes_per_class: int = 0,
    iou_threshold: float = 0.0,
    score_threshold: float | None = None,
    *,
    center_point_box: int = 0,
    method: str = DEFAULT_METHOD,
    sigma: float = DEFAULT_SIGMA,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS of ``boxes [B, N, 4]`` and ``scores [B, C, N]``: the selected
    ``[batch, class, box]`` triples ``[M, 3]`` (int64, by batch, class, then order of
    selection) and their decayed scores ``[M]`` (float32).

    ``method="hard"`` is ONNX NonMaxSuppression (``max_output_boxes_per_class=0``
    selects nothing, as there).

    >>> boxes = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 5, 1, 6]]], np.float32)
    >>> scores = np.array([[[0.9, 0.8, 0.7]]], np.float32)
    >>> selected, decayed = soft_nms(boxes, scores, 3, 0.5, method="hard")
    >>> selected[:, 2].tolist()
    [0, 2]
    """
    code = method_code(method)
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    threshold = np.float32(-np.inf if score_threshold is None else score_threshold)
    batches, classes, count = scores.shape
    steps = max(0, min(int(max_output_boxes_per_class), count))
    selected: list[tuple[int, int, int]] = []
    decayed: list[np.float32] = []
    for b in range(batches):
        geometry = corners(boxes[b], center_point_box)
        for c in range(classes):
            current = scores[b, c].copy()
            for _ in range(steps):
                best = int(np.argmax(current))
                if not current[best] > threshold:
                    break
                selected.append((b, c, best))
                decayed.append(current[best])
                new = decay(current, iou_with(best, geometry), code, iou_threshold, sigma)
                # Removed boxes stay removed (-inf times linear's 0 for a duplicate is NaN).
                current = np.where(current == -np.inf, current, new)
                current[best] = -np.inf
    return (
        np.array(selected, np.int64).reshape(-1, 3),
        np.array(decayed, np.float32).reshape(-1),
    )
