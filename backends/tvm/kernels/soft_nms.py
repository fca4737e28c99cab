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
# Vectors per block: each block keeps its best (score, box) so that the next selection
# looks at the blocks' maxima, and a selection re-scans only the blocks it decays.
BLOCK_VECTORS = 4
# Relative margin of the lower end of a selection's window (2**-18: far above float32
# rounding, 2**-24 per operation, far below any box).
WINDOW_MARGIN = 2.0**-18
# The box index of padding (loses every tie).
NO_INDEX = 2**31 - 1


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
    """The PrimFunc ``(Boxes, Scores, Order, Limit, Iou, Threshold, Picks, Picked, Counts,
    Total)``; ``Order[B, N]`` (int32) lists each batch's boxes by ``a_min`` ascending
    (``min(Boxes[..., 0], Boxes[..., 2])``, or ``Boxes[..., 0] - Boxes[..., 2] / 2`` with
    ``center_point_box``: the lowering sorts them; ties in any order).

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
    block = lanes * BLOCK_VECTORS
    rows, n, k = batches * classes, boxes, max(1, max_selected)
    padded = -(-max(n, 1) // block) * block
    blocks = padded // block
    padded_blocks = -(-blocks // lanes) * lanes
    search_steps = max(1, padded.bit_length() + 1)
    f32, i32, i64 = "float32", "int32", "int64"
    minus_inf = ep.const(NEG_INF, f32, lanes)
    zero = ep.const(0.0, f32, lanes)
    lane_ids = tirx.Ramp(tirx.const(0, i32), tirx.const(1, i32), lanes)
    no_index = tirx.const(NO_INDEX, i32)

    @T.macro
    def keep_best(value, origin, position, acc_v, acc_o, acc_p):
        acc_p[span(0, lanes)] = T.Select(
            (value > acc_v[span(0, lanes)])
            | ((value == acc_v[span(0, lanes)]) & (origin < acc_o[span(0, lanes)])),
            position,
            acc_p[span(0, lanes)],
        )
        acc_o[span(0, lanes)] = T.Select(
            (value > acc_v[span(0, lanes)])
            | ((value == acc_v[span(0, lanes)]) & (origin < acc_o[span(0, lanes)])),
            origin,
            acc_o[span(0, lanes)],
        )
        acc_v[span(0, lanes)] = T.max(value, acc_v[span(0, lanes)])

    @T.macro
    def reduce_lanes(acc_v, acc_o, acc_p):
        # The best lane into lane 0.
        for j in T.serial(1, lanes):
            if acc_v[j] > acc_v[0] or (acc_v[j] == acc_v[0] and acc_o[j] < acc_o[0]):
                acc_v[0] = acc_v[j]
                acc_o[0] = acc_o[j]
                acc_p[0] = acc_p[j]

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
    def block_max(sc, index, bmax, borig, bpos, acc_v, acc_o, acc_p, blk):
        acc_v[span(0, lanes)] = minus_inf
        acc_o[span(0, lanes)] = bcast(no_index, lanes)
        acc_p[span(0, lanes)] = bcast(T.int32(0), lanes)
        for u in T.unroll(BLOCK_VECTORS):
            keep_best(
                sc[span(blk * block + u * lanes, lanes)],
                index[span(blk * block + u * lanes, lanes)],
                lane_ids + bcast(blk * block + u * lanes, lanes),
                acc_v,
                acc_o,
                acc_p,
            )
        reduce_lanes(acc_v, acc_o, acc_p)
        bmax[blk] = acc_v[0]
        borig[blk] = acc_o[0]
        bpos[blk] = acc_p[0]

    @T.macro
    def decay_block(
        sc, geo, index, tile, chosen, iou_thr, bmax, borig, bpos, acc_v, acc_o, acc_p, blk
    ):
        # IoU with the chosen box (broadcast from registers), decay, and the block's new max.
        acc_v[span(0, lanes)] = minus_inf
        acc_o[span(0, lanes)] = bcast(no_index, lanes)
        acc_p[span(0, lanes)] = bcast(T.int32(0), lanes)
        for u in T.unroll(BLOCK_VECTORS):
            tile[span(0, lanes)] = T.min(
                geo[2, span(blk * block + u * lanes, lanes)], bcast(chosen[2], lanes)
            ) - T.max(geo[0, span(blk * block + u * lanes, lanes)], bcast(chosen[0], lanes))
            tile[span(lanes, lanes)] = T.min(
                geo[3, span(blk * block + u * lanes, lanes)], bcast(chosen[3], lanes)
            ) - T.max(geo[1, span(blk * block + u * lanes, lanes)], bcast(chosen[1], lanes))
            tile[span(2 * lanes, lanes)] = tile[span(0, lanes)] * tile[span(lanes, lanes)]
            tile[span(3 * lanes, lanes)] = (
                geo[4, span(blk * block + u * lanes, lanes)] + bcast(chosen[4], lanes)
            ) - tile[span(2 * lanes, lanes)]
            tile[span(4 * lanes, lanes)] = T.Select(
                (tile[span(0, lanes)] > zero)
                & (tile[span(lanes, lanes)] > zero)
                & (tile[span(2 * lanes, lanes)] > zero)
                & (geo[4, span(blk * block + u * lanes, lanes)] > zero)
                & (bcast(chosen[4], lanes) > zero)
                & (tile[span(3 * lanes, lanes)] > zero),
                tile[span(2 * lanes, lanes)] / tile[span(3 * lanes, lanes)],
                zero,
            )
            sc[span(blk * block + u * lanes, lanes)] = decayed(
                sc[span(blk * block + u * lanes, lanes)],
                tile[span(4 * lanes, lanes)],
                bcast(iou_thr, lanes),
                method,
                sigma,
                lanes,
            )
            keep_best(
                sc[span(blk * block + u * lanes, lanes)],
                index[span(blk * block + u * lanes, lanes)],
                lane_ids + bcast(blk * block + u * lanes, lanes),
                acc_v,
                acc_o,
                acc_p,
            )
        reduce_lanes(acc_v, acc_o, acc_p)
        bmax[blk] = acc_v[0]
        borig[blk] = acc_o[0]
        bpos[blk] = acc_p[0]

    @T.macro
    def best_block(bmax, borig, bpos, acc_v, acc_o, acc_p, state):
        # The best candidate over the blocks' maxima: its position into state[0].
        acc_v[span(0, lanes)] = minus_inf
        acc_o[span(0, lanes)] = bcast(no_index, lanes)
        acc_p[span(0, lanes)] = bcast(T.int32(0), lanes)
        for v in T.serial(padded_blocks // lanes):
            keep_best(
                bmax[span(v * lanes, lanes)],
                borig[span(v * lanes, lanes)],
                bpos[span(v * lanes, lanes)],
                acc_v,
                acc_o,
                acc_p,
            )
        reduce_lanes(acc_v, acc_o, acc_p)
        state[0] = acc_p[0]

    @T.macro
    def lower_bound(geo, key, count, found, state, slot):
        # The first candidate position in [0, count) whose a_min is >= key (a_min sorted).
        found[0] = 0
        found[1] = count
        for _ in T.serial(search_steps):
            if found[0] < found[1]:
                if geo[0, (found[0] + found[1]) // 2] < key:
                    found[0] = (found[0] + found[1]) // 2 + 1
                else:
                    found[1] = (found[0] + found[1]) // 2
        state[slot] = found[0]

    @T.prim_func
    def soft_nms(
        Boxes: T.Buffer((batches, n, 4), f32),  # type: ignore[valid-type]
        Scores: T.Buffer((batches, classes, n), f32),  # type: ignore[valid-type]
        Order: T.Buffer((batches, n), i32),  # type: ignore[valid-type]
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
            bmax = T.alloc_buffer((padded_blocks,), f32, scope="global")
            borig = T.alloc_buffer((padded_blocks,), i32, scope="global")
            bpos = T.alloc_buffer((padded_blocks,), i32, scope="global")
            tile = T.alloc_buffer((5 * lanes,), f32, scope="global")
            acc_v = T.alloc_buffer((lanes,), f32, scope="global")
            acc_o = T.alloc_buffer((lanes,), i32, scope="global")
            acc_p = T.alloc_buffer((lanes,), i32, scope="global")
            chosen = T.alloc_buffer((6,), f32, scope="global")  # geometry, widest a extent
            found = T.alloc_buffer((2,), i32, scope="global")
            state = T.alloc_buffer((5,), i32, scope="global")  # best, count, candidates, lo, hi
            # 1. Candidates (score above the threshold) in a_min order, and the widest one.
            state[2] = 0
            chosen[5] = T.float32(0)
            for t in T.serial(n):
                if Scores[r // classes, r % classes, Order[r // classes, t]] > Threshold[0]:
                    sc[state[2]] = Scores[r // classes, r % classes, Order[r // classes, t]]
                    index[state[2]] = Order[r // classes, t]
                    corner(Boxes, r // classes, Order[r // classes, t], geo, state[2])
                    chosen[5] = T.max(chosen[5], geo[2, state[2]] - geo[0, state[2]])
                    state[2] = state[2] + 1
            for i in T.serial(padded):
                if i >= state[2]:
                    sc[i] = T.float32(NEG_INF)
                    index[i] = no_index
                    geo[0, i] = T.float32(math.inf)  # a_min stays sorted
                    for g in T.unroll(1, 5):
                        geo[g, i] = T.float32(0)
            for blk in T.serial(padded_blocks):
                if blk < blocks:
                    block_max(sc, index, bmax, borig, bpos, acc_v, acc_o, acc_p, blk)
                else:
                    bmax[blk] = T.float32(NEG_INF)
                    borig[blk] = no_index
                    bpos[blk] = 0
            # 2. Selections: the best block's best box; decay the blocks it can overlap.
            state[1] = 0
            for step in T.serial(k):
                if T.Cast(i64, step) < Limit[0] and state[1] == step:
                    best_block(bmax, borig, bpos, acc_v, acc_o, acc_p, state)
                    if sc[state[0]] > Threshold[0]:
                        Picks[r, step] = T.Cast(i64, index[state[0]])
                        Picked[r, step] = sc[state[0]]
                        state[1] = step + 1
                        sc[state[0]] = T.float32(NEG_INF)
                        for g in T.unroll(5):
                            chosen[g] = geo[g, state[0]]
                        # Boxes starting at or past the chosen box's a_max, or more than
                        # the widest extent before its a_min, cannot overlap it (the
                        # margin covers the rounding of a_max - a_min and of the key).
                        lower_bound(
                            geo,
                            chosen[0]
                            - chosen[5]
                            - (T.fabs(chosen[0]) + chosen[5]) * T.float32(WINDOW_MARGIN),
                            state[2],
                            found,
                            state,
                            3,
                        )
                        lower_bound(geo, chosen[2], state[2], found, state, 4)
                        for blk in T.serial(
                            T.min(state[3], state[0]) // block,
                            (T.max(state[4], state[0] + 1) + block - 1) // block,
                        ):
                            decay_block(
                                sc,
                                geo,
                                index,
                                tile,
                                chosen,
                                Iou[0],
                                bmax,
                                borig,
                                bpos,
                                acc_v,
                                acc_o,
                                acc_p,
                                blk,
                            )
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
