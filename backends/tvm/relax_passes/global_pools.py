"""A pool whose one window covers its whole map is a global pool.

HF EfficientNet's head averages its 7 x 7 map with ``AvgPool2d(2560, ceil_mode=True)``
(its kernel is the hidden width): one output position, a 2560 x 2560 window. TVM's
pool lowering pads the map to the window first, a 2566 x 2566 x 2560 buffer of 67 GB,
and the compiled library failed with ``std::bad_alloc`` when run. Where the window,
from the map's first position (no padding before it), covers every position and the
output has one position per axis, the pool is an adaptive one to size 1 (an average)
or a ``max`` over the spatial axes. Exact: the same elements; an average's divisor is
the map's size (ceil mode's overhang is never counted, by ONNX nor by PyTorch), so a
pool that counts explicit trailing padding keeps its form.

>>> mod = global_pools()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, rewrite_calls

if TYPE_CHECKING:
    import tvm

POOLS = {
    f"relax.nn.{kind}_pool{rank}d": (kind, rank) for kind in ("avg", "max") for rank in (1, 2, 3)
}


def global_pools() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="GlobalPools")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_calls(mod, set(POOLS), as_global)

    return pass_


def as_global(_builder: Any, call: Any) -> Any:
    """``call`` (a pool) as a global pool, or None where its window does not cover its map
    from the first position, or its layout is not channels-first."""
    from tvm import relax, tirx

    kind, rank = POOLS[call.op.name]
    attrs = call.attrs
    layout = str(attrs.layout)
    if not layout.startswith("NC") or str(attrs.out_layout) != layout:
        return None
    shape, out_shape = dims_of(call.args[0]), dims_of(call)
    if shape is None or out_shape is None:
        return None
    spatial, out = shape[2:], out_shape[2:]
    if not all(isinstance(extent, tirx.IntImm) for extent in spatial):
        return None
    if any(not isinstance(extent, tirx.IntImm) or int(extent) != 1 for extent in out):
        return None
    padding = [int(p) for p in attrs.padding]
    if any(padding[:rank]) or any(int(d) != 1 for d in attrs.dilation):
        return None
    if any(int(window) < int(extent) for window, extent in zip(attrs.pool_size, spatial, strict=True)):
        return None
    if kind == "max":
        return relax.op.max(call.args[0], axis=list(range(2, 2 + rank)), keepdims=True)
    if bool(attrs.count_include_pad) and any(padding):
        return None  # explicit trailing padding counted in the divisor
    adaptive = getattr(relax.op.nn, f"adaptive_avg_pool{rank}d")
    return adaptive(call.args[0], 1, layout=layout)
