"""Rewriting huge graphs: time and peak memory per node from 1k to 1M nodes.

The model is a chain of ``MatMul(x, W_i) + b_i -> Softmax`` blocks (three nodes and two
initializers each, ``--width`` features, no ``value_info``: passes that need types infer
them), written once per size. Each (size, pass) runs in a fresh process, so its peak RSS
is its own: ``rewriter.io.load`` (with the ONNX checker), the pass through
``rewriter.run_pipeline``, ``rewriter.io.save``. Every pass that runs without
calibration data is measured (``prune``'s ``rd`` allocation and ``quantize``'s LIM
importance run the model; they are measured by ``benchmarks/prune.py``).

Printed per size: the pass's wall and CPU time per node, load and save time per node,
peak RSS per node, and the ratio of each pass's CPU time per node to its value at the
smallest size (flat is linear). CPU time is the steadier figure on a shared machine.

    python benchmarks/scale.py                                        # 1k, 10k, 100k, every pass
    python benchmarks/scale.py --sizes 1000 10000 100000 1000000 --passes two-pass-softmax
    python benchmarks/scale.py --code /tmp/scale-before               # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PASSES = (
    "two-pass-softmax",
    "sigmoid-attention",
    "softmax-free-attention",
    "fuse-cross-entropy",
    "quantize(bits=8)",
    "quantize(avg_bits=6,importance=zd)",
    "prune(allocation=uniform)",
    "prune(allocation=global-magnitude)",
    "prune-2to4",
    "prune-width",
)
SIZES = (1_000, 10_000, 100_000)
NODES_PER_BLOCK = 3


def make_model(nodes: int, width: int, path: Path) -> None:
    """Write the chain of ``nodes // 3`` MatMul + Add + Softmax blocks to ``path``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph_nodes, initializers = [], []
    x = "x"
    for i in range(max(1, nodes // NODES_PER_BLOCK)):
        weight = rng.standard_normal((width, width)).astype(np.float32)
        bias = rng.standard_normal(width).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        graph_nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Softmax", [f"a{i}"], [f"s{i}"], name=f"softmax{i}", axis=-1),
        ]
        x = f"s{i}"
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def measure(model_path: Path, spec: str, output: Path) -> dict[str, float]:
    """Load, rewrite and save in this process; times in seconds, peak RSS in bytes."""
    from rewriter import io
    from rewriter.manager import run_pipeline
    from rewriter.registry import parse_pipeline

    passes = parse_pipeline(spec)
    start = time.perf_counter()
    model = io.load(model_path)
    loaded = time.perf_counter()
    nodes = sum(1 for _ in model.graph)
    cpu = time.process_time()
    result = run_pipeline(model, passes)
    cpu = time.process_time() - cpu
    rewritten = time.perf_counter()
    io.save(result.model, output)
    saved = time.perf_counter()
    return {
        "nodes": nodes,
        "load_s": loaded - start,
        "pass_s": rewritten - loaded,
        "pass_cpu_s": cpu,
        "save_s": saved - rewritten,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stats": result.stats,
    }


def _child(arguments: list[str], code: Path | None, timeout: float) -> dict | str:
    env = dict(os.environ)
    if code is not None:  # the checkout's rewriter comes first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, __file__, *arguments],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s"
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--passes", nargs="+", default=list(PASSES))
    parser.add_argument("--width", type=int, default=8, help="features per block (weights are width x width)")
    parser.add_argument("--code", type=Path, help="run the passes from this checkout (e.g. main's) instead")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per (size, pass) process")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--make", nargs=2, metavar=("NODES", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_model(int(args.make[0]), args.width, Path(args.make[1]))
        print(json.dumps({"made": args.make[1]}))
        return
    if args.child:
        model, spec, out = args.child
        print(json.dumps(measure(Path(model), spec, Path(out))))
        return

    code = args.code.resolve() if args.code else None
    print(f"code: {code or ROOT}; width {args.width}; times per node in microseconds, memory in KiB per node")
    header = f"{'pass':<36} {'nodes':>9} {'pass us':>9} {'cpu us':>8} {'x 1st':>6} {'load us':>8} {'save us':>8} {'KiB':>6}  stats"
    print(header)
    rows = []
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rewriter-scale-") as tmp:
        for size in args.sizes:
            model = Path(tmp) / f"chain{size}.onnx"
            made = _child(["--make", str(size), str(model), "--width", str(args.width)], None, args.timeout)
            if isinstance(made, str) and made.startswith(("failed", ">")):
                print(f"making {size} nodes: {made}")
                continue
            for spec in args.passes:
                out = Path(tmp) / "out.onnx"
                row = _child(["--child", str(model), spec, str(out)], code, args.timeout)
                if isinstance(row, str):
                    print(f"{spec:<36} {size:>9} {row}", flush=True)
                    rows.append({"pass": spec, "size": size, "error": row})
                    continue
                nodes = row["nodes"]
                per = {key: row[key] / nodes * 1e6 for key in ("pass_s", "pass_cpu_s", "load_s", "save_s")}
                first.setdefault(spec, per["pass_cpu_s"])
                stats = ", ".join(f"{k}={v}" for k, v in row["stats"].items() if v and not k.endswith("bytes"))
                print(
                    f"{spec:<36} {nodes:>9} {per['pass_s']:>9.1f} {per['pass_cpu_s']:>8.1f} "
                    f"{per['pass_cpu_s'] / first[spec]:>6.2f} {per['load_s']:>8.1f} {per['save_s']:>8.1f} "
                    f"{row['peak_rss'] / nodes / 1024:>6.1f}  {stats[:60]}",
                    flush=True,
                )
                rows.append({"pass": spec, "size": size, **row})
            model.unlink()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
