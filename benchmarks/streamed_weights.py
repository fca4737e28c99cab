"""Benchmark: batch-1 matmuls and convolutions whose weights stream from memory.

With few rows (a batch-1 matmul over 16-64 tokens, a last-stage convolution over 7 x 7
pixels), each weight panel is reused by a handful of register tiles and the kernel waits
on memory. Our matmul and convolution rules then prefetch the next panel in the
micro-kernel (``schedules.prefetch_next_panel``). Each case is a chain of ``--layers``
layers with distinct weights, as in a model, so every call reads its weights from
outside the L2 (a single matmul called in a loop keeps its weight in cache and hides the
effect). The 128- and 197-row chains (16 and 25 row tiles) are prefetched only in
code tuned for a Sapphire Rapids class CPU (``schedules.PREFETCH_MAX_TILES_BY_CPU``;
``avx512`` is tuned for the compiling CPU): elsewhere ``no prefetch / ours`` is 1.0x
there. Side by side, in interleaved rounds on one thread:

* ``ours``: the chain compiled through our pipeline;
* ``no prefetch``: the same pipeline with the prefetch turned off
  (``PREFETCH_MIN_BYTES`` beyond every weight);
* ``ort``: ONNX Runtime on the same model.

Ratios are peer time / our time (above 1: ours is faster). Run::

    .venv/bin/python benchmarks/streamed_weights.py [--seconds 4] [--layers 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import onnx
import timing
from matmul_shapes import graph_model, ort_call, tvm_call
from onnx import helper, numpy_helper
from timing import interleaved

from rewriter.backends.tvm.relax_passes import schedules


def matmul_chain(rows: int, width: int, layers: int) -> onnx.ModelProto:
    """``x[1, rows, width]`` through ``layers`` matmuls by distinct ``width x width`` weights."""
    rng = np.random.default_rng(0)
    inits, nodes, previous = [], [], "x"
    for layer in range(layers):
        weight = rng.standard_normal((width, width)) / np.sqrt(width)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{layer}"))
        output = "y" if layer == layers - 1 else f"h{layer}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{layer}"], [output]))
        previous = output
    return graph_model(nodes, {"x": [1, rows, width]}, [1, rows, width], inits)


def conv_chain(channels: int, size: int, layers: int) -> onnx.ModelProto:
    """``layers`` 3 x 3 convolutions (padding 1, then ReLU) of ``channels`` over ``size x size``."""
    rng = np.random.default_rng(0)
    inits, nodes, previous = [], [], "x"
    for layer in range(layers):
        weight = rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{layer}"))
        output = "y" if layer == layers - 1 else f"h{layer}"
        nodes += [
            helper.make_node("Conv", [previous, f"w{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{layer}"], [output]),
        ]
        previous = output
    shape = [1, channels, size, size]
    return graph_model(nodes, {"x": shape}, shape, inits)


def cases(layers: int) -> list[tuple[str, onnx.ModelProto]]:
    return [
        ("16 x 1024 x 1024", matmul_chain(16, 1024, layers)),
        ("32 x 1024 x 1024", matmul_chain(32, 1024, layers)),
        ("49 x 768 x 768", matmul_chain(49, 768, layers)),
        ("64 x 1024 x 1024", matmul_chain(64, 1024, layers)),
        ("128 x 1024 x 1024", matmul_chain(128, 1024, layers)),
        ("197 x 768 x 768", matmul_chain(197, 768, layers)),
        ("conv 512 @ 7 x 7", conv_chain(512, 7, layers)),
        ("conv 256 @ 7 x 7", conv_chain(256, 7, layers)),
        ("conv 256 @ 14 x 14", conv_chain(256, 14, layers)),
    ]


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per case")
    parser.add_argument("--layers", type=int, default=8, help="layers (distinct weights) per chain")
    args = parser.parse_args()
    print(f"{'case':18} {'weights MiB':>11} {'ours ms':>8} {'no prefetch / ours':>18} {'ort / ours':>10}")
    for label, model in cases(args.layers):
        inputs = feeds(model)
        calls: dict[str, Callable[[], None]] = {"ours": tvm_call(model, inputs)}
        default = schedules.PREFETCH_MIN_BYTES
        schedules.PREFETCH_MIN_BYTES = 1 << 62
        try:
            calls["no prefetch"] = tvm_call(model, inputs)
        finally:
            schedules.PREFETCH_MIN_BYTES = default
        calls["ort"] = ort_call(model, inputs)
        t = interleaved(calls, args.seconds)
        mib = sum(np.prod(init.dims) * 4 for init in model.graph.initializer) / 2**20
        print(
            f"{label:18} {mib:11.0f} {t['ours'] * 1e3:8.2f} {t['no prefetch'] / t['ours']:17.2f}x"
            f" {t['ort'] / t['ours']:9.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
