"""Benchmark: what the public API adds to the Relax VM call, and where that leaves us
against ONNX Runtime and the two-pass floor.

One Softmax (axis -1, float32) rewritten by ``two-pass-softmax``, compiled for each
``--targets`` preset, exported and loaded back (``load(path)``), on 1x16M and 1x64M (out
of cache) and on a small input. Columns, timed side by side in one process:

* ``vm``: the library's ``main`` on TVM tensors made once (no checks, no conversion);
* ``run``: ``Compiled.run({"x": x})`` on a 64-byte aligned numpy array (taken through
  DLPack, no copy), its output a fresh VM buffer the caller owns;
* ``run copy``: the same on numpy's own allocation (16-byte aligned: copied into the
  session's staging buffer, what a plain ``np.random`` input costs);
* ``out=``: ``Compiled.session().run({"x": x}, out={"y": y})``, the kernel writing into
  the caller's ``y``;
* ``ort``: ONNX Runtime's ``Softmax`` with its input and output bound to the same
  buffers (``run_with_iobinding``: no allocation, its fastest use);
* ``floor``: two reads and one write of the row at the bandwidths measured on the spot
  by ``probes.py``'s TIR probes, compiled for the same target (the same stores as the
  kernel), as ``softmax.py`` measures it.

Per shape: ns per element (us per call on the small input), ``run/vm`` and
``out=/vm`` (the API's overhead; goal <= 1.05 on the large shapes), ``run - vm`` in us
(goal <= 20 us on the small input), ``ort/run`` (ORT's time over ours) and the floor
over ``run`` (goal >= 95%). One thread by default, in process CPU time (robust on a busy
machine); every runtime's idle threads sleep (``timing.quiet_threads``). Run:

    .venv/bin/python benchmarks/run_overhead.py [--targets avx512,native] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timing

SHAPES = [(1, 1 << 24), (1, 1 << 26), (8, 128)]
COLUMNS = ["vm", "run", "run copy", "out=", "ort", "floor"]


def softmax_model(rows: int, cols: int) -> object:
    """``Softmax(x)`` rewritten by two-pass-softmax, as ``rewrite --passes two-pass-softmax``."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from rewriter.registry import create_pass

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = create_pass("two-pass-softmax")(ir.serde.deserialize_model(model))
    return ir.serde.serialize_model(result.model)


def _ort(x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(
        proto.SerializeToString(), timing.ort_options(1), providers=["CPUExecutionProvider"]
    )
    binding = session.io_binding()
    binding.bind_input("x", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    return lambda: session.run_with_iobinding(binding)


def _floor_probes(rows: int, cols: int, target: object, x: np.ndarray, y: np.ndarray) -> dict:
    """The read and write probes of ``softmax.py``, on the kernel's segments of a row."""
    from probes import aligned_empty, bind, read_probe, write_probe

    from rewriter.backends.tvm.kernels.softmax import split_segments

    segments = split_segments(rows, cols)
    view = (rows * segments, cols // segments)
    scratch = aligned_empty(x.shape)
    scratch[:] = 0
    return {
        "read": bind(read_probe(*view, target), target, x.reshape(view), scratch.reshape(view)),
        "write": bind(write_probe(*view, target), target, x.reshape(view), y.reshape(view)),
    }


def _check(x: np.ndarray, y: np.ndarray, chunk: int = 1 << 20) -> None:
    """Ours against softmax in float64 (the row sums in chunks, the first ``chunk``
    columns compared): within 1e-5 of the largest value, float32 rounding and the
    polynomial exp being a few ulp (~1e-6). Not against ORT: its float32 sum over 16M
    terms drifts by ~1e-4 relative."""
    peak = x.max(axis=-1, keepdims=True).astype(np.float64)
    total = sum(
        np.exp(x[:, i : i + chunk] - peak).sum(axis=-1, keepdims=True)
        for i in range(0, x.shape[1], chunk)
    )
    head = np.exp(x[:, :chunk] - peak) / total
    error = float(np.abs(y[:, :chunk] - head).max() / head.max())
    assert error < 1e-5, f"ours is off float64 softmax by {error:.2g} of its largest value"


def measure(
    target_name: str, rows: int, cols: int, rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per call of every column for one target and shape."""
    import tvm

    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import targets

    compiled = backend.compile(softmax_model(rows, cols), target_name)
    with tempfile.TemporaryDirectory() as folder:
        library = backend.load(compiled.export(Path(folder) / "softmax.so"))
    target = targets.resolve(target_name)
    x = backend.aligned_empty((rows, cols))
    x[:] = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 4
    # 16 bytes past a 64-byte boundary, as numpy's own allocations start: copied.
    plain = backend.aligned_empty((rows * cols + 16,))[4 : 4 + rows * cols].reshape(rows, cols)
    plain[:] = x
    y, ort_y = backend.aligned_empty((rows, cols)), backend.aligned_empty((rows, cols))
    session = library.session()
    main, tx = library._machine()["main"], tvm.runtime.from_dlpack(x)
    calls = {
        "vm": lambda: main(tx),
        "run": lambda: library.run({"x": x}),
        "run copy": lambda: library.run({"x": plain}),
        "out=": lambda: session.run({"x": x}, out={"y": y}),
        "ort": _ort(x, ort_y),
        **_floor_probes(rows, cols, target, x, backend.aligned_empty((rows, cols))),
    }
    session.run({"x": x}, out={"y": y})
    _check(x, y)
    big = rows * cols * 4 > (32 << 20)
    times = timing.samples(
        calls, rounds=rounds, max_rounds=rounds, block=1 if big else "auto", clock=clock
    )
    result = timing.median(times)
    result["floor"] = 2 * result.pop("read") + result.pop("write")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="avx512,native", help="presets, comma-separated")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="TVM's and ORT's threads")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    timing.quiet_threads()
    clock_name = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    print(
        f"## {args.threads} thread(s), {clock_name} time, median of {args.rounds} interleaved rounds"
    )
    head = ["target", "shape", *COLUMNS, "run/vm", "out=/vm", "run-vm us", "ort/run", "floor/run"]
    print(" | ".join(f"{h:>12}" for h in head))
    for target_name in args.targets.split(","):
        for rows, cols in SHAPES:
            t = measure(target_name, rows, cols, args.rounds, clock)
            small = rows * cols < (1 << 20)
            unit = 1e6 if small else 1e9 / (rows * cols)  # us per call, else ns per element
            cells = [target_name, f"{rows}x{cols}" + (" (us)" if small else " (ns/el)")]
            cells += [f"{t[c] * unit:.3f}" for c in COLUMNS]
            cells += [f"{t['run'] / t['vm']:.3f}", f"{t['out='] / t['vm']:.3f}"]
            cells += [f"{(t['run'] - t['vm']) * 1e6:.1f}", f"{t['ort'] / t['run']:.2f}x"]
            cells += [f"{t['floor'] / t['run']:.0%}"]
            print(" | ".join(f"{c:>12}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
