"""A 3-D convolution runs as a 2-D one over its depth taps stacked into the channels.

TVM has no CPU schedule for ``conv3d``: its default lowering ran torchvision's R3D-18
(video, 8 x 112 x 112 frames) at 60x ONNX Runtime's time. A 3-D convolution is a 2-D
one per output frame whose input channels are the ``kd`` input frames it reads::

    y[n, d] = sum_t conv2d(x[n, d * s + t * dilation], w[t])
            = conv2d(concat_t x[n, d * s + t * dilation], w over (t, c))

The pass runs on channels-last convolutions (``NDHWC``/``DHWIO``: after
:func:`rewriter.backends.tvm.relax_passes.conv.channels_last`'s ``ConvertLayout``, so the
frames between convolutions stay channels-last, as images do). The input, padded in
depth, is sliced once per depth tap (a strided slice: the frames that tap reads for
each output frame), the slices stacked along the channels (per group: ``[groups, taps,
channels]``), and the frames reshaped into the batch: ``[batch x frames, h, w, taps x
c]``, a view. The filter's taps move into its input channels (at compile time). The
2-D convolution then takes every path a convolution takes here (register tiles,
Winograd for 3 x 3 taps), and its output ``[batch x frames, h, w, o]`` is the 3-D
one's by a reshape, a view again: no transpose anywhere (channels-first, the frames
went in and out of the batch by transposes; a symbolic batch kept each a kernel of its
own, and R3D-18's symbolic library ran at 1.3-1.5x its fixed one's time). Exact: the
same products, summed in another order. The stacked input is ``kd`` times the input
(3x for 3 x 3 x 3 filters); a filter of one depth tap reads the input as it is.

>>> mod = conv3d_as_conv2d()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, rewrite_calls

if TYPE_CHECKING:
    import tvm


def conv3d_as_conv2d() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="Conv3dAsConv2d")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_calls(mod, {"relax.nn.conv3d"}, as_conv2d)

    return pass_


def as_conv2d(builder: Any, call: Any) -> Any:
    """``call`` (a ``conv3d``) as the module docstring's 2-D convolution, or None where
    its layouts are not ``NDHWC``/``DHWIO`` or its filter's shape is not static."""
    from tvm import relax, tirx

    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NDHWC", "DHWIO", "NDHWC"):
        return None
    x, weight = call.args
    shape, weight_shape, out_shape = dims_of(x), dims_of(weight), dims_of(call)
    if shape is None or weight_shape is None or out_shape is None:
        return None
    if not all(isinstance(extent, tirx.IntImm) for extent in weight_shape):
        return None
    batch, _, height, width, channels = shape
    taps, kernel_h, kernel_w, group_channels, outputs = (int(e) for e in weight_shape)
    frames = out_shape[1]
    groups = int(attrs.groups)
    stride = int(attrs.strides[0])
    dilation = int(attrs.dilation[0])
    front, back = int(attrs.padding[0]), int(attrs.padding[3])
    emit = builder.emit

    padded = x
    if front or back:
        padded = emit(relax.op.nn.pad(x, [0, 0, front, back, 0, 0, 0, 0, 0, 0]))
    slices = []
    for tap in range(taps):
        start = tap * dilation
        reads = (frames - 1) * stride + 1
        if taps == 1 and stride == 1 and not (front or back):
            slices.append(x)  # the frames as they are
            continue
        slices.append(
            emit(
                relax.op.strided_slice(
                    padded, axes=[1], begin=[start], end=[start + reads], strides=[stride], assume_inbound=True
                )
            )
        )
    images = [batch * frames, height, width]
    if group_channels == 1 and groups > 1 and taps > 1:
        return _depthwise_taps(builder, call, slices, images)
    if groups == 1:
        stacked = slices[0] if taps == 1 else emit(relax.op.concat(slices, axis=4))
    else:  # per group, its taps' channels side by side: [n, d, h, w, groups, taps, channels / groups]
        split = [
            emit(relax.op.expand_dims(emit(relax.op.reshape(part, [batch, frames, height, width, groups, group_channels])), 5))
            for part in slices
        ]
        stacked = split[0] if taps == 1 else emit(relax.op.concat(split, axis=5))
    stacked = emit(relax.op.reshape(stacked, [*images, taps * channels]))
    # The filter's depth taps before its input channels: [kh, kw, taps, c / groups, o].
    filters = emit(relax.op.permute_dims(weight, [1, 2, 0, 3, 4]))
    filters = emit(relax.op.reshape(filters, [kernel_h, kernel_w, taps * group_channels, outputs]))
    planes = emit(relax.op.nn.conv2d(stacked, filters, **_spatial(call)))
    return relax.op.reshape(planes, out_shape)


def _spatial(call: Any) -> dict[str, Any]:
    """``call``'s (a ``conv3d``) height and width attributes, as a channels-last ``conv2d``'s."""
    attrs = call.attrs
    return {
        "strides": [int(attrs.strides[1]), int(attrs.strides[2])],
        "padding": [int(attrs.padding[i]) for i in (1, 2, 4, 5)],
        "dilation": [int(attrs.dilation[1]), int(attrs.dilation[2])],
        "groups": int(attrs.groups),
        "data_layout": "NHWC",
        "kernel_layout": "HWIO",
        "out_layout": "NHWC",
        "out_dtype": attrs.out_dtype,
    }


def _depthwise_taps(builder: Any, call: Any, slices: list[Any], images: list[Any]) -> Any:
    """A depthwise ``call`` (one input channel a group) as the sum of one depthwise 2-D
    convolution a depth tap: stacked, a group's taps would make a 2-D convolution of
    ``kd`` channels a group, which no rule here tiles; each tap's is a depthwise one,
    which the window rule does, and the sum of the taps fuses into their epilogues."""
    from tvm import relax

    weight = call.args[1]
    _, kernel_h, kernel_w, _, outputs = (int(e) for e in weight.ty.shape.values)
    total = None
    for tap, part in enumerate(slices):
        tap_filter = builder.emit(relax.op.strided_slice(weight, axes=[0], begin=[tap], end=[tap + 1]))
        tap_filter = builder.emit(relax.op.reshape(tap_filter, [kernel_h, kernel_w, 1, outputs]))
        channels = part.ty.shape.values[4]
        plane = builder.emit(relax.op.reshape(part, [*images, channels]))
        plane = builder.emit(relax.op.nn.conv2d(plane, tap_filter, **_spatial(call)))
        total = plane if total is None else builder.emit(relax.op.add(total, plane))
    return relax.op.reshape(total, dims_of(call))
