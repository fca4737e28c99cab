"""What this machine can run, for the TVM backend tests: one CPU-feature check, one GPU check.

* ``@pytest.mark.requires_cpu("avx512_vnni")`` skips a test unless ``/proc/cpuinfo`` lists
  every flag given (the kernel's name of the feature, e.g. ``avx512_bf16``, ``movdir64b``):
  read the features from the flags, not the CPU model (a KVM guest may be named after
  another CPU than it runs on).
* ``require_cpu("movdir64b")`` (a fixture) does the same inside a test, for a test that
  checks generated code everywhere and runs it only where the CPU can.
* ``@pytest.mark.cuda`` (declared in ``pyproject.toml``) skips a test unless TVM finds a
  CUDA device.

>>> @pytest.mark.requires_cpu("avx512_bf16")  # doctest: +SKIP
... def test_kernel_runs(): ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from tests.helpers import cpu_flags


def missing_cpu_flags(*flags: str) -> str | None:
    """Why a test cannot run on this CPU (the flags it lacks), or None when it can."""
    missing = [flag for flag in flags if flag not in cpu_flags()]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def has_gpu() -> bool:
    """Whether TVM finds a CUDA device."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # no tvm, or no CUDA runtime at all
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_cpu(*flags): skipped unless /proc/cpuinfo lists every flag"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires_cpu"):
        reason = missing_cpu_flags(*mark.args)
        if reason:
            pytest.skip(reason)
    if item.get_closest_marker("cuda") is not None and not has_gpu():
        pytest.skip("needs an NVIDIA GPU")


@pytest.fixture
def require_cpu() -> Callable[..., None]:
    """``require_cpu(*flags)`` skips the running test unless the CPU has every flag."""

    def require(*flags: str) -> None:
        reason = missing_cpu_flags(*flags)
        if reason:
            pytest.skip(reason)

    return require
