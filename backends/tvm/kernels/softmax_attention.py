"""Exact softmax attention as one fused CPU TIR kernel: ``softmax(scale * QKᵀ + mask) V``.

``Out[b, i, :] = sum_j p(b, i, j) V[b, j, :]`` with ``p(b, i, :) = softmax(scale *
Q[b, i]·K[b, :] + Mask[b, i, :])``: the function of ``MatMul(TwoPassSoftmax(QKᵀ·s +
mask), V)`` that :mod:`rewriter.backends.tvm.attention_fusion` finds in a model. It is
exact (the same function; float32 rounding differs as any reassociation does).

Layout (the lowering, :mod:`rewriter.backends.tvm.ops.softmax_attention`, produces it with
:mod:`rewriter.backends.tvm.ops.attention_layout`, keys not padded):

* ``Q[bh, n, d]``, ``Kt[bh, d, m]`` (K transposed), ``V[bh, m, dv]``;
* ``Mask[mbh, mq, m]`` (optional) with ``mbh`` in ``{1, bh}`` and ``mq`` in ``{1, n}``;
* ``Out[bh, n, dv]``.

Sizes: ``bh``, ``n`` and ``m`` are ints, or ``tirx.Var`` for a library of symbolic batch
and lengths (the head dimensions stay static). No input is padded, so a symbolic library
makes no copy of K or V to pad them: the keys after the last whole vector are scored by
the vector of the last ``lanes`` keys (the keys before them computed again, to the same
bits) over a row end set to -inf, and fewer keys than a vector one dot product each.

Schedule (by hand): the ``bh x ceil(n / ROWS)`` tiles of ``ROWS`` query rows are walked
``TASK_TILES`` at a time by a parallel loop. A tile keeps its rows' scores, ``ROWS x mp``
floats (``mp``: ``m`` rounded up to whole vectors), in a buffer of its task (on the
stack up to 4 KiB, :mod:`rewriter.backends.tvm.stack_tiles`: 256 keys of four rows; else
a workspace of the pool, in L1/L2, allocated once for the task's tiles), and makes three
sweeps over it:

1. scores: ``ROWS x KEY_VECTORS`` register tiles of outer products (a broadcast of
   ``q[i, c]`` times the vector ``Kt[c, j:j+lanes]``), scaled, masked and stored, with
   a running per-lane maximum of each row;
2. ``e**(s - max)`` in place (the float32 exponential of
   :mod:`rewriter.backends.tvm.kernels.common.exp_pair`, ``vscalefps`` on AVX512) and
   the row sums;
3. ``acc[i, :] += e[i, j] V[j, :]`` for every key (``ROWS x dv`` accumulators in
   registers), and ``Out[i, :] = acc[i, :] / sum[i]``.

The scores never leave the core's caches, so subtracting the row maximum (one more sweep
over L1) is cheaper than the two-pass algorithm's scaled pairs, which exist to save a
sweep over memory. A row whose every key is masked with -inf gives zeros (the sdpa
exports' ``Where(IsNaN(p), 0, p)``; a bare Softmax gives NaN there). The last query tile
recomputes clamped rows and does not store them.
"""

from __future__ import annotations

from typing import TypeAlias

import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.score_tile import score_tile
from rewriter.backends.tvm.kernels.common.simd_plan import (
    bcast,
    dividing_lanes,
    isa,
    lanes_of,
    span,
)

Size: TypeAlias = int | tirx.Var

# Query rows per tile and key vectors per register tile of scores (ROWS x KEY_VECTORS
# vectors; ROWS x dv / lanes output accumulators).
ROWS = 4
KEY_VECTORS = 4
# Query tiles per parallel task: its buffers are allocated once for them all (a tile's
# scores over more than 256 keys, or a symbolic number, are a pool workspace).
TASK_TILES = 4


def _is_one(size: Size) -> bool:
    return isinstance(size, int) and size == 1


def softmax_attention(
    batch_heads: Size,
    q_len: Size,
    k_len: Size,
    head_dim: int,
    *,
    target: tvm.target.Target,
    has_mask: bool,
    value_dim: int | None = None,
    mask_heads: Size = 1,
    mask_rows: Size = 1,
    scale: float = 1.0,
) -> tirx.PrimFunc:
    """The fused PrimFunc ``(Q, Kt, V[, Mask], Out)`` of softmax attention.

    ``k_len`` is the number of keys (any); see the module docstring for the buffer
    layout. ``batch_heads``, ``q_len`` and ``k_len`` are ints, or ``tirx.Var`` (int64)
    for symbolic sizes (a tile's scores are then a workspace of the pool).
    ``mask_heads`` (1 or ``batch_heads``) and
    ``mask_rows`` (1 or ``q_len``, the same object when symbolic) give the mask's
    broadcast layout. float32 only.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
    >>> func = softmax_attention(2, 8, 16, 4, target=target, has_mask=False, scale=0.5)
    >>> [p.name for p in func.params]
    ['Q', 'Kt', 'V', 'Out']
    """
    if isa(target) == "cuda":
        raise ValueError("the softmax attention kernel is CPU only")
    lanes = lanes_of(target)
    scalef = isa(target) == "avx512"
    if not (_is_one(mask_heads) or mask_heads is batch_heads or mask_heads == batch_heads):
        raise ValueError("mask_heads must be 1 or batch_heads")
    if not (_is_one(mask_rows) or mask_rows is q_len or mask_rows == q_len):
        raise ValueError("mask_rows must be 1 or q_len")
    bh, n, m, d = batch_heads, q_len, k_len, head_dim
    dv = head_dim if value_dim is None else value_dim
    vl = dividing_lanes(lanes, dv)
    key_vectors = max(1, min(KEY_VECTORS, m // lanes)) if isinstance(m, int) else KEY_VECTORS
    block = key_vectors * lanes
    blocks, rest = m // block, (m % block) // lanes  # rest < key_vectors vectors
    tail = m % lanes  # keys after the last whole vector
    mp = (m + lanes - 1) // lanes * lanes  # a row of a tile's scores: whole vectors
    tiles = (n + ROWS - 1) // ROWS
    per_head, per_row = not _is_one(mask_heads), not _is_one(mask_rows)
    f32 = "float32"
    scale_v = ep.const(scale, f32, lanes)
    zero_v = ep.const(0.0, f32, lanes)
    lowest_v = ep.const(-float("inf"), f32, lanes)

    def row_of(i0: tirx.Expr, r: int) -> tirx.Expr:
        return tirx.min(i0 + r, n - 1)

    def mask_at(mask: tirx.Buffer, b: tirx.Expr, i: tirx.Expr, j0: tirx.Expr) -> tirx.Expr:
        return mask[b if per_head else 0, i if per_row else 0, span(j0, lanes)]

    def exp(x: tirx.Expr) -> tirx.Expr:
        mant, expo = ep.exp_pair(x, lanes)
        return ep.scale(mant, expo, lanes, scalef) if scalef else mant * ep.pow2(expo, lanes)

    scores = score_tile(rows=ROWS, key_vectors=key_vectors, lanes=lanes, head_dim=d, row_of=row_of)

    @T.macro
    def score_block(Q, Kt, mask, sc, s, top, b, i0, j0, nvec):
        # An ROWS x nvec register tile of scores, one rank-1 update per head-dim channel;
        # scaled and masked into the tile's scores, with the running per-lane maxima.
        scores(Q, Kt, sc, b, i0, j0, nvec)
        for r in T.unroll(ROWS):
            for c in T.unroll(nvec):
                if mask is None:
                    s[span(r * mp + j0 + c * lanes, lanes)] = (
                        sc[span((r * key_vectors + c) * lanes, lanes)] * scale_v
                    )
                else:
                    s[span(r * mp + j0 + c * lanes, lanes)] = sc[
                        span((r * key_vectors + c) * lanes, lanes)
                    ] * scale_v + mask_at(mask, b, row_of(i0, r), j0 + c * lanes)
                top[span(r * lanes, lanes)] = tirx.max(
                    top[span(r * lanes, lanes)], s[span(r * mp + j0 + c * lanes, lanes)]
                )

    @T.macro
    def score_scalars(Q, Kt, mask, s, top, b, i0):
        # Fewer keys than a vector: each score a dot product of its own.
        for j in T.serial(m):
            for r in T.unroll(ROWS):
                s[r * mp + j] = T.float32(0.0)
                for k in T.serial(d):
                    s[r * mp + j] = s[r * mp + j] + Q[b, row_of(i0, r), k] * Kt[b, k, j]
                if mask is None:
                    s[r * mp + j] = s[r * mp + j] * T.float32(scale)
                else:
                    s[r * mp + j] = s[r * mp + j] * T.float32(scale) + mask[
                        b if per_head else 0, row_of(i0, r) if per_row else 0, j
                    ]
                top[r * lanes] = T.max(top[r * lanes], s[r * mp + j])

    @T.macro
    def score_tail(Q, Kt, mask, sc, s, top, b, i0):
        # The keys after the last whole vector: -inf over the row's last vector of scores,
        # then the vector of the last `lanes` keys over it (the keys before the tail are
        # computed again, to the same bits), so every read stays inside the inputs.
        for r in T.unroll(ROWS):
            s[span(r * mp + mp - lanes, lanes)] = lowest_v
        if m >= lanes:
            score_block(Q, Kt, mask, sc, s, top, b, i0, m - lanes, 1)
        else:
            score_scalars(Q, Kt, mask, s, top, b, i0)

    @T.macro
    def tile(Q, Kt, V, mask, Out, t, sc, s, top, row_max, total, row_sum, acc):
        b = t // tiles
        i0 = t % tiles * ROWS
        for r in T.unroll(ROWS):
            top[span(r * lanes, lanes)] = lowest_v
        for kb in T.serial(blocks):
            score_block(Q, Kt, mask, sc, s, top, b, i0, kb * block, key_vectors)
        for kr in T.serial(rest):
            score_block(Q, Kt, mask, sc, s, top, b, i0, blocks * block + kr * lanes, 1)
        if tail > 0:
            score_tail(Q, Kt, mask, sc, s, top, b, i0)
        for r in T.unroll(ROWS):
            row_max[r] = top[r * lanes]
            for lane in T.serial(1, lanes):
                row_max[r] = T.max(row_max[r], top[r * lanes + lane])
        # e**(s - max) in place, and the row sums.
        for r in T.unroll(ROWS):
            total[span(r * lanes, lanes)] = zero_v
            for jv in T.serial(mp // lanes):
                s[span(r * mp + jv * lanes, lanes)] = s[
                    span(r * mp + jv * lanes, lanes)
                ] - bcast(row_max[r], lanes)
                s[span(r * mp + jv * lanes, lanes)] = exp(s[span(r * mp + jv * lanes, lanes)])
                total[span(r * lanes, lanes)] = (
                    total[span(r * lanes, lanes)] + s[span(r * mp + jv * lanes, lanes)]
                )
            row_sum[r] = total[r * lanes]
            for lane in T.serial(1, lanes):
                row_sum[r] = row_sum[r] + total[r * lanes + lane]
        # acc[r, :] = sum_j e[r, j] V[j, :], then divided by the row sums.
        for r in T.unroll(ROWS):
            for u in T.unroll(dv // vl):
                acc[span(r * dv + u * vl, vl)] = ep.const(0.0, f32, vl)
        for j in T.serial(m):
            for r in T.unroll(ROWS):
                for u in T.unroll(dv // vl):
                    acc[span(r * dv + u * vl, vl)] = (
                        acc[span(r * dv + u * vl, vl)]
                        + bcast(s[r * mp + j], vl) * V[b, j, span(u * vl, vl)]
                    )
        for r in T.unroll(ROWS):
            if i0 + r < n:
                for u in T.unroll(dv // vl):
                    Out[b, i0 + r, span(u * vl, vl)] = T.Select(
                        row_max[r] > T.float32(-float("inf")),
                        acc[span(r * dv + u * vl, vl)] * bcast(T.float32(1.0) / row_sum[r], vl),
                        ep.const(0.0, f32, vl),
                    )

    @T.macro
    def task(Q, Kt, V, mask, Out, g):
        # Tiles g * TASK_TILES ... share one set of buffers (the scores' may be a workspace).
        sc = T.alloc_buffer((ROWS * key_vectors * lanes,), f32, scope="global")
        s = T.alloc_buffer((ROWS * mp,), f32, scope="global")
        top = T.alloc_buffer((ROWS * lanes,), f32, scope="global")
        row_max = T.alloc_buffer((ROWS,), f32, scope="global")
        total = T.alloc_buffer((ROWS * lanes,), f32, scope="global")
        row_sum = T.alloc_buffer((ROWS,), f32, scope="global")
        acc = T.alloc_buffer((ROWS * dv,), f32, scope="global")
        for t in T.serial(g * TASK_TILES, T.min(g * TASK_TILES + TASK_TILES, bh * tiles)):
            tile(Q, Kt, V, mask, Out, t, sc, s, top, row_max, total, row_sum, acc)

    if has_mask:

        @T.prim_func
        def softmax_attention_masked(
            Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
            Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
            V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
            Mask: T.Buffer((mask_heads, mask_rows, m), f32),  # type: ignore[valid-type]
            Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
        ):
            T.func_attr({"tirx.noalias": True})
            for g in T.parallel((bh * tiles + TASK_TILES - 1) // TASK_TILES):
                task(Q, Kt, V, Mask, Out, g)

        return softmax_attention_masked

    @T.prim_func
    def softmax_attention(
        Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
        Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
        V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
        Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for g in T.parallel((bh * tiles + TASK_TILES - 1) // TASK_TILES):
            task(Q, Kt, V, None, Out, g)

    return softmax_attention
