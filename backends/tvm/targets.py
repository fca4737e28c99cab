"""Target presets: the names the CLI's ``--target`` takes, as TVM targets.

* ``llvm``: generic x86-64 (SSE2 only), runs on any x86-64 CPU;
* ``avx2``: Haswell and later (AVX2 + FMA);
* ``avx512``: AVX-512 F/BW/CD/DQ/VL (``x86-64-v4``) with VNNI and BF16: Intel Sapphire
  Rapids and later, AMD Zen 4 and later. An ISA level, not a CPU model: with
  ``mcpu=sapphirerapids`` LLVM may use AVX512-FP16, AVX-VNNI or MOVDIR64B, and the
  library dies with an illegal instruction on Zen 4;
* ``sapphirerapids``: Intel Sapphire Rapids (LLVM's ``sapphirerapids``): ``avx512`` and
  AVX512-FP16, AVX-VNNI, AMX and MOVDIR64B (the two-pass softmax then streams its
  output with ``movdir64b``);
* ``zen4``: AMD Zen 4 (LLVM's ``znver4``): ``avx512`` with Zen 4's tuning, no AMX, no
  MOVDIR64B;
* ``native``: this machine's CPU: LLVM's name of it for the tuning, and each feature
  compiled code may use (:data:`cpu_features.LLVM_TO_FLAG`) on or off as
  ``/proc/cpuinfo``'s flags say, not as the name implies (a KVM guest may be named after
  another CPU than it runs on);
* ``cuda``: NVIDIA GPUs, ``arch`` from ``cuda_arch`` (default ``sm_90``, Hopper), with
  a generic x86-64 host.

A library records its target's features (``.so.json``), and loading it on a CPU that
lacks one is an :class:`InputError` naming them (:func:`cpu_features.missing`), not an
illegal instruction.

This TVM build takes targets as dicts (``"llvm -mcpu=..."`` strings are rejected), so
every preset is a dict here.

>>> resolve("avx512").kind.name  # doctest: +SKIP
'llvm'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm import cpu_features
from rewriter.errors import InputError

if TYPE_CHECKING:
    import tvm

_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}

CPU_PRESETS: dict[str, dict[str, Any]] = {
    "llvm": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"},
    "avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "avx512": {
        "kind": "llvm",
        "mtriple": "x86_64-linux-gnu",
        "mcpu": "x86-64-v4",
        "mattr": ["+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni", "+avx512bf16"],
    },
    "sapphirerapids": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"},
    "zen4": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"},
}
PRESETS = (*CPU_PRESETS, "native", "cuda")
DEFAULT_CUDA_ARCH = "sm_90"


def resolve(name: str, *, cuda_arch: str = DEFAULT_CUDA_ARCH) -> tvm.target.Target:
    """The TVM target of preset ``name`` (one of :data:`PRESETS`).

    Raises :class:`InputError` for an unknown name or a malformed ``cuda_arch``.

    >>> resolve("cuda", cuda_arch="sm_80").attrs["arch"]  # doctest: +SKIP
    'sm_80'
    """
    import tvm

    return tvm.target.Target(target_dict(name, cuda_arch=cuda_arch))


def target_dict(name: str, *, cuda_arch: str = DEFAULT_CUDA_ARCH) -> dict[str, Any]:
    """The dict behind preset ``name``; see :func:`resolve`. Imports TVM for ``native``
    only (LLVM names the host CPU)."""
    if name in CPU_PRESETS:
        return dict(CPU_PRESETS[name])
    if name == "native":
        return native_dict()
    if name == "cuda":
        if not re.fullmatch(r"sm_\d{2,3}[a-z]?", cuda_arch):
            raise InputError(f"--cuda-arch {cuda_arch!r}: expected sm_XY, e.g. sm_90 or sm_80")
        return {"kind": "cuda", "arch": cuda_arch, "host": dict(_HOST)}
    raise InputError(f"unknown target {name!r}: choose one of {', '.join(PRESETS)}")


def native_dict(flags: frozenset[str] | None = None, cpu: str | None = None) -> dict[str, Any]:
    """The ``native`` target: LLVM's name of this CPU (``cpu``) as ``mcpu``, and every
    feature of :data:`cpu_features.LLVM_TO_FLAG` in ``mattr``, on where this CPU's flags
    (``flags``, read from ``/proc/cpuinfo`` when not given) list it and off where they do
    not, whatever the name implies.

    Raises :class:`InputError` where the flags cannot be read.

    >>> target = native_dict(frozenset({"lm", "avx2"}), "haswell")
    >>> target["mcpu"], "+avx2" in target["mattr"], "-fma" in target["mattr"]
    ('haswell', True, True)
    """
    have = cpu_features.host_flags() if flags is None else flags
    if not have:
        raise InputError(
            f"--target native: cannot read this CPU's features ({cpu_features.CPUINFO} has no flags); "
            f"choose a preset: {', '.join(CPU_PRESETS)}"
        )
    if cpu is None:
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
    on = set(cpu_features.host_features(have))
    mattr = [
        ("+" if feature in on else "-") + feature for feature in sorted(cpu_features.LLVM_TO_FLAG)
    ]
    return {**_HOST, "mcpu": cpu, "mattr": mattr}


# ``mcpu`` values that name an instruction-set level, not a CPU (``avx512``: ``x86-64-v4``).
ISA_LEVELS = frozenset({"x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"})


def tuned_cpu(
    target: tvm.target.Target, host: str | None = None, flags: frozenset[str] | None = None
) -> str:
    """LLVM's name of the CPU whose caches and prefetchers ``target``'s schedules are tuned
    for (:mod:`.relax_passes.schedules`): its ``mcpu`` where that names a CPU; where it
    names an instruction-set level (``avx512``), this machine's CPU (``host``, asked of
    LLVM when not given) if it runs the target's code (its ``/proc/cpuinfo`` ``flags``,
    read when not given), as where a library is compiled on
    the machine it is deployed to; else the level (the schedules' defaults). '' for a
    target that is not LLVM's.

    The choice changes only how fast the code runs, never what it computes or where it
    can run: the instructions are the target's.

    >>> tuned_cpu(resolve("zen4")), tuned_cpu(resolve("avx2"), host="emeraldrapids")  # doctest: +SKIP
    ('znver4', 'haswell')
    """
    if target.kind.name != "llvm":
        return ""
    mcpu = str(target.attrs.get("mcpu", "x86-64"))
    if mcpu not in ISA_LEVELS or cpu_features.missing_for(target, flags):
        return mcpu
    if host is None:
        from tvm.target import codegen

        host = str(codegen.llvm_get_system_cpu())
    return host


def x86_has(target: tvm.target.Target, *features: str) -> bool:
    """Whether ``target`` is an LLVM (CPU) target with AVX-512 F and every one of ``features``.

    >>> x86_has(resolve("avx512"), "avx512vnni"), x86_has(resolve("avx2"), "avx512vnni")  # doctest: +SKIP
    (True, False)
    """
    import tvm

    if target.kind.name != "llvm":
        return False
    return all(tvm.target.codegen.target_has_features(f, target) for f in ("avx512f", *features))


def is_gpu(name: str) -> bool:
    """True for presets whose code runs on a GPU (it needs a device to run)."""
    return name == "cuda"
