"""The VM's shape functions with their stores in slot order: the same library every build.

``VMShapeLower`` computes a function's symbolic sizes into a heap of slots (``H``), in
``shape_func`` PrimFuncs that store one slot per statement. It emits the stores in the
order of a C++ ``unordered_map`` whose free variables hash by address, so the same model
compiled twice gets its stores in another order, and other code: one of the few things
that kept two builds of one model from being the same library (wav2vec2's symbolic one:
``shape_func`` 0x3ec to 0x444 bytes, and every function after it moved).

The stores of a shape function read only slots that it does not write (the sizes that
``match_cast`` and the inputs' shapes defined before the call); each slot is written once.
Sorting them by slot is then exact. A shape function that reads a slot it writes, or is
not a plain sequence of constant-index stores, is left as it is.

>>> mod = ordered_shape_funcs()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

PREFIX = "shape_func"


def ordered_shape_funcs() -> tvm.transform.Pass:
    """The pass: every ``shape_func`` PrimFunc's stores sorted by slot (the module docstring)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="RewriterOrderShapeFuncs")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and gvar.name_hint.startswith(PREFIX):
                body = ordered_stores(func.body)
                if body is not None:
                    mod[gvar] = func.with_body(body)
        return mod

    return transform


def ordered_stores(body: Any) -> Any | None:
    """``body`` (a sequence of stores to constant indices of one buffer) with its stores
    sorted by index; None where it is not that, or a store reads a slot that one writes."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    if not isinstance(body, tirx.SeqStmt):
        return None
    stores = list(body.seq)
    if not stores or not all(isinstance(store, tirx.BufferStore) and len(store.indices) == 1 for store in stores):
        return None
    if not all(isinstance(store.indices[0], tirx.IntImm) for store in stores):
        return None
    heap = stores[0].buffer
    written = [int(store.indices[0]) for store in stores]
    if len(set(written)) != len(written) or any(not store.buffer.same_as(heap) for store in stores):
        return None
    loads: list[Any] = []  # (a load's node class is tvm.ir.TensorLoad; tirx.BufferLoad builds one)
    for store in stores:
        tvm_ffi.structural_walk(store.value, (tvm.ir.TensorLoad, lambda node: loads.append(node)), order="post")
    for read in loads:  # any slot read that one of the stores writes: left as it is
        index = read.indices[0] if len(read.indices) == 1 else None
        if not isinstance(index, tirx.IntImm) or int(index) in written:
            return None
    ordered = sorted(stores, key=lambda store: int(store.indices[0]))
    return tirx.SeqStmt(ordered)
