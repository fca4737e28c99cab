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
Exact: the same products, one term each. Other transposed convolutions keep their form,
channels-first (:data:`rewriter.backends.tvm.relax_passes.conv.KEEP_FIRST`).

>>> mod = blocks_as_conv2d()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of, rewrite_calls

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
