"""``split`` as one ``strided_slice`` per part, before fusion.

TVM legalizes ``split`` into one PrimFunc with an output per part. Fused with its
producers (a channel shuffle's concat, reshape and transpose; GPT-2's QKV reshape), that
function has several outputs, which no schedule rule of ours takes: it ran as TVM's
default scalar loops, every intermediate written out (ShuffleNetV2's dynamo export: 0.35
ms a call at batch 8, where the TorchScript export, which slices, is scheduled). As
slices, each part is a single-output injective op that fuses with its consumer, and the
shared producer chain writes its result once, as a TorchScript export's ``Slice`` nodes
compile. Exact: each part is the same elements.

Splits into sections along an axis of symbolic extent keep ``split`` (the part sizes
are rounded up per TVM's rule there).

>>> mod = split_slices()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, rewrite_calls

if TYPE_CHECKING:
    import tvm


def bounds(extent: int | None, parts: int | list[int]) -> list[tuple[int, int]] | None:
    """``(begin, end)`` of each part of a split along an axis of ``extent`` into ``parts``
    (a section count, or the indices where parts begin), as TVM's ``split`` cuts it; None
    where ``extent`` is not static.

    >>> bounds(232, 2), bounds(10, 3), bounds(10, [2, 7]), bounds(None, 2)
    ([(0, 116), (116, 232)], [(0, 4), (4, 8), (8, 10)], [(0, 2), (2, 7), (7, 10)], None)
    """
    if extent is None:
        return None
    if isinstance(parts, int):
        size = -(-extent // parts)
        cuts = [min(i * size, extent) for i in range(1, parts)]
    else:
        cuts = [min(max(cut, 0), extent) for cut in parts]
    edges = [0, *cuts, extent]
    return list(zip(edges[:-1], edges[1:], strict=True))


def split_slices() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring); the tuple items of a split then read
    its slices directly (CanonicalizeBindings)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="SplitSlices")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updated = rewrite_calls(mod, {"relax.split"}, _as_slices)
        updated = relax.transform.CanonicalizeBindings()(updated)
        return relax.transform.DeadCodeElimination()(updated)

    return pass_


def _as_slices(builder: Any, call: Any) -> Any:
    """A tuple of one ``strided_slice`` of ``call``'s input per part of the split, or None
    (the split kept) where its extent or its cuts are not static."""
    from tvm import relax, tirx

    data = call.args[0]
    dims = dims_of(data)
    if dims is None:
        return None
    axis = int(call.attrs.axis) % len(dims)
    extent = dims[axis]
    parts = call.attrs.indices_or_sections
    if isinstance(parts, tirx.IntImm):
        parts = int(parts)
    elif all(isinstance(cut, tirx.IntImm) for cut in parts):
        parts = [int(cut) for cut in parts]
    else:
        return None
    cuts = bounds(int(extent) if isinstance(extent, tirx.IntImm) else None, parts)
    if cuts is None:
        return None
    slices = [
        builder.emit(relax.op.strided_slice(data, [axis], [begin], [end], assume_inbound=True))
        for begin, end in cuts
    ]
    return relax.Tuple(slices)
