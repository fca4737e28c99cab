"""CPU features: this CPU's, a target's, and those a library needs that a CPU lacks
(:mod:`rewriter.backends.tvm.cpu_features`)."""

from __future__ import annotations

import pytest

from rewriter.backends.tvm import cpu_features

# Flags of the Sapphire Rapids-class KVM guest these tests were written on (abridged):
# LLVM names it rocketlake, the flags say AMX, AVX512-FP16 and MOVDIR64B.
SPR_GUEST = frozenset(
    [
        "fpu",
        "cx8",
        "cmov",
        "mmx",
        "fxsr",
        "sse",
        "sse2",
        "lm",
        "nopl",
        "pni",
        "ssse3",
        "fma",
        "cx16",
        "sse4_1",
        "sse4_2",
        "movbe",
        "popcnt",
        "aes",
        "avx",
        "f16c",
        "lahf_lm",
        "abm",
        "3dnowprefetch",
        "bmi1",
        "avx2",
        "bmi2",
        "avx512f",
        "avx512dq",
        "adx",
        "avx512ifma",
        "avx512cd",
        "sha_ni",
        "avx512bw",
        "avx512vl",
        "avx_vnni",
        "avx512_bf16",
        "avx512vbmi",
        "avx512_vbmi2",
        "gfni",
        "vaes",
        "vpclmulqdq",
        "avx512_vnni",
        "avx512_bitalg",
        "avx512_vpopcntdq",
        "movdiri",
        "movdir64b",
        "serialize",
        "amx_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_int8",
        "pclmulqdq",
    ]
)


def test_host_features_are_llvm_names_of_the_flags():
    features = cpu_features.host_features(SPR_GUEST)
    assert {
        "avx512vnni",
        "avx512bf16",
        "avx512fp16",
        "amx-int8",
        "amx-bf16",
        "movdir64b",
        "sse4.1",
    } <= set(features)
    assert "sse4a" not in features and "amx-fp16" not in features
    assert features == sorted(features)


def test_missing_names_what_the_cpu_lacks_and_ignores_tuning_features():
    needed = ["avx512f", "amx-int8", "movdir64b", "sse4a", "prefer-256-bit", "fast-gather", "uintr"]
    assert cpu_features.missing(needed, SPR_GUEST) == ["sse4a"]
    assert cpu_features.missing(needed, {"avx512f"}) == ["amx-int8", "movdir64b", "sse4a"]
    assert cpu_features.missing([], SPR_GUEST) == []


def test_every_flag_name_is_one_linux_uses():
    """The names of this table are LLVM's (checked by the targets' tests); its flags
    must be Linux's spelling, which uses no dash or dot."""
    for feature, flag in cpu_features.LLVM_TO_FLAG.items():
        assert flag.replace("_", "").isalnum() and flag == flag.lower(), (feature, flag)


def test_this_host_has_its_own_features():
    flags = cpu_features.host_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert cpu_features.missing(cpu_features.host_features()) == []
    assert "sse2" in cpu_features.host_features()
