"""``conv1d(x)`` over a symbolic length -> ``conv1d(pad_frames(x))[:, :frames]``: whole tiles.

The implicit GEMM of :mod:`rewriter.backends.tvm.relax_passes.conv` tiles a 1-D
convolution's output frames by ``tile_i`` rows. Over a symbolic length (wav2vec2's
feature encoder compiled for any number of samples) the frame count is a run-time value
that no tile divides, and TVM's ``LoopPartition``, which peels a ragged last tile off a
static loop, fails on symbolic bounds: the last tile's mask was a ``T.where`` inside the
update block, a bounds test per row in the FMA loop of every tile (1.5-2.6x the fixed
kernel's time on wav2vec2's convs).

As the matmul's :func:`rewriter.backends.tvm.relax_passes.schedules.zero_pad` does for
symbolic rows, the convolution computes whole tiles: a zero-padded copy of its input,
made once per call, is long enough for the frames rounded up to a multiple of the tile's
height (``(padded - 1) * stride + dilation * (kernel - 1) + 1`` samples; the
convolution's own padding folded into the copy), the convolution runs on it unpadded,
and a ``strided_slice`` keeps the real frames. The slice fuses into the convolution's
epilogue, which writes only the real frames; the padded frame count is provably a
multiple of the tile, so the conv rule tiles it without a mask.

Exact: every real frame reads the same samples and zeros as before; the padded frames
read zeros (or samples past the last real window) and are dropped. Requires channels-last
convolutions (``NWC``, :func:`rewriter.backends.tvm.relax_passes.conv.channels_last`);
ensures every ``NWC`` conv1d over a symbolic length has a frame count whole tiles cover.

>>> mod = whole_tiles(target)(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import conv, schedules, visit_functions

if TYPE_CHECKING:
    import tvm


def whole_tiles(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pass padding the frames of every channels-last conv1d over a symbolic
    length to whole register tiles of ``target`` (see the module docstring)."""
    import tvm

    lanes = schedules.vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="ConvWholeTiles")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return pad_frames(mod, lanes)

    return pass_


def tile_height(channels: int, groups: int, lanes: int) -> int:
    """Output frames per register tile of a convolution with ``channels`` outputs in
    ``groups`` groups, as the conv rule (dense, grouped) or the window rule (depthwise)
    picks it for ``lanes``-wide vectors.

    >>> tile_height(256, 1, 16), tile_height(256, 16, 16), tile_height(256, 1, 8)
    (8, 8, 6)
    """
    if groups > 1 and groups == channels:  # depthwise: the window rule's tile
        width = next((w for w in conv.WINDOW_WIDTHS if channels % w == 0), None)
        return min(conv.WINDOW_PIXELS, schedules.tile_rows(width, lanes)) if width else 1
    width = conv.conv_width(channels, channels // groups if groups > 1 else 0, lanes)
    return schedules.tile_rows(width, lanes) if width else 1


def pad_frames(mod: tvm.IRModule, lanes: int) -> tvm.IRModule:
    """``mod`` with every ``NWC`` conv1d over a symbolic length computing whole tiles of
    frames for ``lanes``-wide vectors (the module docstring)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Mutator(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            padded = padded_conv(self.builder_, call, lanes)
            return call if padded is None else padded

    mutator = Mutator(mod)
    visit_functions(mutator, mod)
    return mutator.builder_.get()


def padded_conv(builder: Any, call: Any, lanes: int) -> Any:
    """``call`` (a conv1d) as the slice of the convolution of a zero-padded copy that
    whole tiles of frames cover; None where it is not an ``NWC`` conv1d over a symbolic
    length with a static kernel, or its tile is one frame."""
    from tvm import relax, sym, tirx

    if not conv._is_op(call, "relax.nn.conv1d") or str(call.attrs.data_layout) != "NWC":
        return None
    if str(call.attrs.kernel_layout) != "WIO" or call.attrs.out_layout not in (None, "NWC"):
        return None
    data, weight = call.args
    shapes = []
    for value in (data, weight, call):
        shape = getattr(value.ty, "shape", None)
        if not isinstance(shape, relax.ShapeExpr):
            return None
        shapes.append(list(shape.values))
    (batch, length, channels), kernel, (_, frames, outputs) = shapes
    if isinstance(length, tirx.IntImm) or not all(isinstance(v, tirx.IntImm) for v in (*kernel, outputs)):
        return None
    rows = tile_height(int(outputs), int(call.attrs.groups), lanes)
    analyzer = sym.Analyzer()
    if rows < 2 or analyzer.can_prove(tirx.floormod(frames, rows) == 0):
        return None
    stride, dilation = int(call.attrs.strides[0]), int(call.attrs.dilation[0])
    left = int(call.attrs.padding[0])
    padded = tirx.floordiv(frames + rows - 1, rows) * rows
    span = analyzer.simplify((padded - 1) * stride + dilation * (int(kernel[0]) - 1) + 1)

    def copy(x: Any) -> Any:
        from tvm import te

        def element(n: Any, i: Any, c: Any) -> Any:
            inside = tirx.all(i >= left, i < left + length) if left else i < length
            return tirx.if_then_else(inside, x[n, i - left, c], tirx.const(0, x.dtype))

        return te.compute((batch, span, channels), element, name="pad_frames")

    source = builder.emit_te(copy, data, primfunc_name_hint="pad_frames")
    whole = builder.emit(conv._conv_like(call, source, weight, padding=[0, 0]))
    return relax.op.strided_slice(whole, axes=[1], begin=[0], end=[frames], assume_inbound=True)
