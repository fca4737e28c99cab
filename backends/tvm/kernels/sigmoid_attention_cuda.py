"""Sigmoid attention (arXiv 2409.04431) as one fused CUDA TIR kernel.

Same contract as the CPU kernel :func:`rewriter.backends.tvm.kernels.sigmoid_attention.
sigmoid_attention`: ``Out[b, i, :] = sum_j p(b, i, j) * V[b, j, :]`` with ``p =
sigmoid(scale * Q[b, i]·K[b, j] + bias + Mask[b, i, j])`` and ``p = 0`` exactly where
``Mask <= -1e4``; buffers ``Q[bh, n, d]``, ``Kt[bh, d, mp]``, ``V[bh, mp, dv]``,
``Mask[1|bh, 1|n, mp]`` (optional), ``Out[bh, n, dv]``; padded keys (zero rows of V)
contribute 0.

Schedule: one thread block of :data:`THREADS` threads per ``(bh, tile of ROWS query
rows)``. The keys are walked in tiles of ``key_tile`` keys; per tile the block

1. loads ``Kt[:, tile]`` and ``V[tile, :]`` into shared memory (coalesced, keys past
   ``mp`` read as 0);
2. computes the ``ROWS x key_tile`` probabilities into shared memory, each thread a
   strided share of them (a dot product over ``d`` with Q read from global/L1, then
   ``scale * s + bias (+ mask)``, ``1 / (1 + e**-s)`` with ``-s`` clamped so ``e**-s``
   stays finite, and the mask select);
3. accumulates ``acc[r, c] += p[r, j] * V[j, c]`` in registers, each thread owning a
   strided share of the ``ROWS x dv`` outputs.

No row max, no row sum, and no n x m buffer in global memory: the only score storage is
the ``ROWS x key_tile`` shared tile.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

THREADS = 128
# Query rows per thread block.
ROWS = 16
# Keys per shared-memory tile, at most; fewer for wide heads (shared memory budget).
KEY_TILE = 32
SHARED_BYTES = 40 * 1024
# Mask values at or below this are masked (rewriter.attention.MASKED_AT_OR_BELOW).
MASKED_AT_OR_BELOW = -1e4
# e**-s is computed for -s clamped to [NEG_LOW, NEG_HIGH] (finite, sigmoid exact in f32).
NEG_LOW = -30.0
NEG_HIGH = 88.0


def key_lanes(target: object = None) -> int:
    """Key padding multiple of the CUDA kernel: 1 (it handles any key count)."""
    return 1


def key_tile(head_dim: int, value_dim: int) -> int:
    """Keys per shared tile: :data:`KEY_TILE`, halved until K, V and P tiles fit."""
    tile = KEY_TILE
    while tile > 1 and 4 * tile * (head_dim + value_dim + ROWS) > SHARED_BYTES:
        tile //= 2
    return tile


def sigmoid_attention_cuda(
    batch_heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    *,
    dtype: str = "float32",
    target: object = None,
    has_mask: bool,
    value_dim: int | None = None,
    mask_heads: int = 1,
    mask_rows: int = 1,
    scale: float = 1.0,
    bias: float = 0.0,
) -> tirx.PrimFunc:
    """The fused CUDA PrimFunc ``(Q, Kt, V[, Mask], Out)`` of sigmoid attention.

    Same signature and semantics as the CPU factory; ``target`` is accepted for that
    and not used. ``k_len`` is the (possibly padded) key count. float32 only.

    >>> func = sigmoid_attention_cuda(2, 8, 16, 4, has_mask=True, scale=0.5)
    >>> [p.name for p in func.params]
    ['Q', 'Kt', 'V', 'Mask', 'Out']
    """
    if dtype != "float32":
        raise ValueError(f"the sigmoid attention kernel takes float32, not {dtype}")
    if mask_heads not in (1, batch_heads) or mask_rows not in (1, q_len):
        raise ValueError("mask_heads must be 1 or batch_heads, mask_rows 1 or q_len")
    bh, n, m, d = batch_heads, q_len, k_len, head_dim
    dv = head_dim if value_dim is None else value_dim
    kt = key_tile(d, dv)
    tiles = (n + ROWS - 1) // ROWS
    key_tiles = (m + kt - 1) // kt
    k_loads = (d * kt + THREADS - 1) // THREADS
    v_loads = (kt * dv + THREADS - 1) // THREADS
    p_steps = (ROWS * kt + THREADS - 1) // THREADS
    outs = (ROWS * dv + THREADS - 1) // THREADS
    f32 = "float32"
    scale, bias = float(np.float32(scale)), float(np.float32(bias))  # exact float32 literals

    def row_of(blk: tirx.Expr, r: tirx.Expr) -> tirx.Expr:
        return tirx.min(blk % tiles * ROWS + r, n - 1)

    @T.macro
    def body(Q, Kt, V, Mask, Out):
        for blk in T.thread_binding(bh * tiles, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                Ks = T.alloc_buffer((d * kt,), f32, scope="shared")
                Vs = T.alloc_buffer((kt * dv,), f32, scope="shared")
                Ps = T.alloc_buffer((ROWS * kt,), f32, scope="shared")
                acc = T.alloc_buffer((outs,), f32, scope="local")
                s = T.alloc_buffer((1,), f32, scope="local")
                for e in T.unroll(outs):
                    acc[e] = T.float32(0)
                for t in T.serial(key_tiles):
                    # 1. K and V tiles into shared memory (keys past m read as 0).
                    for e in T.unroll(k_loads):
                        if e * THREADS + tx < d * kt:
                            Ks[e * THREADS + tx] = T.if_then_else(
                                t * kt + (e * THREADS + tx) % kt < m,
                                Kt[
                                    blk // tiles,
                                    (e * THREADS + tx) // kt,
                                    T.min(t * kt + (e * THREADS + tx) % kt, m - 1),
                                ],
                                T.float32(0),
                            )
                    for e in T.unroll(v_loads):
                        if e * THREADS + tx < kt * dv:
                            Vs[e * THREADS + tx] = T.if_then_else(
                                t * kt + (e * THREADS + tx) // dv < m,
                                V[
                                    blk // tiles,
                                    T.min(t * kt + (e * THREADS + tx) // dv, m - 1),
                                    (e * THREADS + tx) % dv,
                                ],
                                T.float32(0),
                            )
                    T.tvm_storage_sync("shared")
                    # 2. Probabilities of the ROWS x kt tile.
                    for e in T.unroll(p_steps):
                        if e * THREADS + tx < ROWS * kt:
                            s[0] = T.float32(0)
                            for k in T.serial(d):
                                s[0] = (
                                    s[0]
                                    + Q[blk // tiles, row_of(blk, (e * THREADS + tx) // kt), k]
                                    * Ks[k * kt + (e * THREADS + tx) % kt]
                                )
                            if Mask is None:
                                s[0] = s[0] * T.float32(scale) + T.float32(bias)
                            else:
                                s[0] = (
                                    s[0] * T.float32(scale)
                                    + T.float32(bias)
                                    + Mask[
                                        blk // tiles if mask_heads > 1 else 0,
                                        row_of(blk, (e * THREADS + tx) // kt)
                                        if mask_rows > 1
                                        else 0,
                                        T.min(t * kt + (e * THREADS + tx) % kt, m - 1),
                                    ]
                                )
                            s[0] = T.float32(1) / (
                                T.float32(1)
                                + T.exp(
                                    T.max(
                                        T.min(T.float32(0) - s[0], T.float32(NEG_HIGH)),
                                        T.float32(NEG_LOW),
                                    )
                                )
                            )
                            if Mask is None:
                                Ps[e * THREADS + tx] = s[0]
                            else:
                                Ps[e * THREADS + tx] = T.Select(
                                    Mask[
                                        blk // tiles if mask_heads > 1 else 0,
                                        row_of(blk, (e * THREADS + tx) // kt)
                                        if mask_rows > 1
                                        else 0,
                                        T.min(t * kt + (e * THREADS + tx) % kt, m - 1),
                                    ]
                                    > T.float32(MASKED_AT_OR_BELOW),
                                    s[0],
                                    T.float32(0),
                                )
                    T.tvm_storage_sync("shared")
                    # 3. acc[r, c] += p[r, j] * V[j, c] (V is 0 past m: no weight there).
                    for e in T.unroll(outs):
                        if e * THREADS + tx < ROWS * dv:
                            for j in T.serial(kt):
                                acc[e] = (
                                    acc[e]
                                    + Ps[(e * THREADS + tx) // dv * kt + j]
                                    * Vs[j * dv + (e * THREADS + tx) % dv]
                                )
                    T.tvm_storage_sync("shared")
                for e in T.unroll(outs):
                    if (
                        e * THREADS + tx < ROWS * dv
                        and blk % tiles * ROWS + (e * THREADS + tx) // dv < n
                    ):
                        Out[
                            blk // tiles,
                            blk % tiles * ROWS + (e * THREADS + tx) // dv,
                            (e * THREADS + tx) % dv,
                        ] = acc[e]

    if has_mask:

        @T.prim_func
        def sigmoid_attention_cuda_masked(
            Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
            Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
            V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
            Mask: T.Buffer((mask_heads, mask_rows, m), f32),  # type: ignore[valid-type]
            Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
        ):
            T.func_attr({"tirx.noalias": True})
            body(Q, Kt, V, Mask, Out)

        return sigmoid_attention_cuda_masked

    @T.prim_func
    def sigmoid_attention_cuda(
        Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
        Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
        V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
        Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        body(Q, Kt, V, None, Out)

    return sigmoid_attention_cuda
