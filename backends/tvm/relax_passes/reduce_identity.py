"""``R.max``/``R.min`` over floats legalized with the identity -inf/+inf, not the finite extremes.

TVM legalizes ``relax.max`` with ``topi.max``, whose reduction starts from
``min_value(dtype)``: the lowest *finite* value (-3.4e38 in float32), and ``relax.min``
from the largest finite one. A row that is all ``-inf`` then has the max -3.4e38 instead of
``-inf``. ONNX's ``ReduceMax`` of such a row is ``-inf`` (and over an empty set too), and
the expanded ONNX ``Attention`` function relies on it: it finds fully masked rows with
``Equal(ReduceMax(bias), -inf)`` and zeroes their (NaN) softmax. Compiled, the test never
held, and the NaN of every fully masked row reached the output (six of the ONNX
conformance cases of ``Attention``, ``*_fullymasked_*``, ``*_nan_robustness_*``,
``*_structural_empty_*``, ``*_softmax_precision_*`` and ``local_window_gqa_rank4_mask``).

Here the float ``max``/``min`` calls are legalized by a TE reduction of our own, the same
loops as ``topi.max``/``topi.min`` with the identity ``-inf``/``+inf``; other dtypes keep
TVM's legalization. Exact: a row with one finite value reduces as before. Runs right before
TVM's ``LegalizeOps`` (:func:`rewriter.backends.tvm.relax_pipeline`), on every target.

>>> mod = legalize_pass()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

# op name -> (the binary TIR op, the identity: -inf for max, +inf for min)
REDUCTIONS = {"relax.max": ("max", -math.inf), "relax.min": ("min", math.inf)}


def legalize_pass() -> tvm.transform.Pass:
    """``LegalizeOps`` with float ``max``/``min`` reduced from ``-inf``/``+inf`` (see the module)."""
    from tvm import relax

    return relax.transform.LegalizeOps(customize_legalize_map=legalizations())


def legalizations() -> dict[str, Any]:
    """``LegalizeOps`` entries for ``relax.max`` and ``relax.min`` (see the module)."""
    return {name: _legalize(name) for name in REDUCTIONS}


def _legalize(name: str) -> Any:
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir

    stock = ir.Op.get(name).get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        dtype = call.args[0].ty.dtype
        if not str(dtype).startswith(("float", "bfloat")):
            return stock(bb, call)
        return bb.call_te(
            reduce_with_infinite_identity,
            call.args[0],
            name,
            call.attrs.axis,
            call.attrs.keepdims,
            primfunc_name_hint=name.removeprefix("relax."),
        )

    return legalize


def reduce_with_infinite_identity(x: Any, name: str, axis: Any | None, keepdims: bool) -> Any:
    """The TE tensor of ``max``/``min`` (``name``: ``relax.max`` or ``relax.min``) of ``x``
    over ``axis`` (None: all axes), starting from ``-inf``/``+inf``."""
    from tvm import te, tirx

    binary, identity = REDUCTIONS[name]
    combine = tirx.max if binary == "max" else tirx.min
    reducer = te.comm_reducer(
        lambda a, b: combine(a, b), lambda dtype: tirx.const(identity, dtype), name=binary
    )
    rank = len(x.shape)
    axes = sorted(
        {int(a) % rank for a in axis} if axis is not None and len(axis) else set(range(rank))
    )
    reduce_axes = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
    kept = [a for a in range(rank) if a not in reduce_axes]
    shape = (
        [1 if a in reduce_axes else x.shape[a] for a in range(rank)]
        if keepdims
        else [x.shape[a] for a in kept]
    )

    def compute(*index: Any) -> Any:
        outer = iter(index) if not keepdims else None
        coordinates = []
        for a in range(rank):
            if a in reduce_axes:
                coordinates.append(reduce_axes[a])
            elif keepdims:
                coordinates.append(index[a])
            else:
                assert outer is not None
                coordinates.append(next(outer))
        return reducer(x(*coordinates), axis=list(reduce_axes.values()))

    return te.compute(shape, compute, name=f"{binary}_red", tag="comm_reduce")
