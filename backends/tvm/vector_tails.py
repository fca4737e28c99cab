"""Vector loops whose last iterations are masked, split into a full-vector case and a tail.

A matmul whose columns are padded to whole register tiles (197 attention keys in panels
of 32) writes its epilogue through a predicate: ``panel * 32 + lane < 197``. The
predicate is per lane, so TVM's ``VectorizeLoop`` makes the whole loop scalar, in every
panel, not only in the last: 224 scalar stores where 6 of 7 panels need 2 vector ones.
Before lowering, each vectorized loop whose block is predicated by bounds that move with
the lane (``base + lane < n``, ``base + lane >= lo``) becomes::

    if <the bounds hold at the first and last lane>:  vector loop, no lane predicate
    else:                                             the loop as it was

(the lane-independent conditions stay on both). Exact: the full case runs where the
predicate holds on every lane. 4 x 197 x 197 attention scores (with the vectorized pad
copy of K^T): 1.13 -> 1.09x ONNX Runtime's time, one thread.
"""

from __future__ import annotations

from typing import Any


def unswitch_pass() -> Any:
    """The module pass (s_tir, before lowering) that splits each such loop."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def rewrite(func: tirx.PrimFunc, _mod: Any, _ctx: Any) -> tirx.PrimFunc:
        body = tvm_ffi.structural_map(func.body, [(tirx.For, unswitched)], order="post")
        return func if body.same_as(func.body) else func.with_body(body)

    return tvm.tirx.transform.prim_func_pass(rewrite, opt_level=0, name="RewriterUnswitchVectorTails")


def unswitched(loop: Any) -> Any:
    """``loop`` split as the module docstring says, or ``loop`` itself where it is not a
    vectorized loop over one block predicated by bounds monotone in the lane."""
    from tvm import s_tir, sym, tirx

    realize = loop.body
    if loop.kind != tirx.ForKind.VECTORIZED or not isinstance(realize, s_tir.SBlockRealize):
        return loop
    lane = loop.loop_var
    terms = _conjuncts(realize.predicate)
    moving = [term for term in terms if uses(term, lane)]
    if not moving:
        return loop
    checks = []
    first, last = loop.min, loop.min + loop.extent - 1
    for term in moving:
        at = _holds_everywhere_at(term, lane, first, last)
        if at is None:
            return loop
        checks.append(sym.Analyzer().simplify(_substitute(term, lane, at)))
    kept = [term for term in terms if not uses(term, lane)]
    fresh = tirx.Var(lane.name, lane.ty)
    values = [_substitute(value, lane, fresh) for value in realize.iter_values]
    full = s_tir.SBlockRealize(values, _all(kept), realize.block)
    vector = tirx.For(fresh, loop.min, loop.extent, loop.kind, full, loop.thread_binding, loop.annotations)
    return tirx.IfThenElse(_all(checks), vector, loop)


def _holds_everywhere_at(term: Any, lane: Any, first: Any, last: Any) -> Any:
    """The lane (``first`` or ``last``) at which bound ``term`` holds only if it holds at
    every lane, or None where ``term`` is not a bound increasing or decreasing with it."""
    from tvm import sym, tirx

    if isinstance(term, (tirx.LT, tirx.LE)):
        low, high = term.a, term.b
    elif isinstance(term, (tirx.GT, tirx.GE)):
        low, high = term.b, term.a
    else:
        return None
    if uses(low, lane) == uses(high, lane):
        return None
    moving = low if uses(low, lane) else high
    coefficients = sym.detect_linear_equation(moving, [lane])
    if len(coefficients) != 2 or not isinstance(coefficients[0], tirx.IntImm):
        return None
    step = int(coefficients[0])
    if step == 0:
        return None
    # low < high: an increasing low is tightest at the last lane, an increasing high at
    # the first (and the other way round for a decreasing one).
    return last if (step > 0) == (moving is low) else first


def _conjuncts(condition: Any) -> list[Any]:
    from tvm import tirx

    if isinstance(condition, tirx.And):
        return _conjuncts(condition.a) + _conjuncts(condition.b)
    return [condition]


def _all(terms: list[Any]) -> Any:
    from tvm import tirx

    if not terms:
        return tirx.const(True, "bool")
    condition = terms[0]
    for term in terms[1:]:
        condition = tirx.And(condition, term)
    return condition


def uses(expr: Any, var: Any) -> bool:
    """Whether ``var`` is free in ``expr``."""
    from tvm import tirx

    return any(free.same_as(var) for free in tirx.analysis.undefined_vars(expr, []))


def _substitute(expr: Any, var: Any, value: Any) -> Any:
    import tvm_ffi
    from tvm import tirx

    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda free: value if free.same_as(var) else free)])
