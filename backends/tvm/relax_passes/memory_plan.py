"""Upper bounds of symbolic dimensions for TVM's memory planning, and a record of the plan.

A model compiled with a symbolic dimension (a dynamic batch) allocates every
intermediate buffer whose size depends on it at run time, on each call: the Relax VM
computes the size (``make_shape``) and calls ``vm.builtin.alloc_storage`` (~50 times a
call for EfficientNet-B0). Given an upper bound of the dimension (the Relax function
attribute ``tir_var_upper_bound``, keyed by the TIR variable's name), TVM's
``StaticPlanBlockMemory`` plans those buffers at the bound: their sizes are constants,
shared between buffers whose lifetimes do not overlap, as for fixed shapes.

:func:`bound_dims` sets the attribute on every Relax function whose signature has the
variables (``compile(max_dims=...)``, CLI ``--max-dim``); the importer names the TIR
variable of a symbolic input axis after its ONNX ``dim_param``, so a bound is keyed by
the axis's name. A call with a larger size would overflow the planned buffers:
:class:`rewriter.backends.tvm.session.Session` refuses it before the VM runs.

:func:`record_storage` runs after TVM's memory planning (``StaticPlanBlockMemory``,
``LowerAllocTensor``) and counts each function's storage allocations by whether their
size is a constant (planned statically) or computed at run time: :class:`StorageRecord`,
the report's ``compiled.memory``.

>>> mod = bound_dims(mod, {"batch": 16})  # doctest: +SKIP
>>> record = StorageRecord()  # doctest: +SKIP
>>> record.functions["main"]  # doctest: +SKIP
{'static': 48, 'dynamic': 1}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

UPPER_BOUND = "tir_var_upper_bound"


def signature_vars(func: Any) -> set[str]:
    """The names of the TIR variables that are dimensions of ``func``'s parameters."""
    from tvm import relax, tirx

    names = set()
    for param in func.params:
        shape = getattr(param.ty, "shape", None)
        if isinstance(shape, relax.ShapeExpr):
            names |= {dim.name for dim in shape.values if isinstance(dim, tirx.Var)}
    return names


def bound_dims(mod: tvm.IRModule, bounds: Mapping[str, int]) -> tvm.IRModule:
    """``mod`` with ``tir_var_upper_bound`` set to ``bounds`` (TIR variable name -> largest
    size) on each Relax function whose parameters have those variables (``main``).

    Raises :class:`InputError` for a name that is no variable of ``main``'s signature
    (an axis whose size is an expression of others, e.g. ``2*n``: bound ``n``).
    """
    from tvm import relax

    if not bounds:
        return mod
    main_vars = signature_vars(mod["main"])
    missing = sorted(set(bounds) - main_vars)
    if missing:
        raise InputError(
            f"--max-dim {missing[0]}: no dimension of the imported model's inputs is that "
            f"variable (its variables: {', '.join(sorted(main_vars)) or 'none'})"
        )
    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        own = {name: int(size) for name, size in bounds.items() if name in signature_vars(func)}
        if not own:
            continue
        earlier = dict(func.attrs[UPPER_BOUND]) if func.attrs and UPPER_BOUND in func.attrs else {}
        merged = {str(name): int(size) for name, size in earlier.items()}
        for name, size in own.items():
            merged[name] = min(size, merged.get(name, size))
        mod[gvar] = func.with_attr(UPPER_BOUND, merged)
    logger.info("memory planned with upper bounds %s", dict(bounds))
    return mod


@dataclasses.dataclass
class StorageRecord:
    """Each Relax function's storage allocations after memory planning, by name: how many
    have a constant size (``static``: planned once, at fixed shapes or at the upper
    bounds) and how many a size computed on each call (``dynamic``)."""

    functions: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {name: dict(counts) for name, counts in self.functions.items()}


def record_storage(record: StorageRecord) -> tvm.transform.Pass:
    """A pass that changes nothing and fills ``record`` (run it after ``LowerAllocTensor``,
    when every allocation is an ``R.memory.alloc_storage``)."""
    import tvm
    from tvm import relax

    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")

    @tvm.transform.module_pass(opt_level=0, name="RecordStorage")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            counts = {"static": 0, "dynamic": 0}

            def visit(expr: Any, counts: dict[str, int] = counts) -> None:
                if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
                    size = expr.args[0]
                    static = isinstance(size, relax.ShapeExpr) and all(
                        isinstance(dim, tvm.tirx.IntImm) for dim in size.values
                    )
                    counts["static" if static else "dynamic"] += 1

            relax.analysis.post_order_visit(func, visit)
            record.functions[gvar.name_hint] = counts
        return mod

    return pass_
