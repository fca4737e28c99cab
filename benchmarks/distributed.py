"""prune's distortion curves on Ray workers against the serial run (MiniLM).

all-MiniLM-L6-v2 (examples/minilm.prepare): the 36 encoder MatMul weights, ``steps``
amounts each (``prune``'s defaults: 1/32 up to 0.95, 30 amounts), measured on the 8
bundled sentences with the ``pooled`` distortion:

* serial: one process, ONNX Runtime's default threads (one per core), as ``prune`` runs
  without ``--workers``;
* ``--workers N`` for each N of ``--workers``: a local Ray of N one-CPU workers (each
  worker's sessions use one thread), Ray and the worker processes started before the
  clock (a cluster is up before a run); the time covers sending the model, every worker
  building its probe once, and the curves.

Prints each run's seconds, its speedup over one worker and over serial, and whether its
curves are bit-identical to the serial run's.

    python benchmarks/distributed.py                      # serial, 1 and 2 workers
    python benchmarks/distributed.py --workers 1 2 4 --steps 16
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import minilm  # noqa: E402
from rewriter import distributed, io, verify  # noqa: E402
from rewriter.passes.pruning import math as pruning  # noqa: E402
from rewriter.passes.pruning import prune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--distortion", default="pooled", choices=prune.DISTORTIONS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rewriter-distributed-") as folder:
        model_path, inputs_path = minilm.prepare(folder)
        model = io.load(model_path)
        batches = [verify.load_inputs(inputs_path, model_path)]
        options = prune.PruneOptions(distortion=args.distortion, steps=args.steps)
        layers, _ = prune.prunable_layers(model)
        amounts = pruning.amount_grid(options.max_amount, options.steps)
        print(f"MiniLM: {len(layers)} layers x {len(amounts)} amounts, {args.distortion} distortion")

        start = time.perf_counter()
        serial = prune.measure_curves(model, layers, amounts, batches, options)
        serial_s = time.perf_counter() - start
        print(f"{'serial (one process)':<24} {serial_s:7.1f} s")
        one = None
        for workers in args.workers:
            with distributed.Pool(workers=workers) as pool:
                pool.start_workers()  # Ray and its worker processes are up before a run
                start = time.perf_counter()
                curves = prune.measure_curves(model, layers, amounts, batches, options, pool=pool)
                seconds = time.perf_counter() - start
            one = seconds if workers == 1 else one
            versus_one = f"{one / seconds:5.2f}x one worker" if one else ""
            same = "bit-identical" if np.array_equal(curves, serial) else "DIFFERENT from serial"
            print(
                f"{'--workers ' + str(workers):<24} {seconds:7.1f} s  {serial_s / seconds:5.2f}x serial  "
                f"{versus_one}  curves {same}"
            )


if __name__ == "__main__":
    main()
