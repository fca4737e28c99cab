"""3 x 3 convolutions as Winograd's minimal filtering F(2 x 2, 3 x 3): 2.25x fewer products.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016). Each
2 x 2 tile of output pixels is computed from the 4 x 4 input patch around it as

    Y = A^T [ (G g G^T) . (B^T d B) ] A

with ``g`` the 3 x 3 filter, ``d`` the patch, ``.`` the element-wise product over the 16
positions, summed over input channels. Over channels the element-wise products are 16
matrix products, one per position ``e``: ``M[e] = V[e] @ U[e]``, ``V[e]`` ``[tiles, C]``
(the transformed patches), ``U[e]`` ``[C, K]`` (the transformed filters). So a convolution
of ``9 C K`` products per output pixel costs ``16 C K / 4 = 4 C K`` per output pixel in
the matrix products, plus the two transforms (additions and subtractions, no products but
the output transform's signs).

The pass rewrites a channels-last ``conv2d`` (``NHWC``, ``HWIO``: after
:func:`rewriter.backends.tvm.relax_passes.conv.channels_last`) whose filter is a constant
3 x 3, stride 1, no dilation, one group, float32, into:

1. ``V = input_transform(x)``, ``[16, N * tiles, C]`` under a static batch, ``[N, 16,
   tiles, C]`` under a symbolic one (so the products' rows, one image's tiles, stay a
   static extent); a TE function, the padding folded in: positions outside the image
   read zeros. Marked opaque, so ``FuseOps`` does not
   inline a producer into its gathers (each input pixel is read by four patches);
2. ``M = matmul(V, U)``, ``U`` the filter transformed at compile time, ``[16, C, K]``
   (broadcast over a symbolic batch): our matmul rule's register tiles;
3. ``Y = output_transform(M)``, ``[N, H_out, W_out, K]``: a TE function marked
   out-element-wise fusable, as a convolution is, so the bias, activation and residual
   after it fuse into it and a transpose (which would reorder its loops) does not.

Where it pays: the matrix products reuse each transformed filter ``N * tiles`` times; at
few tiles (7 x 7 outputs at batch 1: 16 tiles) the convolution is bound by reading its
filter, and ``U`` is 16 / 9 of it, so those stay direct convolutions (:data:`MIN_TILES`,
counted over a static batch, per image under a symbolic one); so do convolutions of few
channels (:data:`MIN_CHANNELS`, :data:`MIN_PRODUCTS`).

``V`` is 4x the input, written by the input transform and read right after by the
products: where a static batch's ``V`` overflows the cache (:data:`PATCH_BYTES`), the
three steps run in chunks (:func:`patch_chunks`: runs of whole images, or bands of tile
rows of one image), and the chunks' outputs are concatenated (the concatenation fuses
with the convolution's epilogue). Under a symbolic batch the chunks are bands of tile
rows of every image, sized for :data:`SYMBOLIC_IMAGES` images (times the batch's static
factor: a 3-D convolution's frames in the batch).

Not exact in the ``assert_equal`` sense: the transforms add and subtract input values
(and filter values, in float64 at compile time) before the products, so the rounding
differs from the direct sum's; F(2 x 2, 3 x 3)'s transforms have entries 0, +-1 and
+-1/2 only, and the error stays at float32 rounding of the output scale (measured
max relative error ~1e-6 on ResNet-18), within :data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE`.
Larger tiles (F(4 x 4, 3 x 3): 4x fewer products) grow the error by orders of magnitude
and are not used.

>>> mod = winograd_convs()(mod)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from rewriter.backends.tvm.relax_passes import conv, dims_of, rewrite_calls, size_terms
from rewriter.backends.tvm.relax_passes.op_patterns import OPAQUE

if TYPE_CHECKING:
    import tvm

# Output tiles (of a static batch; of one image under a symbolic one) from which a 3 x 3
# convolution is done by Winograd. Below, each transformed filter is reused too few times
# and the direct convolution is faster: 512 channels at 7 x 7 (16 tiles), 1.41 ms against
# 1.11 direct at one thread; 256 at 14 x 14 (49 tiles) 0.72 against 1.11; 7 x 7 at batch
# 8 (128 tiles) 6.4 against 8.7.
MIN_TILES = 32
# Input and output channels must be multiples of this (whole vectors in the transforms).
CHANNEL_MULTIPLE = 16
# ... and at least this many (the matrix products' depth and width), with at least
# MIN_PRODUCTS channel pairs (input x output): the transforms' work grows with the
# channels, the products' with their product, so below it the transforms' share outgrows
# that of 64 -> 64 channels, where the pass was first measured to pay. 32 -> 32 channels
# at 224 x 224 ran 6.99 ms against 6.01 direct on one machine; DenseNet's 128 -> 32
# (4096 pairs, a smaller transform share than 64 -> 64's: its output transform is a
# quarter as wide) 2.05 -> 1.20 ms at 56 x 56, batch 1, one thread (AMD Zen 4).
MIN_CHANNELS = 32
MIN_PRODUCTS = 64 * 64
# The patches V of a static batch (16 floats per input value of each 2 x 2 tile: 4x the
# input) are written by the input transform and read right after by the products; past
# the last-level cache (32 MiB on the machines measured) that is a round trip to memory:
# DenseNet's 128 -> 32 channels at 56 x 56, batch 8 (51 MB of patches) ran its products
# at 65 GFLOP/s against 103 at 28 x 28. A static batch whose patches exceed this many
# bytes goes in chunks that do not (:func:`patch_chunks`), each transformed, multiplied
# and transformed back in turn: in chunks of 13 MB those products ran at 99 GFLOP/s, in
# chunks of 26 MB at 68 (64 -> 64 channels, half the products' reads per flop, ran at
# 103 in one piece of 26 MB and no faster in two).
PATCH_BYTES = 16 << 20
# Under a symbolic batch the patches are per image, ``[batch, 16, tiles, C]``; their size
# grows with the batch, so each image's go in bands sized for this many images (so at
# batch 8, DenseNet's 56 x 56 stage's 51 MB of patches run in four bands of 13 MB), times
# the batch's static factor where it has one (a 3-D convolution's frames in the batch,
# ``batch * 8``: R3D-18's symbolic library at batch 8 wrote 132 MB of patches a band, and
# ran at 1.19x its fixed library's time).
SYMBOLIC_IMAGES = 8
OUT_ELEMWISE_FUSABLE = 4  # ``kOutEWiseFusable``: element-wise consumers fuse into it

# F(2, 3): B^T (4 x 4), G (4 x 3), A^T (2 x 4).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def winograd_convs() -> tvm.transform.Pass:
    """The Relax pass (see the module docstring)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="WinogradConv")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_calls(mod, {"relax.nn.conv2d"}, winograd_conv)

    return pass_


def transformed_filter(weight: np.ndarray) -> np.ndarray:
    """``U[4 a + b, c, k] = (G g[:, :, c, k] G^T)[a, b]`` of an ``HWIO`` 3 x 3 filter,
    computed in float64, as float32 ``[16, C, K]``."""
    u = np.einsum("ai,ijck,bj->abck", G, weight.astype(np.float64), G)
    return u.reshape(16, *weight.shape[2:]).astype(np.float32)


def _pick(index: Any, values: list[int]) -> Any:
    """``values[index]`` for a TIR ``index`` in ``range(len(values))``, as a select chain."""
    from tvm import tirx

    picked = tirx.const(values[-1], "int64")
    for at in range(len(values) - 2, -1, -1):
        picked = tirx.if_then_else(index == at, tirx.const(values[at], "int64"), picked)
    return picked


# Each row of B^T has two non-zeros: row a is d[FIRST[a]] + SIGN[a] * d[SECOND[a]].
FIRST = [0, 1, 2, 1]
SECOND = [2, 2, 1, 3]
SIGN = [-1, 1, -1, -1]


def winograd_conv(builder: Any, call: Any) -> Any:
    """``call`` (a conv2d) as input transform, matrix products and output transform; None
    where the pass does not apply (the module docstring)."""
    import tvm
    from tvm import relax, tirx

    if not conv._is_op(call, "relax.nn.conv2d"):
        return None
    attrs = call.attrs
    if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO":
        return None
    if attrs.out_layout not in (None, "NHWC"):
        return None
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1]:
        return None
    if [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    data, weight = call.args
    if not isinstance(weight, tvm.ir.expr.GenericConst) or not isinstance(
        weight.value, tvm.runtime.Tensor
    ):
        return None
    filt = weight.value.numpy()
    if filt.dtype != np.float32 or filt.shape[:2] != (3, 3):
        return None
    channels, outputs = filt.shape[2:]
    if (
        channels % CHANNEL_MULTIPLE
        or outputs % CHANNEL_MULTIPLE
        or min(channels, outputs) < MIN_CHANNELS
        or channels * outputs < MIN_PRODUCTS
    ):
        return None
    shape, out_shape = dims_of(data), dims_of(call)
    if shape is None or out_shape is None:
        return None
    if str(data.ty.dtype) != "float32" or str(call.ty.dtype) != "float32":
        return None
    _, height, width, _ = shape
    _, out_h, out_w, _ = out_shape
    if not all(isinstance(v, tirx.IntImm) for v in (height, width, out_h, out_w)):
        return None
    height, width, out_h, out_w = int(height), int(width), int(out_h), int(out_w)
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    batch = shape[0]
    images = int(batch) if isinstance(batch, tirx.IntImm) else 1  # a symbolic batch: per image
    if images * tiles_h * tiles_w < MIN_TILES:
        return None
    top, left = int(attrs.padding[0]), int(attrs.padding[1])

    # Under a symbolic batch the patches are ``[batch, 16, tiles, C]``: the matrix products'
    # rows are one image's tiles (of a band), a static extent (as ``[16, batch * tiles, C]``
    # they would be symbolic rows, copied each call to whole register tiles).
    per_image = not isinstance(batch, tirx.IntImm)

    def input_transform(x: Any, chunk: Chunk) -> Any:
        """V of ``chunk``'s tiles (all of them under a symbolic batch)."""
        from tvm import te

        first_image, _, first_row, rows = chunk
        chunk_tiles = rows * tiles_w

        def patch(n: Any, th: Any, tw: Any, i: Any, j: Any, c: Any) -> Any:
            row, col = 2 * th + i - top, 2 * tw + j - left
            inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
            return tirx.if_then_else(inside, x[n, row, col, c], tirx.const(0, "float32"))

        def element(n: Any, e: Any, t: Any, c: Any) -> Any:
            a, b = e // 4, e % 4
            th, tw = first_row + t // tiles_w, t % tiles_w
            first_a, second_a = _pick(a, FIRST), _pick(a, SECOND)
            first_b, second_b = _pick(b, FIRST), _pick(b, SECOND)
            sign_a = _pick(a, SIGN).astype("float32")
            sign_b = _pick(b, SIGN).astype("float32")

            def row(i: Any) -> Any:
                return patch(n, th, tw, i, first_b, c) + sign_b * patch(n, th, tw, i, second_b, c)

            return row(first_a) + sign_a * row(second_a)

        if per_image:
            return te.compute(
                (x.shape[0], 16, chunk_tiles, x.shape[3]), element, name="winograd_input"
            )
        return te.compute(
            (16, chunk.images * chunk_tiles, x.shape[3]),
            lambda e, t, c: element(first_image + t // chunk_tiles, e, t % chunk_tiles, c),
            name="winograd_input",
        )

    def output_transform(m: Any, chunk: Chunk) -> Any:
        """``chunk``'s output pixels from its products ``m``."""
        from tvm import te

        chunk_tiles = chunk.rows * tiles_w

        def product(e: int, n: Any, t: Any, k: Any) -> Any:
            return m[n, e, t, k] if per_image else m[e, n * chunk_tiles + t, k]

        def element(n: Any, h: Any, w: Any, k: Any) -> Any:
            t = h // 2 * tiles_w + w // 2
            ph, pw = h % 2, w % 2
            total = tirx.const(0, "float32")
            for a in range(4):
                coef_a = tirx.if_then_else(ph == 0, float(A_T[0, a]), float(A_T[1, a]))
                inner = tirx.const(0, "float32")
                for b in range(4):
                    coef_b = tirx.if_then_else(pw == 0, float(A_T[0, b]), float(A_T[1, b]))
                    inner = inner + coef_b.astype("float32") * product(4 * a + b, n, t, k)
                total = total + coef_a.astype("float32") * inner
            return total

        count = m.shape[0] if per_image else chunk.images
        rows = min(2 * (chunk.first_row + chunk.rows), out_h) - 2 * chunk.first_row
        return te.compute((count, rows, out_w, m.shape[-1]), element, name="winograd_output")

    placeholder_batch = tirx.Var("batch", "int64") if per_image else batch
    transformed = relax.const(transformed_filter(filt), "float32")
    row_bytes = 16 * tiles_w * channels * 4
    if per_image:  # bands of every image, sized for SYMBOLIC_IMAGES images (times a factor)
        chunks = patch_chunks(1, tiles_h, row_bytes, PATCH_BYTES // (SYMBOLIC_IMAGES * static_factor(batch)))
    else:
        chunks = patch_chunks(images, tiles_h, row_bytes)
    outputs = []
    for chunk in chunks:
        gather = input_kernel(
            lambda x, chunk=chunk: input_transform(x, chunk),
            (placeholder_batch, height, width, channels),
        )
        chunk_tiles = chunk.images * chunk.rows * tiles_w
        out_shape = [batch, 16, chunk_tiles, channels] if per_image else [16, chunk_tiles, channels]
        patches = builder.emit(
            relax.call_tir(
                builder.add_func(gather, "winograd_input"),
                [data],
                relax.TensorType(out_shape, "float32"),
            )
        )
        products = builder.emit(relax.op.matmul(patches, transformed))
        # Out-element-wise fusable, as a convolution: its bias, activation and residual
        # fuse into it, a transpose after it (which would reorder its loops) does not.
        outputs.append(
            builder.call_te(
                lambda m, chunk=chunk: output_transform(m, chunk),
                products,
                primfunc_name_hint="winograd_output",
                primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE},
            )
        )
    if len(outputs) == 1:
        return outputs[0]
    # Bands of one image joined along its rows, then the images along the batch.
    images_out, bands = [], []
    for chunk, out in zip(chunks, outputs, strict=True):
        bands.append(builder.emit(out))
        if chunk.first_row + chunk.rows == tiles_h:  # the image's last band
            images_out.append(
                builder.emit(relax.op.concat(bands, axis=1)) if len(bands) > 1 else bands[0]
            )
            bands = []
    return images_out[0] if len(images_out) == 1 else relax.op.concat(images_out, axis=0)


def static_factor(extent: Any) -> int:
    """The constant factor of a symbolic ``extent`` (``batch * 8``: 8), 1 where it is no
    product of a constant and variables (:func:`.size_terms`)."""
    terms = size_terms(extent)
    return terms[0] if terms else 1


class Chunk(NamedTuple):
    """Tiles transformed, multiplied and transformed back together: ``images`` whole
    images from ``first_image``, or, in one image, its tile rows ``first_row`` to
    ``first_row + rows``."""

    first_image: int
    images: int
    first_row: int
    rows: int


def patch_chunks(
    images: int, tiles_h: int, row_bytes: int, budget: int | None = None
) -> list[Chunk]:
    """The chunks of a static batch of ``images`` (``tiles_h`` rows of tiles, their patches
    ``row_bytes`` a row): one where all patches fit ``budget`` bytes (default
    :data:`PATCH_BYTES`); else runs of whole images that do, else bands of rows of each
    image, as equal as they divide.

    >>> patch_chunks(8, 28, 16 * 28 * 128 * 4)  # DenseNet at 56 x 56, batch 8: 51 MB
    [Chunk(first_image=0, images=2, first_row=0, rows=28), Chunk(first_image=2, images=2, first_row=0, rows=28), Chunk(first_image=4, images=2, first_row=0, rows=28), Chunk(first_image=6, images=2, first_row=0, rows=28)]
    >>> patch_chunks(1, 112, 16 * 112 * 32 * 4)  # 224 x 224, 32 channels: 26 MB
    [Chunk(first_image=0, images=1, first_row=0, rows=56), Chunk(first_image=0, images=1, first_row=56, rows=56)]
    >>> len(patch_chunks(8, 14, 16 * 14 * 128 * 4))  # 28 x 28: 13 MB
    1
    """
    budget = budget or PATCH_BYTES
    image_bytes = tiles_h * row_bytes
    if images * image_bytes <= budget:
        return [Chunk(0, images, 0, tiles_h)]
    if image_bytes <= budget:
        runs = -(-images * image_bytes // budget)
        per_run = -(-images // runs)
        return [Chunk(n, min(per_run, images - n), 0, tiles_h) for n in range(0, images, per_run)]
    bands = -(-image_bytes // budget)
    rows = -(-tiles_h // bands)
    return [
        Chunk(n, 1, r, min(rows, tiles_h - r))
        for n in range(images)
        for r in range(0, tiles_h, rows)
    ]


def input_kernel(compute: Any, shape: tuple[Any, ...]) -> Any:
    """The input transform ``compute`` of an ``NHWC`` input of ``shape``, scheduled: tiles
    in parallel, then vectors of channels, the 16 positions of a patch unrolled (their
    coefficients constants, the patch's 16 loads shared)."""
    from tvm import s_tir, te

    x = te.placeholder(shape, "float32", name="x")
    out = compute(x)
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    block = sch.get_sblock("winograd_input")
    *images, position, tile, channel = sch.get_loops(block)  # [16, tiles, C] or [N, 16, tiles, C]
    outer, lanes = sch.split(channel, [None, CHANNEL_MULTIPLE])
    sch.reorder(*images, tile, outer, position, lanes)
    sch.unroll(position)
    sch.vectorize(lanes)
    sch.parallel(sch.fuse(*images, tile) if images else tile)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return func.with_attr("op_pattern", OPAQUE).without_attr("global_symbol")
