"""AMX in this process: Linux grants the tile data state only on request.

Linux (5.16 and later) starts every process without permission to use AMX's tile data
(XTILEDATA, 8 KiB of register state per thread); the first tile instruction of a
process that has not asked for it dies with SIGILL. A process asks once with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, and the permission covers all
its threads, those started later included. :func:`ensure_permission` asks (once per
process) before a library with AMX kernels runs (:meth:`rewriter.backends.tvm.Compiled.run`);
a CPU without AMX, or a kernel that refuses, gives a clean :class:`AmxUnavailableError`.

>>> ensure_permission()  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
from typing import Any

from rewriter.errors import InputError

logger = logging.getLogger(__name__)

SYS_ARCH_PRCTL = 158  # x86-64 Linux syscall number
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")  # /proc/cpuinfo names


class AmxUnavailableError(InputError):
    """This process cannot run AMX instructions: the CPU lacks them, or the OS refused the
    tile state."""


def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (:func:`cpu_features.host_flags`; empty
    where there are none). The flags, not LLVM's name of the CPU, are what counts."""
    from rewriter.backends.tvm import cpu_features

    return cpu_features.host_flags() or frozenset()


def host_has_amx(*flags: str) -> bool:
    """Whether this CPU has AMX tiles and every one of ``flags`` (e.g. ``amx_bf16``)."""
    present = cpu_flags()
    return all(flag in present for flag in ("amx_tile", *flags))


def uses_amx(target: Any) -> bool:
    """Whether code built for ``target`` (a TVM target or its dict) may run AMX kernels."""
    import tvm

    from rewriter.backends.tvm import targets

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(dict(target))
    return targets.x86_has(target, "amx-tile")


@functools.cache
def _request() -> str:
    """Ask Linux for the tile data state; "" on success, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"AMX needs x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not host_has_amx():
        return "this CPU has no AMX (no amx_tile in /proc/cpuinfo)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        code = ctypes.get_errno()
        return f"the kernel refused AMX tile state (arch_prctl: {errno.errorcode.get(code, code)}: {os.strerror(code)})"
    logger.debug("AMX tile data permitted for process %d", os.getpid())
    return ""


def ensure_permission() -> None:
    """Make sure this process may execute AMX instructions (asks Linux once).

    Raises :class:`AmxUnavailableError` saying why not.

    >>> ensure_permission()  # doctest: +SKIP
    """
    reason = _request()
    if reason:
        raise AmxUnavailableError(f"cannot run AMX kernels: {reason}")


def available() -> str:
    """ "" when this process may run AMX kernels, else the reason (tests skip with it)."""
    return _request()
