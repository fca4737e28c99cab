"""The SIMD pieces our TIR kernels share: ``exp_pair`` (e**x as a mantissa and an exponent),
``pair_sum`` (pass 1 of the two-pass softmax over those pairs), ``simd_plan`` (a row
kernel's ISA, vector width, blocks and stores), ``dot_tile`` (the register tile of the
int8 and bf16 dot-product matmuls) and ``score_tile`` (the register tile of scores of
the fused sigmoid and softmax attention kernels)."""
