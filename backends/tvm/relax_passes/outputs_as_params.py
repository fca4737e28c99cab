"""``main(x) -> y`` gains a destination-passing twin ``main_out(x, out) -> out``, and every
output of ``main`` becomes a buffer of its own.

After ``CallTIRRewrite`` each kernel's output is an ``R.builtin.alloc_tensor`` that the
kernel call writes into. An output of ``main`` is such an allocation, or a view of one
(``R.reshape``), or something else: a constant of the model, an input passed through, a
second use of another output. This pass:

1. copies each output of the last kinds into an allocation of its own
   (``runtime.TVMTensorCopyFromTo``), so that no output of ``main`` shares memory with a
   constant (a caller writing into a shared output array would change the model) or an
   input: :class:`rewriter.backends.tvm.session.Session` can then hand the VM's output
   buffers to the caller as numpy arrays without copying them;
2. adds ``main_out``: ``main`` with one more parameter per output (after the inputs, in
   output order) whose allocation is replaced by that parameter (viewed in the
   allocation's shape through ``R.reshape``), so the kernels write the outputs straight
   into the caller's arrays. It returns what ``main`` returns, now views of those
   parameters. The VM checks each parameter's dtype and shape as it checks the inputs.

Runs between TVM's ``dataflow_lower_passes`` and ``finalize_passes`` (memory planning
comes after, so ``main_out``'s parameters are never planned into a shared pool), on CPU
targets. Exact: the kernels are the same calls on other addresses.

Requires: ``main`` after ``CallTIRRewrite`` (no dataflow blocks, explicit allocations).
Ensures: every tensor ``main`` returns is an allocation of this call or a view of one,
each a different one; ``main_out`` exists with ``num_input`` = inputs + outputs, unless
an output's size is computed from the data (then the caller cannot allocate it
beforehand; :class:`Session` calls ``main``).

>>> mod = outputs_as_params()(mod)  # doctest: +SKIP
>>> mod.get_global_var("main_out")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

OUT_FUNCTION = "main_out"
COPY = "runtime.TVMTensorCopyFromTo"


def outputs_as_params() -> tvm.transform.Pass:
    """The pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="OutputsAsParams")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return add_out_function(mod)

    return pass_


def add_out_function(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with its ``main`` returning buffers of its own and with ``main_out`` added;
    unchanged when it has no Relax ``main`` or returns something other than tensors."""
    from tvm import relax

    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    main = mod["main"]
    if not isinstance(main, relax.Function) or not isinstance(main.body, relax.SeqExpr):
        return mod
    if _branches(main):
        # An output made in a branch of an If (a model with control flow): rebound as
        # this pass rebinds it, TVM's memory planning met one call twice and aborted the
        # build ("Check failed: (!token_map_.count(call))"). Session copies main's outputs.
        logger.info("main branches (an If): no main_out")
        return mod
    leaves = _leaves(main.body.body, _bindings(main))
    if leaves is None or not all(
        isinstance(leaf.ty, relax.TensorType) and leaf.ty.shape is not None for leaf in leaves
    ):
        logger.info("main returns something other than tensors of known rank: no main_out")
        return mod
    if not _sized_by_inputs(main, leaves):
        # A size known only inside the call (a detector's kept boxes): the caller cannot
        # allocate the output before it, and the VM checks parameters on entry.
        logger.info("an output's size is computed from the data: no main_out")
        return mod
    main = _own_outputs(main, leaves)
    mod = mod.clone()
    mod["main"] = main
    mod[OUT_FUNCTION] = _out_function(main)
    return mod


def _sized_by_inputs(main: relax.Function, leaves: list[Any]) -> bool:
    """Whether every output's shape uses only dimensions of ``main``'s inputs."""
    from tvm import relax, tirx

    known: list[Any] = []
    for param in main.params:
        shape = getattr(param.ty, "shape", None)
        if isinstance(shape, relax.ShapeExpr):
            known += [var for dim in shape.values for var in tirx.analysis.undefined_vars(dim, [])]
    for leaf in leaves:
        for dim in leaf.ty.shape.values:
            if any(not any(var.same_as(k) for k in known) for var in tirx.analysis.undefined_vars(dim, [])):
                return False
    return True


def _bindings(func: relax.Function) -> dict[Any, Any]:
    """Each variable bound in ``func``'s body, to its value."""
    return {binding.var: binding.value for block in func.body.blocks for binding in block.bindings}


def _leaves(expr: Any, values: dict[Any, Any]) -> list[Any] | None:
    """The tensors ``expr`` returns, in order (tuples flattened); None for other values."""
    from tvm import relax

    while isinstance(expr, relax.Var) and isinstance(values.get(expr), relax.Tuple):
        expr = values[expr]
    if isinstance(expr, relax.Tuple):
        leaves: list[Any] = []
        for field in expr.fields:
            inner = _leaves(field, values)
            if inner is None:
                return None
            leaves += inner
        return leaves
    if isinstance(expr.ty, relax.TensorType):
        return [expr]
    return None


def _allocation(expr: Any, values: dict[Any, Any]) -> Any:
    """The ``alloc_tensor`` variable whose buffer ``expr`` is (through variables and
    ``R.reshape`` views), or None."""
    import tvm
    from tvm import relax

    reshape = tvm.ir.Op.get("relax.reshape")
    alloc = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    while isinstance(expr, relax.Var) and expr in values:
        value = values[expr]
        if isinstance(value, relax.Call) and value.op.same_as(alloc):
            return expr
        if isinstance(value, relax.Call) and value.op.same_as(reshape):
            expr = value.args[0]
        elif isinstance(value, relax.Var):
            expr = value
        else:
            return None
    return None


def _own_outputs(main: relax.Function, leaves: list[Any]) -> relax.Function:
    """``main`` with each output that is not an allocation of its own (see the module
    docstring) copied into one."""
    from tvm import relax

    values = _bindings(main)
    normalize = relax.BlockBuilder().normalize  # fills in the types of the new calls
    claimed: set[Any] = set()
    copies: dict[int, Any] = {}
    extra: list[Any] = []
    for index, leaf in enumerate(leaves):
        found = _allocation(leaf, values)
        if found is not None and found not in claimed:
            claimed.add(found)
            continue
        target = relax.Var(f"own_output{index}", leaf.ty)
        allocation = normalize(relax.op.builtin.alloc_tensor(leaf.ty.shape, str(leaf.ty.dtype), 0))
        extra.append(relax.VarBinding(target, allocation))
        copy = normalize(
            relax.Call(relax.ExternFunc(COPY), [leaf, target], ty_args=[relax.TupleType([])])
        )
        extra.append(relax.VarBinding(relax.Var(f"copied{index}", relax.TupleType([])), copy))
        copies[index] = target
    if not copies:
        return main
    counter = iter(range(len(leaves)))

    def rebuild(expr: Any) -> Any:
        if isinstance(expr, relax.Var) and isinstance(values.get(expr), relax.Tuple):
            return rebuild(values[expr])
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([rebuild(field) for field in expr.fields])
        return copies.get(next(counter), expr)

    result = rebuild(main.body.body)
    blocks = [*main.body.blocks, relax.BindingBlock(extra)]
    body = relax.SeqExpr(blocks, result)
    logger.info("main copies %d outputs into buffers of their own", len(copies))
    return relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs)


def _fresh_calls(func: relax.Function) -> relax.Function:
    """``func`` with a new node for every call in its bindings (the same operands)."""
    from tvm import relax

    def fresh(expr: Any) -> Any:
        if isinstance(expr, relax.Call):
            args = [fresh(arg) for arg in expr.args]
            return relax.Call(expr.op, args, expr.attrs, expr.ty_args, expr.span, ret_ty=expr.ty)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([fresh(field) for field in expr.fields])
        return expr

    def rebind(binding: Any) -> Any:
        if isinstance(binding, relax.MatchCast):
            return relax.MatchCast(binding.var, fresh(binding.value), binding.ty)
        return relax.VarBinding(binding.var, fresh(binding.value))

    blocks = [
        relax.BindingBlock([rebind(binding) for binding in block.bindings])
        for block in func.body.blocks
    ]
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def _out_function(main: relax.Function) -> relax.Function:
    """``main_out``: ``main`` (whose outputs are allocations of its own, each a different
    one) writing each output into a parameter."""
    import tvm_ffi
    from tvm import relax

    # Memory planning keys its tokens by call node, so main_out must share no call with
    # main: new variables (copy_with_new_vars, which keeps the call nodes), then new calls.
    # Not a JSON round trip: that copied every weight of the model (4 s for 64 MB).
    func = _fresh_calls(relax.utils.copy_with_new_vars(main))
    values = _bindings(func)
    normalize = relax.BlockBuilder().normalize
    leaves = _leaves(func.body.body, values)
    assert leaves is not None
    params = [relax.Var(f"out{index}", leaf.ty) for index, leaf in enumerate(leaves)]
    placed: dict[Any, Any] = {}
    for leaf, param in zip(leaves, params, strict=True):
        found = _allocation(leaf, values)
        assert found is not None and found not in placed
        shape = values[found].args[0]
        same = tvm_ffi.structural_equal(shape, leaf.ty.shape)
        placed[found] = param if same else normalize(relax.op.reshape(param, shape))
    blocks = [
        relax.BindingBlock(
            [
                relax.VarBinding(binding.var, placed[binding.var])
                if binding.var in placed
                else binding
                for binding in block.bindings
            ]
        )
        for block in func.body.blocks
    ]
    out = relax.Function(
        [*func.params, *params],
        relax.SeqExpr(blocks, func.body.body),
        func.ret_ty,
        func.is_pure,
        func.attrs,
    )
    return out.with_attrs(
        {"global_symbol": OUT_FUNCTION, "num_input": len(func.params) + len(params)}
    )


def _branches(function: relax.Function) -> bool:
    """Whether ``function`` has an ``If``."""
    from tvm import relax

    found: list[bool] = []
    relax.analysis.post_order_visit(
        function, lambda node: found.append(True) if isinstance(node, relax.If) else None
    )
    return bool(found)
