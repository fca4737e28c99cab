"""AMX bf16 and int8 matmuls with a constant packed weight and a fused epilogue, as TIR.

The AMX forms of :mod:`rewriter.backends.tvm.kernels.bf16_matmul` (``vdpbf16ps``) and
:mod:`rewriter.backends.tvm.kernels.int8_matmul` (``vpdpbusd``), with their epilogues:

* ``bf16``: ``Y = A_bf16 @ W_bf16 (+ bias)``, accumulated in float32, stored as float32
  or rounded to bfloat16 (to nearest, ties to even);
* ``int8``: ``Y = scale * (A_u8 @ W_s8 - comp) (+ bias)``, accumulated exactly in int32,
  the rest in float32.

The products are those of the VNNI kernels (exact bf16 products summed in float32;
exact int32 sums), in another order: results agree with theirs within float32 rounding
(bf16) or exactly (the int32 sums of int8).

The weight is packed at compile time as ``[groups, K_pad / g, 16, g]``
(:func:`pack_weight`: the VNNI kernels' layout, ``g`` = 2 or 4, zero past column N and
row K, ``groups`` even, ``K_pad`` a multiple of one k-step: 32 bf16 or 64 int8 values),
so one B tile is 1 KiB of contiguous memory (:mod:`rewriter.backends.tvm.kernels.common.amx_tile`).

The kernel: first the blocks of 32 rows of ``A`` that the tiles cannot load in place
(all of them where ``K`` does not fill its k-steps, else the last one of a ragged ``M``)
are copied once into a zero-padded ``32 x K_pad`` buffer each. Then one parallel task
per (chunk of up to :data:`CHUNK` blocks of 32 output channels, block of 32 rows),
chunks outside so that a chunk's weight panel stays in L2 while the rows pass it: one
call of the micro-kernel fills a ``32 x 32 * CHUNK`` float32/int32 buffer (32 KiB, in
L1) and the epilogue reads it, vectorized by 16, storing the real rows and columns of
``Y`` only. Padding costs little beyond the copies: a ragged ``N`` computes at most 31
zero channels, a ragged ``M`` at most 31 zero rows; at ``M`` well below 32 (BERT's MLM
head at ``M = 8``: weight-bound) the VNNI kernels are as fast or faster (measured 70 vs
78 GFLOP/s bf16, 146 vs 192 GOP/s int8), but the choice does not look at ``M`` yet.

Requires static shapes and a target with AMX (:func:`supported`: ``amx-tile`` with
``amx-bf16`` or ``amx-int8``, and AVX-512 for the epilogue). A process runs it only
after Linux has granted it AMX state (``rewriter.backends.tvm.amx_runtime``).

>>> func = amx_matmul("bf16", 128, 384, 1536, bias=True, out_dtype="bfloat16", target=spr)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from rewriter.backends.tvm import targets
from rewriter.backends.tvm.kernels.common import amx_tile
from rewriter.backends.tvm.kernels.cross_entropy import drop_params

CHUNK = 8  # blocks of 32 output channels per micro-kernel call (a 32 x 256 accumulator)
LANES = 16  # float32 lanes of the epilogue's vectors
FEATURES = {"bf16": ("amx-tile", "amx-bf16"), "int8": ("amx-tile", "amx-int8")}
OUT_DTYPES = {"bf16": ("bfloat16", "float32"), "int8": ("float32",)}


def supported(target: tvm.target.Target, kind: str) -> bool:
    """Whether the AMX ``kind`` (``bf16`` or ``int8``) kernel runs on ``target``.

    >>> supported(tvm.target.Target(SAPPHIRE_RAPIDS), "int8"), supported(resolve("avx512"), "int8")  # doctest: +SKIP
    (True, False)
    """
    return targets.x86_has(target, *FEATURES[kind])


def packed_shape(kind: str, k: int, n: int) -> tuple[int, int, int, int]:
    """The shape of the packed weight of a ``K x N`` matmul: ``[groups, K_pad / g, 16, g]``.

    >>> packed_shape("int8", 100, 40), packed_shape("bf16", 384, 1536)
    ((4, 32, 16, 4), (96, 192, 16, 2))
    """
    group, step = amx_tile.KINDS[kind][1], amx_tile.k_step(kind)
    blocks = -(-n // amx_tile.BLOCK)
    return (2 * blocks, -(-k // step) * step // group, LANES, group)


def pack_weight(kind: str, weight: np.ndarray) -> np.ndarray:
    """Pack ``weight`` [K, N] as :func:`packed_shape` says: ``packed[n // 16, k // g, n % 16,
    k % g] = weight[k, n]``, zero past column N and row K.

    >>> packed = pack_weight("bf16", np.arange(4 * 18).reshape(4, 18))  # K = 4, N = 18
    >>> packed.shape, int(packed[1, 1, 1, 0]), int(packed[1, 1, 2, 0]), int(packed[0, 2, 0, 0])
    ((2, 16, 16, 2), 53, 0, 0)
    """
    groups, rows, lanes, group = packed_shape(kind, *weight.shape)
    k, n = weight.shape
    padded = np.zeros((rows * group, groups * lanes), weight.dtype)
    padded[:k, :n] = weight
    return np.ascontiguousarray(padded.reshape(rows, group, groups, lanes).transpose(2, 0, 3, 1))


def amx_matmul(
    kind: str,
    m: int,
    k: int,
    n: int,
    *,
    bias: bool,
    out_dtype: str = "float32",
    target: tvm.target.Target,
) -> tirx.PrimFunc:
    """The PrimFunc of the AMX ``kind`` matmul; see the module docstring.

    Parameters: ``bf16``: ``(A [m, k] bfloat16, W_packed[, bias [n] float32], Y [m, n]
    out_dtype)``; ``int8``: ``(A [m, k] uint8, W_packed, scale [n] float32, comp [n]
    int32[, bias [n] float32], Y [m, n] float32)``; ``W_packed`` as :func:`pack_weight`.
    """
    if not supported(target, kind):
        raise ValueError(f"amx_matmul({kind}) needs a target with {FEATURES[kind]}, not {target}")
    if out_dtype not in OUT_DTYPES[kind]:
        raise ValueError(
            f"amx_matmul({kind}) writes {' or '.join(OUT_DTYPES[kind])}, not {out_dtype}"
        )
    _, group, a_dtype, w_dtype, acc_dtype = amx_tile.KINDS[kind]
    groups, w_rows, _, _ = packed_shape(kind, k, n)
    k_pad = w_rows * group
    steps = k_pad // amx_tile.k_step(kind)
    size = 2 if kind == "bf16" else 1  # bytes of an A value
    group_bytes = w_rows * amx_tile.ROW_BYTES
    block = amx_tile.BLOCK
    row_blocks = -(-m // block)
    chunks = -(-(groups // 2) // CHUNK)
    width = CHUNK * block
    # Whole row blocks load A where it is when K fills its k-steps; the others are copied.
    first_copy = m // block if k == k_pad else 0
    copies = row_blocks - first_copy
    quantized = kind == "int8"
    kernel = amx_tile.function_name(kind)
    f32 = "float32"
    # The bits of A (TVM's bf16 legalization would store a bfloat16 buffer as float32).
    pad_dtype = "uint16" if kind == "bf16" else a_dtype
    micro_kernel = amx_tile.function_ir(kind)

    @T.macro
    def store(Y, S, C, B, acc, row, col0, i, j):  # noqa: N803 (Y[row, col0 + j] from acc[i, j])
        if quantized:
            if bias:
                Y[row, col0 + j] = S[col0 + j] * T.Cast(f32, acc[i, j] - C[col0 + j]) + B[col0 + j]
            else:
                Y[row, col0 + j] = S[col0 + j] * T.Cast(f32, acc[i, j] - C[col0 + j])
        elif bias:
            Y[row, col0 + j] = T.Cast(out_dtype, acc[i, j] + B[col0 + j])
        else:
            Y[row, col0 + j] = T.Cast(out_dtype, acc[i, j])

    @T.macro
    def tiles(W, acc, a, lda, ch):  # noqa: N803 (acc = the rows at a, lda bytes apart, @ chunk ch of W)
        T.evaluate(
            T.call_extern(
                "void",
                kernel,
                a,
                T.int64(lda),
                T.address_of(W[ch * CHUNK * 2, 0, 0, 0]),
                T.int64(group_bytes),
                T.Cast("int32", T.min(CHUNK, groups // 2 - ch * CHUNK)),
                T.address_of(acc[0, 0]),
                T.int64(width * 4),
                T.int32(steps),
            )
        )

    @T.prim_func
    def main(
        A: T.Buffer((m, k), a_dtype),  # type: ignore[valid-type]
        W: T.Buffer((groups, w_rows, LANES, group), w_dtype),  # type: ignore[valid-type]
        S: T.Buffer((n,), f32),  # type: ignore[valid-type]
        C: T.Buffer((n,), "int32"),  # type: ignore[valid-type]
        B: T.Buffer((n,), f32),  # type: ignore[valid-type]
        Y: T.Buffer((m, n), out_dtype),  # type: ignore[valid-type]
    ):
        T.func_attr({"tirx.noalias": True})
        # The row blocks A cannot be read in place from (all with a ragged K, else the
        # last of a ragged M), copied once, zero-padded to 32 x K_pad.
        if copies > 0:
            pad = T.alloc_buffer((copies * block, k_pad), pad_dtype, scope="global")
            for pb in T.parallel(copies):
                for i, kk in T.grid(block, k_pad):
                    row = (first_copy + pb) * block + i
                    pad[pb * block + i, kk] = T.if_then_else(
                        row < m and kk < k,
                        T.reinterpret(pad_dtype, A[T.min(row, m - 1), T.min(kk, k - 1)]),
                        T.Cast(pad_dtype, 0),
                    )
        # Chunks outside, row blocks inside: a chunk's weight panel (K x 256) stays in L2
        # while the rows of A pass it.
        for task in T.parallel(
            chunks * row_blocks, annotations={"pragma_import_llvm": micro_kernel}
        ):
            ch = task // row_blocks
            rb = task % row_blocks
            acc = T.alloc_buffer((block, width), acc_dtype, scope="global")
            rows = T.min(block, m - rb * block)
            if rb < first_copy:
                tiles(W, acc, T.address_of(A[rb * block, 0]), k * size, ch)
            elif copies > 0:  # decided in Python: without copies, no copy buffer in the code
                tiles(W, acc, T.address_of(pad[(rb - first_copy) * block, 0]), k_pad * size, ch)
            cols = T.min(width, n - ch * width)
            for i in T.serial(rows):
                for v in T.serial(cols // LANES):
                    for lane in T.vectorized(LANES):  # no let here: TVM scalarizes it
                        store(Y, S, C, B, acc, rb * block + i, ch * width, i, v * LANES + lane)
                for j in T.serial(cols % LANES):
                    tail = cols // LANES * LANES + j
                    store(Y, S, C, B, acc, rb * block + i, ch * width, i, tail)

    unused = ({"B"} if not bias else set()) | ({"S", "C"} if not quantized else set())
    return drop_params(main, unused)
