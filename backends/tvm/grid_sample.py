"""ONNX ``GridSample`` for the importer: 2-D maps sampled by our kernel on CPU targets.

TVM's converter lowers ``GridSample`` to ``topi.image.grid_sample``, which computes every
output element alone: the grid's coordinates, their floors and the four taps' bounds are
computed again for each channel. Deformable DETR's multi-scale deformable attention
samples 64-channel maps at every query's points, and those samples took 63 of its 125
ms (3.7x ONNX Runtime's ``GridSample``). Here a 2-D node (``linear``/``bilinear`` or
``nearest``, any padding mode, either ``align_corners``) becomes, in Relax::

    out = call_tir(rewriter_grid_sample, (data, grid))   # [n, c, ho, wo]

with the kernel of :mod:`rewriter.backends.tvm.kernels.grid_sample` (each point's taps
found once, then gathered per channel). Every size may be symbolic. TVM's converter
keeps the others: ``cubic``/``bicubic``, volumetric (5-D) maps, dtypes other than
float32, GPU targets.
"""

from __future__ import annotations

from typing import Any

from rewriter.backends.tvm.relax_passes import dims_of

KERNEL_NAME = "rewriter_grid_sample"
# Opset 16 names the modes as torch does; opset 20 as ONNX's resize does.
MODE_NAMES = {"bilinear": "linear", "linear": "linear", "nearest": "nearest"}


def convert(bb: Any, inputs: list, attrs: dict, target: Any) -> Any | None:
    """The Relax expression of the ``GridSample`` node's output, or None where TVM's
    converter takes the node (see the module docstring)."""
    from tvm import relax

    from rewriter.backends.tvm.kernels import grid_sample as kernel
    from rewriter.backends.tvm.ops import attribute_text, kernel_dim, scheduled_kernel

    if target.kind.name != "llvm":
        return None
    mode = MODE_NAMES.get(attribute_text(attrs.get("mode", "bilinear")))
    padding = attribute_text(attrs.get("padding_mode", "zeros"))
    data, grid = bb.normalize(inputs[0]), bb.normalize(inputs[1])
    data_dims, grid_dims = dims_of(data), dims_of(grid)
    if (
        mode is None
        or padding not in kernel.PADDINGS
        or data_dims is None
        or grid_dims is None
        or len(data_dims) != 4
        or len(grid_dims) != 4
        or str(data.ty.dtype) != "float32"
        or str(grid.ty.dtype) != "float32"
    ):
        return None
    batch, channels, height, width = data_dims
    out_height, out_width = grid_dims[1], grid_dims[2]
    func = kernel.grid_sample(
        kernel_dim(batch, "batch"),
        kernel_dim(channels, "channels"),
        kernel_dim(height, "height"),
        kernel_dim(width, "width"),
        kernel_dim(out_height, "out_height"),
        kernel_dim(out_width, "out_width"),
        mode=mode,
        padding=padding,
        align_corners=bool(int(attrs.get("align_corners", 0))),
        target=target,
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAME)
    out = relax.TensorType([batch, channels, out_height, out_width], "float32")
    return bb.emit(relax.call_tir(gvar, [data, grid], out))
