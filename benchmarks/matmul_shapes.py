"""Benchmark: matmuls without whole register tiles against their divisible neighbours.

Shapes real models have whose output width (or row count) no register tile divides:
a 1000-class head, BERT's 30522-word LM head, ViT's 197 tokens (its linears, and its
attention scores ``Q @ K^T`` with K an input; ViT-B/16's rows at batch 8, 1576 = 8 x 197,
which no L2 row block divides, and its 3072-deep MLP matmul, there and at batch 8;
DINOv2-S's at batch 8). Each is compiled through our pipeline
(``rewriter.backends.tvm.compile``, which pads them to whole tiles: zero-padded weight
panels at compile time, padded rows reading the last real one, zero-padded copies of
computed B once per call), and
timed side by side, in interleaved rounds on one thread, against:

* ``unpadded``: the same pipeline with the padding turned off, as it was before: such a
  matmul is left to TVM's stock lowering (scalar loops);
* ``ort``: ONNX Runtime on the same model;
* the divisible neighbour (N = 1024, 30528; 192 rows) through our pipeline: how much
  of the whole-tile speed the padded shape keeps.

GFLOP/s count the real (unpadded) flops; ratios are peer time / our time. Run::

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/matmul_shapes.py [--seconds 4] [--only lm]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime as ort
import timing
from onnx import TensorProto, helper, numpy_helper
from timing import interleaved

from rewriter.backends import tvm as backend
from rewriter.backends.tvm.relax_passes import pack_weights, schedules


def dense(rows: int, k: int, n: int, gelu: bool) -> onnx.ModelProto:
    """``x[1, rows, k] @ W[k, n] + b`` (then erf-GELU), as a BERT export writes it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    if gelu:
        for name, value in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        nodes[-1] = helper.make_node("Add", ["h", "b"], ["z"])
        nodes += [
            helper.make_node("Div", ["z", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]),
            helper.make_node("Mul", ["z", "e1"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ]
    return graph_model(nodes, {"x": [1, rows, k]}, [1, rows, n], inits)


def scores(heads: int, tokens: int, depth: int) -> onnx.ModelProto:
    """Attention scores ``Q @ K^T / 8`` with ``K^T`` an input (not a constant)."""
    inits = [numpy_helper.from_array(np.array(0.125, np.float32), "c")]
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["m"]),
        helper.make_node("Mul", ["m", "c"], ["y"]),
    ]
    shapes = {"q": [1, heads, tokens, depth], "kt": [1, heads, depth, tokens]}
    return graph_model(nodes, shapes, [1, heads, tokens, tokens], inits)


def graph_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    out: list[int],
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    """An opset-17 model of ``nodes``: float inputs ``inputs`` (name -> shape), output
    ``y`` of shape ``out``, initializers ``inits``."""
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# (group, label, model, flops, neighbour label, neighbour model)
CASES = [
    (
        "dense",
        "128x768x1000 +b",
        dense(128, 768, 1000, False),
        "N=1024",
        dense(128, 768, 1024, False),
    ),
    (
        "gelu",
        "128x768x1000 gelu",
        dense(128, 768, 1000, True),
        "N=1024",
        dense(128, 768, 1024, True),
    ),
    ("lm", "8x768x30522 +b", dense(8, 768, 30522, False), "N=30528", dense(8, 768, 30528, False)),
    ("vit", "197x768x768 gelu", dense(197, 768, 768, True), "M=192", dense(192, 768, 768, True)),
    ("scores", "12x197x64x197", scores(12, 197, 64), "192 tokens", scores(12, 192, 64)),
    # ViT-B/16 at batch 8: 1576 = 8 x 197 rows (no L2 row block divides them), and its
    # MLP's 3072-deep second matmul (rows x K and the 9.4 MB weight both past L2).
    ("blocks", "1576x768x2304 +b", dense(1576, 768, 2304, False), "M=1600", dense(1600, 768, 2304, False)),
    ("deep", "197x3072x768 +b", dense(197, 3072, 768, False), "M=192", dense(192, 3072, 768, False)),
    # The same weight under ViT-B/16's 1576 rows (batch 8), and DINOv2-S's MLP weight
    # (1536 x 384, 2.4 MB) under its 2056 = 8 x 257 rows: k blocks in column blocks.
    (
        "deep",
        "1576x3072x768 +b",
        dense(1576, 3072, 768, False),
        "M=1600",
        dense(1600, 3072, 768, False),
    ),
    (
        "deep",
        "2056x1536x384 +b",
        dense(2056, 1536, 384, False),
        "M=2048",
        dense(2048, 1536, 384, False),
    ),
]


def flops(model: onnx.ModelProto) -> float:
    """2 x the multiply-adds of the model's MatMul (from its input and output shapes)."""
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    matmul = model.graph.node[0]
    depth = {**dims, **weights}[matmul.input[1]][-2]
    return 2.0 * float(np.prod(dims["y"])) * depth


@contextmanager
def unpadded() -> Iterator[None]:
    """Our pipeline as it was before padding and cache blocking: ragged shapes neither
    packed nor padded, rows in the blocks that divide them, ``k`` never blocked."""
    padding, find, chunk = schedules.padding, pack_weights.find_packable, schedules.K_CHUNK
    schedules.K_CHUNK = 0

    def whole_panels_only(func, width, lanes):  # type: ignore[no-untyped-def]
        site = find(func, width, lanes)
        return site if site is not None and site.n % width == 0 else None

    schedules.padding = lambda *args, **kwargs: (1, 1)
    pack_weights.find_packable = whole_panels_only
    try:
        yield
    finally:
        schedules.padding, pack_weights.find_packable = padding, find
        schedules.K_CHUNK = chunk


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for v in model.graph.input
    }


def tvm_call(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    """Compile for avx512, check against ORT (1e-4 of the output scale), return one call."""
    import tvm

    compiled = backend.compile(model, "avx512")
    expected = ort.InferenceSession(model.SerializeToString()).run(None, inputs)[0]
    error = float(np.abs(compiled.run(inputs)["y"] - expected).max() / np.abs(expected).max())
    assert error < 1e-4, f"compiled output differs from ONNX Runtime's by {error:.2g}"
    vm = compiled._machine()
    args = [tvm.runtime.tensor(inputs[name], tvm.cpu(0)) for name in compiled.input_names]
    return lambda: vm["main"](*args)


def ort_call(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    session = ort.InferenceSession(
        model.SerializeToString(), timing.ort_options(1), providers=["CPUExecutionProvider"]
    )
    return lambda: session.run(None, inputs)


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per case")
    parser.add_argument("--only", default="", help="groups whose name contains this")
    args = parser.parse_args()
    print(
        f"{'shape':18} {'ours GF/s':>9} {'unpadded':>9} {'ort':>9} {'neighbour':>16}"
        f" {'vs unpadded':>11} {'vs ort':>7} {'of neighbour':>12}"
    )
    for group, label, model, other_label, other in CASES:
        if args.only not in group:
            continue
        inputs, other_inputs = feeds(model), feeds(other)
        calls = {"ours": tvm_call(model, inputs), "neighbour": tvm_call(other, other_inputs)}
        with unpadded():
            calls["unpadded"] = tvm_call(model, inputs)
        calls["ort"] = ort_call(model, inputs)
        t = interleaved(calls, args.seconds)
        work = {name: flops(other if name == "neighbour" else model) for name in t}
        rate = {name: work[name] / t[name] / 1e9 for name in t}
        print(
            f"{label:18} {rate['ours']:9.1f} {rate['unpadded']:9.1f} {rate['ort']:9.1f}"
            f" {other_label:>8} {rate['neighbour']:7.1f} {t['unpadded'] / t['ours']:10.1f}x"
            f" {t['ort'] / t['ours']:6.2f}x {rate['ours'] / rate['neighbour']:11.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
