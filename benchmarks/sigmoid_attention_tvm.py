"""Benchmark: the fused sigmoid-attention TIR kernel against TVM's unfused attentions.

Three models compiled by ``rewriter.backends.tvm.compile`` for one target, run on the
same inputs (batch 1, ``--heads`` heads, head dim 64, float32, seeded) at each length:

* ``fused``: ``ai.rewriter::SigmoidAttention`` lowered to our fused kernel
  (:mod:`rewriter.backends.tvm.kernels.sigmoid_attention`: no n x m matrix in memory);
* ``softmax``: the ONNX graph ``MatMul(Softmax(MatMul(Q·s, Kᵀ)), V)`` (our scheduled
  matmul and two-pass softmax kernels, the n x m probabilities in memory);
* ``inlined``: ``SigmoidAttention`` with its ONNX function body inlined into standard
  ops (MatMul, Add, Sigmoid, Where, MatMul), what the backend compiled before the kernel.

TVM runs with ``--threads`` threads (``TVM_NUM_THREADS``, set before TVM starts; default
1). Times are the minimum over rounds (at least ``--repeat``, and 0.5 s in all) in which
the three run in turn, so that a noisy machine slows all of them alike.
Ratios: ``softmax/fused`` and ``inlined/fused`` (above 1: the fused kernel is faster).

    .venv/bin/python benchmarks/sigmoid_attention_tvm.py            # 128 .. 4096
    .venv/bin/python benchmarks/sigmoid_attention_tvm.py --quick    # 128 .. 512
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import numpy as np
import timing

HEAD_DIM = 64
LENGTHS = [128, 256, 512, 1024, 2048, 4096]
QUICK = [128, 256, 512]
PEERS = ("fused", "softmax", "inlined")


def timed(functions: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Minimum seconds of each function, run in turn (interleaved: a noisy machine slows
    all of them alike), after one warm-up each; at least ``repeat`` rounds and 0.5 s."""
    return timing.fastest(timing.samples(functions, rounds=repeat, seconds=0.5))


def models(n: int, heads: int) -> dict[str, object]:
    """The three ONNX models of attention at length ``n`` (see the module docstring)."""
    import onnx
    import onnx.inliner
    from onnx import TensorProto, helper

    from rewriter.pass_base import DOMAIN, DOMAIN_VERSION
    from rewriter.passes import sigmoid_attention

    shape = [1, heads, n, HEAD_DIM]
    values = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in "qkv"]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    scale = 1.0 / math.sqrt(HEAD_DIM)
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [scale])
    softmax_nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["q", "s"], ["qs"]),
        helper.make_node("MatMul", ["qs", "kt"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    softmax = helper.make_model(
        helper.make_graph(softmax_nodes, "softmax", values, out, [s]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    zero = helper.make_tensor("mask", TensorProto.FLOAT, [1, 1, 1, 1], [0.0])
    node = helper.make_node(
        sigmoid_attention.OP_TYPE,
        ["q", "k", "v", "mask"],
        ["y"],
        domain=DOMAIN,
        scale=scale,
        bias=-math.log(n),
    )
    fused = helper.make_model(
        helper.make_graph([node], "sigmoid", values, out, [zero]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[sigmoid_attention.function_proto(18)],
    )
    inlined = onnx.inliner.inline_local_functions(fused)
    return {"fused": fused, "softmax": softmax, "inlined": inlined}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--quick", action="store_true", help="lengths 128..512 only")
    parser.add_argument("--lengths", help="comma-separated lengths (overrides --quick)")
    args = parser.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != str(args.threads):
        # TVM reads its thread count once, when its pool starts: re-run with it set.
        env = dict(os.environ, TVM_NUM_THREADS=str(args.threads))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from rewriter import verify
    from rewriter.backends import tvm as backend

    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = QUICK if args.quick else LENGTHS
    print(
        f"TVM {args.target}, {args.threads} thread(s), batch 1, heads {args.heads}, "
        f"head dim {HEAD_DIM}, float32; min over >= {args.repeat} interleaved rounds"
    )
    header = (
        f"{'n':>6} {'fused ms':>10} {'softmax ms':>11} {'inlined ms':>11}"
        f" {'softmax/fused':>14} {'inlined/fused':>14} {'fused err':>10}"
    )
    print(header)
    for n in lengths:
        rng = np.random.default_rng(n)
        shape = (1, args.heads, n, HEAD_DIM)
        feeds = {x: rng.standard_normal(shape).astype(np.float32) for x in "qkv"}
        runs: dict[str, Callable[[], object]] = {}
        outputs: dict[str, np.ndarray] = {}
        for name, model in models(n, args.heads).items():
            compiled = backend.compile(model, args.target)
            outputs[name] = compiled.run(feeds)["y"]
            runs[name] = lambda c=compiled, f=feeds: c.run(f)
        ms = {name: seconds * 1e3 for name, seconds in timed(runs, args.repeat).items()}
        # The fused kernel against ONNX Runtime on the function body (max err / scale).
        expected = verify.run(models(n, args.heads)["fused"].SerializeToString(), feeds)["y"]
        err = float(np.abs(outputs["fused"] - expected).max() / np.abs(expected).max())
        print(
            f"{n:>6} {ms['fused']:>10.3f} {ms['softmax']:>11.3f} {ms['inlined']:>11.3f}"
            f" {ms['softmax'] / ms['fused']:>14.2f} {ms['inlined'] / ms['fused']:>14.2f}"
            f" {err:>10.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
