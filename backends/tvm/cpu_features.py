"""The instruction-set features of this CPU, and those a target needs that it lacks.

LLVM and Linux name the x86 features differently (``avx512vnni`` and ``avx512_vnni``,
``amx-int8`` and ``amx_int8``, ``sse4.1`` and ``sse4_1``). :data:`LLVM_TO_FLAG` maps each
feature whose instructions compiled code may hold to the flag ``/proc/cpuinfo`` lists for
it: what LLVM emits on its own (SSE to AVX-512, FMA, BMI, ...) and what our kernels call
through intrinsics (AMX, MOVDIR64B). LLVM's other features are not checked: those that
tune the code for a CPU (``fast-gather``, ``prefer-256-bit``) use no instruction, and the
system ones (``uintr``, ``enqcmd``, ``waitpkg``, ``shstk``, ...) LLVM emits only when a
program calls their intrinsics, which ours never do. A KVM guest often lacks those (this
Sapphire Rapids guest has no ``waitpkg`` nor ``uintr``), and a ``sapphirerapids`` library
must still load on it.

The features are read from the flags, never from the CPU's model name: on KVM guests LLVM
may name a Sapphire Rapids host ``rocketlake`` while the flags list AVX512-FP16, AMX and
MOVDIR64B. A target's features are recorded when it is compiled
(:attr:`rewriter.backends.tvm.build.Signature.features`), so that a library is refused
with a clean error on a CPU without them (:func:`missing`), not killed by SIGILL.

>>> missing(["avx512f", "amx-int8", "prefer-256-bit"], flags={"avx512f"})
['amx-int8']
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

CPUINFO = Path("/proc/cpuinfo")

# LLVM's name of each x86 feature compiled code may use -> the flag Linux lists for it.
LLVM_TO_FLAG: dict[str, str] = {
    "64bit": "lm",
    "x87": "fpu",
    "cmov": "cmov",
    "cx8": "cx8",
    "cx16": "cx16",
    "mmx": "mmx",
    "fxsr": "fxsr",
    "sahf": "lahf_lm",
    "nopl": "nopl",
    "sse": "sse",
    "sse2": "sse2",
    "sse3": "pni",
    "ssse3": "ssse3",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "sse4a": "sse4a",
    "popcnt": "popcnt",
    "lzcnt": "abm",
    "prfchw": "3dnowprefetch",
    "movbe": "movbe",
    "bmi": "bmi1",
    "bmi2": "bmi2",
    "adx": "adx",
    "aes": "aes",
    "pclmul": "pclmulqdq",
    "sha": "sha_ni",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avxvnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512cd": "avx512cd",
    "avx512dq": "avx512dq",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avx512vp2intersect": "avx512_vp2intersect",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
    "amx-fp16": "amx_fp16",
    "movdir64b": "movdir64b",
}


@functools.cache
def host_flags() -> frozenset[str] | None:
    """The flags ``/proc/cpuinfo`` lists for this CPU; None where it cannot be read."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def host_features(flags: Iterable[str] | None = None) -> list[str]:
    """LLVM's names of the instruction-set features this CPU has (``flags``: its
    ``/proc/cpuinfo`` flags, read when not given), sorted; [] where they cannot be read.

    >>> host_features({"avx512f", "avx512_vnni", "hypervisor"})
    ['avx512f', 'avx512vnni']
    """
    have = host_flags() if flags is None else frozenset(flags)
    return sorted(feature for feature, flag in LLVM_TO_FLAG.items() if have and flag in have)


def missing(features: Iterable[str], flags: Iterable[str] | None = None) -> list[str]:
    """The instruction-set features among ``features`` (LLVM's names) that this CPU
    (``flags``: its ``/proc/cpuinfo`` flags, read when not given) lacks; [] where the
    flags cannot be read (nothing to check against)."""
    have = host_flags() if flags is None else frozenset(flags)
    if have is None:
        return []
    return sorted(f for f in set(features) if f in LLVM_TO_FLAG and LLVM_TO_FLAG[f] not in have)


def missing_for(target: tvm.target.Target, flags: Iterable[str] | None = None) -> list[str]:
    """The features code for CPU ``target`` may use that this CPU (``flags``, read when not
    given) lacks: :func:`missing` of :func:`target_features`."""
    return missing(target_features(target), flags)


def target_features(target: tvm.target.Target) -> list[str]:
    """Every feature LLVM enables for CPU ``target`` (its ``mcpu`` and ``mattr``), sorted;
    [] for a target that is not LLVM's."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return []
    return sorted(str(feature) for feature in codegen.llvm_get_cpu_features(target))
