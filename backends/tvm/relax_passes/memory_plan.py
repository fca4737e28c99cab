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

Without a bound, TVM's planner shares a storage of symbolic size only between requests
of provably the same size: :func:`share_symbolic_storage`, right after it, shares those
whose sizes are a constant times the same variables (``602112 * batch``) between
tensors whose lifetimes do not overlap, as the planner does constant ones.

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

from rewriter.backends.tvm.relax_passes import size_terms
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


@dataclasses.dataclass
class _Storage:
    """One ``alloc_storage`` binding of a symbolic size: its position among the function's
    bindings, the last position at which a variable that may hold its memory is used
    (:func:`_set_ends`), its size as ``coefficient * variables``, and ``kind``: the
    variables' and the allocation's other arguments (device, scope, dtype), which a
    storage shared must have alike."""

    var: Any
    start: int
    end: int
    coefficient: int
    variables: tuple[Any, ...]
    kind: str

    def fits(self, other: _Storage) -> bool:
        return self.kind == other.kind and all(
            a.same_as(b) for a, b in zip(self.variables, other.variables, strict=True)
        )


def _set_ends(bindings: list[Any], body: Any, storages: dict[Any, _Storage], kernels: set[str]) -> None:
    """Set each storage's ``end``: the last binding whose value uses a variable that may
    hold its memory: a tensor allocated in it, or what a binding makes of such variables
    (an alias, a view, a tuple, an unknown call's result), but for calls of ``kernels``
    (PrimFuncs: they write into their output arguments and return nothing); past the
    last binding where the function returns one."""
    import tvm
    from tvm import relax

    holders: dict[Any, list[_Storage]] = {var: [storage] for var, storage in storages.items()}
    for index, binding in enumerate(bindings):
        used = relax.analysis.free_vars(binding.value)
        owners = {id(owner): owner for var in used for owner in holders.get(var, [])}
        for owner in owners.values():
            owner.end = index
        value = binding.value
        kernel = isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)
        if owners and not (kernel and value.op.name_hint in kernels):
            holders[binding.var] = list(owners.values())
    for var in relax.analysis.free_vars(body):
        for owner in holders.get(var, []):
            owner.end = len(bindings)


def _share(storages: list[_Storage]) -> list[list[_Storage]]:
    """``storages`` (in allocation order) in groups that share one storage: each takes a
    group of its kind whose members are all dead by then, the one with the smallest
    size that fits, else the largest (grown); a new group where none is free."""
    groups: list[list[_Storage]] = []
    for storage in storages:
        free = [g for g in groups if g[0].fits(storage) and max(m.end for m in g) < storage.start]
        fitting = [g for g in free if max(m.coefficient for m in g) >= storage.coefficient]
        if fitting:
            group = min(fitting, key=lambda g: max(m.coefficient for m in g))
        elif free:
            group = max(free, key=lambda g: max(m.coefficient for m in g))
        else:
            group = []
            groups.append(group)
        group.append(storage)
    return groups


def share_symbolic_storage() -> tvm.transform.Pass:
    """A pass (after ``StaticPlanBlockMemory``, before ``LowerAllocTensor``) that lets
    storages of symbolic size share memory as TVM's planner lets constant ones.

    TVM reuses a freed storage of symbolic size only for a request of provably the same
    size: a CNN compiled for any batch gets one storage per distinct activation size
    (MobileNetV3-small: 38, against 8 at a fixed batch), each allocated on every call and
    all live at once, so each layer writes into memory no layer has touched recently.
    Sizes that are a constant times the same product of variables (``602112 * batch``,
    ``1536 * batch * seq``) compare alike for every value of the variables; among those,
    a storage whose tensors are all dead serves the next request (:func:`_share`), and
    is allocated at the largest size it serves. A storage used otherwise than by
    ``alloc_tensor`` at offset 0 keeps its own memory.
    """
    import tvm
    from tvm import relax

    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    alloc_tensor = tvm.ir.Op.get("relax.memory.alloc_tensor")

    def is_call(value: Any, op: Any) -> bool:
        return isinstance(value, relax.Call) and value.op.same_as(op)

    def symbolic_storages(bindings: list[Any], result: Any) -> dict[Any, _Storage]:
        """The storages of ``bindings`` that may be shared (``result``: what the
        function returns)."""
        storages = {}
        for index, binding in enumerate(bindings):
            value = binding.value
            if not is_call(value, alloc_storage) or not isinstance(value.args[0], relax.ShapeExpr):
                continue
            terms = size_terms(value.args[0].values[0]) if len(value.args[0].values) == 1 else None
            if terms is not None:
                kind = ",".join([var.name for var in terms[1]] + [str(arg) for arg in value.args[1:]])
                storages[binding.var] = _Storage(binding.var, index, index, *terms, kind)
        for binding in bindings:
            value = binding.value
            offset = value.args[1] if is_call(value, alloc_tensor) else None
            if not (isinstance(offset, tvm.tirx.IntImm) and int(offset.value) == 0):
                for var in relax.analysis.free_vars(value):
                    storages.pop(var, None)
        for var in relax.analysis.free_vars(result):
            storages.pop(var, None)
        return storages

    def plan(func: Any, kernels: set[str]) -> Any:
        if not isinstance(func.body, relax.SeqExpr):
            return func
        bindings = [binding for block in func.body.blocks for binding in block.bindings]
        storages = symbolic_storages(bindings, func.body.body)
        _set_ends(bindings, func.body.body, storages, kernels)
        groups = _share(sorted(storages.values(), key=lambda storage: storage.start))
        if len(groups) == len(storages):
            return func
        shared = {member.var: group for group in groups for member in group}

        def rewrite(binding: Any) -> Any | None:
            value = binding.value
            args = list(value.args) if isinstance(value, relax.Call) else []
            if is_call(value, alloc_storage) and binding.var in shared:
                group = shared[binding.var]
                if not group[0].var.same_as(binding.var):
                    return None  # its tensors go to the group's storage
                size = tvm.tirx.IntImm("int64", max(member.coefficient for member in group))
                for var in group[0].variables:
                    size = size * var
                args[0] = relax.ShapeExpr([size])
            elif is_call(value, alloc_tensor) and args[0] in shared:
                args[0] = shared[args[0]][0].var
            else:
                return binding
            call = relax.Call(value.op, args, value.attrs, value.ty_args, value.span, ret_ty=value.ty)
            return relax.VarBinding(binding.var, call)

        blocks = []
        for block in func.body.blocks:
            kept = [new for new in map(rewrite, block.bindings) if new is not None]
            blocks.append(type(block)(kept))
        body = relax.SeqExpr(blocks, func.body.body)
        return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)

    @tvm.transform.module_pass(opt_level=0, name="ShareSymbolicStorage")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels = {gvar.name_hint for gvar, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}
        mod = mod.clone()
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = plan(func, kernels)
        return mod

    return pass_
