"""The recurrences of ONNX ``LSTM`` and ``GRU``: one kernel runs every time step.

The lowering (:mod:`rewriter.backends.tvm.recurrent`) computes the input projection of
all steps first, as one matmul ``XW = X W^T + b`` that the matmul rule schedules; what
is left depends on the previous step, and is this kernel. On one thread the directions
run one after the other (each one's weights stay in L2); on more (TVM's
``runtime.NumThreads``, asked once per call), a bidirectional layer's two directions
take each step together, one parallel loop over both directions' tasks (:data:`TOGETHER`).
Per step, the hidden units are split in blocks
of ``2 x lanes`` (a task; the tasks of a step run in parallel): a task accumulates its
units' gates over the previous hidden state, ``acc[g] = XW[t, b, d, g] + sum_k h[k]
R^T[k, g]``, as a register tile of vectors (eight rows, two gates at a time, of one
vector of units; four rows and every gate; or one row and every gate of both vectors),
then applies the gates in place. The recurrent weights are packed per task, ``RT[d,
block, k, g, unit]``, so a task reads one contiguous panel per step.

Buffers (``seq`` and ``batch`` symbolic; ``hp`` the hidden size padded to whole tasks,
the padded units' weights zero; ONNX's gate order):

* LSTM (gates i, o, f, c): ``XW[seq, batch, dirs x 4 x hp]``, ``RT[dirs, blocks, hidden,
  4, 2 lanes]``, ``H0``, ``C0[dirs, batch, hp]``, ``P[dirs, 3, hp]`` (peepholes i, o, f)
  -> ``Y[seq, dirs, batch, hp]``, ``YH``, ``YC[dirs, batch, hp]``;
* GRU (gates z, r, h): ``XW[seq, batch, dirs x 3 x hp]``, ``RT[dirs, blocks, hidden, 3,
  2 lanes]``, ``H0[dirs, batch, hp]``, ``RB[dirs, hp]`` (the recurrent bias of the h
  gate where ``linear_before_reset``; else it is in ``XW``) -> ``Y``, ``YH``. Without
  ``linear_before_reset`` the h gate reads ``r * h``, which needs every unit's ``r``
  first: a step is then two parallel loops (z and r; then h).

The state ``h`` is read from the previous step's ``Y`` (or ``H0``), so the step's writes
never meet its reads; ``c`` is updated in place in ``YC`` (a unit's ``c`` is read and
written by one task). ``f``, ``g``, ``h`` are ONNX's defaults (sigmoid, tanh, tanh; see
:mod:`rewriter.backends.tvm.kernels.common.activations`); ``clip`` bounds every
activation's input.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm import parallel_cost
from rewriter.backends.tvm.kernels.common import activations as act
from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.simd_plan import bcast, isa, span

# Vectors of units per task; rows per tile where the batch has whole tiles: 8 rows, two
# gates at a time (16 accumulators), then 4 rows, every gate; single rows take both
# vectors of units, every gate.
UNIT_VECTORS = 2
WIDE_ROWS = 8
GATES_PER_PASS = 2
ROW_TILE = 4
GATES = {"lstm": 4, "gru": 3}
# Threads from which a bidirectional layer's directions take each step together: half
# the parallel loops (each one wakes the workers and waits for the last task) and twice
# the tasks per loop. On one thread that order would alternate the two directions'
# weights through L2 at every step (2 MiB of LSTM weights at 256 units: the LSTM zoo
# model at 2.3x its time, batch 1); from two threads the LSTM of the zoo took 3-16% less
# time than with the directions one after the other (side by side, batch 1 and 8).
TOGETHER = 2


def lanes_for(target: tvm.target.Target) -> int:
    """float32 lanes of one vector on ``target``."""
    return {"avx512": 16, "avx2": 8}.get(isa(target), 4)


def unit_of(target: tvm.target.Target) -> int:
    """Hidden units per task: ``UNIT_VECTORS`` vectors."""
    return UNIT_VECTORS * lanes_for(target)


def padded_hidden(hidden: int, target: tvm.target.Target) -> int:
    """``hidden`` rounded up to whole tasks."""
    unit = unit_of(target)
    return -(-hidden // unit) * unit


def recurrence(
    kind: str,
    hidden: int,
    directions: int,
    *,
    reverse: bool,
    target: tvm.target.Target,
    clip: float | None = None,
    peepholes: bool = False,
    linear_before_reset: bool = True,
) -> tirx.PrimFunc:
    """The PrimFunc of ``kind`` ("lstm" or "gru") over symbolic ``seq`` and ``batch``.

    ``directions`` is 2 (forward, then reverse) or 1 (reverse if ``reverse``).

    >>> func = recurrence("lstm", 20, 2, reverse=False, target=resolve("avx512"))  # doctest: +SKIP
    >>> [p.name for p in func.params]  # doctest: +SKIP
    ['XW', 'RT', 'H0', 'C0', 'P', 'Y', 'YH', 'YC']
    """
    if kind not in GATES:
        raise ValueError(f"recurrence: kind is 'lstm' or 'gru', not {kind!r}")
    lanes = lanes_for(target)
    unit = UNIT_VECTORS * lanes
    hp = padded_hidden(hidden, target)
    blocks = hp // unit
    gates = GATES[kind]
    dirs = directions
    f32 = "float32"
    seq = tirx.Var("seq", "int64")
    batch = tirx.Var("batch", "int64")
    acc_size = WIDE_ROWS * gates * lanes  # the tallest tile: 8 rows x gates x 1 vector

    def v(value: float) -> tirx.Expr:
        return ep.const(value, f32, lanes)

    # Whether the directions take each step together (TOGETHER): asked of the runtime
    # once per call; never for one direction.
    together = (
        tirx.call_packed("runtime.NumThreads") >= TOGETHER
        if dirs > 1
        else tirx.const(False, "bool")
    )

    def clipped(x: tirx.Expr) -> tirx.Expr:
        return x if clip is None else tirx.max(tirx.min(x, v(clip)), v(-clip))

    def time_of(d: tirx.Expr, s: tirx.Expr) -> tirx.Expr:
        if dirs == 2:
            return tirx.Select(d == 0, s, seq - 1 - s)
        return seq - 1 - s if reverse else s

    def previous(d: tirx.Expr, s: tirx.Expr) -> tirx.Expr:
        return time_of(d, s - 1)

    def h_prev(H0: Any, Y: Any, first: bool, tp: Any, d: Any, b: Any, at: Any) -> tirx.Expr:
        return H0[d, b, at] if first else Y[tp, d, b, at]

    def slot(r: int, g: int, w: int, vectors: int) -> tirx.Expr:
        return span(((r * gates + g) * vectors + w) * lanes, lanes)

    @T.macro
    def sigmoid_in_place(acc, ex, at):
        ex[span(0, lanes)] = act.sigmoid_exp(acc[at], lanes)
        acc[at] = act.sigmoid(acc[at], ex[span(0, lanes)], lanes)

    @T.macro
    def tanh_in_place(acc, ex, at):
        ex[span(0, lanes)] = act.tanh_exp(acc[at], lanes)
        acc[at] = act.tanh(acc[at], ex[span(0, lanes)], lanes)

    @T.macro
    def accumulate(XW, RT, H0, Y, RB, acc, first, tp, t, d, blk, b0, rows, w0, vectors, g0, g1):
        # acc[r, g, w] = XW (or the recurrent bias) + sum_k h[b0 + r, k] R^T[k, g, w], g0 <= g < g1
        for r in T.unroll(rows):
            for g in T.unroll(g0, g1):
                for w in T.unroll(vectors):
                    acc[slot(r, g, w, vectors)] = XW[
                        t, b0 + r, span((d * gates + g) * hp + blk * unit + (w0 + w) * lanes, lanes)
                    ]
            if kind == "gru" and linear_before_reset and g1 == 3:
                for w in T.unroll(vectors):
                    acc[slot(r, 2, w, vectors)] = RB[d, span(blk * unit + (w0 + w) * lanes, lanes)]
        for k in T.serial(hidden):
            for r in T.unroll(rows):
                for g in T.unroll(g0, g1):
                    for w in T.unroll(vectors):
                        acc[slot(r, g, w, vectors)] = (
                            acc[slot(r, g, w, vectors)]
                            + bcast(h_prev(H0, Y, first, tp, d, b0 + r, k), lanes)
                            * RT[d, blk, k, g, span((w0 + w) * lanes, lanes)]
                        )

    @T.macro
    def gates_of(XW, RT, H0, Y, RB, acc, first, tp, t, d, blk, b0, rows, w0, vectors, g0, g1):
        # A tall tile (WIDE_ROWS rows) takes its gates GATES_PER_PASS at a time, so that its
        # accumulators fit the registers; each weight vector then serves 8 rows.
        if rows == WIDE_ROWS and g0 + GATES_PER_PASS < g1:
            accumulate(
                XW,
                RT,
                H0,
                Y,
                RB,
                acc,
                first,
                tp,
                t,
                d,
                blk,
                b0,
                rows,
                w0,
                vectors,
                g0,
                g0 + GATES_PER_PASS,
            )
            accumulate(
                XW,
                RT,
                H0,
                Y,
                RB,
                acc,
                first,
                tp,
                t,
                d,
                blk,
                b0,
                rows,
                w0,
                vectors,
                g0 + GATES_PER_PASS,
                g1,
            )
        else:
            accumulate(XW, RT, H0, Y, RB, acc, first, tp, t, d, blk, b0, rows, w0, vectors, g0, g1)

    @T.macro
    def lstm_tile(XW, RT, H0, P, Y, YC, acc, ex, first, tp, t, d, blk, b0, rows, w0, vectors):
        gates_of(XW, RT, H0, Y, None, acc, first, tp, t, d, blk, b0, rows, w0, vectors, 0, 4)
        for r in T.unroll(rows):
            for w in T.unroll(vectors):
                # i = 0, o = 1, f = 2, c = 3; peepholes i = 0, o = 1, f = 2
                if peepholes:
                    acc[slot(r, 0, w, vectors)] = (
                        acc[slot(r, 0, w, vectors)]
                        + P[d, 0, span(blk * unit + (w0 + w) * lanes, lanes)]
                        * YC[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)]
                    )
                    acc[slot(r, 2, w, vectors)] = (
                        acc[slot(r, 2, w, vectors)]
                        + P[d, 2, span(blk * unit + (w0 + w) * lanes, lanes)]
                        * YC[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)]
                    )
                if peepholes:  # o is clipped after its peephole term, below
                    acc[slot(r, 0, w, vectors)] = clipped(acc[slot(r, 0, w, vectors)])
                    for g in T.unroll(2, 4):
                        acc[slot(r, g, w, vectors)] = clipped(acc[slot(r, g, w, vectors)])
                else:
                    for g in T.unroll(4):
                        acc[slot(r, g, w, vectors)] = clipped(acc[slot(r, g, w, vectors)])
                sigmoid_in_place(acc, ex, slot(r, 0, w, vectors))
                sigmoid_in_place(acc, ex, slot(r, 2, w, vectors))
                tanh_in_place(acc, ex, slot(r, 3, w, vectors))
                # c = f c' + i g(c~), in place
                YC[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)] = (
                    acc[slot(r, 2, w, vectors)]
                    * YC[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)]
                    + acc[slot(r, 0, w, vectors)] * acc[slot(r, 3, w, vectors)]
                )
                if peepholes:
                    acc[slot(r, 1, w, vectors)] = clipped(
                        acc[slot(r, 1, w, vectors)]
                        + P[d, 1, span(blk * unit + (w0 + w) * lanes, lanes)]
                        * YC[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)]
                    )
                sigmoid_in_place(acc, ex, slot(r, 1, w, vectors))
                acc[slot(r, 3, w, vectors)] = YC[
                    d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)
                ]
                tanh_in_place(acc, ex, slot(r, 3, w, vectors))
                Y[t, d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)] = (
                    acc[slot(r, 1, w, vectors)] * acc[slot(r, 3, w, vectors)]
                )

    @T.macro
    def gru_tile(
        XW, RT, H0, RB, Y, Z, RH, acc, ex, first, tp, t, d, blk, b0, rows, w0, vectors, phase
    ):
        # phase 0: every gate (linear_before_reset); 1: z and r; 2: h (reads r h from RH)
        if phase == 0:
            gates_of(XW, RT, H0, Y, RB, acc, first, tp, t, d, blk, b0, rows, w0, vectors, 0, 3)
        if phase == 1:
            gates_of(XW, RT, H0, Y, RB, acc, first, tp, t, d, blk, b0, rows, w0, vectors, 0, 2)
        if phase == 2:
            # acc[h] = XW[h] + sum_k (r h)[k] R^T[k, h]
            gates_of(XW, RT, RH, None, RB, acc, True, tp, t, d, blk, b0, rows, w0, vectors, 2, 3)
        for r in T.unroll(rows):
            for w in T.unroll(vectors):
                if phase != 2:
                    for g in T.unroll(2):
                        acc[slot(r, g, w, vectors)] = clipped(acc[slot(r, g, w, vectors)])
                        sigmoid_in_place(acc, ex, slot(r, g, w, vectors))
                if phase == 1:
                    Z[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)] = acc[
                        slot(r, 0, w, vectors)
                    ]
                    RH[d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)] = acc[
                        slot(r, 1, w, vectors)
                    ] * h_prev(
                        H0, Y, first, tp, d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)
                    )
                if phase != 1:
                    if phase == 0:
                        # h~ = g(XW[h] + r (h R^T + Rb))
                        acc[slot(r, 2, w, vectors)] = clipped(
                            XW[
                                t,
                                b0 + r,
                                span((d * gates + 2) * hp + blk * unit + (w0 + w) * lanes, lanes),
                            ]
                            + acc[slot(r, 1, w, vectors)] * acc[slot(r, 2, w, vectors)]
                        )
                    else:
                        acc[slot(r, 2, w, vectors)] = clipped(acc[slot(r, 2, w, vectors)])
                        acc[slot(r, 0, w, vectors)] = Z[
                            d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)
                        ]
                    tanh_in_place(acc, ex, slot(r, 2, w, vectors))
                    # h = (1 - z) h~ + z h'
                    Y[t, d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)] = (
                        v(1.0) - acc[slot(r, 0, w, vectors)]
                    ) * acc[slot(r, 2, w, vectors)] + acc[slot(r, 0, w, vectors)] * h_prev(
                        H0, Y, first, tp, d, b0 + r, span(blk * unit + (w0 + w) * lanes, lanes)
                    )

    @T.macro
    def tile(XW, RT, H0, PB, Y, C, RH, acc, ex, first, tp, t, d, blk, b0, rows, w0, vectors, phase):
        # LSTM: PB the peepholes, C the cell state; GRU: PB the recurrent bias, C the gate z
        if kind == "lstm":
            lstm_tile(XW, RT, H0, PB, Y, C, acc, ex, first, tp, t, d, blk, b0, rows, w0, vectors)
        else:
            gru_tile(
                XW,
                RT,
                H0,
                PB,
                Y,
                C,
                RH,
                acc,
                ex,
                first,
                tp,
                t,
                d,
                blk,
                b0,
                rows,
                w0,
                vectors,
                phase,
            )

    @T.macro
    def task(XW, RT, H0, PB, Y, C, RH, first, s, d, blk, phase):
        # The batch in tiles of WIDE_ROWS, then one of ROW_TILE rows, then single rows.
        acc = T.alloc_buffer((acc_size,), f32, scope="global")
        ex = T.alloc_buffer((lanes,), f32, scope="global")
        tp, t = previous(d, s), time_of(d, s)
        for bt in T.serial(batch // WIDE_ROWS):
            for w0 in T.unroll(UNIT_VECTORS):
                tile(
                    XW,
                    RT,
                    H0,
                    PB,
                    Y,
                    C,
                    RH,
                    acc,
                    ex,
                    first,
                    tp,
                    t,
                    d,
                    blk,
                    bt * WIDE_ROWS,
                    WIDE_ROWS,
                    w0,
                    1,
                    phase,
                )
        if batch % WIDE_ROWS >= ROW_TILE:
            for w0 in T.unroll(UNIT_VECTORS):
                b0 = batch // WIDE_ROWS * WIDE_ROWS
                tile(
                    XW,
                    RT,
                    H0,
                    PB,
                    Y,
                    C,
                    RH,
                    acc,
                    ex,
                    first,
                    tp,
                    t,
                    d,
                    blk,
                    b0,
                    ROW_TILE,
                    w0,
                    1,
                    phase,
                )
        for br in T.serial(batch % ROW_TILE):
            b0 = batch // ROW_TILE * ROW_TILE + br
            tile(
                XW,
                RT,
                H0,
                PB,
                Y,
                C,
                RH,
                acc,
                ex,
                first,
                tp,
                t,
                d,
                blk,
                b0,
                1,
                0,
                UNIT_VECTORS,
                phase,
            )

    @T.macro
    def step(XW, RT, H0, PB, Y, C, RH, first, s, d0, count):
        # Step s of directions d0 .. d0 + count - 1: their tasks in one parallel loop
        # (both directions where they take the step together, TOGETHER); a GRU without
        # linear_before_reset in two (z and r; then h). Parallel however small a step
        # (parallel_cost.EVERY_STEP).
        if kind == "gru" and not linear_before_reset:
            for db in T.parallel(count * blocks, annotations={parallel_cost.EVERY_STEP: 1}):
                task(XW, RT, H0, PB, Y, C, RH, first, s, d0 + db // blocks, db % blocks, 1)
            for db in T.parallel(count * blocks, annotations={parallel_cost.EVERY_STEP: 1}):
                task(XW, RT, H0, PB, Y, C, RH, first, s, d0 + db // blocks, db % blocks, 2)
        else:
            for db in T.parallel(count * blocks, annotations={parallel_cost.EVERY_STEP: 1}):
                task(XW, RT, H0, PB, Y, C, RH, first, s, d0 + db // blocks, db % blocks, 0)

    @T.macro
    def run(XW, RT, H0, PB, Y, C, RH):
        # Every step: of both directions together, or of one direction after the other.
        if seq > 0 and together:
            step(XW, RT, H0, PB, Y, C, RH, True, T.int64(0), T.int64(0), dirs)
            for s in T.serial(seq - 1):
                step(XW, RT, H0, PB, Y, C, RH, False, s + 1, T.int64(0), dirs)
        elif seq > 0:
            for d in T.serial(dirs):
                step(XW, RT, H0, PB, Y, C, RH, True, T.int64(0), d, 1)
                for s in T.serial(seq - 1):
                    step(XW, RT, H0, PB, Y, C, RH, False, s + 1, d, 1)

    @T.macro
    def last_state(H0, Y, YH):
        # YH: each direction's last output (its first state where the sequence is empty).
        for d, b, u in T.grid(dirs, batch, hp // lanes):
            if seq > 0:
                YH[d, b, span(u * lanes, lanes)] = Y[
                    time_of(d, seq - 1), d, b, span(u * lanes, lanes)
                ]
            else:
                YH[d, b, span(u * lanes, lanes)] = H0[d, b, span(u * lanes, lanes)]

    if kind == "lstm":

        @T.prim_func
        def lstm_recurrence(
            XW: T.Buffer((seq, batch, dirs * 4 * hp), f32),  # type: ignore[valid-type]
            RT: T.Buffer((dirs, blocks, hidden, 4, unit), f32),  # type: ignore[valid-type]
            H0: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
            C0: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
            P: T.Buffer((dirs, 3, hp), f32),  # type: ignore[valid-type]
            Y: T.Buffer((seq, dirs, batch, hp), f32),  # type: ignore[valid-type]
            YH: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
            YC: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
        ):
            T.func_attr({"tirx.noalias": True})
            for d, b, u in T.grid(dirs, batch, hp // lanes):
                YC[d, b, span(u * lanes, lanes)] = C0[d, b, span(u * lanes, lanes)]
            run(XW, RT, H0, P, Y, YC, None)
            last_state(H0, Y, YH)

        return lstm_recurrence

    @T.prim_func
    def gru_recurrence(
        XW: T.Buffer((seq, batch, dirs * 3 * hp), f32),  # type: ignore[valid-type]
        RT: T.Buffer((dirs, blocks, hidden, 3, unit), f32),  # type: ignore[valid-type]
        H0: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
        RB: T.Buffer((dirs, hp), f32),  # type: ignore[valid-type]
        Y: T.Buffer((seq, dirs, batch, hp), f32),  # type: ignore[valid-type]
        YH: T.Buffer((dirs, batch, hp), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        # z and r h of a step without linear_before_reset (unused with it)
        Z = T.alloc_buffer((dirs, batch if not linear_before_reset else 1, hp), f32, scope="global")
        RH = T.alloc_buffer(
            (dirs, batch if not linear_before_reset else 1, hp), f32, scope="global"
        )
        run(XW, RT, H0, RB, Y, Z, RH)
        last_state(H0, Y, YH)

    return gru_recurrence
