"""Benchmark: a symbolic library, the same with its symbolic dimensions bounded
(``max_dims``, ``--max-dim``: memory planned once at the bound), and fixed shapes.

Per model (ONNX files with a symbolic ``batch``, e.g. the zoo's exports in
``~/.cache/rewriter/zoo``): compile for ``--target`` without dims (``symbolic``), with
``--bound`` (``bounded``; default ``batch=16``) and, per ``--batch``, with every
symbolic dimension fixed (``fixed``); then per batch run the three libraries and ONNX
Runtime on the same inputs (``--dim`` gives the other symbolic sizes, e.g.
``sequence=128``), check them against ORT, and time the four interleaved in one process
(``timing.samples``, rotating; every runtime's idle threads sleep). Prints each
function's storage allocations (planned statically / sized on each call) and, per batch,
the ratios to the fixed library: ``symbolic/fixed``, ``bounded/fixed``,
``symbolic/bounded``. One thread by default. ::

    Z=~/.cache/rewriter/zoo
    .venv/bin/python benchmarks/bounded_dims.py $Z/efficientnet_b0-b98e5306b9/*.onnx
    .venv/bin/python benchmarks/bounded_dims.py $Z/bert-26774ba15a/torchscript-57ba223e.onnx \\
        --bound batch=8 --bound sequence=128 --dim sequence=128
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ONNX files with a symbolic batch axis")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bound", action="append", metavar="NAME=N", help="default batch=16")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=N")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per batch")
    parser.add_argument("--target", default="avx512")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    timing.quiet_threads()
    bounds = _pairs(args.bound or ["batch=16"])
    sizes = _pairs(args.dim)
    for path in args.models:
        measure(path, args, bounds, sizes)


def _pairs(items: list[str]) -> dict[str, int]:
    return {item.split("=")[0]: int(item.split("=")[1]) for item in items}


def measure(path: str, args: argparse.Namespace, bounds: dict[str, int], sizes: dict[str, int]) -> None:
    import onnxruntime as ort

    from rewriter import verify
    from rewriter.backends import tvm as backend

    session = ort.InferenceSession(path, timing.ort_options(args.threads), providers=["CPUExecutionProvider"])
    symbolic = backend.compile(path, args.target)
    bounded = backend.compile(path, args.target, max_dims=bounds)
    memory = {
        name: compiled.memory.functions["main"] if compiled.memory else {}
        for name, compiled in (("symbolic", symbolic), ("bounded", bounded))
    }
    print(f"{path}: storage allocations of main {memory}", flush=True)
    for batch in args.batch:
        feeds = verify.make_inputs(path, dims={"batch": batch, **sizes}, seed=0)
        fixed = backend.compile(path, args.target, dims=backend.shape_dims(path, feeds))
        reference = session.run(None, feeds)[0]
        libraries = {"symbolic": symbolic, "bounded": bounded, "fixed": fixed}
        errors = {}
        for name, compiled in libraries.items():
            output = next(iter(compiled.run(feeds).values()))
            errors[name] = float(np.abs(output - reference).max() / np.abs(reference).max())
        calls = {
            name: (lambda c=compiled, f=feeds: c.run(f)) for name, compiled in libraries.items()
        }
        calls["ort"] = lambda f=feeds: session.run(None, f)
        times = timing.median(
            timing.samples(calls, rounds=5, seconds=args.seconds, block="auto", rotate=True)
        )
        ratio = {name: times[name] / times["fixed"] for name in ("symbolic", "bounded", "ort")}
        print(
            f"  batch {batch}: symbolic/fixed {ratio['symbolic']:.3f}  bounded/fixed "
            f"{ratio['bounded']:.3f}  symbolic/bounded {times['symbolic'] / times['bounded']:.3f}  "
            f"ort/fixed {ratio['ort']:.3f}  (fixed {times['fixed'] * 1e3:.2f} ms; max rel err vs ORT "
            + ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
            + ")",
            flush=True,
        )


if __name__ == "__main__":
    main()
