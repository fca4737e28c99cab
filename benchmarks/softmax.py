"""Benchmark: the two-pass softmax TIR kernel against its peers, measured in one run.

The two-pass algorithm (Dukhan & Ablavatski, "The Two-Pass Softmax Algorithm", 2020,
arXiv 2001.04438) reads each row twice and writes it once. Columns, all on the same
64-byte-aligned float32 buffers:

* ``two-pass``: ours (``rewriter.backends.tvm.kernels.softmax.two_pass_softmax``)
* ``tvm-stock``: TVM's softmax (``topi.nn.softmax``, as Relax legalizes ``nn.softmax``)
  through the default pipeline, which does not schedule it (one thread)
* ``three-pass``: ours, max / sum of exp / scale, same vectorization and exp
* ``torch``: ``aten::_softmax.out``
* ``ort``: ONNX Runtime ``Softmax`` (axis -1) with its output bound to our buffer
* ``memcpy``: ``numpy.copyto`` (one read, one write)
* ``floor``: 2 reads + 1 write at the read and write bandwidths measured on the spot
  with TIR probes (``probes.py`` beside this file) that use the same loads and stores as the kernel (and the same
  segments of a long row, so the same number of threads)

Each measurement is the median over rounds; within a round the methods run in turn
(interleaved), so a noisy machine slows all of them alike. Each thread count runs in a
child process (TVM's pool, torch and ORT are set to it). Run:

    .venv/bin/python benchmarks/softmax.py [--quick] [--threads 1,0] [--clock auto|wall|cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import timing

IN_CACHE = [(64, 1024), (1, 32768), (128, 4096), (1536, 128)]  # the last: BERT attention rows
OUT_OF_CACHE = [(1, 1 << 24), (1, 1 << 26), (4096, 16384)]
PEERS = ["tvm-stock", "three-pass", "torch", "ort"]


def _ort_softmax(x: np.ndarray, y: np.ndarray, threads: int) -> Callable[[], None]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = timing.ort_options(threads)  # its idle threads sleep
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    binding = session.io_binding()
    binding.bind_input("x", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    return lambda: session.run_with_iobinding(binding)


def _torch_softmax(x: np.ndarray, y: np.ndarray, threads: int) -> Callable[[], None]:
    import torch

    torch.set_num_threads(threads)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    op = torch.ops.aten._softmax.out
    return lambda: op(tx, -1, False, out=ty)


def measure_shape(
    rows: int, cols: int, threads: int, rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per call of every column for one shape."""
    from probes import (
        aligned_empty,
        bind,
        cpu_target,
        read_probe,
        stock_softmax,
        write_probe,
    )

    from rewriter.backends.tvm.kernels.softmax import (
        split_segments,
        three_pass_softmax,
        two_pass_softmax,
    )

    target = cpu_target()
    segments = split_segments(rows, cols)
    view = (rows * segments, cols // segments)
    x = aligned_empty((rows, cols))
    x[:] = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 4
    y = aligned_empty((rows, cols))
    y[:] = 0
    scratch = aligned_empty((rows, cols))
    scratch[:] = 0
    fns = {
        "two-pass": bind(two_pass_softmax(rows, cols, target=target), target, x, y),
        "tvm-stock": bind(stock_softmax(rows, cols), target, x, y),
        "three-pass": bind(three_pass_softmax(rows, cols, target=target), target, x, y),
        "torch": _torch_softmax(x, y, threads),
        "ort": _ort_softmax(x, y, threads),
        "memcpy": lambda: np.copyto(y, x),
        # On the kernel's segments of a long row, so that the probes use as many threads.
        "read": bind(read_probe(*view, target), target, x.reshape(view), scratch.reshape(view)),
        "write": bind(write_probe(*view, target), target, x.reshape(view), y.reshape(view)),
    }
    big = rows * cols * 4 > (32 << 20)
    # The warm-up takes the page faults, starts the thread pools and fills the caches; a
    # big shape is one call per sample, and tvm-stock (slow and steady) three samples.
    times = timing.samples(
        fns,
        rounds=rounds,
        max_rounds=rounds,
        block=1 if big else "auto",
        max_samples={"tvm-stock": 3} if big else None,
        clock=clock,
    )
    result = timing.median(times)
    result["floor"] = 2 * result["read"] + result["write"]
    return result


def _child(threads: int, shapes: list[tuple[int, int]], rounds: int, clock_name: str) -> None:
    from probes import set_num_threads

    set_num_threads(threads)
    n = threads or os.cpu_count() or 1
    if clock_name == "auto":
        clock_name = "cpu" if n == 1 else "wall"
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    print(
        f"\n## {n} thread(s), {clock_name} time, median of {rounds} interleaved rounds"
        " (ns per element; ratio = peer time / two-pass time)"
    )
    head = ["shape", "two-pass", *PEERS, "memcpy", "floor"]
    head += [f"vs {p}" for p in PEERS] + ["of floor"]
    print(" | ".join(f"{h:>13}" for h in head))
    for rows, cols in shapes:
        t = measure_shape(rows, cols, n, rounds, clock)
        per = {k: v / (rows * cols) * 1e9 for k, v in t.items()}
        cells = [f"{rows}x{cols}"] + [
            f"{per[k]:.3f}" for k in ["two-pass", *PEERS, "memcpy", "floor"]
        ]
        cells += [f"{t[p] / t['two-pass']:.2f}x" for p in PEERS]
        cells += [f"{t['floor'] / t['two-pass']:.0%}"]
        print(" | ".join(f"{c:>13}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes")
    parser.add_argument("--threads", default="1,0", help="thread counts; 0 = all cores")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="auto: process CPU time with one thread (robust to a busy machine), else wall time",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    shapes = IN_CACHE + OUT_OF_CACHE
    if args.quick:
        shapes = [(64, 1024), (1536, 128), (1, 1 << 24), (4096, 16384)]
    if args.child is not None:
        _child(args.child, shapes, rounds, args.clock)
        return
    for threads in [int(t) for t in args.threads.split(",")]:
        # Every runtime's idle threads sleep instead of spinning.
        env = timing.quiet_env(threads or os.cpu_count() or 1)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(threads),
            "--rounds",
            str(rounds),
            "--clock",
            args.clock,
        ]
        subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, check=True)


if __name__ == "__main__":
    main()
