"""A reshape over symbolic dimensions stays a view (``vm.builtin.reshape``), not a copy.

TVM legalizes ``R.reshape`` into a copying PrimFunc and turns it back into a view
(``RewriteDataflowReshape``) only where its analyzer proves the copy's index is the
identity of the flattened data. Over symbolic sizes it cannot (the index is a chain of
divisions and remainders by run-time extents, ``samples // 5 - 1`` ...), and the copy
stays, with those divisions per element: two reshapes of wav2vec2's feature encoder
took 30% of its symbolic library's time, one of them an identity. A reshape of a
contiguous tensor is a view whatever its sizes, so the ones with a symbolic dimension
are not legalized: the VM lowers them to its reshape builtin. Static reshapes keep TVM's
path, where fusion folds them into their neighbours' index. A reshape whose symbolic
dimensions are a prefix both shapes share (``[batch, 256, 3136] -> [batch, 256, 56,
56]``) is legalized by :func:`prefix_reshape`: the prefix indexes as it is, the static
rest through divisions by constants, so fusion folds it too (TVM's own takes the whole
flat index modulo the batch, which its fusion treats as opaque; a view there kept the
transposes around SegFormer's decode-head reshapes apart, and its resize read
channels-first maps with gathers: 4.4 ms against 1.2 ms at fixed sizes). Where nothing
fuses with it, TVM's ``RewriteDataflowReshape`` still makes it a view.

>>> LegalizeOps(customize_legalize_map=legalizations())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from rewriter.backends.tvm.relax_passes import dims_of


def legalizations() -> dict[str, Any]:
    """The ``LegalizeOps`` entry for ``relax.reshape`` (see the module)."""
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir

    stock = ir.Op.get("relax.reshape").get_attr("FLegalize")

    def legalize(bb: Any, call: Any) -> Any:
        source, target = dims_of(call.args[0]), dims_of(call)
        shared = shared_prefix(source, target)
        if shared is None:
            return call  # kept: VMBuiltinLower makes it vm.builtin.reshape (a view)
        if shared == 0:
            return stock(bb, call)  # static
        return bb.call_te(
            # The prefix in the placeholder's own variables (the caller's would be a second
            # variable of the same name, which TVM orders differently every build).
            lambda x: prefix_reshape(x, [int(d) for d in target[shared:]], x.shape[:shared]),  # type: ignore[index]
            call.args[0],
            primfunc_name_hint="reshape",
        )

    return {"relax.reshape": legalize}


def shared_prefix(source: Any, target: Any) -> int | None:
    """How many leading symbolic dimensions ``source`` and ``target`` share (0: both
    static) where every dimension after them is static; None otherwise."""
    import tvm_ffi
    from tvm import tirx

    if source is None or target is None:
        return None
    shared = 0
    while (
        shared < min(len(source), len(target))
        and not isinstance(source[shared], tirx.IntImm)
        and tvm_ffi.structural_equal(source[shared], target[shared])
    ):
        shared += 1
    rest = [*source[shared:], *target[shared:]]
    return shared if all(isinstance(dim, tirx.IntImm) for dim in rest) else None


def prefix_reshape(x: Any, tail: list[int], prefix: Any) -> Any:
    """``x`` reshaped to ``prefix + tail``: the prefix indexes ``x`` as it is, the static
    tail through its flat index (divisions by constants only; TVM's reshape flattens the
    whole index and takes it modulo the symbolic extents, which its fusion treats as
    opaque)."""
    from tvm import te, tirx

    source_tail = [int(d) for d in x.shape[len(prefix) :]]

    def element(*index: Any) -> Any:
        flat: Any = tirx.const(0, "int64")
        for i, size in zip(index[len(prefix) :], tail, strict=True):
            flat = flat * size + i
        inner = []
        for size in reversed(source_tail[1:]):
            inner.append(flat % size)
            flat = flat // size
        return x(*index[: len(prefix)], *([flat] if source_tail else []), *reversed(inner))

    return te.compute([*prefix, *tail], element, name="T_reshape")
