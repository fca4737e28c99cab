"""The inputs of a fused attention operator, built from an :class:`~.onnx_match.AttentionMatch`.

Both attention passes rewrite a match into one operator on rank-4 Q, K, V ([B, H, n, d])
and one additive mask: :func:`operands` builds them in the rewrite's graph, and
:func:`restore` returns the operator's output to the layout the graph used:

* K from Kᵀ, composed with the ``Transpose`` that produced Kᵀ (no transpose pair left);
  key/value heads repeated for the ``Attention`` operator's grouped heads;
* merged heads ([B·H, n, d], ``nn.MultiheadAttention``, DeBERTa): Q, K and V reshaped to
  [B, H, n, d] with the (B, H) of the scores' heads split, and the output merged back;
* the additive terms summed into one mask, in Q's type: the bias (expanded to the
  scores' shape and split as they were), Swin's window mask (added per window, as the
  graph did), the mask (a boolean one as ``Where(keep, 0, fill)`` with the graph's fill,
  -inf for the ``Attention`` operator's) and the ``Attention`` operator's causal mask.

>>> q, k, v, mask = operands(op, match)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.passes.attention.onnx_match import MERGED_RANK, RANK, AttentionMatch


@dataclasses.dataclass
class Operands:
    """Q, K, V of rank 4 and the additive mask (broadcastable to [B, H, n_q, n_k])."""

    query: ir.Value
    key: ir.Value
    value: ir.Value
    mask: ir.Value

    def __iter__(self) -> Any:
        return iter((self.query, self.key, self.value, self.mask))


def operands(op: Any, match: AttentionMatch, *, rank4_mask: bool = False) -> Operands:
    """Q, K, V and the mask of ``match`` for a fused operator; with ``rank4_mask`` the mask
    has rank 4 (``[1, 1, 1, 1]`` zeros when there is none), as the SOFT body's reductions
    need."""
    query, key_3or4, value = match.query, _key(op, match), match.value
    if match.heads is not None:
        split = op.Slice(match.heads, op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
        query, key, value = (_split_heads(op, x, split) for x in (query, key_3or4, value))
    else:
        key = _repeat_heads(op, key_3or4, match.kv_groups)
        value = _repeat_heads(op, value, match.kv_groups)
    mask = _additive_mask(op, match, query, key, key_3or4, rank4=rank4_mask)
    return Operands(query, key, value, mask)


def restore(op: Any, match: AttentionMatch, output: ir.Value) -> ir.Value:
    """The operator's [B, H, n_q, d_v] ``output`` in the graph's layout ([B·H, n_q, d_v]
    when the heads were merged)."""
    if match.heads is None:
        return output
    merged = op.Concat(op.Constant(value_ints=[-1]), op.Shape(output, start=2, end=4), axis=0)
    return op.Reshape(output, merged)


def _split_heads(op: Any, x: ir.Value, split: ir.Value) -> ir.Value:
    """[B·H, n, d] -> [B, H, n, d], (B, H) from the scores' heads split."""
    return op.Reshape(x, op.Concat(split, op.Shape(x, start=1, end=3), axis=0))


def _repeat_heads(op: Any, x: ir.Value, groups: int) -> ir.Value:
    """[B, Hk, N, D] -> [B, Hk·groups, N, D], each head repeated ``groups`` times in a row."""
    if groups == 1:
        return x
    b_h = op.Shape(x, start=0, end=2)
    n_d = op.Shape(x, start=2, end=4)
    group = op.Constant(value_ints=[groups])
    expanded = op.Expand(
        op.Unsqueeze(x, op.Constant(value_ints=[2])), op.Concat(b_h, group, n_d, axis=0)
    )
    heads = op.Constant(value_ints=[0, -1])
    return op.Reshape(expanded, op.Concat(heads, n_d, axis=0))


def _key(op: Any, match: AttentionMatch) -> ir.Value:
    """K ([..., n_k, d], the rank of the match) from Kᵀ (one Transpose at most)."""
    if match.key is not None:
        return match.key
    key_t = match.key_transposed
    assert key_t is not None
    rank = MERGED_RANK if match.heads is not None else RANK
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    producer = key_t.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get_ints("perm")
        if perm is not None and len(perm) == rank:
            composed = [perm[i] for i in swap]
            source = producer.inputs[0]
            assert source is not None
            if composed == list(range(rank)):
                return source
            return op.Transpose(source, perm=composed)
    return op.Transpose(key_t, perm=swap)


def _additive_mask(
    op: Any,
    match: AttentionMatch,
    query: ir.Value,
    key: ir.Value,
    key_3or4: ir.Value,
    *,
    rank4: bool,
) -> ir.Value:
    """Every additive term of ``match`` summed, in Q's type (see the module docstring)."""
    zero = op.CastLike(op.Constant(value_float=0.0), query)
    minus_inf = op.CastLike(op.Constant(value_float=-math.inf), query)
    terms: list[ir.Value] = []
    if match.bias is not None:
        bias = op.CastLike(match.bias, query)
        if match.heads is not None:  # the bias is [B·H, n_q, n_k]-shaped: split it too
            merged = op.Concat(
                op.Shape(match.query, start=0, end=2), op.Shape(key_3or4, start=1, end=2), axis=0
            )
            bias = op.Reshape(op.Expand(bias, merged), match.heads)
        terms.append(bias)
    if match.windows is not None:
        to_windows, window_mask, back = match.windows
        scores = op.Concat(
            op.Shape(query, start=0, end=3), op.Shape(key, start=2, end=3), axis=0
        )
        zeros = op.Expand(zero, scores)
        per_window = op.Add(op.Reshape(zeros, to_windows), op.CastLike(window_mask, query))
        terms.append(op.Reshape(per_window, back))
    if match.mask is not None:
        # Where(keep, scores, fill) as an additive mask: the graph's fill (a huge negative
        # swallows the scores it is added to), -inf for the Attention operator's.
        fill = op.CastLike(match.fill, query) if match.fill is not None else minus_inf
        if match.mask_kind == "boolean":
            mask = op.Where(match.mask, zero, fill)
        elif match.mask_kind == "dropping":
            mask = op.Where(match.mask, fill, zero)
        else:
            mask = op.CastLike(match.mask, query)
        terms.append(mask)
    if match.causal:
        lengths = op.Concat(op.Shape(query, start=2, end=3), op.Shape(key, start=2, end=3), axis=0)
        ones = op.ConstantOfShape(lengths, value=ir.tensor(np.array([1], dtype=np.int64)))
        lower = op.Cast(op.Trilu(ones, upper=0), to=ir.DataType.BOOL)
        terms.append(op.Where(lower, zero, minus_inf))
    if not terms:
        shape = [1] * RANK if rank4 else []
        return op.CastLike(op.Constant(value=ir.tensor(np.zeros(shape, dtype=np.float32))), query)
    total = terms[0]
    for term in terms[1:]:
        total = op.Add(total, term)
    if rank4:  # broadcast up to rank 4 (a mask of rank <= 4; the others are rank 4)
        total = op.Add(total, op.CastLike(op.Constant(value=ir.tensor(np.zeros([1] * RANK, np.float32))), query))
    return total
