"""``Y = A_bf16 @ W_bf16 (+ bias)``, accumulated in float32, as a scheduled TIR PrimFunc (AVX512-BF16).

The kernel of a bf16 matmul with a constant weight (see :mod:`rewriter.backends.tvm.relax_passes.bf16_matmul`
for how the model gets here): ``A`` [M, K] bfloat16, ``W`` bfloat16 packed as
``[ceil(N/16), K/2, 16, 2]`` (``W_packed[n // 16, k // 2, n % 16, k % 2] = W[k, n]``, zero
past column N, so one 64-byte row is the 2 k-values of 16 output channels), accumulated
in float32 over whole groups of 16 channels; then, per output channel ``n < N``,
``Y[m, n] = acc[m, n] (+ bias[n])`` in float32, stored as float32 or rounded to bfloat16
(to nearest, ties to even). Where 16 does not divide ``N`` (BERT's MLM head: 30522),
the padded channels are computed from zeros and never stored: ``Y`` is [M, N].

The inner product is ``vdpbf16ps`` (``llvm.x86.avx512bf16.dpbf16ps.512``: 16 float32
lanes, each adding the 2 products of a pair of bf16 values; the products are exact in
float32), one per 16 output channels and 2 k-values, applied by tensorizing the 16 x 2
block with :data:`BF16_INTRIN`. The register tile and loop order are the int8 kernel's
(:mod:`rewriter.backends.tvm.kernels.common.dot_tile`: 8 x 48 float32 accumulators).

TVM cannot hand LLVM a bfloat vector: its LLVM code generator has no ``bfloat`` type
(a ``bfloat16`` vector crashes it), and its bf16 legalization turns every bfloat16
operand into float32. LLVM 17 and later type the intrinsic's operands ``<32 x bfloat>``.
So the kernel passes the pairs as ``int16x32`` to :data:`DOT_FUNCTION`, a four-line LLVM
IR function that bitcasts them and calls the intrinsic; TVM links it into the kernel's
module (``pragma_import_llvm``, always inlined), and the call becomes one ``vdpbf16ps``.

Requires static shapes, ``K % 2 == 0`` and a target with ``avx512bf16`` (:func:`supported`).

>>> func = bf16_matmul(8, 768, 30522, bias=True, out_dtype="bfloat16", target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from rewriter.backends.tvm import targets
from rewriter.backends.tvm.kernels.common import dot_tile

GROUP = 2  # k-values summed per lane by vdpbf16ps

# Name under which the 16 x 2 bf16 dot product is registered for tensorize.
BF16_INTRIN = "rewriter_bf16_dot_16x2"
# The LLVM IR function the intrinsic's implementation calls (see the module docstring).
DOT_FUNCTION = "rewriter_dpbf16ps"
OUT_DTYPES = ("bfloat16", "float32")
# LLVM 17 retyped the vdpbf16ps operands from <16 x i32> to <32 x bfloat>.
_BFLOAT_OPERANDS_LLVM = 17


def supported(target: tvm.target.Target) -> bool:
    """Whether the bf16 kernel runs on ``target``: an x86 LLVM target with AVX512-BF16.

    >>> supported(resolve("avx512")), supported(resolve("avx2"))  # doctest: +SKIP
    (True, False)
    """
    return targets.x86_has(target, "avx512bf16")


def dot_function_ir() -> str:
    """The LLVM IR of :data:`DOT_FUNCTION`: ``(acc <16 x float>, a <32 x i16>, b <32 x i16>)
    -> <16 x float>``, one ``vdpbf16ps``."""
    bfloat = tvm.target.codegen.llvm_version_major() >= _BFLOAT_OPERANDS_LLVM
    operand = "<32 x bfloat>" if bfloat else "<16 x i32>"
    return f"""
define <16 x float> @{DOT_FUNCTION}(<16 x float> %acc, <32 x i16> %a, <32 x i16> %b) {{
  %x = bitcast <32 x i16> %a to {operand}
  %y = bitcast <32 x i16> %b to {operand}
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, {operand} %x, {operand} %y)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, {operand}, {operand})
"""


def _register_intrinsic() -> None:
    """Register :data:`BF16_INTRIN` for tensorize: the pairs go to :data:`DOT_FUNCTION`
    as ``int16x32`` (see the module docstring)."""

    def dot(acc: tirx.Expr, a: tirx.Expr, w: tirx.Expr) -> tirx.Expr:
        return tirx.call_pure_extern(
            "float32x16",
            DOT_FUNCTION,
            acc,
            tirx.reinterpret("int16x32", a),
            tirx.reinterpret("int16x32", w),
        )

    dot_tile.register_intrinsic(BF16_INTRIN, "bfloat16", "bfloat16", "float32", GROUP, dot)


def bf16_matmul(
    m: int, k: int, n: int, *, bias: bool, out_dtype: str, target: tvm.target.Target
) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(A, W_packed[, bias], Y)``; see the module docstring.

    Shapes: ``A`` [m, k] bfloat16, ``W_packed`` [ceil(n/16), k/2, 16, 2] bfloat16
    (:func:`rewriter.backends.tvm.relax_passes.bf16_matmul.pack_weight`), ``bias`` [n] float32, ``Y`` [m, n]
    ``out_dtype`` (bfloat16 or float32).
    """
    if not supported(target):
        raise ValueError(f"bf16_matmul needs an x86 target with avx512bf16, not {target}")
    if k % GROUP:
        raise ValueError(f"bf16_matmul needs k % {GROUP} == 0 (k={k})")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"bf16_matmul writes {' or '.join(OUT_DTYPES)}, not {out_dtype}")
    _register_intrinsic()
    a = te.placeholder((m, k), "bfloat16", name="A")
    w, acc = dot_tile.accumulate(a, n, GROUP, "bfloat16", "float32")
    b = te.placeholder((n,), "float32", name="bias")

    def epilogue(i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        y = acc[i, j] + b[j] if bias else acc[i, j]
        return y.astype(out_dtype)  # TVM's bf16 legalization rounds to nearest even

    out = te.compute((m, n), epilogue, name="Y")  # the real channels only
    func = te.create_prim_func([a, w, *([b] if bias else []), out])
    return dot_tile.schedule(
        func,
        m,
        int(acc.shape[1]),
        group=GROUP,
        intrin=BF16_INTRIN,
        annotations={"pragma_import_llvm": dot_function_ir()},
    )
