"""``concat(f(x), g(y))`` -> ``g'(y, f'(x))``: each part written in place into the output.

A concatenation of tensors that kernel calls make for it alone (the two expand
convolutions of a SqueezeNet fire module, an Inception block's branches) is a pass over
its whole output that only copies: in the channels-last layout of our convolutions, a
copy of every pixel's channels, part by part (SqueezeNet at batch 8: 4.6 of its 49 ms).
Here each producing kernel writes its part straight into the concatenation's buffer, at
its offset along the axis: the first producer (in the order the calls run) as a
``call_tir`` whose output is the whole buffer, each next one as a ``call_tir_inplace``
on it, and the concatenation is gone. The producer's PrimFunc gets a copy
(``<name>_into_<total>_at_<offset>``) whose output parameter has the concatenation's
shape and whose every access to it is shifted by the offset; the schedules run after
this pass, on that copy, and write the tile epilogues there.

A part qualifies where it is a ``call_tir`` result bound in the same dataflow block,
read by this concatenation only, and every part does (else the concatenation is kept);
so does the concatenation's own result (a dataflow variable: not an output of the
function, whose buffer ``outputs_as_params`` hands to the caller). The concatenation is
recognized by :data:`ATTRIBUTE`, set on its PrimFunc by :func:`legalizations` (a
concatenation fused with other ops, e.g. a batch norm after it, has none).

Exact: the same values, written to other addresses.
Requires: a Relax module after ``FuseTIR``, PrimFuncs not yet scheduled; ``relax.concat``
legalized by :func:`legalizations`. Ensures: no call of a marked concatenation whose
parts all qualify.

>>> mod = concat_in_place()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, visit_functions

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# The axis of a legalized concatenation, on its PrimFunc.
ATTRIBUTE = "rewriter.concat_axis"


def legalizations() -> dict[str, Any]:
    """A ``LegalizeOps`` entry for ``relax.concat``: TVM's lowering (``topi.concatenate``),
    its PrimFunc marked with :data:`ATTRIBUTE`."""
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir, relax, topi

    stock = ir.Op.get("relax.concat").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        axis = call.attrs.axis
        rank = getattr(call.ty, "ndim", -1)
        parts = call.args[0]
        while isinstance(parts, relax.Var):  # the tuple, where a variable names it
            bound = bb.lookup_binding(parts)
            if not isinstance(bound, relax.Tuple | relax.Var):
                break
            parts = bound
        if axis is None or rank is None or rank < 1 or not isinstance(parts, relax.Tuple):
            return stock(bb, call)
        axis = int(axis) % rank
        return bb.call_te(
            topi.concatenate,
            list(parts.fields),
            axis,
            primfunc_name_hint="concatenate",
            primfunc_attrs={ATTRIBUTE: axis},
        )

    return {"relax.concat": legalize}


def concat_in_place() -> tvm.transform.Pass:
    """The module pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ConcatInPlace")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return _rewrite(mod)

    return pass_


@dataclasses.dataclass(frozen=True)
class _Part:
    """A part of a concatenation of type ``ty``, ``total`` long along ``axis``, that the
    call of PrimFunc ``producer`` makes: written at ``offset``. Parts equal but for
    ``ty`` share their producer's copy."""

    producer: str
    offset: int
    total: int
    axis: int
    ty: Any = dataclasses.field(compare=False)


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    # Per concatenation's variable: its parts' variables in the order they are bound;
    # per part, its producer's PrimFunc writing into the concatenation (one per _Part:
    # fire modules of one shape share them).
    plans: dict[Any, list[Any]] = {}
    parts: dict[Any, _Part] = {}
    written: dict[_Part, tvm.tirx.PrimFunc | None] = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            _plan(mod, func, call_tir, plans, parts, written)
    if not plans:
        return mod
    owner = {part: concat for concat, chain in plans.items() for part in chain}
    added: dict[_Part, Any] = {}
    last: dict[Any, Any] = {}  # a concatenation's variable -> its chain's last call

    @relax.expr_functor.mutator
    class InPlace(relax.PyExprMutator):  # type: ignore[misc]
        def visit_var_binding_(self, binding: Any) -> None:
            var, value = binding.var, binding.value
            if var in plans:  # the concatenation: its parts wrote it
                self.set_var_remap(var, last[var])
                return
            if var not in parts:
                super().visit_var_binding_(binding)
                return
            part = parts[var]
            if part not in added:
                name = f"{part.producer}_into_{part.total}_at_{part.offset}"
                if part.axis != len(part.ty.shape.values) - 1:
                    name += f"_axis{part.axis}"
                added[part] = self.builder_.add_func(written[part], name)
            args = [self.visit_expr(arg) for arg in value.args[1].fields]
            concat = owner[var]
            if concat not in last:  # the first part to run makes the buffer
                new = relax.call_tir(added[part], relax.Tuple(args), part.ty)
            else:
                new = relax.call_tir_inplace(
                    added[part], relax.Tuple([*args, last[concat]]), [len(args)], part.ty
                )
            last[concat] = self.builder_.emit(new, var.name)

    mutator = InPlace(mod)
    visit_functions(mutator, mod)
    logger.debug("%d concatenations written in place by their parts", len(plans))
    # The concatenations and the producers no longer called are dropped.
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def _plan(
    mod: tvm.IRModule,
    func: relax.Function,
    call_tir: Any,
    plans: dict[Any, list[Any]],
    parts: dict[Any, _Part],
    written: dict[_Part, tvm.tirx.PrimFunc | None],
) -> None:
    """Fill ``plans`` and ``parts`` with the concatenations of ``func`` whose parts all
    qualify (see the module docstring), and ``written`` with their producers' copies."""
    from tvm import relax, tirx

    uses: collections.Counter[Any] = collections.Counter()

    def count(node: Any) -> None:
        if isinstance(node, relax.Var):
            uses[node] += 1

    for block in func.body.blocks:
        for binding in block.bindings:
            relax.analysis.post_order_visit(binding.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        bound = {binding.var: binding.value for binding in block.bindings}
        position = {binding.var: index for index, binding in enumerate(block.bindings)}
        for binding in block.bindings:
            value = binding.value
            if not (_is_call(value, call_tir) and isinstance(binding.var, relax.DataflowVar)):
                continue
            callee = mod[value.args[0]]
            axis = callee.attrs.get(ATTRIBUTE) if isinstance(callee, tirx.PrimFunc) else None
            if axis is None:
                continue
            axis = int(axis)
            inputs = list(value.args[1].fields)
            extents = [_extent(arg, axis) for arg in inputs]
            total = _extent(binding.var, axis)
            if total is None or None in extents or len(set(inputs)) != len(inputs):
                continue
            if not all(_qualifies(mod, arg, bound, uses, call_tir) for arg in inputs):
                continue
            planned = {}
            for i, arg in enumerate(inputs):
                producer = bound[arg].args[0]
                offset = sum(extents[:i])  # type: ignore[arg-type]
                part = _Part(producer.name_hint, offset, total, axis, binding.var.ty)
                if part not in written:
                    written[part] = _written_into(mod[producer], part)
                if written[part] is None:
                    break
                planned[arg] = part
            else:
                plans[binding.var] = sorted(inputs, key=position.__getitem__)
                parts.update(planned)


def _is_call(value: Any, op: Any) -> bool:
    from tvm import relax

    return isinstance(value, relax.Call) and value.op.same_as(op)


def _extent(var: Any, axis: int) -> int | None:
    """``var``'s static extent along ``axis``, or None."""
    from tvm import tirx

    dims = dims_of(var)
    if dims is None or axis >= len(dims) or not isinstance(dims[axis], tirx.IntImm):
        return None
    return int(dims[axis].value)


def _qualifies(
    mod: tvm.IRModule, var: Any, bound: dict[Any, Any], uses: Any, call_tir: Any
) -> bool:
    """Whether ``var`` is a part a producer can write in place: a dataflow variable of this
    block read once (by the concatenation), bound to a ``call_tir`` of a PrimFunc with one
    tensor output (its last parameter)."""
    from tvm import relax, tirx

    if not isinstance(var, relax.DataflowVar) or uses[var] != 1 or var not in bound:
        return False
    value = bound[var]
    if not _is_call(value, call_tir) or len(value.args) != 2:  # no symbolic scalars passed
        return False
    callee = mod[value.args[0]]
    if not (isinstance(value.ty, relax.TensorType) and isinstance(callee, tirx.PrimFunc)):
        return False
    if callee.attrs is not None and ATTRIBUTE in callee.attrs:
        return False  # a concatenation itself (Inception's nested ones) is kept
    return len(callee.params) == len(value.args[1].fields) + 1


def _written_into(func: tvm.tirx.PrimFunc, part: _Part) -> tvm.tirx.PrimFunc | None:
    """``func`` (a producer: inputs, then its output) writing its output into a buffer
    ``part.total`` long along ``part.axis``, at ``part.offset``; None where its output is
    referred to otherwise than by loads, stores and block regions (then left as it is)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    out = func.params[-1]
    shape = list(out.shape)
    shape[part.axis] = tirx.IntImm(str(shape[part.axis].ty), part.total)
    whole = tirx.decl_buffer(shape, out.dtype, out.name)

    def shifted(indices: Any) -> list[Any]:
        moved = list(indices)
        moved[part.axis] = moved[part.axis] + part.offset
        return moved

    def load(node: Any) -> Any:
        if not node.source.same_as(out):
            return node
        return tirx.BufferLoad(whole, shifted(node.indices))

    def store(node: Any) -> Any:
        if not node.buffer.same_as(out):
            return node
        return tirx.BufferStore(whole, node.value, shifted(node.indices))

    def region(node: Any) -> Any:
        if not node.source.same_as(out):
            return node
        ranges = list(node.region)
        axis = ranges[part.axis]
        ranges[part.axis] = tvm.ir.Range.from_min_extent(axis.min + part.offset, axis.extent)
        return tirx.BufferRegion(whole, ranges)

    body = tvm_ffi.structural_map(
        func.body,
        [(tvm.ir.TensorLoad, load), (tirx.BufferStore, store), (tvm.ir.TensorRegion, region)],
        order="post",
    )
    left: list[Any] = []

    def note(var: Any) -> Any:
        if var.same_as(out) or var.same_as(out.data):
            left.append(var)
        return var

    tvm_ffi.structural_map(body, [(tvm.ir.Var, note)])
    if left:
        return None
    return tirx.PrimFunc([*func.params[:-1], whole], body, func.ret_type, func.attrs)
