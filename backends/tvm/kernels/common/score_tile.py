"""The register tile of attention scores that the fused CPU attention kernels share.

``rows x nvec`` vectors of ``Q[b, i]·Kᵀ[b, :, j0 + c * lanes : ...]`` for ``rows``
query rows from ``i0`` and ``nvec`` vectors of keys from ``j0``, one rank-1 update per
head-dimension channel (a broadcast of ``q[i, k]`` times the vector ``Kt[b, k, j:j+lanes]``).
The tile is a small buffer of the caller's (``rows x key_vectors`` vectors, vector
``(r, c)`` at ``(r * key_vectors + c) * lanes``), on the stack, which LLVM keeps in
registers. Used by :mod:`rewriter.backends.tvm.kernels.sigmoid_attention` and
:mod:`rewriter.backends.tvm.kernels.softmax_attention`, which turn it into
probabilities their own ways.

>>> tile = score_tile(rows=4, key_vectors=4, lanes=16, head_dim=64, row_of=row_of)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm.kernels.common import exp_pair as ep
from rewriter.backends.tvm.kernels.common.simd_plan import bcast, span


def score_tile(
    *,
    rows: int,
    key_vectors: int,
    lanes: int,
    head_dim: Any,
    row_of: Callable[[tirx.Expr, int], tirx.Expr],
) -> Any:
    """The macro ``(Q, Kt, sc, b, i0, j0, nvec)`` writing the tile's scores into ``sc``;
    ``row_of(i0, r)`` is the query row of tile row ``r`` (clamped by the caller)."""
    zero = ep.const(0.0, "float32", lanes)

    @T.macro
    def scores(Q, Kt, sc, b, i0, j0, nvec):
        for r in T.unroll(rows):
            for c in T.unroll(nvec):
                sc[span((r * key_vectors + c) * lanes, lanes)] = zero
        for k in T.serial(head_dim):
            for r in T.unroll(rows):
                for c in T.unroll(nvec):
                    sc[span((r * key_vectors + c) * lanes, lanes)] = (
                        sc[span((r * key_vectors + c) * lanes, lanes)]
                        + bcast(Q[b, row_of(i0, r), k], lanes)
                        * Kt[b, k, span(j0 + c * lanes, lanes)]
                    )

    return scores
