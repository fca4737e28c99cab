"""Sigmoid attention (Ramapuram et al. 2024, arXiv 2409.04431) as one fused CPU TIR kernel.

``Out[b, i, :] = sum_j p(b, i, j) * V[b, j, :]`` with ``p = sigmoid(scale * Q[b, i]·K[b, j]
+ bias + Mask[b, i, j])``, and ``p = 0`` exactly where ``Mask <= -1e4`` (the ONNX body of
``ai.rewriter::SigmoidAttention``, see ``passes/sigmoid_attention.py``). The sigmoid is
elementwise, so no row max and no row sum are needed: each block of scores is turned into
probabilities and multiplied into V at once, and the n x m score matrix never exists.

Layout (the lowering, :mod:`rewriter.backends.tvm.ops.sigmoid_attention`, produces it):

* ``Q[bh, n, d]``, ``Kt[bh, d, mp]`` (K transposed, keys zero-padded to ``mp``, a multiple
  of the vector width), ``V[bh, mp, dv]`` (padded key rows are zero, so they add 0);
* ``Mask[mbh, mq, mp]`` (optional) with ``mbh`` in ``{1, bh}`` and ``mq`` in ``{1, n}``;
* ``Out[bh, n, dv]``.

Schedule (by hand): keys are walked in chunks of ``CHUNK_KEYS`` (K and V of a chunk stay
in L2); per chunk the loop ``bh x ceil(n / ROWS)`` is parallel, and each iteration keeps
``ROWS`` query rows of output accumulators (``ROWS x dv`` floats, read back from ``Out``
after the first chunk) in registers while it walks the chunk in blocks of
``KEY_VECTORS`` vectors of keys. Per block: the scores as a ``ROWS x KEY_VECTORS``
register tile of outer products (a broadcast of ``q[i, c]`` times the vector
``Kt[c, j:j+lanes]``), then in place ``scale * s + bias (+ mask)``, the sigmoid
``1 / (1 + e**-s)`` with the polynomial exponential of
:mod:`rewriter.backends.tvm.kernels.common.exp_pair` (``vscalefps``) and ``vrcp14ps`` plus a Newton
step on AVX512 (a division elsewhere), the mask select, then ``acc[i, :] += p[i, j] *
V[j, :]`` vectorized over ``dv``. The last query tile recomputes clamped rows and does
not store them. The tile buffers are small "global" allocations (under TVM's 1 KiB stack
limit for ``dv <= 64``), so LLVM keeps them in registers; the values inside one
expression are loads, so that the expressions (and compile times) stay small.

Measured (``benchmarks/sigmoid_attention_tvm.py``, one thread, head dim 64): about 2x
faster than TVM's MatMul-Softmax-MatMul with our matmul and two-pass softmax kernels,
and 2.5-3x faster than the inlined sigmoid body.
"""

from __future__ import annotations

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

# Query rows per tile and key vectors per block (a ROWS x KEY_VECTORS register tile of
# scores; ROWS x dv / lanes output accumulators).
ROWS = 3
KEY_VECTORS = 4
# Keys per chunk: all query tiles go through one chunk of K and V (256 KiB each at head
# dim 64, so both stay in L2) before the next; the output accumulates across chunks.
CHUNK_KEYS = 1024
# Mask values at or below this are masked (rewriter.attention.MASKED_AT_OR_BELOW).
MASKED_AT_OR_BELOW = -1e4
# e**-s is computed for -s clamped to [NEG_LOW, NEG_HIGH]: sigmoid is 1 (float32) below
# and ~6e-39 above, and 2**n stays a normal float.
NEG_LOW = -30.0
NEG_HIGH = 88.0


def key_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one vector on ``target`` (keys are padded to a multiple of it)."""
    return lanes_of(target)


def _neg_clamped(logits: tirx.Expr, lanes: int) -> tirx.Expr:
    """``-logits`` clamped to ``[NEG_LOW, NEG_HIGH]`` (``e**-s`` finite and normal)."""
    neg = ep.const(0.0, "float32", lanes) - logits
    return tirx.max(
        tirx.min(neg, ep.const(NEG_HIGH, "float32", lanes)), ep.const(NEG_LOW, "float32", lanes)
    )


def _exp(x: tirx.Expr, lanes: int, scalef: bool) -> tirx.Expr:
    """``e**x`` for ``x`` in ``[NEG_LOW, NEG_HIGH]`` (``x`` should be a load: it is reused)."""
    m, n = ep.exp_pair(x, lanes)
    return ep.scale(m, n, lanes, scalef) if scalef else m * ep.pow2(n, lanes)


def _one_over_one_plus(e: tirx.Expr, lanes: int, scalef: bool) -> tirx.Expr:
    """``1 / (1 + e)``: ``vrcp14ps`` and one Newton step on AVX512 (rel. error ~1e-8)."""
    one = ep.const(1.0, "float32", lanes)
    x = one + e
    if not scalef:
        return one / x
    r = tirx.call_llvm_pure_intrin(
        "float32x16", "llvm.x86.avx512.rcp14.ps.512", x, x, tirx.const(-1, "int16")
    )
    return r * (ep.const(2.0, "float32", lanes) - x * r)


def sigmoid_attention(
    batch_heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    *,
    dtype: str = "float32",
    target: tvm.target.Target,
    has_mask: bool,
    value_dim: int | None = None,
    mask_heads: int = 1,
    mask_rows: int = 1,
    scale: float = 1.0,
    bias: float = 0.0,
) -> tirx.PrimFunc:
    """The fused PrimFunc ``(Q, Kt, V[, Mask], Out)`` of sigmoid attention (static shapes).

    ``k_len`` is the padded key count ``mp`` (a multiple of :func:`key_lanes`); see the
    module docstring for the buffer layout. ``mask_heads`` (1 or ``batch_heads``) and
    ``mask_rows`` (1 or ``q_len``) give the mask's broadcast layout. float32 only.

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
    >>> func = sigmoid_attention(2, 8, 16, 4, target=target, has_mask=False, scale=0.5)
    >>> [p.name for p in func.params]
    ['Q', 'Kt', 'V', 'Out']
    """
    if dtype != "float32":
        raise ValueError(f"the sigmoid attention kernel takes float32, not {dtype}")
    if isa(target) == "cuda":
        raise ValueError("the sigmoid attention kernel is CPU only")
    lanes = key_lanes(target)
    scalef = isa(target) == "avx512"
    if k_len % lanes:
        raise ValueError(f"k_len {k_len} must be a multiple of {lanes} (pad the keys)")
    if mask_heads not in (1, batch_heads) or mask_rows not in (1, q_len):
        raise ValueError("mask_heads must be 1 or batch_heads, mask_rows 1 or q_len")
    bh, n, m, d = batch_heads, q_len, k_len, head_dim
    dv = head_dim if value_dim is None else value_dim
    vl = dividing_lanes(lanes, dv)
    key_vectors = min(KEY_VECTORS, m // lanes)
    block = key_vectors * lanes
    blocks, rest = m // block, (m % block) // lanes  # rest < key_vectors vectors
    tiles = (n + ROWS - 1) // ROWS
    chunk_blocks = max(1, CHUNK_KEYS // block)
    chunks = max(1, -(-blocks // chunk_blocks))
    f32 = "float32"
    scale_v = ep.const(scale, f32, lanes)
    bias_v = ep.const(bias, f32, lanes)
    masked_v = ep.const(MASKED_AT_OR_BELOW, f32, lanes)
    zero_v = ep.const(0.0, f32, lanes)

    def row_of(i0: tirx.Expr, r: int) -> tirx.Expr:
        return tirx.min(i0 + r, n - 1)

    def mask_at(mask: tirx.Buffer, b: tirx.Expr, i: tirx.Expr, j0: tirx.Expr) -> tirx.Expr:
        return mask[b if mask_heads > 1 else 0, i if mask_rows > 1 else 0, span(j0, lanes)]

    @T.macro
    def probs(sc, off, mask, b, i, j0):
        # In stages through the (register) tile: a value used several times is a load, so
        # the expressions stay small (the exponential reads its argument ~16 times).
        if mask is None:
            sc[span(off, lanes)] = _neg_clamped(sc[span(off, lanes)] * scale_v + bias_v, lanes)
        else:
            sc[span(off, lanes)] = _neg_clamped(
                sc[span(off, lanes)] * scale_v + bias_v + mask_at(mask, b, i, j0), lanes
            )
        sc[span(off, lanes)] = _exp(sc[span(off, lanes)], lanes, scalef)
        sc[span(off, lanes)] = _one_over_one_plus(sc[span(off, lanes)], lanes, scalef)
        if mask is not None:
            sc[span(off, lanes)] = tirx.Select(
                mask_at(mask, b, i, j0) > masked_v, sc[span(off, lanes)], zero_v
            )

    scores = score_tile(rows=ROWS, key_vectors=key_vectors, lanes=lanes, head_dim=d, row_of=row_of)

    @T.macro
    def key_block(Q, Kt, V, mask, sc, acc, b, i0, j0, nvec):
        # Scores: an ROWS x nvec tile of vectors, one rank-1 update per head-dim channel.
        scores(Q, Kt, sc, b, i0, j0, nvec)
        # Probabilities in place, then acc[r, :] += p[r, j] * V[j, :].
        for r in T.unroll(ROWS):
            for c in T.unroll(nvec):
                probs(sc, (r * key_vectors + c) * lanes, mask, b, row_of(i0, r), j0 + c * lanes)
        for j in T.serial(nvec * lanes):
            for r in T.unroll(ROWS):
                for u in T.unroll(dv // vl):
                    acc[span(r * dv + u * vl, vl)] = (
                        acc[span(r * dv + u * vl, vl)]
                        + bcast(sc[r * key_vectors * lanes + j], vl)
                        * V[b, j0 + j, span(u * vl, vl)]
                    )

    @T.macro
    def tile(Q, Kt, V, mask, Out, t, ch):
        # ROWS query rows against the keys of chunk ch; the output accumulates over chunks.
        sc = T.alloc_buffer((ROWS * key_vectors * lanes,), f32, scope="global")
        acc = T.alloc_buffer((ROWS * dv,), f32, scope="global")
        for r in T.unroll(ROWS):
            for u in T.unroll(dv // vl):
                if ch == 0:
                    acc[span(r * dv + u * vl, vl)] = ep.const(0.0, f32, vl)
                else:
                    acc[span(r * dv + u * vl, vl)] = Out[
                        t // tiles, row_of(t % tiles * ROWS, r), span(u * vl, vl)
                    ]
        for kb in T.serial(T.min(chunk_blocks, blocks - ch * chunk_blocks)):
            key_block(
                Q,
                Kt,
                V,
                mask,
                sc,
                acc,
                t // tiles,
                t % tiles * ROWS,
                (ch * chunk_blocks + kb) * block,
                key_vectors,
            )
        if ch == chunks - 1:
            for kr in T.serial(rest):
                key_block(
                    Q,
                    Kt,
                    V,
                    mask,
                    sc,
                    acc,
                    t // tiles,
                    t % tiles * ROWS,
                    blocks * block + kr * lanes,
                    1,
                )
        for r in T.unroll(ROWS):
            if t % tiles * ROWS + r < n:
                for u in T.unroll(dv // vl):
                    Out[t // tiles, t % tiles * ROWS + r, span(u * vl, vl)] = acc[
                        span(r * dv + u * vl, vl)
                    ]

    if has_mask:

        @T.prim_func
        def sigmoid_attention_masked(
            Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
            Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
            V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
            Mask: T.Buffer((mask_heads, mask_rows, m), f32),  # type: ignore[valid-type]
            Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
        ):
            T.func_attr({"tirx.noalias": True})
            for ch in T.serial(chunks):
                for t in T.parallel(bh * tiles):
                    tile(Q, Kt, V, Mask, Out, t, ch)

        return sigmoid_attention_masked

    @T.prim_func
    def sigmoid_attention(
        Q: T.Buffer((bh, n, d), f32),  # type: ignore[valid-type]
        Kt: T.Buffer((bh, d, m), f32),  # type: ignore[valid-type]
        V: T.Buffer((bh, m, dv), f32),  # type: ignore[valid-type]
        Out: T.Buffer((bh, n, dv), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        for ch in T.serial(chunks):
            for t in T.parallel(bh * tiles):
                tile(Q, Kt, V, None, Out, t, ch)

    return sigmoid_attention
