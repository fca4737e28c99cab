"""Side-by-side timing shared by the benchmarks: contenders interleaved round by round.

On a shared, noisy machine a single absolute time means little; timing the contenders
in turn within each round makes load from other processes hit all of them alike, so
their ratios hold. Imported by the benchmark scripts (run as ``python benchmarks/X.py``,
which puts this directory on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(calls: dict[str, Callable[[], None]], seconds: float) -> dict[str, float]:
    """Median seconds per call of each of ``calls``: rounds of ~20 ms of calls of each, in
    turn, for ``seconds`` (at least 5 rounds)."""
    repeats = {}
    for name, call in calls.items():
        call()  # warm up
        start = time.perf_counter()
        call()
        repeats[name] = max(1, int(0.02 / (time.perf_counter() - start)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times[next(iter(calls))]) < 5:
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(t) for name, t in times.items()}
