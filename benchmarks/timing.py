"""Side-by-side timing shared by every benchmark: contenders interleaved round by round.

On a shared, noisy machine a single absolute time means little; timing the contenders
in turn within each round makes load from other processes hit all of them alike, so
their ratios hold. One sample is the seconds per call of a block of calls; a round takes
one sample of each contender. The benchmarks print the median of the samples (a typical
run) or the fastest (the least disturbed run, for latencies), and say which.

Runtimes timed side by side in one process must not leave threads spinning: torch's
OpenMP threads (``OMP_WAIT_POLICY`` unset), TVM's pool and ONNX Runtime's keep spinning
after each call and take the cores of whichever contender runs next (MiniLM at 2 threads
read 1.1x ORT for ours and 6.5x for torch that way, 0.86x and 2.6x with passive waits).
Every benchmark that times more than one runtime in a process makes them all wait
passively: :func:`quiet_env` for the child processes it starts, :func:`quiet_threads` to
re-run a script that times in its own process, :func:`ort_options` for ORT's sessions.

Imported by the benchmark scripts (run as ``python benchmarks/X.py``, which puts this
directory on ``sys.path``).

>>> times = samples({"a": lambda: None, "b": lambda: None}, rounds=5)  # doctest: +SKIP
>>> median(times)["a"] / median(times)["b"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

# A block of "auto" calls lasts about this long: long enough for the clock, short
# enough for many rounds.
AUTO_BLOCK_SECONDS = 0.02

# Idle threads sleep: torch's (and any) OpenMP runtime, read when it starts; TVM's
# thread pool, read when it starts (its default spins 300000 times before sleeping).
QUIET_THREADS = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_THREAD_POOL_SPIN_COUNT": "0"}


def quiet_env(threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that times runtimes side by side: ``base``
    (default ``os.environ``) with :data:`QUIET_THREADS`, and with ``threads``, TVM's and
    OpenMP's thread counts.

    >>> quiet_env(2, {})["OMP_WAIT_POLICY"], quiet_env(2, {})["TVM_NUM_THREADS"]
    ('PASSIVE', '2')
    """
    env = dict(os.environ if base is None else base, **QUIET_THREADS)
    if threads is not None:
        env.update(TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env


def quiet_threads() -> None:
    """Run this script again, with the same arguments, in :func:`quiet_env`, unless its
    environment has :data:`QUIET_THREADS` already (the runtimes read them when they
    start, so they cannot be set once one has been imported). Call it first in ``main``."""
    if all(os.environ.get(name) == value for name, value in QUIET_THREADS.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], quiet_env())


def case_arguments(description: str, seconds: float, noun: str) -> argparse.Namespace:
    """The command line of a benchmark over named cases (``noun``: "layer"): ``--seconds``
    of timing per case (``seconds`` by default), ``--only`` the cases whose name contains
    it, ``--target`` (avx512)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=seconds, help=f"timing per {noun}")
    parser.add_argument("--only", default="", help=f"{noun}s whose name contains this")
    parser.add_argument("--target", default="avx512")
    return parser.parse_args()


def ort_options(threads: int) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads, one inter-op, and idle
    threads that sleep (``session.intra_op.allow_spinning=0``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def samples(
    calls: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 5,
    seconds: float = 0.0,
    max_rounds: int | None = None,
    block: int | str = 1,
    warmup: int = 1,
    rotate: bool = False,
    max_samples: Mapping[str, int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, one sample per round, contenders in turn.

    At least ``rounds`` rounds, and more until ``seconds`` of wall time have passed (at
    most ``max_rounds``). Each contender is called ``warmup`` times first. A sample times
    ``block`` calls (``"auto"``: as many as take about 20 ms, found after the warm-up).
    ``rotate`` starts each round with the next contender (threads one leaves spinning
    then slow each alike); ``max_samples`` caps the samples of slow, steady contenders;
    ``clock`` is ``time.perf_counter`` (wall) or ``time.process_time`` (CPU).
    """
    blocks: dict[str, int] = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        if block == "auto":
            start = clock()
            call()
            blocks[name] = max(1, int(AUTO_BLOCK_SECONDS / max(clock() - start, 1e-9)))
        else:
            blocks[name] = int(block)
    caps = max_samples or {}
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + seconds
    done = 0
    while (done < rounds or time.perf_counter() < deadline) and (
        max_rounds is None or done < max_rounds
    ):
        order = names[done % len(names) :] + names[: done % len(names)] if rotate else names
        for name in order:
            if len(times[name]) >= caps.get(name, len(times[name]) + 1):
                continue
            call, count = calls[name], blocks[name]
            start = clock()
            for _ in range(count):
                call()
            times[name].append((clock() - start) / count)
        done += 1
    return times


def median(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The median sample of each contender: its typical time per call."""
    return {name: statistics.median(values) for name, values in times.items()}


def fastest(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The fastest sample of each contender: its least disturbed time per call."""
    return {name: min(values) for name, values in times.items()}


def interleaved(calls: Mapping[str, Callable[[], None]], seconds: float) -> dict[str, float]:
    """Median seconds per call of each of ``calls``: rounds of ~20 ms of calls of each, in
    turn, for ``seconds`` (at least 5 rounds)."""
    return median(samples(calls, rounds=5, seconds=seconds, block="auto"))
