"""Side-by-side timing shared by every benchmark: contenders interleaved round by round.

On a shared, noisy machine a single absolute time means little; timing the contenders
in turn within each round makes load from other processes hit all of them alike, so
their ratios hold. One sample is the seconds per call of a block of calls; a round takes
one sample of each contender. The benchmarks print the median of the samples (a typical
run) or the fastest (the least disturbed run, for latencies), and say which.

Imported by the benchmark scripts (run as ``python benchmarks/X.py``, which puts this
directory on ``sys.path``).

>>> times = samples({"a": lambda: None, "b": lambda: None}, rounds=5)  # doctest: +SKIP
>>> median(times)["a"] / median(times)["b"]  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

# A block of "auto" calls lasts about this long: long enough for the clock, short
# enough for many rounds.
AUTO_BLOCK_SECONDS = 0.02


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
