"""A reshape over symbolic dimensions stays a view (``vm.builtin.reshape``), not a copy.

TVM legalizes ``R.reshape`` into a copying PrimFunc and turns it back into a view
(``RewriteDataflowReshape``) only where its analyzer proves the copy's index is the
identity of the flattened data. Over symbolic sizes it cannot (the index is a chain of
divisions and remainders by run-time extents, ``samples // 5 - 1`` ...), and the copy
stays, with those divisions per element: two reshapes of wav2vec2's feature encoder
took 30% of its symbolic library's time, one of them an identity. A reshape of a
contiguous tensor is a view whatever its sizes, so the ones with a symbolic dimension
are not legalized: the VM lowers them to its reshape builtin. Static reshapes keep TVM's
path, where fusion folds them into their neighbours' index.

>>> LegalizeOps(customize_legalize_map=legalizations())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any


def legalizations() -> dict[str, Any]:
    """The ``LegalizeOps`` entry for ``relax.reshape`` (see the module)."""
    import tvm.relax.transform  # noqa: F401  (registers TVM's own legalizations)
    from tvm import ir, tirx

    stock = ir.Op.get("relax.reshape").get_attr("FLegalize")

    def static(shape: Any) -> bool:
        dims = getattr(shape, "values", None)
        return dims is not None and all(isinstance(d, tirx.IntImm) for d in dims)

    def legalize(bb: Any, call: Any) -> Any:
        source = getattr(call.args[0].ty, "shape", None)
        target = getattr(call.ty, "shape", None)
        if static(source) and static(target):
            return stock(bb, call)
        return call  # kept: VMBuiltinLower makes it vm.builtin.reshape (a view)

    return {"relax.reshape": legalize}
