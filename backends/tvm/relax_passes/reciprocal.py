"""Division by a constant as multiplication by its reciprocal (fast math only).

``divide(x, c) -> multiply(x, 1 / c)`` for a float32 constant ``c``, and ``quantize(x, s,
z)`` with a constant scale legalized as ``round(x * (1 / s)) + z`` rather than TVM's
``round(x / s) + z``. A vector division costs what ten multiplications do here (AVX-512
``vdivps`` issues once every ~10 cycles): the exported GELU's ``Div(x, sqrt 2)`` and the
quantize that follows it were half the time of int8 MiniLM's fused GELU (0.55 ns per
element; 0.35 after this).

Approximate, as LLVM's ``-freciprocal-math``: ``x * (1 / c)`` is within one unit in the
last place of ``x / c`` (exact where ``c`` is a power of two), so a quantized value can move
one step where ``x / s`` falls within that of a rounding boundary. Runs with
``FastMathTransform`` (``fast_math=False`` keeps the divisions): ``divide_by_constants``
before legalization, :func:`legalizations` inside the pipeline's one ``LegalizeOps``.

>>> mod = divide_by_constants()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import visit_functions

if TYPE_CHECKING:
    import tvm


def divide_by_constants() -> tvm.transform.Pass:
    """The Relax pass: float32 ``divide(x, constant)`` -> ``multiply(x, 1 / constant)``."""
    import numpy as np
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Reciprocal(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.divide":
                return call
            divisor = call.args[1]
            if not isinstance(divisor, tvm.ir.expr.GenericConst) or divisor.value.dtype != "float32":
                return call
            values = divisor.value.numpy()
            if not np.all(np.isfinite(values)) or np.any(values == 0):
                return call  # x / 0 and x / inf keep their IEEE meaning
            inverse = relax.const((np.float32(1) / values).astype(np.float32), "float32")
            return relax.op.multiply(call.args[0], inverse)

    @tvm.transform.module_pass(opt_level=0, name="DivideByConstants")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mutator = Reciprocal(mod)
        visit_functions(mutator, mod)
        return mutator.builder_.get()

    return pass_


def legalizations() -> dict[str, Any]:
    """``LegalizeOps`` entries: ``relax.quantize`` of float32 to an integer type with a
    scalar constant scale multiplies by its reciprocal; other quantizes keep TVM's
    legalization."""
    import tvm
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir

    stock = ir.Op.get("relax.quantize").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        data, scale, zero_point = call.args
        if (
            not isinstance(scale, tvm.ir.expr.GenericConst)
            or scale.value.dtype != "float32"
            or scale.value.numpy().size != 1
            or data.ty.dtype != "float32"
            or "int" not in str(call.attrs.out_dtype)  # float8 outputs are not rounded
        ):
            return stock(bb, call)
        value = float(scale.value.numpy().reshape(()))
        if value == 0 or value != value or abs(value) == float("inf"):
            return stock(bb, call)
        if isinstance(zero_point, tvm.ir.expr.GenericConst) and zero_point.value.numpy().size == 1:
            zero_point = float(zero_point.value.numpy().reshape(()))
        return bb.call_te(
            quantize_by_reciprocal,
            data,
            1.0 / value,
            zero_point,
            str(call.attrs.out_dtype),
            primfunc_name_hint="quantize",
        )

    return {"relax.quantize": legalize}


def quantize_by_reciprocal(x: Any, inverse: float, zero_point: Any, dtype: str) -> Any:
    """The TE tensor ``clip(round(x * inverse) + zero_point)`` cast to ``dtype``; the zero
    point a number or a one-element tensor."""
    from tvm import te, tirx

    def compute(*index: Any) -> Any:
        if isinstance(zero_point, float):
            zero = tirx.const(zero_point, "float32")
        else:
            zero = zero_point(*([0] * len(zero_point.shape))).astype("float32")
        value = tirx.round(x(*index) * tirx.const(inverse, "float32")) + zero
        low, high = tirx.min_value(dtype).astype("float32"), tirx.max_value(dtype).astype("float32")
        return tirx.max(tirx.min(value, high), low).astype(dtype)

    return te.compute(x.shape, compute, name="quantized")
