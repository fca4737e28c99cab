"""Convolutions and pooling on the CPU: channels-last layout, register-tiled schedules.

TVM's generic CPU pipeline leaves ``conv2d`` a scalar seven-deep loop (ResNet-18 ran
about 100x ONNX Runtime's time). Three pieces fix it:

1. :func:`channels_last` (a Relax pass, before legalization): every ``conv1d``/``conv2d``
   takes channels-last data and ``[kernel..., in, out]`` weights (``NWC``/``WIO``,
   ``NHWC``/``HWIO``) through TVM's ``ConvertLayout``, which carries the layout through
   the elementwise ops, pooling and residual adds in between, so transposes appear only
   where a model leaves the convolutional part. Constant weights are transposed at
   compile time.
2. :class:`ConvRule` (``RegisterTiledConv``): the convolution as an implicit GEMM.
   Output pixels are the rows, output channels the columns, ``(kernel..., in)`` the
   reduction: for each reduction step the micro-kernel broadcasts ``tile_i`` input values
   (one per output pixel of the tile; any stride or dilation) and multiplies-adds them with
   ``tile_j / lanes`` vectors of the weight row, as the matmul micro-kernel of
   :mod:`rewriter.backends.tvm.relax_passes.schedules` does, with the epilogue (bias, activation, residual)
   on each finished tile. Weights are packed in ``tile_j``-wide panels at compile time
   (:mod:`rewriter.backends.tvm.relax_passes.pack_weights`). Pixels of all images and rows are one axis
   (``transform_block_layout``), so a tile may span image rows: no tail is lost when the
   output width has no good divisor. Where a divisor of the pixels gives a tile under
   1 KiB (56 x 56: 7 x 32), it is taken: such a tile is a stack buffer, in registers,
   where an 8 x 32 one is a workspace allocation and a memset per tile
   (:func:`.schedules.stack_rows`; MobileNetV3-small at batch 8: 1.32 -> 0.95x ORT).
   Where few pixel tiles reuse a large weight (ResNet-18's last stage at batch 1: 7 x 7
   pixels, 9 MiB of 3 x 3 x 512 x 512), the micro-kernel prefetches the next panel
   (:func:`.schedules.prefetch_next_panel`; 1.11 -> 0.88x ORT's time for that conv).
3. :class:`WindowRule` (``ChannelsLastWindow``): reductions that keep the channel axis
   (depthwise convolutions, max/average pooling, global pooling): channels vectorized,
   a few pixels per tile sharing each weight vector, the window reduced in registers;
   a row of pixels that 7 and 8 both divide (56, 112) takes 7-pixel tiles, on the stack,
   as in item 2 (EfficientNet-B0 at batch 8 on Zen 4: 1.03 -> 1.00x ORT).

Exact: the same products are summed, in another order (float32 rounding only).

>>> mod = channels_last()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import conv_depth, dims_of, rewrite_calls, visit_functions

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# Data and kernel layouts the convolutions are converted to, per op.
LAYOUTS = {"relax.nn.conv1d": ["NWC", "WIO"], "relax.nn.conv2d": ["NHWC", "HWIO"]}
# 3-D convolutions too, so that the frames between them stay channels-last: each becomes
# 2-D ones over frames in the batch (:mod:`.conv_depth`), on which the steps after
# ``ConvertLayout`` (and the rules) work.
LAYOUTS_3D = {"relax.nn.conv3d": ["NDHWC", "DHWIO"]}
CHANNELS_LAST = {**LAYOUTS, **LAYOUTS_3D}
# Transposed convolutions stay channels-first: TVM lowers them in no other layout, and
# ConvertLayout, unasked, gave them their channels-last input's (the build then failed
# in VM codegen, the op never lowered). Those of non-overlapping blocks are 1 x 1
# convolutions by then (:mod:`rewriter.backends.tvm.relax_passes.conv_transpose`).
KEEP_FIRST = {"relax.nn.conv1d_transpose": ["NCW", "IOW"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
# Vectors of output channels per register tile row (as the matmul's panels).
PANEL_VECTORS = 2
# Marks a convolution whose weight pack_weights stored as panels (value: the panel width).
PACKED_ANNOTATION = "rewriter.packed_conv"
# Output pixels per window-rule tile, at most (fewer where the accumulators would not fit
# the registers), and its channel widths, widest first: whole vectors only (48 or 24 lanes,
# a vector and a half, ran 2-4x slower than 16 or 8 on MobileNetV3's depthwise convs: LLVM
# shuffled the accumulators lane by lane). 4 and 2 lanes for channels no 8 divides
# (ShuffleNetV2's 116 and 58): without them TVM's generic rule ran the window scalar,
# 9-18x slower.
WINDOW_PIXELS = 8
# Images kept apart (a symbolic batch, or a large one) take the widest window tile, over
# each image's pixels flattened, unless their rows are at least this long and a narrower
# tile's height divides them (SqueezeNet's first max pool, 55 x 55 x 64, at a symbolic
# batch: 0.46 ms in masked 4 x 64 tiles, 0.18 in 5 x 32 row tiles as at a fixed batch of
# 1). The 7 x 7 maps that end most CNNs too: their depthwise convolutions at batch 8 ran
# in masked 3 x 64 tiles over 49 pixels, a division and a remainder per load, with a
# padded copy; in 7 x 32 row tiles, 2-3x faster (MNASNet's 1152-channel 5 x 5 one: 0.37
# -> 0.12 ms; the model at batch 8 1.16 -> 1.06x ORT's time, MobileNetV2 0.92 -> 0.85).
WINDOW_LONG_ROW = 7
WINDOW_WIDTHS = (64, 32, 16, 8, 4, 2)
# A window's padded copy of its input is made where each copied element is read at least
# this many times and the copy fits WINDOW_BLOCK_BYTES, else the padding is tested in the
# window's loads (measured on MobileNetV3-small: a 3x3 stride-2 depthwise conv, 2 reads
# per element, ran in half the time without the copy; a 5x5 stride-1 one on 14x14, 15
# reads, 15% faster with it).
WINDOW_COPY_READS = 12
# The window rule sweeps each channel tile over blocks of output rows whose input is
# at most this large (a quarter of a 2 MiB L2).
WINDOW_BLOCK_BYTES = 1 << 19
# A window or convolution over a batch of images (a symbolic batch counts as
# STREAM_SYMBOLIC_IMAGES) whose input is at least STREAM_BYTES_BY_CPU streams it.
# A window's tiles are then one vector of channels wide, and each prefetches the input
# rows its next output row adds, WINDOW_PREFETCH_AHEAD output rows ahead
# (:func:`prefetch_window_rows`). Measured on Zen 4, one thread, batch 8, the 3 x 3
# depthwise convolutions of MobileNetV2 and EfficientNet-B0 (56 x 56 x 144 to 28 x 28 x
# 192, stride 1 or 2), kernel alone: 16-channel tiles 1.16-1.75x faster than 32-channel
# ones (both prefetching), the prefetches 1.16-1.32x (both 16-channel); at batch 1,
# 16-channel tiles took 0.78-1.11x the time and the prefetches 1.0-1.09x, so one image
# keeps its tiles. Pools (a window without a weight) keep theirs too: streamed, the 3 x 3
# stride-2 max pools of ResNet-18 (112 x 112 x 64) and SqueezeNet (111 x 111 x 64) took
# 1.46x and 1.2x the time at batch 8. A pointwise convolution's micro-kernel prefetches
# the next tile's pixels where its input streams, and the next tile's output where its
# output does (:func:`prefetch_next_pixels`). Batch 8, kernel alone, against neither:
# 144 -> 32 channels over 56 x 56 0.57x the time, 96 -> 32 0.72x, 256 -> 64 0.81x, a
# stride-2 64 -> 128 0.84x, the expansions 16 -> 96 over 112 x 112 and 32 -> 144,
# 24 -> 144 over 56 x 56 0.87-0.88x (their output alone: 0.85x); over 28 x 28 and
# 14 x 14 0.91-1.0x. An image's first convolution (3 x 3, 3 -> 32) took 1.16x the time
# with its output prefetched: other convolutions are left as they were. By the CPU the
# code is tuned for (.targets.tuned_cpu); elsewhere (0) nothing streams: not measured on
# Sapphire or Emerald Rapids yet.
STREAM_BYTES_BY_CPU = {"znver4": 4 << 20}
STREAM_SYMBOLIC_IMAGES = 8
WINDOW_PREFETCH_AHEAD = 1
# A convolution over a static batch whose input (every image) is larger than this, with a
# weight that stays in L2 (at most schedules.ROW_MAJOR_MAX_B_BYTES), runs image by image,
# as under a symbolic batch (:func:`images_apart`).
CONV_IMAGES_APART_BYTES = 1 << 20
# The innermost reduction loop (input channels) is unrolled by this much.
K_UNROLL = 4
# A window of at most this many taps (3 x 3) is unrolled in full. Left as loops, LLVM
# unrolled the kernel's columns and kept a loop over its rows, each row's padding tests
# branching between copies of the tile's FMAs: EfficientNet-B0's stride-1 3 x 3
# depthwise conv over 8 x 56 x 56 x 144 ran in 5.5 ms at a fixed batch, 1.8 ms unrolled
# (and 2.3 ms at a symbolic batch, where LLVM had unrolled it itself); Zen 4, one thread.
# Larger windows stay loops: its 5 x 5 stride-2 one, whose padding is tested in every
# load, ran 1.86 -> 2.03 ms unrolled at a fixed batch and 1.52 -> 2.52 at a symbolic one
# (175 guarded loads a tile); ConvNeXt's 7 x 7 ones did not change.
WINDOW_UNROLL_TAPS = 9


def channels_last() -> tvm.transform.Pass:
    """The Relax pass converting convolutions to channels-last layouts (see the module
    docstring). Where TVM's ``ConvertLayout`` fails on some op of the model, each
    convolution is converted on its own instead, between two transposes (logged).
    Common subexpressions are then eliminated (a tensor two convolutions read is
    transposed once), taps that only ever read padding dropped (:func:`drop_dead_taps`),
    and convolutions whose output channels no whole vector divides (1000 classes, 40 or
    72 channels) get zero output channels up to a multiple of :data:`CHANNEL_MULTIPLE`
    (:func:`pad_channels`), the extra ones sliced off (after the next convolution, where
    every use of them leads into one: :mod:`.carried_channels`, the pass after this one)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="ChannelsLastConv")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not _has_conv(mod):
            return mod
        mod = constants_at_full_rank(pads_as_pools(clips_as_max_min(mod)))
        try:
            mod = relax.transform.ConvertLayout({**CHANNELS_LAST, **KEEP_FIRST})(mod)
        except Exception as exc:  # an op ConvertLayout has no rule for
            logger.info("convolutions converted one by one (ConvertLayout failed: %s)", _first_line(exc))
            mod = rewrite_calls(mod, CHANNELS_LAST.keys(), _each_channels_last)
        mod = conv_depth.conv3d_as_conv2d()(mod)  # 3-D ones as 2-D ones, before the steps below
        mod = relax.transform.FoldConstant()(pools_as_pads(mod))
        # Each convolution's input got a transpose of its own: two convolutions reading one
        # channels-first tensor (ShuffleNetV2's two branches) transposed it twice.
        mod = relax.transform.EliminateCommonSubexpr()(mod)
        mod = _rewrite_convs(_rewrite_convs(mod, drop_dead_taps), split_partial_taps)
        return trim_sliced_positions(_rewrite_convs(mod, pad_channels))

    return pass_


def clips_as_max_min(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every float ``clip(x, lo, hi)`` as ``minimum(maximum(x, lo), hi)``.

    TVM's ``ConvertLayout`` has no layout rule for ``clip``: each one (MobileNetV3's
    hardswish and hardsigmoid) went back to channels-first between two transposes, which
    cut the activation out of the convolution's epilogue into a function of its own.
    ``maximum`` and ``minimum`` follow the layout of their tensor operand. Exact (the
    same comparisons)."""
    from tvm import relax

    def rewrite(builder: Any, call: Any) -> Any:
        x, lo, hi = call.args
        dtype = str(getattr(x.ty, "dtype", ""))
        bounds = [_number(bound) for bound in (lo, hi)]
        if not dtype.startswith("float") or None in bounds:
            return None
        low, high = (relax.const(bound, dtype) for bound in bounds)
        return relax.op.minimum(builder.emit(relax.op.maximum(x, low)), high)

    return rewrite_calls(mod, {"relax.clip"}, rewrite)


# The element-wise binary ops whose constant operand :func:`constants_at_full_rank` widens.
BINARY_OPS = frozenset(
    f"relax.{name}" for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power")
)
COMMUTATIVE = frozenset({"add", "multiply", "maximum", "minimum"})


def constants_at_full_rank(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each constant operand of an element-wise binary op that has fewer axes
    than the other operand given the missing leading axes (``[C, 1, 1]`` -> ``[1, C, 1,
    1]``): the same broadcast.

    TVM's ``ConvertLayout`` takes a binary op whose operands differ in rank back to the
    initial layout: a per-channel constant as exporters write it (a group norm's affine
    ``weight.unsqueeze(-1).unsqueeze(-1)``, a layer scale ``[C, 1, 1]``) put its
    channels-last operand through a transpose to channels-first, the op, and one back
    (BiT's group norms; the transposed result made the element-wise function after it
    write channels-first). Of the same rank, the constant is transposed instead (folded).
    A constant first operand of a commutative op goes second: the conversion takes a
    binary op's layout from its first operand."""
    import tvm
    from tvm import relax

    def rewrite(_builder: Any, call: Any) -> Any:
        if len(call.args) != 2:
            return None
        ranks = [getattr(arg.ty, "ndim", -1) for arg in call.args]
        args = list(call.args)
        for index, arg in enumerate(args):
            other = ranks[1 - index]
            if not isinstance(arg, tvm.ir.expr.GenericConst) or not 0 <= ranks[index] < other:
                continue
            if not isinstance(arg.value, tvm.runtime.Tensor):
                return None
            value = arg.value.numpy()
            args[index] = relax.const(value.reshape((1,) * (other - value.ndim) + value.shape), str(value.dtype))
        name = call.op.name.removeprefix("relax.")
        if isinstance(args[0], tvm.ir.expr.GenericConst) and name in COMMUTATIVE:
            args.reverse()  # the layout is the first operand's
        if all(new.same_as(old) for new, old in zip(args, call.args, strict=True)):
            return None
        return getattr(relax.op, name)(*args)

    return rewrite_calls(mod, BINARY_OPS, rewrite)


def pads_as_pools(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every zero ``pad`` of the spatial axes of a 3-D or 4-D float map as the
    average pool over a 1-wide window with that padding, zeros counted (the same values:
    each output is one input element divided by one, or a zero).

    TVM's ``ConvertLayout`` has no layout rule for ``pad``, and has one for pools: an
    explicit pad between channels-last convolutions (BiT's stem pads the convolution's
    output before its max pool; TensorFlow-style "same" padding) went back to
    channels-first between two transposes, and every op after it up to the next
    convolution stayed channels-first with it (BiT at batch 8: the transposing pad 4.3 ms,
    the channels-first max pool, which no rule of ours schedules, 1.4 ms).
    :func:`pools_as_pads` turns them back after the conversion."""
    from tvm import relax

    def rewrite(_builder: Any, call: Any) -> Any:
        ty = call.args[0].ty
        widths = [int(width) for width in call.attrs.pad_width]
        rank = getattr(ty, "ndim", -1)
        dtype = str(getattr(ty, "dtype", ""))
        if call.attrs.pad_mode != "constant" or _number(call.attrs.pad_value) != 0.0 or not dtype.startswith("float"):
            return None
        if rank not in (3, 4) or any(widths[:4]) or min(widths) < 0:
            return None
        before, after = widths[4::2], widths[5::2]
        pool = relax.op.nn.avg_pool1d if rank == 3 else relax.op.nn.avg_pool2d
        return pool(call.args[0], pool_size=[1] * (rank - 2), padding=before + after, count_include_pad=True)

    return rewrite_calls(mod, {"relax.nn.pad"}, rewrite)


def pools_as_pads(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every average pool over a 1-wide window, stride 1, zeros counted, as
    the zero ``pad`` it is, in the pool's layout (undoes :func:`pads_as_pools`)."""
    from tvm import relax

    def rewrite(_builder: Any, call: Any) -> Any:
        attrs = call.attrs
        ones = [int(v) for v in (*attrs.pool_size, *attrs.strides, *attrs.dilation)]
        if any(v != 1 for v in ones) or not attrs.count_include_pad or attrs.ceil_mode:
            return None
        if attrs.layout != attrs.out_layout:
            return None
        padding = [int(v) for v in attrs.padding]
        spatial = len(padding) // 2
        axes = [axis for axis in attrs.layout if axis not in "NC"]
        widths: list[int] = []
        for axis in attrs.layout:
            at = axes.index(axis) if axis in axes else None
            widths += [0, 0] if at is None else [padding[at], padding[spatial + at]]
        return relax.op.nn.pad(call.args[0], widths, pad_value=0.0)

    return rewrite_calls(mod, {"relax.nn.avg_pool1d", "relax.nn.avg_pool2d"}, rewrite)


def _number(expr: Any) -> float | None:
    """The constant ``expr`` holds (an ``IntImm``/``FloatImm``, or a ``PrimValue`` of one), else None."""
    while not isinstance(expr, (int, float)):
        expr = getattr(expr, "value", None)
        if expr is None:
            return None
    return float(expr)


def trim_sliced_positions(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with ``strided_slice(conv(x))`` over the convolution's positions (not its
    batch or channels; step 1), where the convolution has no other use, as the
    convolution with that much less padding (a constant bias added between them, the
    same at every position, is added after): exact, since output ``j`` of the new one
    reads the window of output ``j + begin`` of the old. wav2vec2's positional convolution
    (an even kernel padded by half of it, its last position dropped): the slice fused
    into the convolution's epilogue left it on TVM's default lowering (100x slower). Where
    the padding is narrower than the slice, the convolution stays as it is."""
    import tvm
    from tvm import relax

    uses: dict[Any, int] = {}

    @relax.expr_functor.visitor
    class Uses(relax.PyExprVisitor):  # type: ignore[misc]
        def visit_var_(self, var: Any) -> None:
            uses[var] = uses.get(var, 0) + 1

        def visit_dataflow_var_(self, var: Any) -> None:
            uses[var] = uses.get(var, 0) + 1

    @relax.expr_functor.mutator
    class Trim(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.strided_slice"):
                return call
            source, bias = self._single_use(call.args[0]), None
            if _is_op(source, "relax.add") and _broadcasts_over(source.args[1], call):
                # A bias between them (the convolution's third input): added after.
                source, bias = self._single_use(source.args[0]), source.args[1]
            trimmed = _trimmed_conv(source, call) if source is not None else None
            if trimmed is None:
                return call
            return trimmed if bias is None else relax.op.add(self.builder_.emit(trimmed), bias)

        def _single_use(self, var: Any) -> Any:
            """What ``var`` is bound to, where nothing else uses it; else None."""
            if not isinstance(var, relax.Var) or uses.get(var, 0) != 1:
                return None
            return self.lookup_binding(var)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            Uses().visit_expr(func)
    mutator = Trim(mod)
    visit_functions(mutator, mod)
    return mutator.builder_.get()


def _is_op(expr: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _broadcasts_over(bias: Any, slice_: Any) -> bool:
    """Whether constant ``bias`` is the same at every position ``slice_`` slices (its
    extent there 1, or it has no such axis)."""
    import tvm

    shape = dims_of(bias)
    rank = slice_.args[0].ty.ndim
    if not isinstance(bias, tvm.ir.expr.GenericConst) or shape is None:
        return False
    dims = [int(d) for d in shape]
    for axis in slice_.args[1].fields:
        position = int(axis) - (rank - len(dims))
        if 0 <= position < len(dims) and dims[position] != 1:
            return False
    return True


def _trimmed_conv(conv: Any, slice_: Any) -> Any:
    """The convolution ``conv`` computing only what ``slice_`` keeps of it, or None."""
    import tvm

    if not any(_is_op(conv, name) for name in LAYOUTS):
        return None
    _, axes, begins, ends, *steps = slice_.args
    if steps and any(int(step) != 1 for step in steps[0].fields):
        return None
    attrs = conv.attrs
    layout = str(attrs.data_layout)
    spatial = [i for i, letter in enumerate(layout) if letter not in "NC"]
    shape = dims_of(conv)
    if shape is None:
        return None
    padding = [int(p) for p in attrs.padding]
    strides = [int(s) for s in attrs.strides]
    for axis, begin, end in zip(axes.fields, begins.fields, ends.fields, strict=True):
        axis, dims = int(axis), len(spatial)
        if axis not in spatial or not all(isinstance(v, tvm.tirx.IntImm) for v in (begin, end, shape[axis])):
            return None
        size, begin, end = int(shape[axis]), int(begin), int(end)
        begin, end = (begin + size if begin < 0 else begin), (end + size if end < 0 else end)
        end = min(end, size)
        if not 0 <= begin < end:
            return None
        k = spatial.index(axis)
        padding[k] -= begin * strides[k]
        padding[k + dims] -= (size - end) * strides[k]
        if padding[k] < 0 or padding[k + dims] < 0:
            return None
    return _conv_like(conv, conv.args[0], conv.args[1], padding=padding)


def _conv_like(conv: Any, data: Any, weight: Any, **changes: Any) -> Any:
    """A conv1d/conv2d call on ``data`` and ``weight`` with ``conv``'s attributes but
    ``changes`` (a new ``data_layout`` also gives the output that layout)."""
    from tvm import relax

    attrs = conv.attrs
    fields: dict[str, Any] = {
        name: getattr(attrs, name)
        for name in ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout")
    }
    fields["out_layout"] = None if "data_layout" in changes else attrs.out_layout
    fields["out_dtype"] = attrs.out_dtype if attrs.out_dtype else None
    fields.update(changes)
    make = relax.op.nn.conv2d if len(str(fields["data_layout"])) == 4 else relax.op.nn.conv1d
    return make(data, weight, **fields)


def _rewrite_convs(mod: tvm.IRModule, rewrite: Any) -> tvm.IRModule:
    """``mod`` with every conv1d/conv2d call ``c`` replaced by ``rewrite(builder, c)``
    (which returns the new expression, or None to keep ``c``)."""
    return rewrite_calls(mod, LAYOUTS.keys(), rewrite)


def _each_channels_last(builder: Any, call: Any) -> Any:
    """One NCHW/NCW/NCDHW convolution as ``transpose -> channels-last conv -> transpose``."""
    from tvm import relax

    attrs = call.attrs
    data_layout, kernel_layout = CHANNELS_LAST[call.op.name]
    if attrs.data_layout != data_layout[0] + "C" + data_layout[1:-1] or attrs.kernel_layout != "OI" + kernel_layout[:-2]:
        return None
    rank = len(data_layout)
    to_last = [0, *range(2, rank), 1]
    to_first = [0, rank - 1, *range(1, rank - 1)]
    weight_perm = [*range(2, rank), 1, 0]
    data = builder.emit(relax.op.permute_dims(call.args[0], to_last))
    weight = builder.emit(relax.op.permute_dims(call.args[1], weight_perm))
    out = builder.emit(_conv_like(call, data, weight, data_layout=data_layout, kernel_layout=kernel_layout))
    return relax.op.permute_dims(out, to_first)


# A convolution whose live taps (summed over its outputs) are at most this share of its
# taps times its outputs is split into regions of the same live taps
# (:func:`split_partial_taps`): a region's convolution reads its weight's slice again, so
# only where most of the work is on padding.
PARTIAL_TAPS_LIVE = 0.5
# ... into at most this many regions: a 3 x 3 kernel's border rows and columns. A wide
# kernel slides its live taps output by output (wav2vec2's positional convolution, 128
# taps over 49 frames padded by 64: 49 regions, 4x the time of the one convolution).
PARTIAL_TAPS_REGIONS = 9
# Output channels are padded to a multiple of this (one AVX-512 vector) where that wastes
# at most MAX_CHANNEL_WASTE of the convolution's work; below, narrower tiles are used.
CHANNEL_MULTIPLE = 16
MAX_CHANNEL_WASTE = 0.25
# ... and further to a multiple of this (the widest register tile: two AVX-512 vectors)
# where that wastes at most MAX_PANEL_WASTE: a tile one vector wide holds 8 accumulators,
# half the registers, and its FMAs wait on loads (RegNetX-400MF's 1 x 1 convolutions over
# 7 x 7 x 400: 98 GFLOP/s in 7 x 16 tiles, 124 in 7 x 32 ones over 416 channels; the
# model at batch 1, one thread, 1.09x ORT's time).
PANEL_MULTIPLE = 32
MAX_PANEL_WASTE = 0.125
# The narrowest register tile of the convolution rule (conv_tile_width): output channels
# no tile divides are padded to a multiple of it whatever the waste.
NARROWEST_TILE = 8


def padded_channels(channels: int) -> int:
    """The output channels :func:`pad_channels` computes for ``channels`` (the same
    number where none are added).

    >>> [padded_channels(n) for n in (400, 1000, 72, 40, 48, 3, 1, 64)]
    [416, 1024, 80, 48, 48, 8, 8, 64]
    """
    padded = -(-channels // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    wide = -(-channels // PANEL_MULTIPLE) * PANEL_MULTIPLE
    if wide - channels <= MAX_PANEL_WASTE * channels:
        padded = wide
    if padded - channels <= MAX_CHANNEL_WASTE * channels:
        return padded
    if channels % NARROWEST_TILE == 0:
        return channels  # a narrower register tile takes it
    # No register tile divides them (an image's 3 channels, a depth map's 1, 12): the
    # convolution rule refused them, and TVM's generic reduction rule ran them at 4-35x
    # ONNX Runtime's time (Swin2SR's last 64 -> 3 at 128 x 128: 33 ms, 2.8 ms padded to 8).
    return -(-channels // NARROWEST_TILE) * NARROWEST_TILE


def pad_channels(builder: Any, call: Any) -> Any:
    """A channels-last, ungrouped convolution with a constant weight and ``N`` output
    channels that :data:`CHANNEL_MULTIPLE` does not divide (or :data:`PANEL_MULTIPLE`,
    within :data:`MAX_PANEL_WASTE`), as the convolution with zero weights up to the next
    multiple (of :data:`PANEL_MULTIPLE` where that wastes at most
    :data:`MAX_PANEL_WASTE`; of :data:`NARROWEST_TILE` where that would
    waste more than :data:`MAX_CHANNEL_WASTE` and no tile divides ``N``), sliced back to
    ``N`` channels (exact: the extra channels are computed from zeros and dropped). None
    where it does not apply."""
    import tvm
    from tvm import relax

    attrs = call.attrs
    weight = call.args[1]
    if attrs.groups != 1 or attrs.data_layout not in ("NHWC", "NWC"):
        return None
    if not isinstance(weight, tvm.ir.expr.GenericConst) or not isinstance(weight.value, tvm.runtime.Tensor):
        return None
    array = weight.value.numpy()
    channels = array.shape[-1]
    padded = padded_channels(channels)
    if padded == channels:
        return None
    wide = relax.const(pad_axis(array, -1, padded - channels), str(array.dtype))
    out = builder.emit(_conv_like(call, call.args[0], wide))
    rank = len(attrs.data_layout)
    return relax.op.strided_slice(out, axes=[rank - 1], begin=[0], end=[channels])


def stream_bytes(target: tvm.target.Target) -> int:
    """The input size from which a window or pointwise convolution over a batch of images
    streams it, in code for ``target`` (:data:`STREAM_BYTES_BY_CPU` of the CPU it is
    tuned for; 0: never).

    >>> stream_bytes(targets.resolve("zen4")), stream_bytes(targets.resolve("sapphirerapids"))  # doctest: +SKIP
    (4194304, 0)
    """
    from rewriter.backends.tvm import targets

    return STREAM_BYTES_BY_CPU.get(targets.tuned_cpu(target), 0)


def prefetch_window_rows(sch: Any, name: str, lead: int, tile: tuple[int, int]) -> Any:
    """``sch`` (the window rule's, row tiles of ``tile`` = (pixels, channels)) with each
    tile first prefetching the input it reads :data:`WINDOW_PREFETCH_AHEAD` output rows
    later that no earlier row reads: the window's last ``stride`` rows, over the tile's
    columns and channels. Only for an image input (``lead`` 4: ``[n, y, x, c]``) read by
    the block ``name`` directly (its padding tested in the loads, not copied). Addresses
    are clamped into the image (a prefetch past its edge only repeats one inside it).
    No schedule primitive inserts a
    statement: the function is rebuilt, and a new schedule returned (as
    :func:`.schedules.prefetch_next_panel` does); ``sch`` itself where it does not apply."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, sym, tirx

    from rewriter.backends.tvm.relax_passes import schedules
    from rewriter.backends.tvm.vector_tails import uses

    func = sch.mod["main"]
    realizes: list[Any] = []
    parallel: list[Any] = []

    def note_realize(node: Any) -> Any:
        if node.block.name_hint == name:
            realizes.append(node)
        return node

    def note_parallel(node: Any) -> Any:
        if node.kind == tirx.ForKind.PARALLEL:
            parallel.append(node)
        return node

    tvm_ffi.structural_map(func.body, [(s_tir.SBlockRealize, note_realize), (tirx.For, note_parallel)], order="post")
    if lead != 4 or len(realizes) != 1 or len(parallel) != 1:
        return sch
    realize, outer = realizes[0], parallel[0]
    stmt = realize.block
    ivars = [iv.var for iv in stmt.iter_vars]
    if len(ivars) < lead + 2:
        return sch
    params = [param for param in func.params if hasattr(param, "shape")]
    loads: list[Any] = []

    def note_load(node: Any) -> Any:
        if any(node.source.same_as(param) for param in params) and len(node.indices) == 4 and uses(node.indices[1], ivars[1]):
            loads.append(node)
        return node

    tvm_ffi.structural_map(stmt.body, [(tvm.ir.TensorLoad, note_load)], order="post")
    if not loads or not all(load.source.same_as(loads[0].source) for load in loads):
        return sch
    source = loads[0].source
    indices = list(loads[0].indices)
    shape = [int(extent) if isinstance(extent, tirx.IntImm) else 0 for extent in source.shape]
    itemsize = (tvm.DataType(str(source.dtype)).bits + 7) // 8
    if not all(shape[1:]):
        return sch
    inner: list[Any] = []

    def note_loop(loop: Any) -> Any:
        inner.append(loop.loop_var)
        return loop

    tvm_ffi.structural_map(outer.body, [(tirx.For, note_loop)], order="post")
    zero = tirx.const(0, "int64")
    inner_zero = dict.fromkeys(inner, zero)
    base = {var: _substitute(value, inner_zero) for var, value in zip(ivars[:lead], realize.iter_values, strict=False)}
    base[ivars[1]] = base[ivars[1]] + WINDOW_PREFETCH_AHEAD
    reductions = dict.fromkeys(ivars[lead:], zero)
    analyzer = sym.Analyzer()

    def at(index: int, row: Any = zero, column: Any = zero, pixel: int = 0) -> Any:
        values = {**base, **reductions, ivars[lead]: row, ivars[lead + 1]: column}
        values[ivars[2]] = base[ivars[2]] + pixel
        return analyzer.simplify(_substitute(indices[index], values))

    taps = [int(iv.dom.extent) if isinstance(iv.dom.extent, tirx.IntImm) else 0 for iv in stmt.iter_vars[lead : lead + 2]]
    ahead = {**base, ivars[1]: base[ivars[1]] + 1}
    stride = analyzer.simplify(_substitute(indices[1], {**ahead, **reductions}) - _substitute(indices[1], {**base, **reductions}))
    span = analyzer.simplify(at(2, column=tirx.const(taps[1] - 1, "int64"), pixel=tile[0] - 1) - at(2))
    if not all(taps) or not isinstance(stride, tirx.IntImm) or not isinstance(span, tirx.IntImm):
        return sch
    rows = min(int(stride), taps[0])
    if rows < 1:
        return sch
    line = max(64 // itemsize, 1)
    r, j, c = (tirx.Var(var, "int64") for var in ("prefetch_row", "prefetch_column", "prefetch_line"))
    height, width = shape[1] - 1, shape[2] - 1
    y = tirx.max(tirx.min(at(1, row=r + (taps[0] - rows)), height), 0)
    x = tirx.max(tirx.min(at(2) + j, width), 0)
    channel = tirx.min(at(3) + c * line, shape[3] - 1)
    fetch = schedules.prefetch(source, [at(0), y, x, channel])
    for var, extent in ((c, -(-tile[1] // line)), (j, int(span) + 1), (r, rows)):
        fetch = tirx.For(var, zero, tirx.const(extent, "int64"), tirx.ForKind.SERIAL, fetch)
    return schedules.first_in_loop(sch, outer.loop_var, [fetch])


def prefetch_next_pixels(sch: Any, block: Any, tail: Any, weight: Any, keep: int, inputs: bool, outputs: bool) -> Any:
    """``sch`` (the conv rule's for a pointwise convolution, every window axis of extent
    1, after :func:`tile`) with the micro-kernel prefetching for the next tile of pixels,
    while it multiplies this tile's: with ``inputs``, the tile's input (a parameter read
    directly; the ``weight`` another), in the first panel of output channels only (the
    others read the same pixels); with ``outputs``, this panel's output, for writing
    (``tail``: the block that stores it). Each iteration of the
    reduction loop prefetches a few cache lines, spread so that the next tile's are all
    asked for by the end of this one; the last tile's are clamped into the pixels.
    ``keep`` leading axes stand apart from the flat pixel axis. The function is rebuilt,
    as :func:`prefetch_window_rows` does; ``sch`` itself where it does not apply."""
    import tvm_ffi
    from tvm import s_tir, sym, tirx

    from rewriter.backends.tvm.relax_passes import schedules
    from rewriter.backends.tvm.vector_tails import uses

    stmt, tail_name = sch.get(block), sch.get(tail).name_hint
    ivars = [iv.var for iv in stmt.iter_vars]
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if len(ivars) < keep + 3 or not all(isinstance(e, tirx.IntImm) and int(e) == 1 for e in extents[keep + 2 : -1]):
        return sch  # not pointwise
    loops = [sch.get(loop) for loop in sch.get_loops(block)]
    serial = [loop for loop in loops[1:] if loop.kind == tirx.ForKind.SERIAL]
    tiled = [loop for loop in loops[1:] if loop.kind == tirx.ForKind.UNROLLED]
    if loops[0].kind != tirx.ForKind.PARALLEL or not serial:
        return sch
    if not all(isinstance(loop.extent, tirx.IntImm) for loop in serial + tiled):
        return sch
    func = sch.mod["main"]
    realizes: dict[str, Any] = {}

    def note_realize(node: Any) -> Any:
        if node.block.name_hint in (stmt.name_hint, tail_name):
            realizes.setdefault(node.block.name_hint, []).append(node)
        return node

    tvm_ffi.structural_map(func.body, [(s_tir.SBlockRealize, note_realize)], order="post")
    if any(len(realizes.get(name, [])) != 1 for name in (stmt.name_hint, tail_name)):
        return sch
    update, store = realizes[stmt.name_hint][0], realizes[tail_name][0]
    pixels = update.iter_values[keep]
    if any(uses(pixels, loop.loop_var) for loop in serial):
        return sch  # ragged tiles in a loop of their own, not the parallel one
    tile_i = next((int(loop.extent) for loop in tiled if uses(pixels, loop.loop_var)), 0)
    if not tile_i:
        return sch
    params = [param for param in func.params if hasattr(param, "shape") and not param.same_as(weight)]
    fused, zero = loops[0].loop_var, tirx.const(0, "int64")
    iterations = math.prod(int(loop.extent) for loop in serial)
    iteration: Any = zero
    for loop in serial:
        iteration = iteration * loop.extent + loop.loop_var
    lines = _NextTileLines(tile_i, iteration, iterations)
    fetches: list[Any] = []
    if inputs and isinstance(extents[-1], tirx.IntImm):
        loads = _accesses(update.block.body, params, load=True)
        if len(loads) == 1:
            base = lines.base(ivars, update.iter_values, fused)
            for var in ivars[keep + 2 :]:
                base[var] = zero
            first = lines.fetches(loads[0], base, (ivars[keep], extents[keep]), (ivars[-1], extents[-1]), 0, write=False)
            first_panel = sym.Analyzer().simplify(base[ivars[keep + 1]] == 0)
            if not (isinstance(first_panel, tirx.IntImm) and int(first_panel)):
                first = [tirx.IfThenElse(first_panel, tirx.SeqStmt(first) if len(first) > 1 else first[0], None)]
            fetches += first
    tvars = [iv.var for iv in store.block.iter_vars]
    textents = [iv.dom.extent for iv in store.block.iter_vars]
    width = next((int(loop.extent) for loop in loops if loop.kind == tirx.ForKind.VECTORIZED), 0)
    if outputs and len(tvars) == keep + 2 and width:
        stores = _accesses(store.block.body, params, load=False)
        if len(stores) == 1:
            base = lines.base(tvars, store.iter_values, fused)
            fetches += lines.fetches(stores[0], base, (tvars[keep], textents[keep]), (tvars[-1], textents[-1]), width, write=True)
    return schedules.first_in_loop(sch, serial[-1].loop_var, fetches) if fetches else sch


def _accesses(body: Any, buffers: list[Any], load: bool) -> list[Any]:
    """The loads (or stores) of ``body`` from (to) any of ``buffers``."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    found: list[Any] = []

    def note(node: Any) -> Any:
        if any((node.source if load else node.buffer).same_as(buffer) for buffer in buffers):
            found.append(node)
        return node

    tvm_ffi.structural_map(body, [(tvm.ir.TensorLoad if load else tirx.BufferStore, note)], order="post")
    return found


def _substitute(expr: Any, values: dict[Any, Any]) -> Any:
    """``expr`` with its variables replaced by their ``values``."""
    import tvm_ffi
    from tvm import tirx

    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda var: values.get(var, var))])


class _NextTileLines:
    """The prefetches of :func:`prefetch_next_pixels`: the cache lines of a buffer that
    the next tile of ``tile_i`` pixels reads or writes, spread over ``iterations``
    iterations of the reduction loop (``iteration``: which one this is)."""

    def __init__(self, tile_i: int, iteration: Any, iterations: int) -> None:
        self.tile_i, self.iteration, self.iterations = tile_i, iteration, iterations

    @staticmethod
    def base(ivars: list[Any], values: list[Any], fused: Any) -> dict[Any, Any]:
        """A block's iterators at the first of this tile's (the parallel loop's ``fused``
        iteration; every loop inside it at 0)."""
        import tvm_ffi
        from tvm import tirx

        zero = tirx.const(0, "int64")

        def at_start(expr: Any) -> Any:
            return tvm_ffi.structural_map(expr, [(tirx.Var, lambda var: var if var.same_as(fused) else zero)])

        return {var: at_start(value) for var, value in zip(ivars, values, strict=True)}

    def fetches(
        self, access: Any, base: dict[Any, Any], pixel: tuple[Any, Any], channel: tuple[Any, Any], width: int, write: bool
    ) -> list[Any]:
        """Prefetches of ``access`` (a load or store indexed by ``base``'s iterators) for
        the next tile: its pixels (``pixel``: the iterator and its extent) one tile
        further, the channels from ``base``'s over ``width`` of them (0: all of the
        ``channel`` iterator's extent)."""
        import tvm
        from tvm import sym, tirx

        from rewriter.backends.tvm.relax_passes import schedules

        buffer = access.source if hasattr(access, "source") else access.buffer
        line = max(64 // ((tvm.DataType(str(buffer.dtype)).bits + 7) // 8), 1)
        (pixel_var, pixels), (channel_var, channels) = pixel, channel
        per_pixel = -(-(width or int(channels)) // line)
        lines = self.tile_i * per_pixel
        per_iteration = -(-lines // self.iterations)
        analyzer = sym.Analyzer()
        out = []
        for part in range(per_iteration):
            flat = tirx.min(self.iteration * per_iteration + part, lines - 1)
            values = dict(base)
            values[pixel_var] = tirx.min(base[pixel_var] + self.tile_i + tirx.floordiv(flat, per_pixel), pixels - 1)
            values[channel_var] = tirx.min(base[channel_var] + tirx.floormod(flat, per_pixel) * line, channels - 1)
            out.append(schedules.prefetch(buffer, [analyzer.simplify(_substitute(i, values)) for i in access.indices], write))
        return out


def pad_axis(array: Any, axis: int, extra: int, fill: float = 0.0) -> Any:
    """``array`` (numpy) with ``extra`` entries of ``fill`` appended along ``axis``."""
    import numpy as np

    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    return np.pad(array, widths, constant_values=fill)


def live_taps(size: int, out: int, kernel: int, stride: int, dilation: int, before: int) -> range:
    """The kernel taps along one axis that read the input at some output position: tap
    ``k`` reads ``o * stride + k * dilation - before`` for outputs ``o < out``, an input
    position only where that lies in ``[0, size)``. A contiguous range (the positions a
    tap reads slide with it).

    >>> live_taps(14, 14, 3, 1, 36, 36), live_taps(14, 14, 3, 1, 12, 12), live_taps(14, 14, 3, 1, 1, 1)
    (range(1, 2), range(0, 3), range(0, 3))
    """
    live = [
        k
        for k in range(kernel)
        if any(0 <= o * stride + k * dilation - before < size for o in range(out))
    ]
    return range(live[0], live[-1] + 1) if live else range(kernel)


def _static_conv(call: Any) -> tuple[Any, list[int], list[int], list[int], list[int], list[int], list[int]] | None:
    """(weight array, input sizes, output sizes, padding before, padding after, strides,
    dilations) along the positions of a channels-last convolution with a constant weight
    and static positions; None for any other."""
    import tvm
    from tvm import tirx

    attrs = call.attrs
    weight = call.args[1]
    if attrs.data_layout not in ("NHWC", "NWC") or attrs.kernel_layout not in ("HWIO", "WIO"):
        return None
    if not isinstance(weight, tvm.ir.expr.GenericConst) or not isinstance(weight.value, tvm.runtime.Tensor):
        return None
    data_shape, out_shape = dims_of(call.args[0]), dims_of(call)
    if data_shape is None or out_shape is None:
        return None
    sizes, outs = data_shape[1:-1], out_shape[1:-1]
    if not all(isinstance(v, tirx.IntImm) for v in [*sizes, *outs]):
        return None
    axes = len(sizes)
    padding = [int(p) for p in attrs.padding]
    return (
        weight.value.numpy(),
        [int(v) for v in sizes],
        [int(v) for v in outs],
        padding[:axes],
        padding[axes:],
        [int(v) for v in attrs.strides],
        [int(v) for v in attrs.dilation],
    )


def drop_dead_taps(builder: Any, call: Any) -> Any:
    """A channels-last convolution with a constant weight whose outer taps only ever read
    padding (an atrous convolution dilated past its map: DeepLabV3's ASPP at rates 24 and
    36 over a 14 x 14 map is a 1 x 1 convolution), as the convolution over its live taps
    alone, its padding cut by as much: exact, the dropped taps multiplied zeros only.
    None where every tap is live or the positions are not static."""
    import numpy as np
    from tvm import relax

    static = _static_conv(call)
    if static is None:
        return None
    array, sizes, outs, before, after, strides, dilations = static
    axes = len(sizes)
    live = [
        live_taps(sizes[i], outs[i], array.shape[i], strides[i], dilations[i], before[i])
        for i in range(axes)
    ]
    if all(len(taps) == array.shape[i] for i, taps in enumerate(live)):
        return None
    new_before = [before[i] - live[i].start * dilations[i] for i in range(axes)]
    new_after = [after[i] - (array.shape[i] - live[i].stop) * dilations[i] for i in range(axes)]
    if min(new_before + new_after) < 0:
        return None
    kept = relax.const(np.ascontiguousarray(array[tuple(slice(t.start, t.stop) for t in live)]), str(array.dtype))
    dilation = [d if len(t) > 1 else 1 for d, t in zip(dilations, live, strict=True)]
    return _conv_like(call, call.args[0], kept, padding=[*new_before, *new_after], dilation=dilation)


def tap_bands(size: int, out: int, kernel: int, stride: int, dilation: int, before: int) -> list[tuple[range, range]]:
    """The output positions along one axis in runs over which the same taps are live
    (:func:`live_taps`, position by position): ``(positions, taps)`` pairs in order.

    >>> tap_bands(14, 14, 3, 1, 12, 12)
    [(range(0, 2), range(1, 3)), (range(2, 12), range(1, 2)), (range(12, 14), range(0, 2))]
    """
    bands: list[tuple[range, range]] = []
    for o in range(out):
        taps = live_taps(size, 1, kernel, 1, dilation, before - o * stride)
        if bands and bands[-1][1] == taps:
            bands[-1] = (range(bands[-1][0].start, o + 1), taps)
        else:
            bands.append((range(o, o + 1), taps))
    return bands


def split_partial_taps(builder: Any, call: Any) -> Any:
    """A channels-last convolution with a constant weight whose taps read padding for most
    outputs (live taps at most :data:`PARTIAL_TAPS_LIVE` of the work, in at most
    :data:`PARTIAL_TAPS_REGIONS` regions), as one
    convolution per region of outputs over which the same taps are live (:func:`tap_bands`
    along each axis), each over the input it reads with no padding, concatenated:
    exact, the taps dropped multiplied zeros only. DeepLabV3's rate-12 ASPP branch over a
    14 x 14 map: the outer taps are live on the 2 border rows or columns only, a fifth of
    the 3 x 3 work; computed whole, over a padded copy, 8.3 ms against ONNX Runtime's 2.5
    (which skips the taps per output) at batch 1. None for the other convolutions."""
    import numpy as np
    from tvm import relax

    static = _static_conv(call)
    if static is None:
        return None
    array, sizes, outs, before, _, strides, dilations = static
    axes = len(sizes)
    bands = [
        tap_bands(sizes[i], outs[i], array.shape[i], strides[i], dilations[i], before[i])
        for i in range(axes)
    ]
    live = math.prod(
        sum(len(positions) * len(taps) for positions, taps in axis) / (outs[i] * array.shape[i])
        for i, axis in enumerate(bands)
    )
    if live > PARTIAL_TAPS_LIVE or math.prod(len(axis) for axis in bands) > PARTIAL_TAPS_REGIONS:
        return None
    for i, axis in enumerate(bands):  # (an output no tap reads the input for: all taps)
        for positions, taps in axis:
            first = positions.start * strides[i] + taps.start * dilations[i] - before[i]
            last = (positions.stop - 1) * strides[i] + (taps.stop - 1) * dilations[i] - before[i]
            if first < 0 or last >= sizes[i]:
                return None

    def region(chosen: list[tuple[range, range]]) -> Any:
        begin = [p.start * s + t.start * d - b for (p, t), s, d, b in zip(chosen, strides, dilations, before, strict=True)]
        end = [
            (p.stop - 1) * s + (t.stop - 1) * d - b + 1
            for (p, t), s, d, b in zip(chosen, strides, dilations, before, strict=True)
        ]
        data = builder.emit(relax.op.strided_slice(call.args[0], axes=list(range(1, axes + 1)), begin=begin, end=end))
        taps = np.ascontiguousarray(array[tuple(slice(t.start, t.stop) for _, t in chosen)])
        dilation = [d if len(t) > 1 else 1 for d, (_, t) in zip(dilations, chosen, strict=True)]
        return builder.emit(
            _conv_like(call, data, relax.const(taps, str(array.dtype)), padding=[0] * (2 * axes), dilation=dilation)
        )

    def joined(axis: int, chosen: list[tuple[range, range]]) -> Any:
        if axis == axes:
            return region(chosen)
        parts = [joined(axis + 1, [*chosen, band]) for band in bands[axis]]
        return parts[0] if len(parts) == 1 else builder.emit(relax.op.concat(parts, axis=axis + 1))

    return joined(0, [])


def _has_conv(mod: tvm.IRModule) -> bool:
    import tvm
    from tvm import relax

    found = False

    def visit(expr: Any) -> None:
        nonlocal found
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in CHANNELS_LAST:
            found = True

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def conv_tile_width(channels: int, lanes: int) -> int | None:
    """Output channels per register tile for ``channels`` output channels: the widest
    power of two from 8 up to ``PANEL_VECTORS`` vectors of ``lanes`` that divides them.
    (Wider or other widths, 48 or 24, leave TVM's vectorizer index arithmetic it does not
    fold, and the loads become element-by-element inserts.)

    >>> conv_tile_width(64, 16), conv_tile_width(24, 16), conv_tile_width(48, 16), conv_tile_width(10, 16)
    (32, 8, 16, None)
    """
    width = PANEL_VECTORS * lanes
    while width >= NARROWEST_TILE:
        if channels % width == 0:
            return width
        width //= 2
    return None


def group_size(index: Any, channel: Any, reduction: Any) -> int | None:
    """Output channels per group of a convolution whose input-channel index is ``index``:
    0 for a dense one (``index`` is the input-channel iterator ``reduction``), ``G`` for a
    grouped one (``channel // G * C_g + reduction``, as TVM writes it), else None."""
    from tvm import tirx

    if index.same_as(reduction):
        return 0
    if not (isinstance(index, tirx.Add) and index.b.same_as(reduction) and isinstance(index.a, tirx.Mul)):
        return None
    group, _ = index.a.a, index.a.b
    if isinstance(group, tirx.FloorDiv) and group.a.same_as(channel) and isinstance(group.b, tirx.IntImm):
        return int(group.b)
    return None


def conv_width(channels: int, group: int, lanes: int) -> int | None:
    """The register tile's width for a convolution with ``channels`` outputs in groups of
    ``group`` (0: dense): a tile never spans two groups, so every lane of it reads the
    same input channels.

    >>> conv_width(128, 4, 16), conv_width(256, 8, 16), conv_width(512, 16, 16), conv_width(96, 3, 16)
    (4, 8, 16, None)
    """
    if group in (2, 4):
        # Groups narrower than the narrowest tile: tiles of one group, 4- or 2-lane
        # vectors (ResNeXt-50's 32 groups of 4 channels at 56 x 56: 7.0 ms a call under
        # TVM's generic reduction rule, 0.64 ms so).
        return group
    return conv_tile_width(group or channels, lanes)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


_RULES: dict[str, Any] = {}


def rules() -> dict[str, Any]:
    """The rule classes, ``{"conv": ConvRule, "window": WindowRule}`` (defined on first use)."""
    if _RULES:
        return _RULES
    import tvm
    from tvm import s_tir, sym, tirx

    from rewriter.backends.tvm.relax_passes import schedules
    from rewriter.backends.tvm.vector_tails import uses

    base = schedules.cpu_rule_base()
    reduce = tirx.IterVar.CommReduce

    def split_blocks(sch: Any) -> tuple[list[Any], Any, list[Any]] | None:
        """(producers, the one reduction block, epilogue) of the function, or None."""
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        kinds = [any(iv.iter_type == reduce for iv in sch.get(b).iter_vars) for b in blocks]
        if kinds.count(True) != 1:
            return None
        at = kinds.index(True)
        return blocks[:at], blocks[at], blocks[at + 1 :]

    def spatial_then_reduce(stmt: Any) -> int | None:
        """How many spatial iterators lead ``stmt``'s (all spatial first, then reductions)."""
        kinds = [iv.iter_type == reduce for iv in stmt.iter_vars]
        if True not in kinds:
            return None
        lead = kinds.index(True)
        if lead < 2 or not all(kinds[lead:]):
            return None
        return lead

    def static(stmt: Any, lead: int) -> tuple[list[Any], int] | None:
        """The iterators' extents, and how many leading axes stay apart from the pixels:
        0, or 1 for a symbolic batch (a model compiled for any batch size; its other
        extents static, and a pixel axis besides it). The one pixel axis of a 1-D
        convolution may be symbolic too (wav2vec2's frames, for any number of samples):
        its extent stays a TIR expression, and the last tile of pixels is masked."""
        extents = [iv.dom.extent for iv in stmt.iter_vars]
        keep = 0 if isinstance(extents[0], tirx.IntImm) else 1
        if keep and lead < 3:
            return None
        symbolic = [i for i, extent in enumerate(extents) if i >= keep and not isinstance(extent, tirx.IntImm)]
        if symbolic == [1] and not keep and lead == 3:
            keep = 1  # a static batch of 1-D signals of any length: its images apart too
        if symbolic and (symbolic != [keep] or lead - 1 - keep != 1):
            return None
        return [1] * keep + [e if i in symbolic else int(e) for i, e in enumerate(extents) if i >= keep], keep

    def reduction_parts(sch: Any) -> tuple[list[Any], Any, list[Any], Any, int, list[int], int] | None:
        """(producers, the reduction block, epilogue, its statement, how many spatial
        iterators lead it, its extents, how many leading axes stay apart) of a function
        whose one reduction block writes one buffer, its iterators spatial then reduce,
        its extents static (a batch or a 1-D pixel axis aside: :func:`static`); else None."""
        parts = split_blocks(sch)
        if parts is None:
            return None
        producers, block, epilogue = parts
        stmt = sch.get(block)
        lead = spatial_then_reduce(stmt)
        shape = static(stmt, lead) if lead is not None else None
        if lead is None or shape is None or len(stmt.writes) != 1:
            return None
        return producers, block, epilogue, stmt, lead, *shape

    def flatten_pixels(sch: Any, block: Any, tail: Any, lead: int, extents: list[Any], keep: int) -> None:
        """Fuse the pixel iterators of ``block`` (the ``lead - 1`` before its channel, but
        the ``keep`` first: a symbolic batch), and of its epilogue and the accumulator it
        writes, into one, so tiles of pixels may span image rows."""
        pixel_extents = extents[keep : lead - 1]
        if len(pixel_extents) == 1:
            return
        index_map = tirx.IndexMap.from_func

        def flat(*index: Any) -> Any:
            position = index[0]
            for value, extent in zip(index[1:], pixel_extents[1:], strict=True):
                position = position * extent + value
            return position

        def fused(*a: Any) -> tuple[Any, ...]:
            return (*a[:keep], flat(*a[keep : lead - 1]), *a[lead - 1 :])

        sch.transform_layout(block, ("write", 0), index_map(fused, ndim=lead))
        sch.transform_block_layout(block, index_map(fused, ndim=len(extents)))
        tail_extents = [int(iv.dom.extent) for iv in sch.get(tail).iter_vars[keep : lead - 1]]
        if tail_extents != pixel_extents:
            # The epilogue keeps part of the pixels (wav2vec2's positional convolution
            # drops its last position): its own flat index matches the block's only
            # where a single pixel axis is longer than 1.
            if sum(extent > 1 for extent in pixel_extents) > 1:
                raise ValueError("the epilogue slices pixels of a multi-axis image")

            def fused(*a: Any) -> tuple[Any, ...]:
                position = a[keep]
                for value, extent in zip(a[keep + 1 : lead - 1], tail_extents[1:], strict=True):
                    position = position * extent + value
                return (*a[:keep], position, *a[lead - 1 :])

        sch.transform_block_layout(tail, index_map(fused, ndim=lead))

    def images_apart(
        sch: Any, tail: Any, lead: int, keep: int, extents: list[Any], *, weight: Any = None, data_bytes: int = 0
    ) -> tuple[int, list[Any]]:
        """``(keep, extents)``, the images of a static batch kept apart (as a symbolic
        batch is) where the epilogue ``tail`` keeps part of a 1-D convolution's frames
        (the padded frames of :mod:`rewriter.backends.tvm.relax_passes.conv_frames`):
        frames flattened across images would index the epilogue (``n * 1599 + f``)
        otherwise than the convolution (``n * 1600 + f``); and where a convolution's
        input (``data_bytes``, every image) is past :data:`CONV_IMAGES_APART_BYTES` and
        its ``weight`` stays in L2 (or it has none: pooling): flattened, each panel of
        output channels swept the pixels of every image, reading the whole input once a
        panel from beyond L2 (MobileNetV3-small's 1 x 1 convolutions at 56 x 56, batch 8:
        1.45 ms against 0.78 image by image); image by image, one image's input stays in
        cache over the panels. Windows too (EfficientNet-B0's 5 x 5 depthwise convolutions
        at 7 x 7 pixels, tiles of 4 across image rows: 1.9 ms against 1.4 at batch 8)."""
        if keep or extents[0] == 1:
            return keep, extents
        in_l2 = weight is None or buffer_bytes(weight) <= schedules.ROW_MAJOR_MAX_B_BYTES
        if in_l2 and data_bytes > CONV_IMAGES_APART_BYTES:
            return 1, [1, *extents[1:]]
        if lead != 3:
            return keep, extents
        frames = sch.get(tail).iter_vars[1].dom.extent
        if isinstance(frames, tirx.IntImm) and int(frames) == extents[1]:
            return keep, extents
        return 1, [1, *extents[1:]]

    def inline_plain_copies(sch: Any, producers: list[Any]) -> list[Any]:
        """``producers`` but the plain copies, inlined: TVM's ``pad_temp`` of a
        convolution without padding (every 1x1 convolution) copied the whole input once
        per call."""
        kept = []
        for producer in producers:
            if schedules.copies(sch.get(producer)):
                try:
                    sch.compute_inline(producer)
                    continue
                except Exception:  # an index TVM cannot substitute: it stays a copy
                    pass
            kept.append(producer)
        return kept

    def finish_producers(sch: Any, producers: list[Any], lanes: int) -> None:
        """Padding copies, computed once per call: image rows in parallel, each pixel's
        channels vectorized (whole vectors of them: the padding test is then one per
        vector); where no vector of at least a quarter of ``lanes`` divides the channels,
        each row (contiguous on both sides) where whole vectors cover it."""
        for block in producers:
            loops = sch.get_loops(block)
            if len(loops) < 2:
                sch.parallel(loops[0])
                continue
            channels = int(sch.get(loops[-1]).extent)
            width = next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and channels % w == 0), None)
            rows = sch.fuse(*loops[:-2]) if len(loops) > 2 else None
            if width is not None:
                _, inner = sch.split(loops[-1], [None, width])
                sch.vectorize(inner)
            else:
                row = sch.fuse(*loops[-2:])
                extent = sch.get(row).extent  # symbolic: a 1-D signal's length
                if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
                    _, inner = sch.split(row, [None, lanes])
                    sch.vectorize(inner)
            sch.parallel(rows if rows is not None else sch.get_loops(block)[0])

    def tile(
        sch: Any,
        block: Any,
        tail: Any,
        pixels: Any,
        limit: int,
        tile_j: int,
        unroll_k: bool,
        keep: int,
        pixel_floats: int = 0,
        weight_in_l2: bool = False,
    ) -> Any:
        """The register tile: ``tile_i`` pixels (at most ``limit``) x ``tile_j`` channels
        accumulated in registers over the reduction loops, ``tail`` (the epilogue, or a
        copy out) run on each finished tile. Returns the pixels per block (below).

        Loops, outside in, as the matmul rule's: blocks of pixels whose input
        (``pixel_floats`` floats per output pixel) fits half of L2
        (:func:`.schedules.row_block`), panels of output channels, pixel tiles. So a
        block's input stays in cache over the panels, and each thread of the parallel
        loop reads the pixels of a contiguous share of the images, the share its producer
        wrote. Panels outside every pixel (one block) read the whole input once a panel:
        CLIP's 32 x 32 patch embedding at batch 8 (4.8 MB of input, a 3 MB weight) ran
        in 2.2 ms on two threads after its producer, against 1.8 ms in blocks of 56 pixels.
        With ``weight_in_l2`` a block is one tile, which sweeps every panel (as the
        matmul's :func:`.schedules.rows_outside`): its input stays in L1 over the panels,
        and the threads split the pixels, not the channels (RegNetY-400MF at batch 1 on two
        threads: 7.4 -> 6.2 ms; ResNet-18 14.7 -> 14.1 ms).

        ``tile_i`` divides ``pixels`` where a divisor of at least half of ``limit`` does;
        else (169 = 13 x 13 pixels) it is ``limit`` and the last tile is partial: its
        rows are masked. ``pragma_loop_partition_hint`` asks ``LoopPartition`` to peel
        that tile off, but this TVM's does not: the mask stays in every tile (1-D
        convolutions get whole tiles from
        :mod:`rewriter.backends.tvm.relax_passes.conv_frames`). A symbolic ``pixels``
        (a TIR expression) takes the tallest tile that provably divides it (the frames
        that ``conv_frames`` padded); where none does, it is ragged, its mask in every
        tile."""
        run_time = not isinstance(pixels, int)
        if run_time:
            tile_i = schedules.dividing_tile(pixels, limit) or 1
        else:
            tile_i = max(d for d in range(1, limit + 1) if pixels % d == 0)
        ragged = 2 * tile_i < limit
        symbolic = run_time and ragged
        # A tile on the stack (in registers) where one divides the pixels (56 x 56: 7 x 32);
        # a symbolic count's tile is the one that provably divides it.
        if ragged:  # any height: the tallest on the stack (4 x 64 floats are 1 KiB: 3 x 64)
            tile_i = schedules.stack_height(limit, tile_j)
        elif not run_time:
            tile_i = schedules.stack_rows(pixels, limit, tile_j) or tile_i
        loops = sch.get_loops(block)
        outer, (pixel, channel), reduction = loops[:keep], loops[keep : keep + 2], loops[keep + 2 :]
        per_block = pixels
        if not (ragged or run_time):  # static whole tiles: blocks of them (docstring)
            if weight_in_l2:
                per_block = tile_i
            elif pixel_floats:
                per_block = schedules.row_block(pixels, pixel_floats, tile_i)
        if per_block != pixels:
            pb, po, pi = sch.split(pixel, [None, per_block // tile_i, tile_i])
            outer = [*outer, pb]
        else:
            po, pi = sch.split(pixel, [None, tile_i])
        co, ci = sch.split(channel, [None, tile_j])
        inner = list(reduction)
        if unroll_k:
            extent = int(sch.get(inner[-1]).extent)
            if extent % K_UNROLL == 0 and extent > K_UNROLL:
                inner[-1:] = sch.split(inner[-1], [None, K_UNROLL])
        sch.reorder(*outer[keep:], co, po, *inner, pi, ci)
        sch.reverse_compute_at(tail, po)
        sch.set_scope(block, 0, schedules.tile_scope(tile_i, tile_j))
        sch.vectorize(ci)
        sch.unroll(pi)
        if unroll_k and len(inner) > len(reduction):
            sch.unroll(inner[-1])
        last = sch.get_loops(tail)[-1]
        sch.vectorize(last)
        if ragged and not outer and not symbolic:  # the tile loop stays apart, for LoopPartition to peel its last tile
            sch.annotate(po, "pragma_loop_partition_hint", 1)
            sch.parallel(co)
        elif ragged:
            # Under a symbolic batch or pixel count, TVM's LoopPartition fails (int32 and
            # int64 mixed in its bounds): the last tile's mask stays in every tile, a
            # branch per row.
            sch.parallel(sch.fuse(*outer, co) if outer else co)
        else:
            sch.parallel(sch.fuse(*outer, co, po))
        sch.decompose_reduction(block, inner[0])
        return per_block

    def spreads(sch: Any, block: Any, stmt: Any) -> bool:
        """Whether the epilogue's ``block`` writes more pixels than the convolution
        ``stmt``: its result broadcast over pixels the convolution has one of (a
        squeeze-and-excitation gate, ``[n, 1, 1, c]``, scaling a ``[n, h, w, c]`` feature
        map). In the tile's epilogue, everything before the product (the gate's sigmoid)
        ran once per pixel of the feature map: EfficientNet-B0's largest gate took 2.0 ms
        at batch 8 (two threads) against 0.6 ms as a loop of its own."""
        conv_shape = list(stmt.writes[0].source.shape)
        shape = list(sch.get(block).writes[0].source.shape)
        if len(shape) != len(conv_shape) or len(shape) < 3:
            return False
        wider, analyzer = False, sym.Analyzer()
        for extent, conv_extent in zip(shape[1:-1], conv_shape[1:-1], strict=True):
            if isinstance(conv_extent, tirx.IntImm) and int(conv_extent) == 1:
                wider |= not (isinstance(extent, tirx.IntImm) and int(extent) == 1)
            elif not analyzer.can_prove_equal(extent, conv_extent):
                return False
        return wider

    class ConvRule(base):  # type: ignore[misc, valid-type]
        """``Y[p..., f] += X[g(p..., r...), rc] * W[r..., rc, f]`` (+ epilogue): a
        channels-last convolution as an implicit GEMM (module docstring, item 2); grouped
        ones (``X[..., f // G * C_g + rc]``) too, with tiles inside a group."""

        what = "conv"

        def __init__(self, lanes: int, prefetch_tiles: int | None = None, stream_bytes: int = 0) -> None:
            super().__init__(lanes, prefetch_tiles)
            self.stream_bytes = stream_bytes  # :func:`stream_bytes`; 0: never

        def _schedule(self, func: Any) -> Any:
            sch = s_tir.Schedule(func)
            parts = reduction_parts(sch)
            if parts is None or len(parts[3].reads) != 2:
                return None
            producers, block, epilogue, stmt, lead, extents, keep = parts
            ivars = [iv.var for iv in stmt.iter_vars]
            channel, reductions = ivars[lead - 1], ivars[lead:]
            write = [r.min for r in stmt.writes[0].region]
            if len(write) != lead or not all(w.same_as(v) for w, v in zip(write, ivars[:lead], strict=True)):
                return None
            data, weight = stmt.reads
            group = group_size(data.region[-1].min, channel, reductions[-1])
            if group is None or any(uses(r.min, channel) for r in data.region[:-1]):
                return None  # a depthwise convolution or pooling: the window rule's
            packed = stmt.annotations.get(PACKED_ANNOTATION)
            weight_index = [r.min for r in weight.region]
            if packed is None and not (
                len(weight_index) >= 3  # a matmul's weight (2-D) is the matmul rule's
                and len(weight_index) == len(reductions) + 1
                and all(w.same_as(v) for w, v in zip(weight_index, [*reductions, channel], strict=True))
            ):
                return None
            tile_j = int(packed) if packed is not None else conv_width(extents[lead - 1], group, self.lanes)
            if tile_j is None:
                return None
            for producer in producers:
                if sch.get(producer).writes[0].source.same_as(weight.source):
                    return None  # a computed weight (not a parameter)
            # An epilogue that spreads the result over more pixels (a gate) from its
            # first wider block on: a loop of its own, after the tiles.
            wide = next((i for i, b in enumerate(epilogue) if spreads(sch, b, stmt)), len(epilogue))
            epilogue, spread = epilogue[:wide], epilogue[wide:]
            for extra in [*epilogue[:-1], *spread[:-1]]:
                sch.compute_inline(extra)
            tail = epilogue[-1] if epilogue else sch.cache_write(block, 0, "global")
            if len(sch.get(tail).iter_vars) != lead:
                return None
            if spread:
                schedules.rows_parallel(sch, spread[-1], self.lanes)
            keep, extents = images_apart(
                sch, tail, lead, keep, extents, weight=weight.source, data_bytes=input_bytes(stmt, 0)
            )
            flatten_pixels(sch, block, tail, lead, extents, keep)
            pixels = 1
            for extent in extents[: lead - 1]:
                pixels *= extent
            # The input floats per output pixel (an image's, a static batch flattened).
            pixel_floats = buffer_bytes(data.source, keep) // 4 // pixels if isinstance(pixels, int) else 0
            limit = schedules.tile_rows(tile_j, self.lanes)
            # Pixel tiles outside, each sweeping every panel, for a 2-D convolution whose
            # weight stays in L2 (1-D ones measured slower so: wav2vec2's 128-channel
            # feature encoder, 3.6 -> 4.2 ms for its second convolution).
            in_l2 = lead == 4 and buffer_bytes(weight.source) <= schedules.ROW_MAJOR_MAX_B_BYTES
            per_block = tile(sch, block, tail, pixels, limit, tile_j, True, keep, pixel_floats, in_l2)
            # Each input element is read once per output-channel tile.
            reads = [*extents[: lead - 1], extents[lead - 1] // tile_j, *extents[lead:]]
            producers = inline_plain_copies(sch, producers)
            # An image's first convolution (3 input channels, stride 2) reads each padded
            # element about twice: its copy went to memory at batch 8 (1.24 to 0.94 ms
            # without it, MobileNetV3-small). Wider inputs keep theirs: inlined, the
            # bounds tests in the micro-kernel slowed ResNet-18's convs 1.3x.
            if extents[-1] < self.lanes:
                producers = inline_cheap_padding(sch, producers, reads, any_size=False)
            finish_producers(sch, producers, self.lanes)
            if packed is not None:
                prefetched = prefetch_streamed_weight(sch, block, per_block, self.prefetch_tiles)
                if prefetched is not sch:
                    return prefetched
            if self.stream_bytes:
                inputs = streamed(data.source, self.stream_bytes)
                outputs = streamed(stmt.writes[0].source, self.stream_bytes)
                if inputs or outputs:
                    return prefetch_next_pixels(sch, block, tail, weight.source, keep, inputs, outputs)
            return sch

    class WindowRule(base):  # type: ignore[misc, valid-type]
        """``Y[p..., c] = reduce_r X[g(p..., r...), c + ...] (* W[r..., c])`` (+ epilogue):
        depthwise convolutions and pooling, channels vectorized (module docstring, item 3)."""

        what = "channels-last window"

        def __init__(self, lanes: int, stream_bytes: int = 0) -> None:
            super().__init__(lanes)
            self.stream_bytes = stream_bytes  # :func:`stream_bytes`; 0: never

        def _pixels(self, tile_j: int) -> int:
            """Output pixels a tile ``tile_j`` channels wide has at most."""
            return min(WINDOW_PIXELS, schedules.tile_rows(tile_j, self.lanes))

        def _tile(self, widths: list[int], extents: list[Any], lead: int, keep: int) -> tuple[int, int, int]:
            """The register tile (rows, channels) and its pixel limit, of ``widths``.

            The widest tile, unless its pixels would be ragged both ways (no height
            dividing the row in at least half of its rows, none dividing the flattened
            pixels either): then the widest whose height divides the row so. SqueezeNet's
            max pool over 55 x 55 x 64 in 5 x 32 tiles, not 3 x 64 ones over flattened
            pixels, masked, which ran 2.3x as long (3.4x on two threads: the parallel loop
            was the one panel). Images apart (a large batch) keep the widest: their
            flattened tiles were measured so (EfficientNet-B0's 7 x 7 maps at batch 8)."""
            width = extents[lead - 2]
            spatial = extents[keep : lead - 1]
            pixels = math.prod(spatial) if all(isinstance(e, int) for e in spatial) else 0
            tile_j = widths[0]
            ragged = not (_row_tiles(width, self._pixels(tile_j)) or _whole_tiles(pixels, self._pixels(tile_j)))
            if ragged and (not keep or (isinstance(width, int) and width >= WINDOW_LONG_ROW)):
                tile_j = next((w for w in widths if _row_tiles(width, self._pixels(w))), tile_j)
            limit = self._pixels(tile_j)
            # A tile on the stack (in registers) where one divides the row (56 or 112
            # pixels: 7 x 32, not 8 x 32 in a workspace allocated and zeroed per tile,
            # its accumulators stored after every FMA), as in the convolution rule.
            tile_i = schedules.stack_rows(width, limit, tile_j) or _row_divisor(width, limit)
            return tile_i, tile_j, limit

        def _schedule(self, func: Any) -> Any:
            sch = s_tir.Schedule(func)
            parts = reduction_parts(sch)
            if parts is None or not parts[3].reads:
                return None
            producers, block, epilogue, stmt, lead, extents, keep = parts
            ivars = [iv.var for iv in stmt.iter_vars]
            channel = ivars[lead - 1]
            write = [r.min for r in stmt.writes[0].region]
            if len(write) != lead or not all(w.same_as(v) for w, v in zip(write, ivars[:lead], strict=True)):
                return None
            for read in stmt.reads:
                last = read.region[-1].min
                if read.source.same_as(stmt.writes[0].source):
                    continue
                if not uses(last, channel) or any(uses(r.min, channel) for r in read.region[:-1]):
                    return None
                if not (last.same_as(channel) or _is_channel_plus_reduction(last, channel, ivars[lead:])):
                    return None
            channels = extents[lead - 1]
            widths = [w for w in WINDOW_WIDTHS if channels % w == 0]
            if not widths:
                return None
            pool = len(operands(stmt)) < 2
            streaming = lead == 4 and self.stream_bytes > 0 and not pool and streams(stmt, self.stream_bytes)
            for extra in epilogue[:-1]:
                sch.compute_inline(extra)
            tail = epilogue[-1] if epilogue else sch.cache_write(block, 0, "global")
            if len(sch.get(tail).iter_vars) != lead:
                return None
            sources = sorted(operands(stmt), key=buffer_bytes)
            keep, extents = images_apart(
                sch, tail, lead, keep, extents, weight=sources[0] if len(sources) > 1 else None,
                data_bytes=input_bytes(stmt, 0),
            )
            tail_extents = [iv.dom.extent for iv in sch.get(tail).iter_vars]
            same = all(
                isinstance(t, tirx.IntImm) and int(t) == e
                for t, e in zip(tail_extents[keep:lead], extents[keep:lead], strict=True)
            )
            tiled = same and lead - 1 - keep >= 2
            narrow = [w for w in widths if w <= self.lanes] if self.lanes in widths else widths
            tile_i, tile_j, limit = self._tile(narrow if streaming else widths, extents, lead, keep)
            if streaming and not (tiled and 2 * tile_i >= limit):
                # The rows' prefetch needs row tiles: the tile as where nothing streams
                # (SqueezeNet's max pools over 55 x 55 x 128 at batch 8: 3 x 64 row tiles,
                # not 8 x 16 ones over flattened pixels, which ran 3.5x ORT's time).
                streaming = False
                tile_i, tile_j, limit = self._tile(widths, extents, lead, keep)
            row_tiled = tiled and 2 * tile_i >= limit
            if row_tiled:
                rows = 1
                for extent in extents[keep : lead - 2]:
                    rows *= extent
                row_bytes = max(input_bytes(stmt, keep) // rows, 1)
                fitting = [d for d in range(2, rows + 1) if rows % d == 0 and d * row_bytes <= WINDOW_BLOCK_BYTES]
                block_rows = max(fitting, default=1)
                producers = inline_cheap_padding(sch, producers, extents)
                unroll_small_window(sch, block)
                row_tile(sch, block, tail, lead, keep, (tile_i, tile_j), block_rows)
            else:
                flatten_pixels(sch, block, tail, lead, extents, keep)
                unroll_small_window(sch, block)
                pixels = 1
                for extent in extents[: lead - 1]:
                    pixels *= extent
                tile(sch, block, tail, pixels, limit, tile_j, False, keep)
            finish_producers(sch, producers, self.lanes)
            if streaming and row_tiled:
                return prefetch_window_rows(sch, sch.get(block).name_hint, lead, (tile_i, tile_j))
            return sch

    def _row_divisor(width: int, limit: int) -> int:
        """The largest divisor of ``width`` (an image row's pixels) up to ``limit``."""
        return max(d for d in range(1, limit + 1) if width % d == 0)

    def _row_tiles(width: int, limit: int) -> bool:
        """Whether tiles of at least half of ``limit`` pixels divide a row ``width`` long."""
        return 2 * _row_divisor(width, limit) >= limit

    def _whole_tiles(pixels: int, limit: int) -> bool:
        """Whether tiles of at least half of ``limit`` pixels divide ``pixels`` (0: symbolic)."""
        return pixels > 0 and 2 * _row_divisor(pixels, limit) >= limit

    def unroll_small_window(sch: Any, block: Any) -> None:
        """Unrolls the window's loops (its reduction: the kernel's rows and columns)
        where it has at most ``WINDOW_UNROLL_TAPS`` taps (the constant's comment says
        why); after any change of the block's layout (which makes new loops): the
        annotations stay on the loops through the tiling's splits and reorder."""
        stmt = sch.get(block)
        count = sum(iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars)
        loops = sch.get_loops(block)
        window = loops[len(loops) - count :]
        extents = [sch.get(loop).extent for loop in window]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return
        taps = 1
        for extent in extents:
            taps *= int(extent)
        if taps <= WINDOW_UNROLL_TAPS:
            for loop in window:
                sch.unroll(loop)

    def prefetch_streamed_weight(sch: Any, block: Any, pixels: Any, max_tiles: int | None) -> Any:
        """``sch`` with the next weight panel prefetched in the micro-kernel
        (:func:`.schedules.prefetch_next_panel`) where the packed weight is streamed from
        memory (:func:`.schedules.streams_weight`: a large weight, few tiles of the
        ``pixels`` of a block; ResNet-18's last stage at batch 1: 7 x 7 pixels, a 9 MiB
        3 x 3 x 512 x 512 weight), as the matmul rule does. Only where the panels and pixel tiles are one
        parallel loop (:func:`tile`: static, whole tiles)."""
        loops = [sch.get(loop) for loop in sch.get_loops(block)]  # (panels, tiles), reduction..., tile
        weight = sch.get(block).reads[-1].source  # the update reads Y, X, W
        *reduction, pixel, _ = loops[1:]
        steps = int(reduction[-1].extent) if reduction[-1].kind == tirx.ForKind.UNROLLED else 1
        serial = reduction[:-1] if steps > 1 else reduction
        tile_i = int(pixel.extent)
        if not isinstance(pixels, int) or pixels % tile_i or not serial:
            return sch
        tiles = pixels // tile_i
        if not schedules.streams_weight(buffer_bytes(weight), tile_i, tiles, max_tiles) or loops[0].kind != tirx.ForKind.PARALLEL:
            return sch
        # The parallel loop fuses (images of a symbolic batch, pixel blocks,) panels and
        # the pixel tiles of a block.
        panels = int(weight.shape[0])
        if not sym.Analyzer().can_prove(tirx.floormod(loops[0].extent, tiles * panels) == 0):
            return sch
        iteration, iterations = tirx.const(0, "int64"), 1
        for loop in serial:
            iteration = iteration * loop.extent + loop.loop_var
            iterations *= int(loop.extent)
        fused = loops[0].loop_var
        position = tirx.floormod(fused, tiles) * iterations + iteration
        counts = (tiles, steps)
        panel = tirx.floormod(tirx.floordiv(fused, tiles), panels)
        return schedules.prefetch_next_panel(sch, weight, serial[-1], panel, position, counts)

    def buffer_bytes(buffer: Any, keep: int = 0) -> int:
        """Bytes of ``buffer`` (its ``keep`` leading axes left out); 0 if it is symbolic."""
        size = (tvm.DataType(str(buffer.dtype)).bits + 7) // 8
        for extent in list(buffer.shape)[keep:]:
            size *= int(extent) if isinstance(extent, tirx.IntImm) else 0
        return size

    def streams(stmt: Any, min_bytes: int) -> bool:
        """Whether a window streams its input: a batch of images (a symbolic one counts
        as :data:`STREAM_SYMBOLIC_IMAGES`) of at least ``min_bytes``."""
        source = max(operands(stmt), key=lambda buffer: buffer_bytes(buffer, 1), default=None)
        return source is not None and streamed(source, min_bytes)

    def streamed(buffer: Any, min_bytes: int) -> bool:
        """Whether ``buffer`` holds a batch of images of at least ``min_bytes`` (a symbolic
        batch counted as :data:`STREAM_SYMBOLIC_IMAGES`)."""
        if not buffer.shape:
            return False
        batch = buffer.shape[0]
        images = int(batch) if isinstance(batch, tirx.IntImm) else STREAM_SYMBOLIC_IMAGES
        return images >= 2 and images * buffer_bytes(buffer, 1) >= min_bytes

    def input_bytes(stmt: Any, keep: int) -> int:
        """Bytes of the largest buffer a window reads, per image of a symbolic batch
        (``keep`` leading axes left out)."""
        return max((buffer_bytes(source, keep) for source in operands(stmt)), default=0)

    def operands(stmt: Any) -> list[Any]:
        """The buffers a block reads, but the one it accumulates into."""
        return [read.source for read in stmt.reads if not read.source.same_as(stmt.writes[0].source)]

    def inline_cheap_padding(
        sch: Any, producers: list[Any], extents: list[int], *, any_size: bool = True
    ) -> list[Any]:
        """The padding copies still worth making, of a block reading each input element
        once per iteration of ``extents``: one whose elements are each read fewer than
        :data:`WINDOW_COPY_READS` times, or (``any_size`` false: not) larger than
        :data:`WINDOW_BLOCK_BYTES` (written to memory, not L2: at batch 8, MobileNetV3's
        5x5 depthwise convs ran 1.5x slower with it), is inlined (its bounds test moves
        into the loads)."""
        reads = 1
        for extent in extents:
            reads *= extent
        kept = []
        for producer in producers:
            buffer = sch.get(producer).writes[0].source
            # A symbolic batch counts as one image, as the reads do (a copy kept for any
            # batch ran MobileNetV3's symbolic depthwise convs at 2x their fixed time);
            # its copy holds every image, of any size: where size matters (``any_size``)
            # it is inlined, as a fixed batch's copy past WINDOW_BLOCK_BYTES is
            # (MobileNetV3-small symbolic, batch 8: 6% faster; batch 1 level).
            batch = 1 if not isinstance(buffer.shape[0], tirx.IntImm) else 0
            copied, size = 1, buffer_bytes(buffer, batch)
            for extent in list(buffer.shape)[batch:]:
                copied *= int(extent) if isinstance(extent, tirx.IntImm) else 0
            large = batch or size > WINDOW_BLOCK_BYTES
            if copied and (reads < WINDOW_COPY_READS * copied or any_size and large):
                try:
                    sch.compute_inline(producer)
                    continue
                except Exception:  # not a plain padding: it stays a copy
                    pass
            kept.append(producer)
        return kept

    def row_tile(sch: Any, block: Any, tail: Any, lead: int, keep: int, tile: tuple[int, int], rows_per_block: int) -> None:
        """The window's register tile: ``tile_i`` neighbouring pixels of one image row
        (``tile_i`` divides the row) x ``tile_j`` channels, accumulated over the window,
        ``tail`` (the epilogue) on each finished tile. Within a row, every input address
        is the tile's base plus a constant (no per-pixel division: pixels flattened across
        rows cost a ``// W`` and ``% W`` per load, and the loads' addresses were computed
        in scalar code, four instructions per FMA).

        Loops, outside in: blocks of ``rows_per_block`` output rows (their input in L2),
        channel tiles, the rows of the block, the tiles along the row: one channel slice
        of a block's input stays in L1 while its rows are swept, and the input is read
        from memory once (channel tiles outside all rows read a large input once per
        tile: 3x slower at batch 8)."""
        tile_i, tile_j = tile
        loops = sch.get_loops(block)
        outer, rows, width, channel, reduction = (
            loops[:keep], loops[keep : lead - 2], loops[lead - 2], loops[lead - 1], loops[lead:]
        )
        wo, wi = sch.split(width, [None, tile_i])
        co, ci = sch.split(channel, [None, tile_j])
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        ro, ri = sch.split(row, [None, rows_per_block])
        sch.reorder(*outer, ro, co, ri, wo, *reduction, wi, ci)
        sch.reverse_compute_at(tail, wo)
        sch.set_scope(block, 0, schedules.tile_scope(tile_i, tile_j))
        sch.vectorize(ci)
        sch.unroll(wi)
        sch.vectorize(sch.get_loops(tail)[-1])
        sch.parallel(sch.fuse(*outer, ro, co, ri, wo))
        sch.decompose_reduction(block, reduction[0])

    def _is_channel_plus_reduction(expr: Any, channel: Any, reductions: list[Any]) -> bool:
        """``c + r`` with ``r`` a unit reduction (a depthwise convolution's input channel)."""
        return isinstance(expr, tirx.Add) and expr.a.same_as(channel) and any(expr.b.same_as(r) for r in reductions)

    _RULES["conv"] = ConvRule
    _RULES["window"] = WindowRule
    return _RULES
