"""Tensors of known rank and unknown shape -> match_cast to fresh symbolic dimensions.

TVM's ONNX importer gives the result of an ``If`` whose branches differ in shape (the
``batched_nms`` of torchvision's detectors: an empty constant, or the kept boxes of a
``NonMaxSuppression``) a rank but no shape. ``LegalizeOps`` lowers no operator on such a
tensor, and VM code generation then fails ("CodeGenVM cannot emit this Relax operator
directly"). After each binding of such a tensor this pass inserts
``match_cast(x, R.Tensor((d0, ..., dk), dtype))`` with new ``int64`` variables, and the
later uses read the cast value: the operators after it see a symbolic shape, which they
lower, and the VM checks the rank at run time. Exact: the values are not touched.

>>> mod = bind_unknown_shapes()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import visit_functions

if TYPE_CHECKING:
    import tvm


def bind_unknown_shapes() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm
    from tvm import relax, tirx

    @relax.expr_functor.mutator
    class Bind(relax.PyExprMutator):  # type: ignore[misc]
        def visit_var_binding_(self, binding: Any) -> None:
            super().visit_var_binding_(binding)
            ty = binding.var.ty
            if not isinstance(ty, relax.TensorType) or ty.shape is not None or ty.ndim < 0:
                return
            value = self.visit_expr(binding.var)  # the var as re-emitted
            name = binding.var.name
            dims = [tirx.Var(f"{name}_dim{axis}", "int64") for axis in range(ty.ndim)]
            bound = self.builder_.match_cast(value, relax.TensorType(dims, ty.dtype))
            self.set_var_remap(binding.var, bound)

    @tvm.transform.module_pass(opt_level=0, name="BindUnknownShapes")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = Bind(mod)
        visit_functions(mutator, mod)
        return mutator.builder_.get()

    return pass_
