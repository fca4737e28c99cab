"""Benchmark: the fused exact softmax-attention kernel against what it replaces, TVM's stock
softmax and ONNX Runtime.

At each case (batch, heads, length, head dim, mask), one attention graph
``MatMul(Softmax(MatMul(Q, Kᵀ)·s + mask), V)`` with symbolic batch and length, run on the
same inputs (float32, seeded) as:

* ``fused``: rewritten by ``two-pass-softmax`` and compiled by
  ``rewriter.backends.tvm.compile`` at the case's dims: the fused kernel
  (:mod:`rewriter.backends.tvm.kernels.softmax_attention`);
* ``fused-sym``: the same, compiled with the batch and length symbolic;
* ``unfused``: the same at fixed dims with ``prepare(fuse_attention=False)``: our matmul
  schedules and two-pass softmax kernel, the n x n probabilities in memory (what the
  backend compiled before the fusion);
* ``tvm``: the original graph (ONNX ``Softmax``) compiled at fixed dims by the same
  pipeline: TVM's stock softmax lowering between our matmuls;
* ``ort``: ONNX Runtime on the original graph.

Masks: ``pad`` is a padding mask ``[B, 1, 1, n]`` (0 or ``finfo.min``, the last eighth
of the keys padded), ``causal`` a ``[1, 1, n, n]`` one (0 or -inf), ``none`` none.
Each ``--threads`` count runs with TVM's pool and ONNX Runtime at that many threads
(idle threads sleep, :func:`timing.quiet_env`); times are medians of interleaved rounds,
so a noisy machine slows every peer alike. Ratios: each peer / ``ort``.

    .venv/bin/python benchmarks/softmax_attention_tvm.py            # every case
    .venv/bin/python benchmarks/softmax_attention_tvm.py --quick    # MiniLM and ViT shapes
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import numpy as np
import timing

# name: (batch, heads, length, head dim, mask)
CASES = {
    "minilm": (1, 12, 128, 32, "pad"),
    "minilm-b8": (8, 12, 128, 32, "pad"),
    "vit-b": (1, 12, 197, 64, "none"),
    "gpt2-512": (1, 12, 512, 64, "causal"),
    "whisper-1500": (1, 8, 1500, 64, "none"),
}
QUICK = ("minilm", "vit-b")
PEERS = ("fused", "fused-sym", "unfused", "tvm", "ort")


def attention_graph(heads: int, head_dim: int, mask: str) -> object:
    """The ONNX attention model (symbolic ``batch`` and ``length``), opset 18."""
    from onnx import TensorProto, helper

    shape = ["batch", heads, "length", head_dim]
    values = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in "qkv"]
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [1.0 / math.sqrt(head_dim)])
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "s"], ["logits"]),
    ]
    if mask != "none":
        mask_shape = ["batch", 1, 1, "length"] if mask == "pad" else [1, 1, "length", "length"]
        values.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, mask_shape))
        nodes.append(helper.make_node("Add", ["logits", "mask"], ["masked"]))
    nodes += [
        helper.make_node("Softmax", ["masked" if mask != "none" else "logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, "attention", values, out, [scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def case_feeds(batch: int, heads: int, n: int, head_dim: int, mask: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    feeds = {x: rng.standard_normal((batch, heads, n, head_dim)).astype(np.float32) for x in "qkv"}
    if mask == "pad":
        padded = np.zeros((batch, 1, 1, n), np.float32)
        padded[..., n - n // 8 :] = np.finfo(np.float32).min
        feeds["mask"] = padded
    elif mask == "causal":
        feeds["mask"] = np.triu(np.full((n, n), -np.inf, np.float32), 1)[None, None]
    return feeds


def peers(name: str, threads: int) -> tuple[dict[str, Callable[[], object]], float]:
    """The peers' calls at case ``name`` and the fused kernel's max error against ORT."""
    import onnx_ir as ir
    import onnxruntime as ort

    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import import_onnx
    from rewriter.registry import create_pass

    batch, heads, n, head_dim, mask = CASES[name]
    original = attention_graph(heads, head_dim, mask)
    model = ir.serde.deserialize_model(original)
    create_pass("two-pass-softmax")(model)
    rewritten = ir.serde.serialize_model(model)
    feeds = case_feeds(batch, heads, n, head_dim, mask)
    dims = {"batch": batch, "length": n}
    compiled = {
        "fused": backend.compile(rewritten, "avx512", dims=dims),
        "fused-sym": backend.compile(rewritten, "avx512"),
        "unfused": backend.compile(
            import_onnx.prepare(rewritten, dims=dims, fuse_attention=False), "avx512"
        ),
        "tvm": backend.compile(original, "avx512", dims=dims),
    }
    session = ort.InferenceSession(
        original.SerializeToString(), timing.ort_options(threads), providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, feeds)[0]
    got = compiled["fused"].run(feeds)["y"]
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    calls: dict[str, Callable[[], object]] = {
        label: (lambda c=c: c.run(feeds)) for label, c in compiled.items()
    }
    calls["ort"] = lambda: session.run(None, feeds)
    return calls, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per case")
    parser.add_argument("--quick", action="store_true", help="the MiniLM and ViT shapes only")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES))
    args = parser.parse_args()
    if os.environ.get("TVM_NUM_THREADS") != str(args.threads):
        # TVM reads its thread count once, when its pool starts: re-run with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], timing.quiet_env(args.threads))
    names = args.cases or (QUICK if args.quick else tuple(CASES))
    print(f"avx512, {args.threads} thread(s), float32; medians of interleaved rounds")
    header = f"{'case':<13} {'b':>2} {'h':>3} {'n':>5} {'d':>3} {'mask':<6}"
    header += "".join(f" {peer + ' ms':>12}" for peer in PEERS)
    header += "".join(f" {peer + '/ort':>13}" for peer in PEERS[:-1]) + f" {'err':>8}"
    print(header)
    for name in names:
        calls, error = peers(name, args.threads)
        ms = timing.median(timing.samples(calls, seconds=args.seconds, rotate=True, block="auto"))
        batch, heads, n, head_dim, mask = CASES[name]
        row = f"{name:<13} {batch:>2} {heads:>3} {n:>5} {head_dim:>3} {mask:<6}"
        row += "".join(f" {ms[peer] * 1e3:>12.3f}" for peer in PEERS)
        row += "".join(f" {ms[peer] / ms['ort']:>13.2f}" for peer in PEERS[:-1])
        print(row + f" {error:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
