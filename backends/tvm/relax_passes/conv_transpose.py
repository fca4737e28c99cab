"""A transposed convolution whose stride equals its kernel is a 1 x 1 convolution and a
depth-to-space.

The upsampling of U-Nets, FPNs and DPT's reassemble stage (``ConvTranspose2d(k, k,
stride=k)``, k = 2 or 4) writes each input pixel's ``k x k`` block of outputs, blocks
not overlapping::

    y[n, o, h * k + i, w * k + j] = sum_c x[n, c, h, w] * W[c, o, i, j]

that is a 1 x 1 convolution to ``o * k * k`` channels (a matmul over the pixels, which
the convolution rule tiles), its channels then moved into the ``k x k`` blocks. TVM has
no CPU schedule for ``conv2d_transpose`` and no lowering of it channels-last (a DPT
export crashed in VM codegen: "CodeGenVM cannot emit this Relax operator directly").
Exact: the same products, one term each.

Overlapping ones (kernel longer than the stride: EnCodec's and SEANet's decoders,
``ConvTranspose1d(k = 2s, stride s)``; GAN and FCN upsamplers) are a matmul and an
overlap-add (:func:`overlap_add`): each input position's contribution to every output
channel and tap, ``cols[n, t, (o, k)] = sum_c x[n, c, t] * W[c, o, k]`` (the weight a
constant ``[C, O·K]`` matrix, so the matmul rule packs it), then each output summed from
the ``ceil(K / s)`` taps that reach it, ``y[n, o, j] = sum_m cols[n, t, (o, k)]`` with
``k = (j + p) mod s + m·s`` and ``t = (j + p) div s - m`` (and so per axis in 2-D). TVM's
lowering of ``conv1d_transpose`` was a scalar loop nest over every tap of every input
channel: EnCodec's decoder took 1.6 s against ONNX Runtime's 18 ms. Exact up to the
order of the additions. Grouped and dilated ones keep their form, channels-first
(:data:`rewriter.backends.tvm.relax_passes.conv.KEEP_FIRST`).

>>> mod = blocks_as_conv2d()(mod)  # doctest: +SKIP
>>> mod = overlap_add()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, product, rewrite_calls

if TYPE_CHECKING:
    import tvm


def blocks_as_conv2d() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ConvTransposeBlocks")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_calls(mod, {"relax.nn.conv2d_transpose"}, as_blocks)

    return pass_


def as_blocks(builder: Any, call: Any) -> Any:
    """``call`` (a ``conv2d_transpose``) as the module docstring's 1 x 1 convolution and
    depth-to-space, or None where its blocks overlap or are padded, or it is grouped."""
    from tvm import relax, tirx

    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "IOHW", "NCHW"):
        return None
    x, weight = call.args
    shape, weight_shape = dims_of(x), dims_of(weight)
    if shape is None or weight_shape is None:
        return None
    if not all(isinstance(extent, tirx.IntImm) for extent in weight_shape):
        return None
    channels, outputs, kernel_h, kernel_w = (int(e) for e in weight_shape)
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [kernel_h, kernel_w]:
        return None
    if any(int(p) for p in [*attrs.padding, *attrs.output_padding]) or any(int(d) != 1 for d in attrs.dilation):
        return None
    batch, _, height, width = shape
    emit = builder.emit
    # W[c, o, i, j] -> [(o, i, j), c, 1, 1]
    filters = emit(relax.op.permute_dims(weight, [1, 2, 3, 0]))
    filters = emit(relax.op.reshape(filters, [outputs * kernel_h * kernel_w, channels, 1, 1]))
    blocks = emit(relax.op.nn.conv2d(x, filters, out_dtype=attrs.out_dtype))
    blocks = emit(relax.op.reshape(blocks, [batch, outputs, kernel_h, kernel_w, height, width]))
    blocks = emit(relax.op.permute_dims(blocks, [0, 1, 4, 2, 5, 3]))  # [n, o, h, i, w, j]
    return relax.op.reshape(blocks, [batch, outputs, height * kernel_h, width * kernel_w])


_LAYOUTS = {
    "relax.nn.conv1d_transpose": ("NCW", "IOW", "NCW"),
    "relax.nn.conv2d_transpose": ("NCHW", "IOHW", "NCHW"),
}


def overlap_add() -> tvm.transform.Pass:
    """The Relax pass of the overlapping transposed convolutions (module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ConvTransposeOverlapAdd")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_calls(mod, set(_LAYOUTS), as_overlap_add)

    return pass_


def as_overlap_add(builder: Any, call: Any) -> Any:
    """``call`` (a 1-D or 2-D transposed convolution) as a matmul and an overlap-add, or
    None where it is grouped, dilated, not channels-first or of a weight of unknown
    shape."""
    from tvm import relax, tirx

    attrs = call.attrs
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != _LAYOUTS[call.op.name]:
        return None
    x, weight = call.args
    shape, weight_shape, out_shape = dims_of(x), dims_of(weight), dims_of(call)
    if shape is None or weight_shape is None or out_shape is None:
        return None
    if not all(isinstance(extent, tirx.IntImm) for extent in weight_shape[1:]):
        return None
    if int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation):
        return None
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", str(x.ty.dtype)):
        return None
    rank = len(shape) - 2
    channels, outputs = weight_shape[0], int(weight_shape[1])
    kernel = [int(k) for k in weight_shape[2:]]
    emit = builder.emit
    # x [n, c, *s] -> [n, prod(s), c]; W [c, o, *k] -> [c, o·prod(k)]
    rows = emit(relax.op.permute_dims(x, [0, *range(2, 2 + rank), 1]))
    positions = product(shape[2:])
    rows = emit(relax.op.reshape(rows, [shape[0], positions, channels]))
    matrix = emit(relax.op.reshape(weight, [channels, outputs * product(kernel)]))
    cols = emit(relax.op.matmul(rows, matrix))
    strides = [int(stride) for stride in attrs.strides]
    before = [int(pad) for pad in attrs.padding[:rank]]
    return builder.call_te(
        _overlap_add, cols, list(shape[2:]), list(out_shape), outputs, kernel, strides, before,
        primfunc_name_hint=f"overlap_add{rank}d",
    )  # fmt: skip


def _overlap_add(
    cols: Any, sizes: list, out_shape: list, outputs: int, kernel: list[int], strides: list[int], before: list[int]
) -> Any:
    """The TE compute of the overlap-add: ``cols[n, position, (o, *k)]`` to ``y[n, o, *j]``.

    The ``ceil(k / s)`` taps that reach an output are summed as terms of one expression,
    not as a reduction: the function is elementwise, and the elementwise schedule's
    parallel rows and vectors take it (as a reduction of two taps per output, each
    output was a row of the row-reduction rule, its index a division by the symbolic
    length: EnCodec's decoder at symbolic sizes, 4-5x its time at fixed ones)."""
    import itertools

    from tvm import te, tirx

    taps = [-(-k // s) for k, s in zip(kernel, strides, strict=True)]

    def element(n: Any, o: Any, *j: Any) -> Any:
        total = None
        for step in itertools.product(*(range(count) for count in taps)):
            inside, position, tap = [], 0, o
            for axis, (index, m) in enumerate(zip(j, step, strict=True)):
                q = index + before[axis]
                k = tirx.floormod(q, strides[axis]) + m * strides[axis]
                t = tirx.floordiv(q, strides[axis]) - m
                inside += [k < kernel[axis], t >= 0, t < sizes[axis]]
                position = position * sizes[axis] + tirx.max(tirx.min(t, sizes[axis] - 1), 0)
                tap = tap * kernel[axis] + tirx.min(k, kernel[axis] - 1)
            term = tirx.if_then_else(tirx.all(*inside), cols[n, position, tap], tirx.const(0, cols.dtype))
            total = term if total is None else total + term
        return total

    return te.compute(out_shape, element, name="overlap_add")
