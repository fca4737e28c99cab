"""Soft-NMS (Bodla et al. 2017, arXiv 1704.04503) as a CPU TIR kernel: one row (batch,
class) per parallel task, IoU and decay vectorized over the row's candidate boxes.

The math is :mod:`rewriter.passes.soft_nms.math` (the body of
``ai.rewriter::SoftNonMaxSuppression``): ties to the lower box, IoU in ONNX Runtime's
float32 order of operations, removed boxes at ``-inf``. ``method`` and ``sigma`` are
compile-time; the thresholds and ``max_output_boxes_per_class`` are read at run time.

Buffers: ``Boxes[B, N, 4]``, ``Scores[B, C, N]``, ``Limit[1]`` (int64), ``Iou[1]``,
``Threshold[1]`` (float32) in; ``Picks[B*C, K]`` (int64 box indices), ``Picked[B*C, K]``
(decayed scores), ``Counts[B*C]`` and ``Total[1]`` (int64) out, ``K`` the static bound
on the selections per row (``min(max_output_boxes_per_class, N)`` when that input is a
constant, else ``N``). :func:`compact` writes the selected ``[M, 3]`` triples and ``[M]``
scores from them (``M = Total``, a shape known only at run time).

Schedule, per row:

1. gather the candidates (score > ``Threshold``: decayed scores never rise, so no other
   box can be selected) into a row workspace: box index, score and geometry (``a_min,
   b_min, a_max, b_max, area``), padded to whole vectors with ``-inf`` scores and empty
   boxes; then a vectorized argmax (per lane the first of equal maxima, lanes merged to
   the lowest index);
2. per selection: record the best box, remove it, then one vectorized pass over the
   candidates computes the IoU with the selected box (its geometry broadcast from
   registers), the decay, and, fused in the same pass, the next argmax. The loop ends
   when the best is not above ``Threshold`` or ``min(Limit, K)`` boxes are kept.

So each selection reads each candidate once: O(K x candidates / lanes) vector steps.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.simd_plan import bcast, isa, span

HARD, LINEAR, GAUSSIAN = 0, 1, 2  # rewriter.passes.soft_nms.math.METHODS
# The Gaussian's exponent is clamped here: exp(-87) is the smallest normal float32 order.
EXP_LOW = -87.0
NEG_INF = -math.inf


def lanes_for(target: tvm.target.Target) -> int:
    """float32 lanes of one vector on ``target``."""
    return {"avx512": 16, "avx2": 8}.get(isa(target), 4)


def decayed(
    s: tirx.Expr, iou: tirx.Expr, iou_threshold: tirx.Expr, method: int, sigma: float, lanes: int
) -> tirx.Expr:
    """The new scores of candidates with scores ``s`` and IoU ``iou`` with the selected box
    (removed boxes: ``-inf``; ``s == -inf`` stays so)."""
    f32 = "float32"
    minus_inf = ep.const(NEG_INF, f32, lanes)
    over = iou > iou_threshold
    if method == HARD:
        new = tirx.Select(over, minus_inf, s)
    elif method == LINEAR:
        new = tirx.Select(over, s * (ep.const(1.0, f32, lanes) - iou), s)
    else:
        x = (ep.const(0.0, f32, lanes) - iou * iou) / ep.const(sigma, f32, lanes)
        x = tirx.max(x, ep.const(EXP_LOW, f32, lanes))
        m, n = ep.exp_pair(x, lanes)
        new = s * ep.scale(m, n, lanes, use_scalef=False)
    return tirx.Select(s == minus_inf, s, new)


def soft_nms(
    batches: int,
    classes: int,
    boxes: int,
    max_selected: int,
    *,
    method: int,
    sigma: float,
    center_point_box: int,
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """The PrimFunc ``(Boxes, Scores, Limit, Iou, Threshold, Picks, Picked, Counts, Total)``.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
    >>> func = soft_nms(1, 2, 40, 10, method=2, sigma=0.5, center_point_box=0, target=target)
    >>> [p.name for p in func.params][-4:]
    ['Picks', 'Picked', 'Counts', 'Total']
    """
    if isa(target) == "cuda":
        raise ValueError("soft_nms is the CPU kernel: use soft_nms_cuda on CUDA targets")
    if method not in (HARD, LINEAR, GAUSSIAN) or center_point_box not in (0, 1):
        raise ValueError(f"method {method}, center_point_box {center_point_box}")
    lanes = lanes_for(target)
    rows, n, k = batches * classes, boxes, max(1, max_selected)
    padded = -(-max(n, 1) // lanes) * lanes
    vectors = padded // lanes
    f32, i32, i64 = "float32", "int32", "int64"
    minus_inf = ep.const(NEG_INF, f32, lanes)
    lane_ids = tirx.Ramp(tirx.const(0, i32), tirx.const(1, i32), lanes)

    @T.macro
    def reduce_lanes(best_v, best_i, best):
        best[0] = best_i[0]
        for j in T.serial(1, lanes):
            if best_v[j] > best_v[0] or (best_v[j] == best_v[0] and best_i[j] < best[0]):
                best_v[0] = best_v[j]
                best[0] = best_i[j]

    @T.macro
    def argmax(sc, best_v, best_i, best):
        # Per lane the first of equal maxima (strict >), then the lanes by (value, -index).
        best_v[span(0, lanes)] = minus_inf
        best_i[span(0, lanes)] = bcast(T.int32(0), lanes)
        for v in T.serial(vectors):
            best_i[span(0, lanes)] = T.Select(
                sc[span(v * lanes, lanes)] > best_v[span(0, lanes)],
                lane_ids + bcast(v * lanes, lanes),
                best_i[span(0, lanes)],
            )
            best_v[span(0, lanes)] = T.max(sc[span(v * lanes, lanes)], best_v[span(0, lanes)])
        reduce_lanes(best_v, best_i, best)

    @T.macro
    def corner(Boxes, b, i, geo, at):
        if center_point_box == 1:
            geo[0, at] = Boxes[b, i, 0] - Boxes[b, i, 2] / T.float32(2)
            geo[1, at] = Boxes[b, i, 1] - Boxes[b, i, 3] / T.float32(2)
            geo[2, at] = Boxes[b, i, 0] + Boxes[b, i, 2] / T.float32(2)
            geo[3, at] = Boxes[b, i, 1] + Boxes[b, i, 3] / T.float32(2)
        else:
            geo[0, at] = T.min(Boxes[b, i, 0], Boxes[b, i, 2])
            geo[1, at] = T.min(Boxes[b, i, 1], Boxes[b, i, 3])
            geo[2, at] = T.max(Boxes[b, i, 0], Boxes[b, i, 2])
            geo[3, at] = T.max(Boxes[b, i, 1], Boxes[b, i, 3])
        geo[4, at] = (geo[2, at] - geo[0, at]) * (geo[3, at] - geo[1, at])

    @T.macro
    def decay_pass(sc, geo, tile, chosen, iou_thr, best_v, best_i, best):
        # IoU with the chosen box (broadcast), decay, and the next argmax, in one pass.
        best_v[span(0, lanes)] = minus_inf
        best_i[span(0, lanes)] = bcast(T.int32(0), lanes)
        for v in T.serial(vectors):
            tile[span(0, lanes)] = T.min(
                geo[2, span(v * lanes, lanes)], bcast(geo[2, chosen], lanes)
            ) - T.max(geo[0, span(v * lanes, lanes)], bcast(geo[0, chosen], lanes))
            tile[span(lanes, lanes)] = T.min(
                geo[3, span(v * lanes, lanes)], bcast(geo[3, chosen], lanes)
            ) - T.max(geo[1, span(v * lanes, lanes)], bcast(geo[1, chosen], lanes))
            tile[span(2 * lanes, lanes)] = tile[span(0, lanes)] * tile[span(lanes, lanes)]
            tile[span(3 * lanes, lanes)] = (
                geo[4, span(v * lanes, lanes)] + bcast(geo[4, chosen], lanes)
            ) - tile[span(2 * lanes, lanes)]
            tile[span(4 * lanes, lanes)] = T.Select(
                (tile[span(0, lanes)] > bcast(T.float32(0), lanes))
                & (tile[span(lanes, lanes)] > bcast(T.float32(0), lanes))
                & (tile[span(2 * lanes, lanes)] > bcast(T.float32(0), lanes))
                & (geo[4, span(v * lanes, lanes)] > bcast(T.float32(0), lanes))
                & (bcast(geo[4, chosen], lanes) > bcast(T.float32(0), lanes))
                & (tile[span(3 * lanes, lanes)] > bcast(T.float32(0), lanes)),
                tile[span(2 * lanes, lanes)] / tile[span(3 * lanes, lanes)],
                bcast(T.float32(0), lanes),
            )
            sc[span(v * lanes, lanes)] = decayed(
                sc[span(v * lanes, lanes)],
                tile[span(4 * lanes, lanes)],
                bcast(iou_thr, lanes),
                method,
                sigma,
                lanes,
            )
            best_i[span(0, lanes)] = T.Select(
                sc[span(v * lanes, lanes)] > best_v[span(0, lanes)],
                lane_ids + bcast(v * lanes, lanes),
                best_i[span(0, lanes)],
            )
            best_v[span(0, lanes)] = T.max(sc[span(v * lanes, lanes)], best_v[span(0, lanes)])
        reduce_lanes(best_v, best_i, best)

    @T.prim_func
    def soft_nms(
        Boxes: T.Buffer((batches, n, 4), f32),  # type: ignore[valid-type]
        Scores: T.Buffer((batches, classes, n), f32),  # type: ignore[valid-type]
        Limit: T.Buffer((1,), i64),  # type: ignore[valid-type]
        Iou: T.Buffer((1,), f32),  # type: ignore[valid-type]
        Threshold: T.Buffer((1,), f32),  # type: ignore[valid-type]
        Picks: T.Buffer((rows, k), i64),  # type: ignore[valid-type]
        Picked: T.Buffer((rows, k), f32),  # type: ignore[valid-type]
        Counts: T.Buffer((rows,), i64),  # type: ignore[valid-type]
        Total: T.Buffer((1,), i64),  # type: ignore[valid-type]
    ):
        T.func_attr({"tir.noalias": True})
        for r in T.parallel(rows):
            sc = T.alloc_buffer((padded,), f32, scope="global")
            geo = T.alloc_buffer((5, padded), f32, scope="global")
            index = T.alloc_buffer((padded,), i32, scope="global")
            tile = T.alloc_buffer((5 * lanes,), f32, scope="global")
            best_v = T.alloc_buffer((lanes,), f32, scope="global")
            best_i = T.alloc_buffer((lanes,), i32, scope="global")
            state = T.alloc_buffer((3,), i32, scope="global")  # best, count, candidates
            state[2] = 0
            for i in T.serial(n):
                if Scores[r // classes, r % classes, i] > Threshold[0]:
                    sc[state[2]] = Scores[r // classes, r % classes, i]
                    index[state[2]] = i
                    corner(Boxes, r // classes, i, geo, state[2])
                    state[2] = state[2] + 1
            for i in T.serial(padded):
                if i >= state[2]:
                    sc[i] = T.float32(NEG_INF)
                    index[i] = 0
                    for g in T.unroll(5):
                        geo[g, i] = T.float32(0)
            argmax(sc, best_v, best_i, state)
            state[1] = 0
            for step in T.serial(k):
                if (
                    T.Cast(i64, step) < Limit[0]
                    and state[1] == step
                    and sc[state[0]] > Threshold[0]
                ):
                    Picks[r, step] = T.Cast(i64, index[state[0]])
                    Picked[r, step] = sc[state[0]]
                    state[1] = step + 1
                    sc[state[0]] = T.float32(NEG_INF)
                    decay_pass(sc, geo, tile, state[0], Iou[0], best_v, best_i, state)
            Counts[r] = T.Cast(i64, state[1])
        Total[0] = T.int64(0)
        for r in T.serial(rows):
            Total[0] = Total[0] + Counts[r]

    return soft_nms


def compact(batches: int, classes: int, max_selected: int) -> tirx.PrimFunc:
    """The PrimFunc ``(Picks, Picked, Counts, m, Selected, Scores)``: every row's selections
    as ``[batch, class, box]`` triples ``Selected[m, 3]`` and their ``Scores[m]``, by row
    (batch, then class) and order of selection; ``m`` is :func:`soft_nms`'s ``Total``.

    >>> [p.name for p in compact(1, 2, 10).params]
    ['Picks', 'Picked', 'Counts', 'm', 'var_Selected', 'var_Scores']
    """
    rows, k = batches * classes, max(1, max_selected)
    f32, i64 = "float32", "int64"

    @T.prim_func
    def soft_nms_compact(
        Picks: T.Buffer((rows, k), i64),  # type: ignore[valid-type]
        Picked: T.Buffer((rows, k), f32),  # type: ignore[valid-type]
        Counts: T.Buffer((rows,), i64),  # type: ignore[valid-type]
        m: T.int64,
        var_Selected: T.handle,
        var_Scores: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        Selected = T.match_buffer(var_Selected, (m, 3), i64)
        Scores = T.match_buffer(var_Scores, (m,), f32)
        offset = T.alloc_buffer((1,), i64, scope="global")
        offset[0] = T.int64(0)
        for r in T.serial(rows):
            for j in T.serial(Counts[r]):
                Selected[offset[0] + j, 0] = T.int64(r // classes)
                Selected[offset[0] + j, 1] = T.int64(r % classes)
                Selected[offset[0] + j, 2] = Picks[r, j]
                Scores[offset[0] + j] = Picked[r, j]
            offset[0] = offset[0] + Counts[r]

    return soft_nms_compact
