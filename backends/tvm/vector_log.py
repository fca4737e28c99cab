"""``log`` of float32 as a polynomial LLVM vectorizes, not a libm call per element.

TVM lowers ``tirx.log`` to LLVM's ``llvm.log`` intrinsic, which LLVM has no vector form of
without a vector math library: a vectorized loop becomes one ``logf`` call per lane.
That is what the relative-position buckets of DeBERTa and T5 cost in a library with a
symbolic sequence, where they are computed on every call (DeBERTa at 1 x 128: 0.28 ms
of 4.1). Each float32 ``llvm.log`` becomes Cephes' ``logf`` (:func:`fast_log`, within an
ulp of the correctly rounded log; 2x faster than libm's over 1M elements, the loop's
loads and stores included), in the call's vector width.

The rewrite is the last TIR pass before code generation, after TVM's ``LowerIntrin``
(whose analyzer substitutes ``Let``-bound values into their uses: on T5's position
bucket it ran for minutes). The schedules before it see one call, not its expansion
inlined into every use, and each distinct log of a stored value is computed once
(T5's bucket read one log 15 times).
"""

from __future__ import annotations

from typing import Any

# Cephes' logf: log(1 + f) = f - f^2 / 2 + f^3 * P(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1),
# P's coefficients from the highest power down; ln 2 split in two for the exponent's part.
LOG_POLYNOMIAL = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
SMALLEST_NORMAL = 1.1754943508222875e-38


def log_pass() -> Any:
    """The PrimFunc pass (after ``LowerIntrin``) that computes each distinct float32
    ``llvm.log`` in a stored value once, as :func:`fast_log` bound by ``Let`` ahead of the
    value. Inlining copies a producer into each of its uses, and TVM's
    common-subexpression elimination leaves calls alone: T5's position bucket reads one
    log 15 times. A log of a variable the value binds itself stays a libm call (none seen
    in real exports), and so does a log of a load under an ``if_then_else`` (a padded
    read: computed ahead of the value, it would read past the guard)."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    from tvm.target import codegen

    intrinsic = tvm.ir.Op.get("tirx.call_llvm_pure_intrin")
    llvm_log = codegen.llvm_lookup_intrinsic_id("llvm.log")

    def is_log(node: Any) -> bool:
        dtype = tvm_ffi.dtype(str(node.ty))
        return (
            node.op.same_as(intrinsic)
            and isinstance(node.args[0], tirx.IntImm)
            and int(node.args[0]) == llvm_log
            and (dtype.type_code, dtype.bits) == (2, 32)  # float32, any lanes
        )

    def key(call: Any) -> Any:
        """The log's argument, compared by structure (the documented one-argument form;
        the stub asks for a hash too)."""
        return tvm_ffi.StructuralKey(call.args[-1])  # type: ignore[call-arg]

    def reads_memory(expr: Any) -> bool:
        loads: list[Any] = []

        def note_load(load: Any) -> Any:
            loads.append(load)
            return load

        tvm_ffi.structural_map(expr, [(tvm.ir.TensorLoad, note_load)])
        return bool(loads)

    def expanded(store: Any) -> Any:
        calls: list[Any] = []
        bound: set[Any] = set()
        guarded: set[Any] = set()  # logs of loads an if_then_else guards (a padded read)

        def note_guarded(node: Any) -> Any:
            if is_log(node) and reads_memory(node.args[-1]):
                guarded.add(key(node))
            return node

        def note(node: Any) -> Any:
            if isinstance(node, tirx.Let):
                bound.add(node.var)
            elif is_log(node):
                calls.append(node)
            elif getattr(node.op, "name", None) == "prim.if_then_else":
                for branch in node.args[1:]:
                    tvm_ffi.structural_map(branch, [(tvm.ir.Call, note_guarded)])
            return node

        tvm_ffi.structural_map(store.value, [(tvm.ir.Call, note), (tirx.Let, note)])
        arguments = {key(call): call.args[-1] for call in calls}
        arguments = {
            found: argument
            for found, argument in arguments.items()
            if found not in guarded and not bound.intersection(tirx.analysis.undefined_vars(argument, []))
        }
        if not arguments:
            return store
        names = {found: tirx.Var("log", argument.ty) for found, argument in arguments.items()}

        def named(call: Any) -> Any:
            return names.get(key(call), call) if is_log(call) else call

        bindings = []
        for found, var in names.items():
            steps, result = fast_log(arguments[found])
            bindings += [*steps, (var, result)]
        value = tvm_ffi.structural_map(store.value, [(tvm.ir.Call, named)], order="post")
        for var, bound_value in reversed(bindings):
            value = tirx.Let(var, bound_value, value)
        return tirx.BufferStore(store.buffer, value, store.indices)

    def rewrite(func: tirx.PrimFunc, _mod: Any, _ctx: Any) -> tirx.PrimFunc:
        body = tvm_ffi.structural_map(func.body, [(tirx.BufferStore, expanded)], order="post")
        return func if body.same_as(func.body) else func.with_body(body)

    return tirx.transform.prim_func_pass(rewrite, opt_level=0, name="RewriterVectorLog")


def fast_log(x: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """The float32 expression ``log(x)`` (``x`` a scalar or a vector) as Cephes' ``logf``
    computes it, as bindings ``(variable, value)`` in order and the result over them:
    ``x = m * 2^e`` from its bits, ``m`` in ``[sqrt(1/2), sqrt(2))``, ``log(x) = e * ln 2 + log(m)``, ``log(m)`` a polynomial; subnormals scaled by 2^23
    first; ``log(0) = -inf``, ``log(inf) = inf``, NaN for NaN and negative ``x``. The
    variables are fresh; bind them with ``Let`` around the use (LLVM's code generator
    does; not inside another binding's value)."""
    import tvm_ffi
    from tvm import tirx

    lanes = tvm_ffi.dtype(str(x.ty)).lanes
    suffix = f"x{lanes}" if lanes > 1 else ""

    def const(value: float, dtype: str) -> Any:
        scalar = tirx.const(value, dtype)
        return tirx.Broadcast(scalar, lanes) if lanes > 1 else scalar

    def f32(value: float) -> Any:
        return const(value, "float32")

    def i32(value: int) -> Any:
        return const(value, "int32")

    value, bits, half, e, f = (
        tirx.Var(name, dtype + suffix)
        for name, dtype in (("value", "float32"), ("bits", "int32"), ("half", "float32"), ("e", "float32"), ("f", "float32"))
    )
    subnormal = value < f32(SMALLEST_NORMAL)
    exponent = (bits >> i32(23)) - tirx.Select(subnormal, i32(149), i32(126))
    low = half < f32(0.70710678118654752440)
    bindings = [
        (value, x),
        (bits, tirx.reinterpret("int32" + suffix, tirx.Select(subnormal, value * f32(8388608.0), value))),
        # the mantissa as a float in [0.5, 1) (frexp's)
        (half, tirx.reinterpret("float32" + suffix, (bits & i32(0x007FFFFF)) | i32(0x3F000000))),
        (e, tirx.Cast("float32" + suffix, tirx.Select(low, exponent - i32(1), exponent))),
        (f, tirx.Select(low, half + half - f32(1.0), half - f32(1.0))),
    ]
    square = f * f
    polynomial = f32(LOG_POLYNOMIAL[0])
    for coefficient in LOG_POLYNOMIAL[1:]:
        polynomial = polynomial * f + f32(coefficient)
    y = polynomial * f * square + e * f32(LN2_LOW) - f32(0.5) * square
    result = f + y + e * f32(LN2_HIGH)
    result = tirx.Select(value == f32(float("inf")), value, result)
    result = tirx.Select(value == f32(0.0), f32(float("-inf")), result)
    result = tirx.Select(tirx.Or(value < f32(0.0), tirx.isnan(value)), f32(float("nan")), result)
    return bindings, result
