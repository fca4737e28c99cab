"""MetaSchedule-tuned matmul against our default schedule and ONNX Runtime, in one run.

The workload is BERT's FFN up-projection, ``y = x @ W + b`` with ``x`` of M x K and
``W`` of K x N (default 128 x 384 x 1536, float32, a constant weight). Three
contenders, timed in interleaved rounds (one call of each per round, medians), on the
same number of threads:

* ``ort``: ONNX Runtime (the peer);
* ``ours``: TVM with our default schedules (no tuning);
* ``tuned``: TVM after ``compile(..., tune=TRIALS)`` into a tuning database (fresh
  unless ``--db`` names one that has the task: then it is reused);
* ``search``: the search's best record applied whatever the side-by-side choice (a copy
  of the database without ``rewriter_choices.json``).

``tuned`` is ``ours`` or ``search`` as the side-by-side timing chose; the ratio of the
two identical contenders shows the measurement's noise.
Ratios are time / the named peer's time (below 1: faster). Example::

    .venv/bin/python benchmarks/tuning.py --trials 64 --rounds 15
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timing
from onnx import TensorProto, helper, numpy_helper

from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm import tuning


def linear(m: int, k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    """``y = MatMul(x, W) + b`` with ``x`` of ``m x k``; ``W`` and ``b`` constants."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) / k**0.5, "w")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def interleaved_times(
    runs: dict[str, Callable[[], object]], rounds: int, calls: int
) -> dict[str, list[float]]:
    """Seconds per call of each contender, per round: ``rounds`` rounds of ``calls`` calls.

    The contenders take turns within each round, in an order rotated every round, so that
    load changes on the shared machine, and the threads one contender leaves spinning,
    hit all alike."""
    return timing.samples(runs, rounds=rounds, max_rounds=rounds, block=calls, rotate=True)


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--shape", default="128x384x1536", help="MxKxN")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--tune-time", type=float, default=None)
    parser.add_argument(
        "--db", default=None, help="tuning database (default: a fresh temporary one)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per contender per round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    m, k, n = (int(part) for part in args.shape.split("x"))
    model = linear(m, k, n)
    feeds = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
    cores = tuning.num_cores()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        ours = backend.compile(model, args.target)
        start = time.perf_counter()
        database = Path(args.db or Path(scratch) / "db")
        tuned = backend.compile(
            model,
            args.target,
            tune=args.trials,
            tune_db=database,
            tune_seconds=args.tune_time,
            progress=say,
        )
        tune_seconds = time.perf_counter() - start
        records = Path(scratch) / "records-only"
        shutil.copytree(database, records, ignore=shutil.ignore_patterns(tuning.CHOICES_FILE))
        search = backend.compile(model, args.target, tune_db=records)
    options = timing.ort_options(cores)  # its idle workers sleep
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    reference = session.run(["y"], feeds)[0]
    contenders = {"ours": ours, "tuned": tuned, "search": search}
    errors = {
        name: verify.compare("y", reference, compiled.run(feeds)["y"]).max_rel_err
        for name, compiled in contenders.items()
    }
    runs: dict[str, Callable[[], object]] = {"ort": lambda: session.run(["y"], feeds)}
    runs.update({name: lambda c=compiled: c.run(feeds) for name, compiled in contenders.items()})
    times = interleaved_times(runs, args.rounds, args.calls)
    medians = timing.median(times)
    fastest = timing.fastest(times)
    report = tuned.tuning
    assert report is not None
    flop = 2.0 * m * k * n
    print(
        f"{args.shape} float32 matmul + bias, target {args.target}, {cores} threads; "
        f"tuned with {args.trials} trials in {tune_seconds:.0f} s "
        f"({report.counts()['tuned']} task(s), applied to {report.applied})"
    )
    for task in report.tasks:
        if task.best_us is not None and task.ours_us is not None:
            print(
                f"  task {task.name} ({task.status}, {task.trials} valid trials this run): "
                f"search's best {task.best_us:.1f} us, ours {task.ours_us:.1f} us side by side "
                f"in the runner ({task.speedup:.2f}x): {task.choice} chosen"
            )
    print(f"medians (and fastest rounds) of {args.rounds} rounds x {args.calls} calls:")
    print(
        f"{'contender':<9} {'ms':>7} {'GFLOP/s':>8} {'/ ort':>6} {'/ ours':>7} "
        f"{'min ms':>7} {'/ ort':>6} {'/ ours':>7} {'max rel err':>12}"
    )
    for name, seconds in medians.items():
        error = f"{errors[name]:.2g}" if name in errors else "-"
        low = fastest[name]
        print(
            f"{name:<9} {seconds * 1e3:>7.3f} {flop / seconds / 1e9:>8.1f} "
            f"{seconds / medians['ort']:>6.2f} {seconds / medians['ours']:>7.2f} "
            f"{low * 1e3:>7.3f} {low / fastest['ort']:>6.2f} {low / fastest['ours']:>7.2f} "
            f"{error:>12}"
        )


if __name__ == "__main__":
    main()
