"""Our passes of the TVM pipeline, in the order they run.

On the ONNX model, in :func:`rewriter.backends.tvm.import_onnx.prepare` (what TVM's
importer lacks): ``loss_decompose`` (NLL and softmax cross-entropy losses spelled out),
``unroll`` (constant-trip ``Loop`` nodes), ``qdq_matmul`` (QDQ MatMuls to the int8
kernel's op, on VNNI targets).

On the Relax module, in :func:`rewriter.backends.tvm.pipeline.relax_pipeline`:
``legalize_bf16_norms`` (bf16 layer/RMS norms computed in float32), ``bf16_matmul``
(bf16 matmuls to the ``vdpbf16ps`` kernel, before legalization), ``reduce_identity``
(float ``max``/``min`` legalized from -inf/+inf, with TVM's ``LegalizeOps``), ``pack_weights``
(constant matmul weights in panels, after fusion) and ``schedules`` (our dlight rules
for the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm


def rewrite_calls(mod: tvm.IRModule, ops: Any, rewrite: Any) -> tvm.IRModule:
    """``mod`` (an ``IRModule``) with every call ``c`` of an op named in ``ops`` replaced
    by ``rewrite(builder, c)`` (which returns the new expression, or None to keep ``c``)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Mutator(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name in ops:
                new = rewrite(self.builder_, call)
                if new is not None:
                    return new
            return call

    mutator = Mutator(mod)
    visit_functions(mutator, mod)
    return mutator.builder_.get()


def visit_functions(mutator: object, mod: object) -> None:
    """Run a ``relax.PyExprMutator`` over every Relax function of ``mod``, each result
    back into the mutator's builder (``mutator.builder_.get()`` is the rewritten module)."""
    from tvm import relax

    for gv, func in mod.functions.items():  # type: ignore[attr-defined]
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))  # type: ignore[attr-defined]


def dims_of(expr: Any) -> list[Any] | None:
    """``expr``'s dimensions (ints or symbolic ``tirx`` expressions) where its type has a
    known shape (a ``ShapeExpr``), else None."""
    from tvm import relax

    shape = getattr(getattr(expr, "ty", None), "shape", None)
    return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None


def product(dims: Any) -> Any:
    """The product of ``dims`` (ints or TIR expressions) as an int64 TIR expression (1 for
    none; TVM folds the leading 1): a reshape's extent, or one side of a proof that two
    shapes hold as many elements."""
    from tvm import tirx

    total: Any = tirx.const(1, "int64")
    for dim in dims:
        total = total * dim
    return total


def product_factors(terms: Any) -> tuple[int, list[Any]]:
    """The product of ``terms`` (TIR expressions) as its constant and its other factors,
    products taken apart (``4 * b * (n + 6) // 7`` -> ``(4, [b, (n + 6) // 7])``)."""
    from tvm import tirx

    coefficient, factors = 1, []
    pending = list(terms)
    while pending:
        term = pending.pop()
        if isinstance(term, tirx.Mul):
            pending += [term.a, term.b]
        elif isinstance(term, tirx.IntImm):
            coefficient *= int(term.value)
        else:
            factors.append(term)
    return coefficient, factors


def size_terms(size: Any) -> tuple[int, tuple[Any, ...]] | None:
    """``size`` (a TIR expression: a storage's bytes, a symbolic batch) as ``coefficient *
    v1 * v2 ...``: ``(coefficient, (v1, v2, ...))`` the variables sorted by name; None for
    any other form (a sum, a division) or a constant."""
    from tvm import tirx

    coefficient, variables = product_factors([size])
    if not variables or not all(isinstance(var, tirx.Var) for var in variables):
        return None
    return coefficient, tuple(sorted(variables, key=lambda var: var.name))


def in_placeholder_vars(expr: Any, values: Any, shape: Any) -> Any:
    """``expr`` with the variables of ``values`` (a Relax shape) replaced by those of
    ``shape``, the shape of the TE placeholder that ``emit_te`` made of it (the same
    expressions over fresh variables)."""
    import tvm_ffi
    from tvm import tirx

    fresh: dict[Any, Any] = {}
    for value, placeholder in zip(values, shape, strict=True):
        olds = tirx.analysis.undefined_vars(value, [])
        news = tirx.analysis.undefined_vars(placeholder, [])
        fresh.update(zip(olds, news, strict=True))
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda var: fresh.get(var, var))])
