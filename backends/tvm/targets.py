"""Target presets: the names the CLI's ``--target`` takes, as TVM targets.

* ``llvm``: generic x86-64 (SSE2 only), runs on any x86-64 CPU;
* ``avx2``: Haswell and later (AVX2 + FMA);
* ``avx512``: AVX-512 F/BW/CD/DQ/VL (``x86-64-v4``) with VNNI and BF16: Intel Sapphire
  Rapids and later, AMD Zen 4 and later. An ISA level, not a CPU model: with
  ``mcpu=sapphirerapids`` LLVM may use AVX512-FP16, AVX-VNNI or MOVDIR64B, and the
  library dies with an illegal instruction on Zen 4;
* ``cuda``: NVIDIA GPUs, ``arch`` from ``cuda_arch`` (default ``sm_90``, Hopper), with
  a generic x86-64 host.

This TVM build takes targets as dicts (``"llvm -mcpu=..."`` strings are rejected), so
every preset is a dict here.

>>> resolve("avx512").kind.name  # doctest: +SKIP
'llvm'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

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
}
PRESETS = (*CPU_PRESETS, "cuda")
DEFAULT_CUDA_ARCH = "sm_90"

# How many float32 lanes one vector register holds, per preset (for schedules).
VECTOR_LANES = {"llvm": 4, "avx2": 8, "avx512": 16, "cuda": 1}


def resolve(name: str, *, cuda_arch: str = DEFAULT_CUDA_ARCH) -> tvm.target.Target:
    """The TVM target of preset ``name`` (one of :data:`PRESETS`).

    Raises :class:`InputError` for an unknown name or a malformed ``cuda_arch``.

    >>> resolve("cuda", cuda_arch="sm_80").attrs["arch"]  # doctest: +SKIP
    'sm_80'
    """
    import tvm

    return tvm.target.Target(target_dict(name, cuda_arch=cuda_arch))


def target_dict(name: str, *, cuda_arch: str = DEFAULT_CUDA_ARCH) -> dict[str, Any]:
    """The dict behind preset ``name``; see :func:`resolve`. Does not import TVM."""
    if name in CPU_PRESETS:
        return dict(CPU_PRESETS[name])
    if name == "cuda":
        if not re.fullmatch(r"sm_\d{2,3}[a-z]?", cuda_arch):
            raise InputError(f"--cuda-arch {cuda_arch!r}: expected sm_XY, e.g. sm_90 or sm_80")
        return {"kind": "cuda", "arch": cuda_arch, "host": dict(_HOST)}
    raise InputError(f"unknown target {name!r}: choose one of {', '.join(PRESETS)}")


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
