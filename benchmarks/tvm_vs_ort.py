"""TVM-compiled BERT against ONNX Runtime on one CPU thread, in the same run.

Builds a random BERT (default: hidden 256, 4 layers, 4 heads, intermediate 1024),
exports it (TorchScript exporter, opset 17), rewrites it with two-pass-softmax and
times, on one thread and at batch 1 x sequence 128:

* ``ort``: ONNX Runtime on the original model (the peer);
* ``tvm original``: TVM on the original model (stock softmax);
* ``tvm two-pass``: TVM on the rewritten model (our two-pass kernel).

Ratios are time / ORT's time (below 1: faster than ORT). Run it with one TVM
thread, e.g.::

    TVM_NUM_THREADS=1 taskset -c 0 .venv/bin/python benchmarks/tvm_vs_ort.py --target avx512
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import timing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import bert  # noqa: E402
from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.registry import create_pass


def export_bert(path: Path, *, hidden: int, layers: int, heads: int, intermediate: int) -> None:
    model = bert.random_bert(hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
    ids = np.zeros((1, 8), dtype=np.int64)
    bert.export_bert(model, path, {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def interleaved_medians(
    runs: dict[str, Callable[[], object]], *, budget: float = 6.0
) -> dict[str, float]:
    """Median time of each callable, timed in rounds (one call of each per round) so that
    load changes on a shared machine hit every contender alike: at least 7 rounds, and
    ``budget`` seconds."""
    return timing.median(timing.samples(runs, rounds=7, seconds=budget, warmup=2))


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("TVM_NUM_THREADS") != "1":
        print("note: TVM_NUM_THREADS is not 1; TVM may use several threads")
    with tempfile.TemporaryDirectory() as folder:
        original = Path(folder) / "bert.onnx"
        export_bert(
            original,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=args.intermediate,
        )
        result = create_pass("two-pass-softmax")(ir.load(original))
        rewritten = Path(folder) / "bert_tp.onnx"
        ir.save(result.model, rewritten)
        dims = {"batch": args.batch, "sequence": args.sequence}
        feeds = verify.make_inputs(original, dims=dims)
        options = timing.ort_options(1)
        options.log_severity_level = 3
        session = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        reference = dict(zip(names, session.run(names, feeds), strict=True))
        runs: dict[str, Callable[[], object]] = {"ort": lambda: session.run(names, feeds)}
        errors = {"ort": 0.0}
        for label, path in (("tvm original", original), ("tvm two-pass", rewritten)):
            compiled = backend.compile(path, args.target, dims=dims)
            outputs = compiled.run(feeds)
            errors[label] = max(
                verify.compare(n, reference[n], outputs[n]).max_rel_err for n in names
            )
            runs[label] = lambda c=compiled: c.run(feeds)
        medians = interleaved_medians(runs)
        rows = [(label, medians[label], errors[label]) for label in runs]
    size = f"BERT hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.sequence}"
    print(f"{size}, target {args.target}, one thread")
    print(f"{'model':<14} {'ms':>9} {'/ ort':>7} {'max rel err vs ort':>19}")
    for label, seconds, error in rows:
        print(f"{label:<14} {seconds * 1e3:>9.2f} {seconds / rows[0][1]:>7.2f} {error:>19.2g}")


if __name__ == "__main__":
    main()
