"""ONNX ``Einsum`` of two operands as one (batched) matmul, for the importer.

TVM converts ``Einsum`` to ``relax.op.einsum``, whose lowering is a scalar loop nest that
no schedule of ours takes: XLNet's TorchScript export, whose attention and projections
are all einsums (``ibnd,jbnd->bnij``, ``ibh,hnd->ibnd``), ran at 8.6x ONNX Runtime's
time. A two-operand contraction is a matmul once its indices are sorted into kinds:

* batch: in both operands and the output;
* contracted: in both operands, not the output;
* left / right: in one operand and the output;
* summed: in one operand only (reduced before the product).

``A`` is permuted to ``[batch..., left..., contracted...]`` and reshaped to
``[batch..., M, K]``, ``B`` to ``[batch..., K, N]``; their product, ``[batch..., M, N]``,
is reshaped to ``[batch..., left..., right...]`` and permuted to the output's order.
The matmul rules (and packed weights, where ``B`` is a constant) then apply, at fixed
and symbolic sizes. Exact up to the order of the additions.

Left to TVM's converter (None): one operand or more than two, ellipses, an index
repeated within one term (a diagonal), and sizes that broadcast (1 against n).

The forms with one index of each kind (CvT's attention, ``bhlk,bhtk->bhlt``) are
``MatMul``s already, before the import (``onnx_simplify``, with :func:`indices`): there
the attention matcher sees ``MatMul -> Softmax -> MatMul`` and the fused attention
kernel takes it. This lowering takes the rest, whose groups of indices need reshapes by
sizes that are plain products here (symbolic ones too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rewriter.backends.tvm.ops import attribute_text
from rewriter.backends.tvm.relax_passes import dims_of, product


@dataclasses.dataclass(frozen=True)
class Indices:
    """A two-operand equation's indices by kind (see the module docstring), each list in
    the order of the term it is taken from: ``batch``, ``left`` and ``right`` in the
    output's order, ``contracted`` in the first operand's."""

    a: str
    b: str
    out: str
    batch: list[str]
    left: list[str]
    right: list[str]
    contracted: list[str]


def indices(equation: Any) -> Indices | None:
    """The indices of a two-operand ``equation`` by kind, or None for a form left to TVM
    (one operand or three, an ellipsis, a repeated index).

    >>> indices("ibh,hnd->ibnd").right, indices("ibh,hnd->ibnd").contracted
    (['n', 'd'], ['h'])
    """
    terms = _terms(equation)
    if terms is None or len(terms[0]) != 2:
        return None
    (a, b), out = terms
    return Indices(
        a, b, out,
        batch=[c for c in out if c in a and c in b],
        left=[c for c in out if c in a and c not in b],
        right=[c for c in out if c in b and c not in a],
        contracted=[c for c in a if c in b and c not in out],
    )  # fmt: skip


def convert(bb: Any, inputs: list, attrs: dict) -> Any | None:
    """The Relax expression of the ``Einsum`` node, or None (see the module docstring)."""
    from tvm import relax

    found = indices(attrs.get("equation", ""))
    if found is None or len(inputs) != 2:
        return None
    a_sub, b_sub, out = found.a, found.b, found.out
    batch, left, right, contracted = found.batch, found.left, found.right, found.contracted
    a, b = (bb.normalize(value) for value in inputs)
    sizes = _sizes([(a_sub, dims_of(a)), (b_sub, dims_of(b))])
    if sizes is None or any(letter not in sizes for letter in out):
        return None
    a, a_sub = _sum_alone(bb, a, a_sub, b_sub + out)
    b, b_sub = _sum_alone(bb, b, b_sub, a_sub + out)
    rows = _arrange(bb, a, a_sub, batch + left + contracted, [*batch, left, contracted], sizes)
    columns = _arrange(bb, b, b_sub, batch + contracted + right, [*batch, contracted, right], sizes)
    product = bb.emit(relax.op.matmul(rows, columns))
    order = batch + left + right
    if len(left) != 1 or len(right) != 1:
        product = bb.emit(relax.op.reshape(product, [sizes[c] for c in order]))
    if order != list(out):
        product = bb.emit(relax.op.permute_dims(product, [order.index(c) for c in out]))
    return product


def _terms(equation: Any) -> tuple[list[str], str] | None:
    """``(inputs' subscripts, output's)`` of ``equation``, or None for a form left to TVM
    (ellipses, a repeated index). An implicit output is the indices seen once, sorted."""
    text = attribute_text(equation).replace(" ", "")
    if "..." in text:
        return None
    lhs, arrow, out = text.partition("->")
    subscripts = lhs.split(",")
    if not arrow:
        seen = "".join(subscripts)
        out = "".join(sorted(c for c in set(seen) if seen.count(c) == 1))
    if any(len(set(term)) != len(term) for term in [*subscripts, out]):
        return None
    if not all(term.isalpha() for term in [*subscripts, out] if term):
        return None
    return subscripts, out


def _sizes(operands: list[tuple[str, list | None]]) -> dict[str, Any] | None:
    """Each index's size; None where a rank is unknown or wrong, or two sizes of one index
    differ (a broadcast, or sizes not provably equal)."""
    from tvm import sym

    sizes: dict[str, Any] = {}
    analyzer = sym.Analyzer()
    for subscripts, dims in operands:
        if dims is None or len(dims) != len(subscripts):
            return None
        for letter, dim in zip(subscripts, dims, strict=True):
            if letter not in sizes:
                sizes[letter] = dim
            elif not analyzer.can_prove_equal(dim, sizes[letter]):  # constants too
                return None
    return sizes


def _sum_alone(bb: Any, value: Any, subscripts: str, others: str) -> tuple[Any, str]:
    """``value`` summed over its indices that appear nowhere else."""
    from tvm import relax

    alone = [axis for axis, c in enumerate(subscripts) if c not in others]
    if not alone:
        return value, subscripts
    summed = bb.emit(relax.op.sum(value, axis=alone))
    return summed, "".join(c for c in subscripts if c in others)


def _arrange(bb: Any, value: Any, subscripts: str, order: list[str], groups: list, sizes: dict) -> Any:
    """``value`` permuted to ``order`` and reshaped to ``groups`` (a letter stays an axis,
    a list of letters becomes one axis of their sizes' product)."""
    from tvm import relax

    if list(subscripts) != order:
        value = bb.emit(relax.op.permute_dims(value, [subscripts.index(c) for c in order]))
    shape = [product([sizes[c] for c in group]) if isinstance(group, list) else sizes[group] for group in groups]
    if any(isinstance(group, list) and len(group) != 1 for group in groups):
        value = bb.emit(relax.op.reshape(value, shape))
    return value
