"""The CPU preset with AMX that the benchmarks compile for, where ``targets.py`` lacks one.

``sapphirerapids`` (``mcpu=sapphirerapids``: AMX-BF16/INT8, AVX512-FP16, ...) is the
target of the AMX kernels (:mod:`rewriter.backends.tvm.kernels.amx_matmul`). Until
:mod:`rewriter.backends.tvm.targets` has the preset itself, :func:`amx_target` registers
it for the benchmark's process (a preset of the same name in ``targets`` wins).

>>> backend.compile(model, amx_target())  # doctest: +SKIP
"""

from __future__ import annotations

from rewriter.backends.tvm import amx_runtime, targets

AMX_PRESET = "sapphirerapids"
SAPPHIRE_RAPIDS = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}


def amx_target() -> str:
    """The name of a preset with AMX (registered in this process where missing)."""
    targets.CPU_PRESETS.setdefault(AMX_PRESET, dict(SAPPHIRE_RAPIDS))
    return AMX_PRESET


def host_amx(*flags: str) -> str:
    """Why this machine cannot run AMX kernels (with ``flags``, e.g. ``amx_bf16``), or ""."""
    if not amx_runtime.host_has_amx(*flags):
        return f"this CPU lacks {' or '.join(('amx_tile', *flags))}"
    return amx_runtime.available()
