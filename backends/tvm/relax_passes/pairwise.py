"""ONNX's variadic ``Min``/``Max``/``Sum`` as pairwise ops, not a stack reduced.

``min(stack((broadcast_to(a, s), broadcast_to(b, s)), axis=0), axis=[0]) ->
minimum(a, b)`` (and ``max`` -> ``maximum``, ``sum`` -> ``add``), folded left to right over
any number of inputs. TVM's importer writes ``Min(a, b)`` that way: two broadcast copies,
a stacked copy and a reduction over it, which no elementwise rule schedules (T5's
relative-position buckets, ``min(bucket, buckets - 1)``, ran scalar on every call of a
library with a symbolic sequence). The pairwise ops broadcast to the same shape ``s`` and
fuse with their neighbours. Exact: each output element is the same ``min``/``max``/sum of
the same values (sums added in the same order).

>>> mod = pairwise()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import visit_functions

if TYPE_CHECKING:
    import tvm

# reduction over the stacked axis -> its pairwise op
PAIRWISE = {"relax.min": "minimum", "relax.max": "maximum", "relax.sum": "add"}


def pairwise() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring); dead stacks and copies removed after."""
    import tvm
    from tvm import relax

    def op_name(expr: Any) -> str | None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            return str(expr.op.name)
        return None

    @relax.expr_functor.mutator
    class Pairwise(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = op_name(call)
            if name not in PAIRWISE or call.attrs.keepdims:
                return call
            axis = call.attrs.axis
            if axis is None or [int(a) for a in axis] != [0]:
                return call
            stacked = self._bound(call.args[0])
            if op_name(stacked) != "relax.stack" or int(stacked.attrs.axis) != 0:
                return call
            fields = self._bound(stacked.args[0])
            if not isinstance(fields, relax.Tuple) or len(fields.fields) < 2:
                return call
            inputs = []
            for field in fields.fields:
                copy = self._bound(field)
                inputs.append(copy.args[0] if op_name(copy) == "relax.broadcast_to" else field)
            combine = getattr(relax.op, PAIRWISE[name])
            result = inputs[0]
            for value in inputs[1:]:
                result = self.builder_.normalize(combine(result, value))
            # the stacked inputs had been broadcast to the output's shape: so are these
            return (
                relax.op.broadcast_to(result, call.ty.shape)
                if _shape_differs(result, call)
                else result
            )

        def _bound(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is not None:
                    return bound
            return expr

    @tvm.transform.module_pass(opt_level=0, name="Pairwise")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = Pairwise(mod)
        visit_functions(mutator, mod)
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return pass_


def _shape_differs(result: Any, call: Any) -> bool:
    """Whether ``result``'s shape is not structurally ``call``'s (a broadcast is needed)."""
    import tvm

    try:
        tvm.ir.assert_structural_equal(result.ty.shape, call.ty.shape, map_free_vars=False)
    except (ValueError, AttributeError):
        return True
    return False
