"""``conv1d(x)`` -> ``conv1d(pad_frames(x))[:, :frames]``: whole tiles of output frames.

The implicit GEMM of :mod:`rewriter.backends.tvm.relax_passes.conv` tiles a 1-D
convolution's output frames by ``tile_i`` rows (7 or 8 on AVX-512). Where no tile of at least
half that divides the frames, the last tile is partial and its rows are masked:

* over a symbolic length (wav2vec2's feature encoder compiled for any number of
  samples), the mask was a ``T.where`` in the update block, a bounds test per row in the
  FMA loop of every tile;
* over a static one (1599 frames: tiles of 3, or 8 with a partial last one), the
  ``pragma_loop_partition_hint`` asks TVM's ``LoopPartition`` to peel the last tile off,
  but it does not (the lowered loop keeps an ``if`` on the last row of every tile), and
  ``Schedule.loop_partition`` crashes on the tile loop.

wav2vec2's convs with a mask ran at 1.5-2.6x their time without one. As the matmul's
:func:`rewriter.backends.tvm.relax_passes.schedules.zero_pad` does for rows, the
convolution computes whole tiles instead: a zero-padded copy of its input, made once per
call, is long enough for the frames rounded up to a multiple of the tile's height
(``(padded - 1) * stride + dilation * (kernel - 1) + 1`` samples; the convolution's own
padding folded into the copy), the convolution runs on it unpadded, and a
``strided_slice`` keeps the real frames. The slice fuses into the convolution's
epilogue, which writes only the real frames, and the conv rule tiles the padded frames
without a mask. Unpadded, the copy fuses into the epilogue of its producer (the previous
convolution's), which writes only the samples that its own tiles produce: the rest of
the copy only feeds padded frames. Padded, the real frames read the copy's zeros, so it
stays a function of its own (``op_patterns.OPAQUE``).

Exact: every real frame reads the same samples and zeros as before; the padded frames
read whatever lies past the real samples, and are dropped. Requires channels-last
convolutions (``NWC``, :func:`rewriter.backends.tvm.relax_passes.conv.channels_last`);
ensures every ``NWC`` conv1d's frames have a tile of at least half the tile's height
that divides them (provably, for a symbolic length). 2-D convolutions are left as they
are (their pixels are flattened across image rows; a padded copy would pad each row).

>>> mod = whole_tiles(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import (
    conv,
    dims_of,
    in_placeholder_vars,
    rewrite_calls,
    schedules,
)
from rewriter.backends.tvm.relax_passes.op_patterns import OPAQUE

if TYPE_CHECKING:
    import tvm


def whole_tiles(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pass padding the frames of every channels-last conv1d that no tile
    divides to whole register tiles of ``target`` (see the module docstring)."""
    import tvm

    lanes = schedules.vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="ConvWholeTiles")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return pad_frames(mod, lanes)

    return pass_


def tile_height(channels: int, groups: int, lanes: int) -> int:
    """Output frames per register tile of a convolution with ``channels`` outputs in
    ``groups`` groups, as the conv rule (dense, grouped) or the window rule (depthwise)
    picks it for ``lanes``-wide vectors where it divides the frames: the tallest tile on
    the stack (:func:`rewriter.backends.tvm.relax_passes.schedules.stack_rows`: 7 x 32,
    not 8 x 32 in a workspace).

    >>> tile_height(256, 1, 16), tile_height(256, 16, 16), tile_height(256, 1, 8)
    (7, 8, 6)
    """
    if groups > 1 and groups == channels:  # depthwise: the window rule's tile
        width = next((w for w in conv.WINDOW_WIDTHS if channels % w == 0), None)
        limit = min(conv.WINDOW_PIXELS, schedules.tile_rows(width, lanes)) if width else 1
    else:
        width = conv.conv_width(channels, channels // groups if groups > 1 else 0, lanes)
        limit = schedules.tile_rows(width, lanes) if width else 1
    if not width:
        return 1
    return schedules.stack_height(limit, width)


def pad_frames(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """``mod`` with every ``NWC`` conv1d computing whole tiles of frames for
    ``lanes``-wide vectors (the module docstring)."""
    return rewrite_calls(
        mod, {"relax.nn.conv1d"}, lambda builder, call: padded_conv(builder, call, lanes)
    )


def whole_tile(frames: Any, rows: int) -> int:
    """The tallest tile of at most ``rows`` frames that divides ``frames`` (a static or a
    symbolic count: then one that provably does), as the conv rule tiles them."""
    from tvm import tirx

    if isinstance(frames, tirx.IntImm):
        return max(d for d in range(1, rows + 1) if int(frames) % d == 0)
    return schedules.dividing_tile(frames, rows) or 1


def padded_conv(builder: Any, call: Any, lanes: int) -> Any:
    """``call`` (a conv1d) as the slice of the convolution of a zero-padded copy that
    whole tiles of frames cover; None where it is not an ``NWC`` conv1d with a static
    kernel, or a tile of at least half the tile's height divides its frames already."""
    from tvm import relax, sym, tirx

    if not conv._is_op(call, "relax.nn.conv1d") or str(call.attrs.data_layout) != "NWC":
        return None
    if str(call.attrs.kernel_layout) != "WIO" or call.attrs.out_layout not in (None, "NWC"):
        return None
    data, weight = call.args
    data_shape, kernel, out_shape = dims_of(data), dims_of(weight), dims_of(call)
    if data_shape is None or kernel is None or out_shape is None:
        return None
    (batch, length, channels), (_, frames, outputs) = data_shape, out_shape
    if not all(isinstance(v, tirx.IntImm) for v in (*kernel, outputs)):
        return None
    rows = tile_height(int(outputs), int(call.attrs.groups), lanes)
    if 2 * whole_tile(frames, rows) >= rows:
        return None
    stride, dilation = int(call.attrs.strides[0]), int(call.attrs.dilation[0])
    left = int(call.attrs.padding[0])
    padded = tirx.floordiv(frames + rows - 1, rows) * rows
    span = sym.Analyzer().simplify((padded - 1) * stride + dilation * (int(kernel[0]) - 1) + 1)

    def copy(x: Any) -> Any:
        from tvm import te

        # In the placeholder's own copies of the shape's variables (``emit_te`` makes them):
        # the caller's would be a second variable of the same name, and TVM orders a
        # PrimFunc's variables from a set (a different function, and code, every build).
        n_x, length_x, channels_x = x.shape
        span_x = in_placeholder_vars(span, (batch, length, channels), x.shape)

        def element(n: Any, i: Any, c: Any) -> Any:
            inside = tirx.all(i >= left, i < left + length_x) if left else i < length_x
            return tirx.if_then_else(inside, x[n, i - left, c], tirx.const(0, x.dtype))

        return te.compute((n_x, span_x, channels_x), element, name="pad_frames")

    # Without padding, the copy may fuse into the epilogue of the function that computes
    # ``data`` (wav2vec2: the previous convolution's), which writes only the samples its
    # tiles produce: the real frames read only those. Padded, the real frames read zeros
    # that such an epilogue would not write; the copy stays a function of its own. So it
    # does after a pad by computed amounts, with which it can fuse into a function that no
    # rule schedules.
    padded_input = left or int(call.attrs.padding[1])
    attrs = {"op_pattern": OPAQUE} if padded_input or after_computed_pad(builder, data) else None
    source = builder.emit_te(copy, data, primfunc_name_hint="pad_frames", primfunc_attrs=attrs)
    whole = builder.emit(conv._conv_like(call, source, weight, padding=[0, 0]))
    return relax.op.strided_slice(whole, axes=[1], begin=[0], end=[frames], assume_inbound=True)


def after_computed_pad(builder: Any, data: Any) -> bool:
    """Whether ``data`` is, through transposes, a pad whose amounts are computed from the
    sizes: the importer's pad kernel (``reflect_pad``, ``constant_pad``, ``edge_pad``:
    EnCodec's reflect pads to whole frames) with an axis longer than its input's by no
    constant. Fused with the copy of the frames, such a pad can make a function that no
    rule schedules (TVM finds the copy's rows and the pad's outputs not provably the same
    region: "not a stage pipeline"): EnCodec's first, after a transpose from its input,
    was left scalar, 2 ms of its 27 at symbolic sizes, where the pad and the copy apart
    take 0.22."""
    import tvm
    from tvm import relax, sym, tirx

    permute, call_tir = (tvm.ir.Op.get(name) for name in ("relax.permute_dims", "relax.call_tir"))
    expr = data
    for _ in range(4):
        value = builder.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(value, relax.Call) or not value.op.same_as(permute):
            break
        expr = value.args[0]
    if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
        return False
    if not value.args[0].name_hint.endswith("_pad") or not isinstance(value.args[1], relax.Tuple):
        return False
    before, after = dims_of(value.args[1].fields[0]), dims_of(value)
    if before is None or after is None or len(before) != len(after):
        return False
    analyzer = sym.Analyzer()
    return any(
        not isinstance(analyzer.simplify(b - a), tirx.IntImm) for a, b in zip(before, after, strict=True)
    )
