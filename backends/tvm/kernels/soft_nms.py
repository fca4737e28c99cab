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

Schedule, per row (one parallel task):

1. gather the candidates (score > ``Threshold``: decayed scores never rise, so no other
   box can be selected) with their geometry (``a_min, b_min, a_max, b_max, area``), then
   counting-sort them by the cell of a grid over their centres (about one block of
   ``BLOCK_VECTORS`` vectors per cell) into the row workspace, padded to whole blocks
   with ``-inf`` scores and empty boxes; per block its bounding box and its best (score,
   box), ties to the lower box index;
2. per selection: the best of the blocks' maxima is the selected box; record and remove
   it; then for each block whose bounding box the selected box overlaps (tested per group
   of ``GROUP`` blocks first; its own block always), one vectorized pass computes the IoU
   with the selected box (its geometry broadcast from registers), the decay, and the
   block's new best (branch-free lane reductions). The loop ends when the best is not
   above ``Threshold`` or ``min(Limit, K)`` boxes are kept.

Since a block covers a compact patch of the image, a selection touches the few blocks
around it: it costs a scan of the block maxima plus the nearby blocks, not all the
candidates. The result does not depend on the grid (the bounding-box tests are exact).
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
# Blocks per group: a selection tests the groups' bounding boxes, then the blocks' of the
# groups it overlaps.
GROUP = 16
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
    block = lanes * BLOCK_VECTORS
    rows, n, k = batches * classes, boxes, max(1, max_selected)
    padded = -(-max(n, 1) // block) * block
    blocks = padded // block
    padded_blocks = -(-blocks // GROUP) * GROUP  # GROUP is a multiple of the lanes
    groups = padded_blocks // GROUP
    side_most = int(math.sqrt(max(n, 1) / block) + 0.5) + 1
    max_cells = side_most * side_most
    f32, i32, i64 = "float32", "int32", "int64"
    minus_inf = ep.const(NEG_INF, f32, lanes)
    zero = ep.const(0.0, f32, lanes)
    lane_ids = tirx.Ramp(tirx.const(0, i32), tirx.const(1, i32), lanes)
    no_index = tirx.const(NO_INDEX, i32)

    def part(offset: int, width: int) -> tirx.Expr:
        """Lanes ``offset .. offset + width`` of a lane buffer (a scalar index for one)."""
        return tirx.const(offset, i32) if width == 1 else span(offset, width)

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
    def fold(acc_v, acc_o, acc_p, half):
        acc_p[part(0, half)] = T.Select(
            (acc_v[part(half, half)] > acc_v[part(0, half)])
            | (
                (acc_v[part(half, half)] == acc_v[part(0, half)])
                & (acc_o[part(half, half)] < acc_o[part(0, half)])
            ),
            acc_p[part(half, half)],
            acc_p[part(0, half)],
        )
        acc_o[part(0, half)] = T.Select(
            (acc_v[part(half, half)] > acc_v[part(0, half)])
            | (
                (acc_v[part(half, half)] == acc_v[part(0, half)])
                & (acc_o[part(half, half)] < acc_o[part(0, half)])
            ),
            acc_o[part(half, half)],
            acc_o[part(0, half)],
        )
        acc_v[part(0, half)] = T.max(acc_v[part(half, half)], acc_v[part(0, half)])

    @T.macro
    def reduce_lanes(acc_v, acc_o, acc_p):
        # The best lane into lane 0, branch-free: halves compared and selected in turn.
        if lanes == 16:
            fold(acc_v, acc_o, acc_p, 8)
        if lanes >= 8:
            fold(acc_v, acc_o, acc_p, 4)
        fold(acc_v, acc_o, acc_p, 2)
        fold(acc_v, acc_o, acc_p, 1)

    @T.macro
    def block_bounds(geo, tile, bbox, blk):
        # The block's bounding box: lane-wise min of a_min, b_min and max of a_max, b_max.
        for g in T.unroll(4):
            tile[span(g * lanes, lanes)] = geo[g, span(blk * block, lanes)]
        for u in T.unroll(1, BLOCK_VECTORS):
            for g in T.unroll(2):
                tile[span(g * lanes, lanes)] = T.min(
                    tile[span(g * lanes, lanes)], geo[g, span(blk * block + u * lanes, lanes)]
                )
                tile[span((g + 2) * lanes, lanes)] = T.max(
                    tile[span((g + 2) * lanes, lanes)],
                    geo[g + 2, span(blk * block + u * lanes, lanes)],
                )
        for g in T.unroll(2):
            bbox[g, blk] = ep.across_lanes(tirx.min, tile[span(g * lanes, lanes)], lanes)
            bbox[g + 2, blk] = ep.across_lanes(tirx.max, tile[span((g + 2) * lanes, lanes)], lanes)

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
        T.func_attr({"tirx.noalias": True})
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
            chosen = T.alloc_buffer((5,), f32, scope="global")
            bbox = T.alloc_buffer((4, padded_blocks), f32, scope="global")  # per block
            gbox = T.alloc_buffer((4, groups), f32, scope="global")  # per group of blocks
            state = T.alloc_buffer((5,), i32, scope="global")  # best, count, candidates, side, at
            stage_i = T.alloc_buffer((max(n, 1),), i32, scope="global")
            centre = T.alloc_buffer((2, max(n, 1)), f32, scope="global")
            cell_of = T.alloc_buffer((max(n, 1),), i32, scope="global")
            cells = T.alloc_buffer((max_cells + 1,), i32, scope="global")
            span_lo = T.alloc_buffer((2,), f32, scope="global")  # lowest centre per axis
            span_hi = T.alloc_buffer((2,), f32, scope="global")
            scale = T.alloc_buffer((2,), f32, scope="global")
            # 1. Candidates (score above the threshold): their indices and centres (as
            #    sums of two coordinates: only the cells use them) with the centres'
            #    bounds; then a counting sort by the cell of a grid over the centres
            #    (about a block of candidates per cell, rows of cells in turn) puts their
            #    scores, indices and geometry into the row workspace; then each block's
            #    bounding box.
            state[2] = 0
            for g in T.unroll(2):
                span_lo[g] = T.float32(math.inf)
                span_hi[g] = T.float32(NEG_INF)
            for i in T.serial(n):
                if Scores[r // classes, r % classes, i] > Threshold[0]:
                    stage_i[state[2]] = i
                    for g in T.unroll(2):
                        if center_point_box == 1:
                            centre[g, state[2]] = Boxes[r // classes, i, g]
                        else:
                            centre[g, state[2]] = (
                                Boxes[r // classes, i, g] + Boxes[r // classes, i, g + 2]
                            )
                        span_lo[g] = T.min(span_lo[g], centre[g, state[2]])
                        span_hi[g] = T.max(span_hi[g], centre[g, state[2]])
                    state[2] = state[2] + 1
            # Cells per side: about state[2] / block cells in all (at least one).
            state[3] = T.max(
                1, T.Cast(i32, T.sqrt(T.Cast(f32, state[2]) / T.float32(block)) + T.float32(0.5))
            )
            for g in T.unroll(2):
                scale[g] = T.Select(
                    span_hi[g] > span_lo[g],
                    T.Cast(f32, state[3]) / (span_hi[g] - span_lo[g]),
                    T.float32(0),
                )
            for c in T.serial(max_cells + 1):
                cells[c] = 0
            for j in T.serial(state[2]):
                cell_of[j] = T.Cast(
                    i32,
                    T.max(
                        T.min((centre[1, j] - span_lo[1]) * scale[1], T.Cast(f32, state[3] - 1)),
                        T.float32(0),
                    ),
                ) * state[3] + T.Cast(
                    i32,
                    T.max(
                        T.min((centre[0, j] - span_lo[0]) * scale[0], T.Cast(f32, state[3] - 1)),
                        T.float32(0),
                    ),
                )
                cells[cell_of[j] + 1] = cells[cell_of[j] + 1] + 1
            for c in T.serial(max_cells):
                cells[c + 1] = cells[c + 1] + cells[c]
            for j in T.serial(state[2]):
                state[4] = cells[cell_of[j]]
                cells[cell_of[j]] = state[4] + 1
                sc[state[4]] = Scores[r // classes, r % classes, stage_i[j]]
                index[state[4]] = stage_i[j]
                corner(Boxes, r // classes, stage_i[j], geo, state[4])
            for i in T.serial(padded):
                if i >= state[2]:  # padding: overlaps nothing, widens no bounding box
                    sc[i] = T.float32(NEG_INF)
                    index[i] = no_index
                    geo[0, i] = T.float32(math.inf)
                    geo[1, i] = T.float32(math.inf)
                    geo[2, i] = T.float32(NEG_INF)
                    geo[3, i] = T.float32(NEG_INF)
                    geo[4, i] = T.float32(0)
            for blk in T.serial(padded_blocks):
                if blk < blocks:
                    block_bounds(geo, tile, bbox, blk)
                else:
                    bbox[0, blk] = T.float32(math.inf)
                    bbox[1, blk] = T.float32(math.inf)
                    bbox[2, blk] = T.float32(NEG_INF)
                    bbox[3, blk] = T.float32(NEG_INF)
            for grp in T.serial(groups):
                for g in T.unroll(2):
                    gbox[g, grp] = T.float32(math.inf)
                    gbox[g + 2, grp] = T.float32(NEG_INF)
                for member in T.serial(GROUP):
                    for g in T.unroll(2):
                        gbox[g, grp] = T.min(gbox[g, grp], bbox[g, grp * GROUP + member])
                        gbox[g + 2, grp] = T.max(
                            gbox[g + 2, grp], bbox[g + 2, grp * GROUP + member]
                        )
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
                        # A block (a group of GROUP blocks) whose bounding box the chosen
                        # box does not overlap holds no box it overlaps (an intersection of
                        # zero extent is no overlap). Its own block is always rescanned.
                        for grp in T.serial(groups):
                            if grp == state[0] // (block * GROUP) or not (
                                chosen[2] <= gbox[0, grp]
                                or chosen[0] >= gbox[2, grp]
                                or chosen[3] <= gbox[1, grp]
                                or chosen[1] >= gbox[3, grp]
                            ):
                                for member in T.serial(GROUP):
                                    if grp * GROUP + member < blocks and (
                                        grp * GROUP + member == state[0] // block
                                        or not (
                                            chosen[2] <= bbox[0, grp * GROUP + member]
                                            or chosen[0] >= bbox[2, grp * GROUP + member]
                                            or chosen[3] <= bbox[1, grp * GROUP + member]
                                            or chosen[1] >= bbox[3, grp * GROUP + member]
                                        )
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
                                            grp * GROUP + member,
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
        T.func_attr({"tirx.noalias": True})
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
