"""Soft-NMS (Bodla et al. 2017, arXiv 1704.04503) as a CUDA TIR kernel.

Same contract as the CPU kernel :func:`rewriter.backends.tvm.kernels.soft_nms.soft_nms`
(inputs ``Boxes[B, N, 4]``, ``Scores[B, C, N]``, ``Limit``, ``Iou``, ``Threshold``;
outputs ``Picks[B*C, K]``, ``Picked[B*C, K]``, ``Counts[B*C]``, ``Total[1]``) plus one
more output, ``Work[B*C, N]``, the rows' current scores (a scratch buffer the caller
drops).

Schedule: one thread block of :data:`THREADS` threads per row (batch, class). The
threads own a strided share of the row's boxes. Per selection, the block

1. reduces its threads' (score, index) pairs to the row's best in shared memory (a tree
   of ``log2(THREADS)`` steps; equal scores go to the lower index);
2. has thread 0 record the pick and remove the box;
3. decays its boxes by their IoU with the picked box (the picked box's geometry read
   from shared memory, each box's from ``Boxes``), and keeps each thread's best of the
   decayed scores for the next reduction: the decay and the next argmax are one pass.

Boxes at or below ``Threshold`` start at ``-inf``. :func:`compact_cuda` then writes the
``[m, 3]`` triples and ``[m]`` scores with a single thread (``m`` is small).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.soft_nms import EXP_LOW, GAUSSIAN, HARD, LINEAR

THREADS = 256
NEG_INF = -math.inf


def soft_nms_cuda(
    batches: int,
    classes: int,
    boxes: int,
    max_selected: int,
    *,
    method: int,
    sigma: float,
    center_point_box: int,
    target: object = None,
) -> tirx.PrimFunc:
    """The CUDA PrimFunc ``(Boxes, Scores, Limit, Iou, Threshold, Picks, Picked, Counts,
    Total, Work)``; ``target`` is accepted for the CPU factory's signature.

    >>> [p.name for p in soft_nms_cuda(1, 2, 40, 10, method=2, sigma=0.5, center_point_box=0).params][-2:]
    ['Total', 'Work']
    """
    if method not in (HARD, LINEAR, GAUSSIAN) or center_point_box not in (0, 1):
        raise ValueError(f"method {method}, center_point_box {center_point_box}")
    rows, n, k = batches * classes, boxes, max(1, max_selected)
    per_thread = max(1, -(-n // THREADS))
    f32, i32, i64 = "float32", "int32", "int64"
    sigma = float(sigma)

    @T.macro
    def geometry(Boxes, b, i, g):
        # (a_min, b_min, a_max, b_max, area) of box i, as ONNX Runtime computes them.
        if center_point_box == 1:
            g[0] = Boxes[b, i, 0] - Boxes[b, i, 2] / T.float32(2)
            g[1] = Boxes[b, i, 1] - Boxes[b, i, 3] / T.float32(2)
            g[2] = Boxes[b, i, 0] + Boxes[b, i, 2] / T.float32(2)
            g[3] = Boxes[b, i, 1] + Boxes[b, i, 3] / T.float32(2)
        else:
            g[0] = T.min(Boxes[b, i, 0], Boxes[b, i, 2])
            g[1] = T.min(Boxes[b, i, 1], Boxes[b, i, 3])
            g[2] = T.max(Boxes[b, i, 0], Boxes[b, i, 2])
            g[3] = T.max(Boxes[b, i, 1], Boxes[b, i, 3])
        g[4] = (g[2] - g[0]) * (g[3] - g[1])

    @T.macro
    def block_argmax(red_v, red_i, tx, mine_v, mine_i, other_v, other_i):
        # The block's best (value, lowest index) into red_v[0], red_i[0]. Shared values
        # are read into registers first: TVM's sync analysis takes no shared load in a
        # condition.
        red_v[tx] = mine_v[0]
        red_i[tx] = mine_i[0]
        T.tvm_storage_sync("shared")
        for level in T.unroll(int(math.log2(THREADS))):
            # Reads, a barrier, then writes: no shared buffer is read and written in one
            # conditional block (TVM's sync planner cannot place a barrier inside one).
            if tx < (THREADS >> (level + 1)):
                other_v[0] = red_v[tx + (THREADS >> (level + 1))]
                other_i[0] = red_i[tx + (THREADS >> (level + 1))]
                if other_v[0] > mine_v[0] or (other_v[0] == mine_v[0] and other_i[0] < mine_i[0]):
                    mine_v[0] = other_v[0]
                    mine_i[0] = other_i[0]
            T.tvm_storage_sync("shared")
            if tx < (THREADS >> (level + 1)):
                red_v[tx] = mine_v[0]
                red_i[tx] = mine_i[0]
            T.tvm_storage_sync("shared")
        mine_v[0] = red_v[0]
        mine_i[0] = red_i[0]

    @T.macro
    def decay(Work, r, i, g, chosen, iou_thr):
        # Work[r, i] decayed by its IoU with the chosen box (-inf stays -inf).
        ia = T.min(g[2], chosen[2]) - T.max(g[0], chosen[0])
        ib = T.min(g[3], chosen[3]) - T.max(g[1], chosen[1])
        g[5] = ia * ib
        g[6] = (g[4] + chosen[4]) - g[5]
        g[7] = T.Select(
            ia > T.float32(0)
            and ib > T.float32(0)
            and g[5] > T.float32(0)
            and g[4] > T.float32(0)
            and chosen[4] > T.float32(0)
            and g[6] > T.float32(0),
            g[5] / g[6],
            T.float32(0),
        )
        if Work[r, i] != T.float32(NEG_INF):
            if method == HARD:
                if g[7] > iou_thr:
                    Work[r, i] = T.float32(NEG_INF)
            elif method == LINEAR:
                if g[7] > iou_thr:
                    Work[r, i] = Work[r, i] * (T.float32(1) - g[7])
            else:
                Work[r, i] = Work[r, i] * T.exp(
                    T.max((T.float32(0) - g[7] * g[7]) / T.float32(sigma), T.float32(EXP_LOW))
                )

    @T.prim_func
    def soft_nms_cuda(
        Boxes: T.Buffer((batches, n, 4), f32),  # type: ignore[valid-type]
        Scores: T.Buffer((batches, classes, n), f32),  # type: ignore[valid-type]
        Limit: T.Buffer((1,), i64),  # type: ignore[valid-type]
        Iou: T.Buffer((1,), f32),  # type: ignore[valid-type]
        Threshold: T.Buffer((1,), f32),  # type: ignore[valid-type]
        Picks: T.Buffer((rows, k), i64),  # type: ignore[valid-type]
        Picked: T.Buffer((rows, k), f32),  # type: ignore[valid-type]
        Counts: T.Buffer((rows,), i64),  # type: ignore[valid-type]
        Total: T.Buffer((1,), i64),  # type: ignore[valid-type]
        Work: T.Buffer((rows, n), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for r in T.thread_binding(rows, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                red_v = T.alloc_buffer((THREADS,), f32, scope="shared")
                red_i = T.alloc_buffer((THREADS,), i32, scope="shared")
                chosen = T.alloc_buffer((5,), f32, scope="shared")
                state = T.alloc_buffer((2,), i32, scope="shared")  # count, still going
                g = T.alloc_buffer((8,), f32, scope="local")
                mine_v = T.alloc_buffer((1,), f32, scope="local")
                mine_i = T.alloc_buffer((1,), i32, scope="local")
                other_v = T.alloc_buffer((1,), f32, scope="local")
                other_i = T.alloc_buffer((1,), i32, scope="local")
                going = T.alloc_buffer((1,), i32, scope="local")
                picked = T.alloc_buffer((5,), f32, scope="local")
                mine_v[0] = T.float32(NEG_INF)
                mine_i[0] = 0
                for e in T.serial(per_thread):
                    if e * THREADS + tx < n:
                        Work[r, e * THREADS + tx] = T.Select(
                            Scores[r // classes, r % classes, e * THREADS + tx] > Threshold[0],
                            Scores[r // classes, r % classes, e * THREADS + tx],
                            T.float32(NEG_INF),
                        )
                        if Work[r, e * THREADS + tx] > mine_v[0]:
                            mine_v[0] = Work[r, e * THREADS + tx]
                            mine_i[0] = e * THREADS + tx
                if tx == 0:
                    state[0] = 0
                    state[1] = 1
                for step in T.serial(k):
                    block_argmax(red_v, red_i, tx, mine_v, mine_i, other_v, other_i)
                    going[0] = state[1]
                    if tx == 0:
                        if (
                            going[0] == 1
                            and T.Cast(i64, step) < Limit[0]
                            and mine_v[0] > Threshold[0]
                        ):
                            Picks[r, step] = T.Cast(i64, mine_i[0])
                            Picked[r, step] = mine_v[0]
                            state[0] = step + 1
                            Work[r, mine_i[0]] = T.float32(NEG_INF)
                            geometry(Boxes, r // classes, mine_i[0], g)
                            for j in T.unroll(5):
                                chosen[j] = g[j]
                        else:
                            state[1] = 0
                    T.tvm_storage_sync("shared")
                    going[0] = state[1]
                    for j in T.unroll(5):
                        picked[j] = chosen[j]
                    mine_v[0] = T.float32(NEG_INF)
                    mine_i[0] = 0
                    if going[0] == 1:
                        for e in T.serial(per_thread):
                            if e * THREADS + tx < n:
                                geometry(Boxes, r // classes, e * THREADS + tx, g)
                                decay(Work, r, e * THREADS + tx, g, picked, Iou[0])
                                if Work[r, e * THREADS + tx] > mine_v[0]:
                                    mine_v[0] = Work[r, e * THREADS + tx]
                                    mine_i[0] = e * THREADS + tx
                going[0] = state[0]
                if tx == 0:
                    Counts[r] = T.Cast(i64, going[0])
        for _once in T.thread_binding(1, thread="blockIdx.x"):
            for _t in T.thread_binding(1, thread="threadIdx.x"):
                Total[0] = T.int64(0)
                for r in T.serial(rows):
                    Total[0] = Total[0] + Counts[r]

    return soft_nms_cuda


def compact_cuda(batches: int, classes: int, max_selected: int) -> tirx.PrimFunc:
    """The CUDA PrimFunc ``(Picks, Picked, Counts, m, Selected, Scores)`` of
    :func:`rewriter.backends.tvm.kernels.soft_nms.compact`, on one thread.

    >>> [p.name for p in compact_cuda(1, 2, 10).params][3]
    'm'
    """
    rows, k = batches * classes, max(1, max_selected)
    f32, i64 = "float32", "int64"

    @T.prim_func
    def soft_nms_compact_cuda(
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
        for _once in T.thread_binding(1, thread="blockIdx.x"):
            for _t in T.thread_binding(1, thread="threadIdx.x"):
                offset = T.alloc_buffer((1,), i64, scope="local")
                offset[0] = T.int64(0)
                for r in T.serial(rows):
                    for j in T.serial(Counts[r]):
                        Selected[offset[0] + j, 0] = T.int64(r // classes)
                        Selected[offset[0] + j, 1] = T.int64(r % classes)
                        Selected[offset[0] + j, 2] = Picks[r, j]
                        Scores[offset[0] + j] = Picked[r, j]
                    offset[0] = offset[0] + Counts[r]

    return soft_nms_compact_cuda
