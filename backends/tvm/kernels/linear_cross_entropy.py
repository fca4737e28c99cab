"""Fused linear + cross-entropy on the CPU: the ``[tokens x vocab]`` logits never exist.

``ai.rewriter::FusedLinearCrossEntropy(hidden, weight, labels[, bias[, weights]])`` (the
ONNX op of ``passes/fuse_cross_entropy.py``) is ``SoftmaxCrossEntropyLoss(hidden @ W + b,
labels[, weights])``. Following Liger-Kernel (Hsu et al. 2024, arXiv 2410.10989) and Cut
Cross-Entropy (Wijmans et al. 2024, arXiv 2411.09009), this kernel computes the logits a
register tile at a time and consumes each tile at once: the tile's exponentials are folded
into per-row running ``(M, N)`` pairs (pass 1 of the two-pass softmax, Dukhan &
Ablavatski 2020, arXiv 2001.04438, the macros of :mod:`rewriter.backends.tvm.kernels.common.pair_sum`
shared with the softmax kernel), and the target logit is picked from the tile with a
compare-and-select. The loss is the log-softmax formula at ``y`` with the weights, ignore
mask and reduction of :func:`rewriter.backends.tvm.kernels.cross_entropy.loss_epilogue`.

Layout (the lowering, :mod:`rewriter.backends.tvm.ops.cross_entropy`, produces it):

* ``H[tokens, hidden]``;
* ``Wp[panels, hidden, width]``: the weight in panels of ``width`` vocabulary columns
  (:func:`panel_width`: 64 on AVX512, 16 on AVX2), each panel contiguous (:func:`pack_weight`; done once in numpy for a
  constant weight); the vocabulary is padded to ``panels * width``;
* ``B[panels * width]`` (optional): the bias, ``-inf`` on the padding columns (so they add
  ``e**-inf = 0``); present whenever there is a bias or padding;
* ``Y[tokens]`` int64 labels, ``Wc[vocab]`` class weights (optional), ``Loss``.

Schedule (by hand): the tokens are cut into blocks of ``block`` rows (``hidden * block``
floats stay in L2, :func:`token_block`), parallel over threads. A thread walks the
vocabulary panel by panel (the vocabulary chunk); per panel, for each ``TILE_ROWS`` (6)
rows of its block, the ``6 x width`` logits tile is accumulated in registers over the
hidden dimension (a broadcast of ``H[i, k]`` times the vector ``Wp[p, k, j:j+lanes]``: one
FMA per vector; 4 vector loads of the panel feed 24 FMAs on AVX512), then folded into the
rows' pairs and the target picked. The workspace of a thread is the block's pairs and
picked lanes (``block x 4 x lanes`` floats, 96 KiB at most) and the tile (on the stack, in
registers); nothing of size ``tokens x vocab``, nor ``block x vocab``.

Numerics: exact up to float32 rounding (the matmul accumulates in float32 in ``k`` order).
A row outside the float32 pair's contract (inf, NaN, logits above about 2700) is
recomputed with scalar float32 dot products and a float64 sum, so it follows ONNX as the
cross-entropy kernel does. float32, CPU (llvm) targets only.

Measured (``benchmarks/cross_entropy_tvm.py``, one thread, AVX512, mean loss): at 1024-2048
tokens, hidden 256-512 and vocabularies of 32k-128k, 1.3-1.4x faster than ONNX Runtime and
1.7-2.2x faster than TVM on the unfused graph, whose logits (128-500 MiB) it never holds;
its workspace is at most 96 KiB per thread (256 bytes per row of a token block).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.pair_sum import (
    PairSum,
    VectorAt,
    log_prob_exact,
    log_terms,
)
from rewriter.backends.tvm.kernels.common.simd_plan import Plan, bcast, isa, span
from rewriter.backends.tvm.kernels.cross_entropy import (
    LossOptions,
    drop_params,
    label,
    loss_epilogue,
)

logger = logging.getLogger(__name__)

# The register tile: TILE_ROWS token rows times PANEL_VECTORS vectors of vocabulary
# columns, 24 (AVX512, 32 registers) or 12 accumulators (AVX2 and SSE, 16 registers). It
# is held in two buffers of HALF_ROWS rows: each is under TVM's 1 KiB limit for buffers
# on the stack (3 x 4 x 16 floats = 768 bytes), which LLVM then keeps in registers.
HALF_ROWS = 3
TILE_ROWS = 2 * HALF_ROWS
PANEL_VECTORS = {"avx512": 4, "avx2": 2, "generic": 2}
# Hidden states of one token block: about this many bytes (half of a core's L2: they stay
# there while the block walks the vocabulary), between MIN_BLOCK and MAX_BLOCK rows. The
# whole weight is read once per block, from L3 or memory, so larger blocks read it less:
# at hidden 256, 512 and 1024 these blocks (up to 384 rows) ran 13%, 17% and 28% faster
# than blocks of 256 KiB and at most 192 rows (one thread, interleaved runs).
BLOCK_BYTES = 1 << 20
MIN_BLOCK = 12
MAX_BLOCK = 384


def lanes_of(target: tvm.target.Target) -> int:
    """float32 lanes of one vector on ``target``."""
    return {"avx512": 16, "avx2": 8}.get(isa(target), 4)


def panel_vectors(target: tvm.target.Target) -> int:
    """Vectors of vocabulary columns per register tile row on ``target``."""
    return PANEL_VECTORS[isa(target)]


def panel_width(target: tvm.target.Target) -> int:
    """Vocabulary columns per weight panel on ``target`` (the vocabulary is padded to it)."""
    return panel_vectors(target) * lanes_of(target)


def token_block(tokens: int, hidden: int) -> int:
    """Rows per token block: a multiple of ``TILE_ROWS`` whose hidden states fill about
    ``BLOCK_BYTES``, evened out so that the blocks are of one size and, when there are
    several, an even number of them (the threads of a 2- or 4-core machine share them out).

    >>> token_block(4096, 256), token_block(1024, 512), token_block(4096, 4096), token_block(10, 64)
    (342, 258, 66, 12)
    """
    rows = min(MAX_BLOCK, max(MIN_BLOCK, BLOCK_BYTES // (4 * hidden)))
    blocks = -(-tokens // rows)
    blocks += blocks % 2 if blocks > 1 else 0
    rows = -(-tokens // blocks)
    return -(-rows // TILE_ROWS) * TILE_ROWS


def pack_weight(weight: np.ndarray, *, transposed: bool, width: int) -> np.ndarray:
    """The ``[panels, hidden, width]`` panels of ``weight`` ([hidden, vocab], or [vocab,
    hidden] when ``transposed``), zero-padded to whole panels.

    >>> pack_weight(np.arange(6.0).reshape(2, 3), transposed=False, width=2).shape
    (2, 2, 2)
    """
    w = np.asarray(weight, np.float32)
    w = w.T if transposed else w
    hidden, vocab = w.shape
    panels = -(-vocab // width)
    padded = np.zeros((hidden, panels * width), np.float32)
    padded[:, :vocab] = w
    return np.ascontiguousarray(padded.reshape(hidden, panels, width).transpose(1, 0, 2))


def padded_bias(bias: np.ndarray | None, vocab: int, width: int) -> np.ndarray:
    """The bias (zeros without one) padded with ``-inf`` to whole panels."""
    panels = -(-vocab // width)
    out = np.full(panels * width, -np.inf, np.float32)
    out[:vocab] = 0.0 if bias is None else np.asarray(bias, np.float32)
    return out


def linear_cross_entropy(
    tokens: int,
    hidden: int,
    vocab: int,
    *,
    options: LossOptions,
    biased: bool,
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """The PrimFunc ``(H, Wp, Y[, B][, Wc], Loss)`` of ``cross_entropy(H @ W + b, Y)``.

    See the module docstring for the layout. ``biased`` must be true when ``vocab`` is not
    a multiple of :func:`panel_width` (the padding columns are masked by the bias).

    >>> target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"})
    >>> func = linear_cross_entropy(16, 32, 128, options=LossOptions("sum"), biased=False, target=target)
    >>> [p.name for p in func.params]
    ['H', 'Wp', 'Y', 'Loss']
    """
    if isa(target) == "cuda":
        raise ValueError("the linear cross-entropy kernel is CPU only")
    lanes, vectors = lanes_of(target), panel_vectors(target)
    width = vectors * lanes
    panels = -(-vocab // width)
    padded = panels * width
    if padded != vocab and not biased:
        raise ValueError(f"vocab {vocab} is not a multiple of {width}: the padding needs the bias")
    block = token_block(tokens, hidden)
    blocks = -(-tokens // block)
    p = Plan(tokens, padded, "float32", target)
    sums = PairSum(p, units=vectors)
    finish, reduce = loss_epilogue(options, tokens, vocab)
    f32, f64 = "float32", "float64"
    state = PairSum.STATE * lanes
    reduced = 1 if options.reduction == "none" else tokens

    def tile_at(u: int | tirx.Expr, i: int | tirx.Expr) -> tirx.Expr:
        return span((i * vectors + u) * lanes, lanes)

    def logits(sc: tirx.Buffer, B: tirx.Buffer, i: tirx.Expr, pn: tirx.Expr) -> VectorAt:
        """The ``u``-th logits vector of row ``i`` of a half tile (bias added), for ``fold``."""
        if biased:
            return lambda u: sc[tile_at(u, i)] + B[span(pn * width + u * lanes, lanes)]
        return lambda u: sc[tile_at(u, i)]

    def columns(pn: tirx.Expr, u: tirx.Expr) -> tirx.Expr:
        return tirx.Ramp(tirx.Cast("int32", pn * width + u * lanes), 1, lanes)

    def row_of(r0: tirx.Expr, i: tirx.Expr) -> tirx.Expr:
        return tirx.min(r0 + i, tokens - 1)  # the last tile recomputes clamped rows

    @T.macro
    def tile(H, Wp, sa, sb, r0, pn):
        # TILE_ROWS x width logits in registers, one FMA per vector and hidden channel.
        for i in T.unroll(HALF_ROWS):
            for u in T.unroll(vectors):
                sa[tile_at(u, i)] = p.vec(0.0)
                sb[tile_at(u, i)] = p.vec(0.0)
        for k in T.serial(hidden):
            for i in T.unroll(HALF_ROWS):
                for u in T.unroll(vectors):
                    sa[tile_at(u, i)] = (
                        sa[tile_at(u, i)]
                        + bcast(H[row_of(r0, i), k], lanes) * Wp[pn, k, span(u * lanes, lanes)]
                    )
            for i in T.unroll(HALF_ROWS):
                for u in T.unroll(vectors):
                    sb[tile_at(u, i)] = (
                        sb[tile_at(u, i)]
                        + bcast(H[row_of(r0, HALF_ROWS + i), k], lanes)
                        * Wp[pn, k, span(u * lanes, lanes)]
                    )

    @T.macro
    def consume(Y, B, sc, st, pk, tmp, r0, i0, pn):
        # Fold a half tile's exponentials into its rows' pairs; pick the target logits.
        for i in T.unroll(HALF_ROWS):
            sums.fold(st, (i0 + i) * state, logits(sc, B, i, pn), None, None, None, None)
            for u in T.unroll(vectors):
                pk[span((i0 + i) * lanes, lanes)] = T.Select(
                    columns(pn, u) == bcast(T.Cast("int32", label(Y, row_of(r0, i), vocab)), lanes),
                    logits(sc, B, i, pn)(u),
                    pk[span((i0 + i) * lanes, lanes)],
                )

    @T.macro
    def exact_row(H, Wp, B, srow, lg, v, r, y):
        # Scalar float32 logits (the tile's k order), summed in float64.
        sums.exact_init(srow)
        for c in T.serial(vocab):
            lg[0] = T.float32(0)
            for k in T.serial(hidden):
                lg[0] = lg[0] + H[r, k] * Wp[c // width, k, c % width]
            if biased:
                lg[0] = lg[0] + B[c]
            sums.exact_add(srow, T.Cast(f64, lg[0]))
            if T.Cast("int64", c) == y:
                lg[1] = lg[0]
        sums.exact_finish(srow)
        v[0] = T.Cast(f32, T.float64(0) - log_prob_exact(T.Cast(f64, lg[1]), srow))

    @T.prim_func
    def linear_cross_entropy(
        H: T.Buffer((tokens, hidden), f32),  # type: ignore[valid-type]
        Wp: T.Buffer((panels, hidden, width), f32),  # type: ignore[valid-type]
        Y: T.Buffer((tokens,), "int64"),  # type: ignore[valid-type]
        B: T.Buffer((padded,), f32),  # type: ignore[valid-type]
        Wc: T.Buffer((vocab,), f32),  # type: ignore[valid-type]
        Loss: T.Buffer((options.loss_rows(tokens),), f32),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        RL = T.alloc_buffer((reduced,), f32, scope="global")
        RW = T.alloc_buffer((reduced,), f32, scope="global")
        acc = T.alloc_buffer((2,), f64, scope="global")
        for b in T.parallel(blocks):
            st = T.alloc_buffer((block * state,), f32, scope="global")
            pk = T.alloc_buffer((block * lanes,), f32, scope="global")
            sa = T.alloc_buffer((HALF_ROWS * width,), f32, scope="global")
            sb = T.alloc_buffer((HALF_ROWS * width,), f32, scope="global")
            tmp = T.alloc_buffer((sums.tmp_size,), f32, scope="global")
            row = T.alloc_buffer((5,), f32, scope="global")
            srow = T.alloc_buffer((2,), f64, scope="global")
            lg = T.alloc_buffer((2,), f32, scope="global")
            v = T.alloc_buffer((1,), f32, scope="global")
            for i in T.serial(block):
                sums.init(st, i * state)
                pk[span(i * lanes, lanes)] = p.vec(0.0)
            for pn in T.serial(panels):
                for t in T.serial(block // TILE_ROWS):
                    tile(H, Wp, sa, sb, b * block + t * TILE_ROWS, pn)
                    consume(Y, B, sa, st, pk, tmp, b * block + t * TILE_ROWS, t * TILE_ROWS, pn)
                    consume(
                        Y,
                        B,
                        sb,
                        st,
                        pk,
                        tmp,
                        b * block + t * TILE_ROWS + HALF_ROWS,
                        t * TILE_ROWS + HALF_ROWS,
                        pn,
                    )
            for i in T.serial(T.min(block, tokens - b * block)):
                sums.settle(st, i * state)
                sums.merge(st, i * state, row)
                if ep.fast_path_ok(row[0], row[1]):
                    log_terms(row)
                    # Only the target's lane is nonzero: the sum is the target logit.
                    v[0] = (
                        row[2] - ep.tree(tirx.Add, [pk[i * lanes + k] for k in range(lanes)])
                    ) + row[3]
                else:
                    exact_row(H, Wp, B, srow, lg, v, b * block + i, label(Y, b * block + i, vocab))
                finish(Y, Wc, Loss, RL, RW, b * block + i, v)
        if options.reduction != "none":
            reduce(Loss, RL, RW, acc)

    unused = ({"B"} if not biased else set()) | ({"Wc"} if not options.weighted else set())
    func = drop_params(linear_cross_entropy, unused)
    logger.debug(
        "built linear_cross_entropy tokens=%d hidden=%d vocab=%d block=%d %s for %s",
        tokens,
        hidden,
        vocab,
        block,
        options,
        isa(target),
    )
    return func
