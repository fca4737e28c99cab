"""Injective functions at symbolic sizes marked so, so that they fuse as at fixed sizes.

TVM's ``AnnotateTIROpPattern`` calls a function injective when each value it stores is
read at indices that use only the store's own index variables (``Y[i, j] = X[j, i]``,
``Y[i] = X[i - 2]``). A pad, a reversal or a slice at a symbolic length reads at
indices that also use that length (a reflect pad of ``n`` samples: ``X[2 * n - i]``
past the end): a variable of the function, fixed over the whole call, which the check
counts as unknown, so it calls the function opaque, and ``FuseOps`` fuses nothing into it
or out of it. EnCodec's ELU, reflect pad and transpose were one loop at fixed sizes and
three at symbolic ones (the library at symbolic sizes 1.6x the fixed one's time).

:func:`annotate_op_patterns` takes ``AnnotateTIROpPattern``'s place: it runs it, then
marks injective (``op_pattern`` 2) each function it found opaque that is injective at
every value of its sizes and reads its inputs at indices of its sizes alone
(:func:`injective`: pads, slices, reversals; not gathers, nor tables read at products
of positions). A function that came marked (a padded convolution's ``pad_frames``,
opaque on purpose) keeps its mark, as ``AnnotateTIROpPattern`` keeps it.

>>> mod = annotate_op_patterns()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.vector_tails import uses

if TYPE_CHECKING:
    import tvm

# TVM's ``OpPatternKind``: ``FuseOps`` fuses an opaque function with nothing.
OPAQUE = 8
INJECTIVE = 2


def annotate_op_patterns() -> tvm.transform.Pass:
    """``AnnotateTIROpPattern``, then the functions injective at symbolic sizes marked so
    (see the module docstring)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="AnnotateOpPatterns")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        unmarked = {
            gv.name_hint
            for gv, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and not _pattern(func)
        }
        mod = relax.transform.AnnotateTIROpPattern()(mod)
        for gv, func in list(mod.functions.items()):
            if gv.name_hint in unmarked and _pattern(func) == OPAQUE and injective(func):
                mod[gv] = func.with_attr("op_pattern", INJECTIVE)
        return mod

    return run


def _pattern(func: Any) -> int | None:
    attrs = func.attrs
    return int(attrs["op_pattern"]) if attrs is not None and "op_pattern" in attrs else None


def injective(func: Any) -> bool:
    """Whether ``func`` is injective as TVM's check would find it at any fixed value of its
    symbolic sizes, and reads its inputs at indices of its sizes alone: each block
    spatial, with one store at its iteration variables, every load at indices of those
    variables and of the function's own (its sizes and scalar parameters: inside a block,
    the variables that are not its iteration variables). Not a gather (a load inside an
    index: fused at symbolic sizes, T5's bucketed position bias took 8% more time), nor a
    product of iteration variables in an index (a table read many times: FNet's DFT
    matrix, ``angles[n * k mod N]``, which a fixed size folds to a constant; fused, each
    of its N x K entries computed its angle's sine and cosine again), nor a function
    that loads nothing."""
    import tvm
    from tvm import s_tir, tirx

    blocks = [block for block in _nodes(func.body, s_tir.SBlock) if block.name_hint != "root"]
    if not blocks:
        return False
    for block in blocks:
        if block.init is not None or any(int(iv.iter_type) != 0 for iv in block.iter_vars):
            return False  # a reduction
        stores = _nodes(block.body, tirx.BufferStore)
        if len(stores) != 1 or not all(isinstance(index, tirx.Var) for index in stores[0].indices):
            return False
        loads = _nodes(block.body, tvm.ir.TensorLoad)
        if not loads:
            return False
        unstored = [iv.var for iv in block.iter_vars if not any(iv.var.same_as(i) for i in stores[0].indices)]
        iters = [iv.var for iv in block.iter_vars]
        for load in loads:
            if any(_nodes(index, tvm.ir.TensorLoad) or _multiplies(index, iters) for index in load.indices):
                return False  # a gather, or a table read at products of positions
            if any(uses(index, var) for index in load.indices for var in unstored):
                return False
    return True


def _multiplies(index: Any, iters: list[Any]) -> bool:
    """Whether ``index`` multiplies two expressions of ``iters``, or divides by one."""
    from tvm import tirx

    def varies(expr: Any) -> bool:
        return any(uses(expr, var) for var in iters)

    if any(varies(node.a) and varies(node.b) for node in _nodes(index, tirx.Mul)):
        return True
    divisions = (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod)
    return any(varies(node.b) for kind in divisions for node in _nodes(index, kind))


def _nodes(root: Any, kind: type) -> list[Any]:
    """The nodes of ``kind`` under ``root`` (a statement or an expression), in post order."""
    import tvm_ffi

    found: list[Any] = []

    def note(node: Any) -> Any:
        found.append(node)
        return node

    tvm_ffi.structural_map(root, [(kind, note)], order="post")
    return found
