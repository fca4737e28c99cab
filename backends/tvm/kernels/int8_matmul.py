"""``Y = scale * (A_u8 @ W_s8 - comp) + bias`` as a scheduled TIR PrimFunc (AVX-512 VNNI).

The integer matmul of a QDQ MatMul (see :mod:`rewriter.backends.tvm.relax_passes.qdq_matmul` for how the
model gets here): ``A`` [M, K] uint8 activations, ``W`` int8 weights packed as
``[ceil(N/16), K/4, 16, 4]`` (``W_packed[n // 16, k // 4, n % 16, k % 4] = W[k, n]``,
zero past column N, so one 64-byte row is the 4 k-values of 16 output channels),
accumulated exactly in int32 over whole groups of 16 channels; then, per output channel
``n < N``, in float32: ``Y[m, n] = scale[n] * float(acc[m, n] - comp[n]) (+ bias[n])``.
Where 16 does not divide ``N`` (an ImageNet head: 1000; BERT's MLM head: 30522), the
padded channels are computed from zeros and never stored: ``Y``, ``scale``, ``comp``
and ``bias`` are [M, N] and [N].

The inner product is ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``: 16 int32 lanes, each
adding 4 u8 x s8 products, exact, no saturation), one per 16 output channels and 4
k-values, applied by tensorizing the 16 x 4 block with :data:`VNNI_INTRIN`.

Schedule (by hand, shared with the bf16 kernel: :mod:`rewriter.backends.tvm.kernels.common.dot_tile`):
an 8 x 48 block of the int32 accumulator lives in registers, the k loop in steps of 4
runs outside the tile, each step broadcasts 4 bytes of each A row and loads one 64-byte
row of W per 16 channels; the ``K x 48`` panel of W (18 KiB for K = 384) stays in L1
while the rows of A stream past it. The epilogue (scale, compensation, bias) runs on the
tile before it is stored. (Measured on one Sapphire Rapids core: 600 GOPS for 256 x 384 x
384, 350 for 256 x 384 x 1536.)

Requires static shapes, ``K % 4 == 0`` and a target with ``avx512vnni`` (:func:`supported`).

>>> func = int8_matmul(8, 768, 30522, bias=True, target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from rewriter.backends.tvm import targets
from rewriter.backends.tvm.kernels.common import dot_tile

GROUP = 4  # k-values summed per lane by vpdpbusd

# Name under which the 16 x 4 VNNI dot product is registered for tensorize.
VNNI_INTRIN = "rewriter_vnni_dot_16x4"
# LLVM 22 retyped the vpdpbusd operands from <16 x i32> to <64 x i8> (llvm-project #155194).
_BYTE_OPERANDS_LLVM = 22


def supported(target: tvm.target.Target) -> bool:
    """Whether the int8 kernel runs on ``target``: an x86 LLVM target with AVX-512 VNNI.

    >>> supported(resolve("avx512")), supported(resolve("avx2"))  # doctest: +SKIP
    (True, False)
    """
    return targets.x86_has(target, "avx512vnni")


def _register_intrinsic() -> None:
    """Register :data:`VNNI_INTRIN` (TVM's own ``dot_16x4_vnni`` passes the operands as
    ``int32x16``, which LLVM 22 rejects)."""
    byte_operands = tvm.target.codegen.llvm_version_major() >= _BYTE_OPERANDS_LLVM
    operand = "int8x64" if byte_operands else "int32x16"

    def dot(acc: tirx.Expr, a: tirx.Expr, w: tirx.Expr) -> tirx.Expr:
        return tirx.call_llvm_pure_intrin(
            "int32x16",
            "llvm.x86.avx512.vpdpbusd.512",
            acc,
            tirx.reinterpret(operand, a),
            tirx.reinterpret(operand, w),
        )

    dot_tile.register_intrinsic(VNNI_INTRIN, "uint8", "int8", "int32", GROUP, dot)


def int8_matmul(m: int, k: int, n: int, *, bias: bool, target: tvm.target.Target) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(A, W_packed, scale, comp[, bias], Y)``; see the module docstring.

    Shapes: ``A`` [m, k] uint8, ``W_packed`` [ceil(n/16), k/4, 16, 4] int8
    (:func:`rewriter.backends.tvm.relax_passes.qdq_matmul.pack_weight`), ``scale`` [n] float32, ``comp``
    [n] int32, ``bias`` [n] float32, ``Y`` [m, n] float32.
    """
    if not supported(target):
        raise ValueError(f"int8_matmul needs an x86 target with avx512vnni, not {target}")
    if k % GROUP:
        raise ValueError(f"int8_matmul needs k % {GROUP} == 0 (k={k})")
    _register_intrinsic()
    a = te.placeholder((m, k), "uint8", name="A")
    w, acc = dot_tile.accumulate(a, n, GROUP, "int8", "int32")
    scale = te.placeholder((n,), "float32", name="scale")
    comp = te.placeholder((n,), "int32", name="comp")
    b = te.placeholder((n,), "float32", name="bias")

    def epilogue(i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        y = scale[j] * (acc[i, j] - comp[j]).astype("float32")
        return y + b[j] if bias else y

    out = te.compute((m, n), epilogue, name="Y")  # the real channels only
    func = te.create_prim_func([a, w, scale, comp, *([b] if bias else []), out])
    return dot_tile.schedule(func, m, int(acc.shape[1]), group=GROUP, intrin=VNNI_INTRIN)
