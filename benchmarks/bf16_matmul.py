"""Benchmark: our bf16 matmul kernels (AMX, vdpbf16ps) against our float32 path and torch.

BERT-shaped linears ``x[1, M, K] @ W[K, N] + b``, each timed side by side in interleaved
rounds, on one thread; the last is BERT's MLM head (N = 30522, not a multiple of 16: the
kernel computes whole groups of 16 channels from a zero-padded weight), at M = 8 to keep
the run short:

* ``amx``: the bf16 ONNX model through ``rewriter.backends.tvm.compile`` for
  ``sapphirerapids`` (``presets.py``): the Relax rewrite runs our AMX kernel
  (``tdpbf16ps``, :mod:`rewriter.backends.tvm.kernels.amx_matmul`); only on CPUs with
  AMX-BF16;
* ``bf16``: the same for avx512 (the Relax rewrite runs our ``vdpbf16ps`` kernel,
  :mod:`rewriter.backends.tvm.relax_passes.bf16_matmul`);
* ``fp32``: the float32 model through the same pipeline (packed panels, 8 x 32 FMA tile);
* ``tvm bf16``: the bf16 model with the rewrite off (TVM's bf16 legalization: each bf16
  operand widened to float32 in our float32 schedule), what bf16 models got before;
* ``torch bf16`` and ``torch fp32``: ``torch.matmul(x, W) + b`` (oneDNN).

Each TVM library is first checked against float64 numpy on the same values. GFLOP/s
count ``2 M K N`` (the real N); ratios are peer time / the first contender's time
(``amx`` where the CPU has it, else ``bf16``). torch's idle OpenMP threads sleep
(``OMP_WAIT_POLICY=PASSIVE``). Run::

    .venv/bin/python benchmarks/bf16_matmul.py [--seconds 3] [--shape 8x768x30522]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ["TVM_NUM_THREADS"] = "1"  # read when TVM's thread pool starts
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep between contenders

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import timing
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from presets import amx_target, host_amx  # noqa: E402
from timing import interleaved  # noqa: E402

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm.relax_passes import bf16_matmul  # noqa: E402

BF16 = ml_dtypes.bfloat16
SHAPES = [(128, 384, 1536), (128, 1536, 384), (128, 768, 768), (8, 768, 30522)]


def dense(m: int, k: int, n: int, dtype: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``x[1, m, k] @ W + b`` as an ONNX model in ``dtype`` (bfloat16 or float32), and its values."""
    rng = np.random.default_rng(0)
    values = {
        "x": rng.standard_normal((1, m, k)).astype(BF16),
        "w": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(BF16),
        "b": rng.standard_normal(n).astype(BF16),
    }
    if dtype == "float32":
        values = {name: value.astype(np.float32) for name, value in values.items()}
        inits = [numpy_helper.from_array(values[name], name) for name in ("w", "b")]
        elem = TensorProto.FLOAT
    else:
        elem = TensorProto.BFLOAT16
        inits = [
            helper.make_tensor(
                name, elem, values[name].shape, values[name].view(np.uint16).tobytes(), raw=True
            )
            for name in ("w", "b")
        ]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", elem, [1, m, k])],
        [helper.make_tensor_value_info("y", elem, [1, m, n])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    ), values


def tvm_call(
    model: onnx.ModelProto,
    values: dict[str, np.ndarray],
    *,
    rewrite: bool = True,
    target: str = "avx512",
) -> Callable[[], None]:
    """Compile for ``target``, check against float64 numpy (bf16: 2**-7 of |x| @ |W| + |b|,
    two bf16 roundings; fp32: 1e-5), return one call."""
    import tvm

    supported = bf16_matmul.supported
    if not rewrite:  # the pipeline as it was: no target has the kernel
        bf16_matmul.supported = lambda target: False  # type: ignore[assignment]
    try:
        compiled = backend.compile(model, target)
    finally:
        bf16_matmul.supported = supported  # type: ignore[assignment]
    x, w, b = (values[name].astype(np.float64) for name in ("x", "w", "b"))
    expected, magnitude = x @ w + b, np.abs(x) @ np.abs(w) + np.abs(b)
    got = compiled.run({"x": values["x"]})["y"].astype(np.float64)
    bound = (2.0**-7 if values["x"].dtype == BF16 else 1e-5) * magnitude
    assert np.all(np.abs(got - expected) <= bound), "compiled output disagrees with numpy"
    vm = compiled._machine()
    x_arg = tvm.runtime.tensor(values["x"], tvm.cpu(0))
    return lambda: vm["main"](x_arg)


def torch_call(values: dict[str, np.ndarray], dtype: torch.dtype) -> Callable[[], None]:
    x, w, b = (torch.from_numpy(values[n].astype(np.float32)).to(dtype) for n in ("x", "w", "b"))

    def call() -> None:
        with torch.no_grad():
            torch.matmul(x, w) + b

    return call


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per shape")
    parser.add_argument(
        "--shape", action="append", default=[], help="MxKxN (repeatable; default: all of SHAPES)"
    )
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in text.split("x")) for text in args.shape] or SHAPES
    torch.set_num_threads(1)
    no_amx = host_amx("amx_bf16")
    names = ["bf16", "fp32", "tvm bf16", "torch bf16", "torch fp32"]
    if no_amx:
        print(f"no 'amx': {no_amx}")
    else:
        names.insert(0, "amx")
    print(
        f"GFLOP/s, 1 thread; ratios: peer time / {names[0]} (ours) time. torch {torch.__version__}"
    )
    print(
        f"{'M x K x N':16}"
        + "".join(f"{name:>11}" for name in names)
        + "".join(f"{'/' + name:>12}" for name in names[1:])
    )
    for m, k, n in shapes:
        model, values = dense(m, k, n, "bfloat16")
        model32, values32 = dense(m, k, n, "float32")
        calls = {
            **({} if no_amx else {"amx": tvm_call(model, values, target=amx_target())}),
            "bf16": tvm_call(model, values),
            "fp32": tvm_call(model32, values32),
            "tvm bf16": tvm_call(model, values, rewrite=False),
            "torch bf16": torch_call(values, torch.bfloat16),
            "torch fp32": torch_call(values, torch.float32),
        }
        t = interleaved(calls, args.seconds)
        rate = {name: 2.0 * m * k * n / t[name] / 1e9 for name in names}
        print(
            f"{f'{m}x{k}x{n}':16}"
            + "".join(f"{rate[name]:11.1f}" for name in names)
            + "".join(f"{t[name] / t[names[0]]:11.2f}x" for name in names[1:]),
            flush=True,
        )


if __name__ == "__main__":
    main()
