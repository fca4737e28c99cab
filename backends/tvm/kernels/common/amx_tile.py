"""The AMX micro-kernel: a 32 x 32 block of the accumulator in four tiles, as LLVM IR.

Shared by the AMX bf16 and int8 matmuls (:mod:`rewriter.backends.tvm.kernels.amx_matmul`).
AMX has eight tile registers of up to 16 rows x 64 bytes and one instruction per tile
product: ``tdpbf16ps`` (bf16 pairs into float32) and ``tdpbusd`` (u8 x s8 quads into
int32). Every tile here is 16 x 64 bytes, so the configuration is one constant (palette
1): tiles 0-3 hold the 2 x 2 float32/int32 accumulator tiles of a 32 x 32 block, tiles
4-5 the two 16-row halves of A (64 bytes of K per row), tiles 6-7 two groups of 16
output channels of the packed weight.

The weight is packed as the VNNI kernels pack it, ``[groups, K_pad / g, 16, g]``
(``g`` = 2 bf16 or 4 int8 k-values per 32-bit lane), with ``groups`` even and ``K_pad``
a multiple of one k-step (64 bytes: 32 bf16, 64 int8), zero-padded. Then the B tile of
k-step ``s`` of a group is the 1 KiB at ``group_base + s * 1024``, rows 64 bytes apart:
one ``tileloadd`` of contiguous memory.

:func:`function_ir` is the micro-kernel, ``(A, lda, B, group_bytes, blocks, C, ldc,
steps)``: for each of ``blocks`` blocks of 32 channels, the 32 x 32 product of the 32
rows of ``A`` (``lda`` bytes apart) with groups ``2b`` and ``2b + 1`` of ``B`` (each
``group_bytes`` long) over ``steps`` k-steps, stored to ``C`` at column ``32 b`` (rows
``ldc`` bytes apart). It configures the tiles once per call (``ldtilecfg``) and
releases them on return (``tilerelease``), so a thread holds no tile state between
kernels. TVM links it into the calling kernel's module (``pragma_import_llvm``).

The intrinsics are LLVM's ``llvm.x86.*`` forms with the tile register as an immediate
(``tileloadd64``, ``tdpbf16ps``, ``tdpbusd``, ``tilestored64``), which LLVM emits as is;
TVM 0.27 ships no AMX tensor intrinsics.

>>> "tdpbusd" in function_ir("int8")
True
"""

from __future__ import annotations

ROWS = 16  # rows of a tile
ROW_BYTES = 64  # bytes of a tile row
BLOCK = 32  # rows and output channels of the 2 x 2 accumulator block
STEP_BYTES = ROWS * ROW_BYTES  # one B tile: a k-step of one group of 16 channels

# Per kind: the instruction, the k-values per 32-bit lane, the A/W and accumulator dtypes.
KINDS = {
    "bf16": ("tdpbf16ps", 2, "bfloat16", "bfloat16", "float32"),
    "int8": ("tdpbusd", 4, "uint8", "int8", "int32"),
}


def function_name(kind: str) -> str:
    """The name of the micro-kernel of ``kind`` (``bf16`` or ``int8``)."""
    return f"rewriter_amx_{kind}_32x32"


def k_step(kind: str) -> int:
    """K values one tile row holds: 32 bf16 or 64 int8."""
    group = KINDS[kind][1]
    return ROW_BYTES // 4 * group


def _config() -> str:
    """The 64-byte tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes."""
    data = [0] * 64
    data[0] = 1  # palette
    for tile in range(8):
        data[16 + 2 * tile] = ROW_BYTES  # colsb, u16 little-endian
        data[48 + tile] = ROWS
    return "[" + ", ".join(f"i8 {byte}" for byte in data) + "]"


def function_ir(kind: str) -> str:
    """The LLVM IR of the micro-kernel of ``kind`` (see the module docstring)."""
    instruction = KINDS[kind][0]
    name = function_name(kind)
    dots = "\n".join(
        f"  call void @llvm.x86.{instruction}(i8 {c}, i8 {a}, i8 {b})"
        for c, a, b in ((0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7))
    )
    zeros = "\n".join(f"  call void @llvm.x86.tilezero(i8 {c})" for c in range(4))
    return f"""
@{name}_config = private unnamed_addr constant [64 x i8] {_config()}, align 64

define void @{name}(ptr %a, i64 %lda, ptr %b, i64 %group, i32 %blocks, ptr %c, i64 %ldc, i32 %steps) {{
entry:
  call void @llvm.x86.ldtilecfg(ptr @{name}_config)
  %lda16 = mul i64 %lda, 16
  %a1 = getelementptr i8, ptr %a, i64 %lda16
  %ldc16 = mul i64 %ldc, 16
  %pair = mul i64 %group, 2
  br label %block
block:
  %j = phi i32 [0, %entry], [%j.next, %stored]
  %j64 = zext i32 %j to i64
  %boff = mul i64 %j64, %pair
  %b0 = getelementptr i8, ptr %b, i64 %boff
  %b1 = getelementptr i8, ptr %b0, i64 %group
{zeros}
  br label %step
step:
  %s = phi i32 [0, %block], [%s.next, %step]
  %s64 = zext i32 %s to i64
  %aoff = mul i64 %s64, {ROW_BYTES}
  %woff = mul i64 %s64, {STEP_BYTES}
  %pa0 = getelementptr i8, ptr %a, i64 %aoff
  %pa1 = getelementptr i8, ptr %a1, i64 %aoff
  %pb0 = getelementptr i8, ptr %b0, i64 %woff
  %pb1 = getelementptr i8, ptr %b1, i64 %woff
  call void @llvm.x86.tileloadd64(i8 4, ptr %pa0, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 6, ptr %pb0, i64 {ROW_BYTES})
  call void @llvm.x86.tileloadd64(i8 7, ptr %pb1, i64 {ROW_BYTES})
  call void @llvm.x86.tileloadd64(i8 5, ptr %pa1, i64 %lda)
{dots}
  %s.next = add i32 %s, 1
  %s.done = icmp eq i32 %s.next, %steps
  br i1 %s.done, label %stored, label %step
stored:
  %coff = mul i64 %j64, {BLOCK * 4}
  %c00 = getelementptr i8, ptr %c, i64 %coff
  %c01 = getelementptr i8, ptr %c00, i64 {ROW_BYTES}
  %c10 = getelementptr i8, ptr %c00, i64 %ldc16
  %c11 = getelementptr i8, ptr %c10, i64 {ROW_BYTES}
  call void @llvm.x86.tilestored64(i8 0, ptr %c00, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 1, ptr %c01, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 2, ptr %c10, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 3, ptr %c11, i64 %ldc)
  %j.next = add i32 %j, 1
  %j.done = icmp eq i32 %j.next, %blocks
  br i1 %j.done, label %exit, label %block
exit:
  call void @llvm.x86.tilerelease()
  ret void
}}

declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.{instruction}(i8 immarg, i8 immarg, i8 immarg)
"""
