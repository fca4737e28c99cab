"""The CPU preset with AMX that the benchmarks compile for, and whether this host runs it.

``sapphirerapids`` (``mcpu=sapphirerapids``: AMX-BF16/INT8, AVX512-FP16, ...) is the
target of the AMX kernels (:mod:`rewriter.backends.tvm.kernels.amx_matmul`).

>>> backend.compile(model, amx_target())  # doctest: +SKIP
"""

from __future__ import annotations

from rewriter.backends.tvm import amx_runtime, targets

AMX_PRESET = "sapphirerapids"


def amx_target() -> str:
    """The name of the preset with AMX."""
    assert AMX_PRESET in targets.CPU_PRESETS
    return AMX_PRESET


def host_amx(*flags: str) -> str:
    """Why this machine cannot run AMX kernels (with ``flags``, e.g. ``amx_bf16``), or ""."""
    if not amx_runtime.host_has_amx(*flags):
        return f"this CPU lacks {' or '.join(('amx_tile', *flags))}"
    return amx_runtime.available()
