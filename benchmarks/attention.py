"""Softmax attention vs sigmoid attention vs SOFT: forward time by sequence length.

One process, one thread count, the same inputs (batch 1, ``--heads`` heads, head dim
64, float32, seeded) for every peer at each length:

* ``sdpa``: ``F.scaled_dot_product_attention`` (torch's fused softmax attention);
* ``softmax``: explicit ``softmax(QKᵀ/sqrt(d))·V`` (:func:`rewriter.passes.attention.math.softmax_attention`);
* ``sigmoid``: :func:`rewriter.passes.attention.math.sigmoid_attention` (Ramapuram et al. 2024),
  what the ``sigmoid-attention`` rewrite computes;
* ``soft``: :func:`rewriter.passes.attention.math.softmax_free_attention` (Lu et al. 2021),
  m = ``--landmarks`` (32), ``--iterations`` (20) Newton–Schulz steps.

Times are the minimum over repeats (at least ``--repeat``, and enough for 0.5 s): on a
shared machine the minimum is the run least disturbed by other processes. One thread
by default (``--threads``). Ratios are
peer / sdpa (lower is faster). The SOFT crossover is the first length where SOFT beats
sdpa. With ``--tvm``, two more peers compiled by ``rewriter.backends.tvm`` for ``llvm``
(no fused kernel exists for either: the TVM backend has no lowering of our operators,
so the sigmoid operator's function body is inlined into standard ops first):

* ``tvm-softmax``: the ONNX graph ``MatMul(Softmax(MatMul(Q·s, Kᵀ)), V)``;
* ``tvm-sigmoid``: ``ai.rewriter::SigmoidAttention`` with its body inlined.

SOFT has no TVM column: its body's Newton–Schulz ``Loop`` is not supported by TVM's
ONNX importer. Each TVM compile takes ~20 s on 2 cores.

    python benchmarks/attention.py                 # 128 .. 4096, then 16384 (sdpa vs soft)
    python benchmarks/attention.py --quick         # 128 .. 1024
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import timing
import torch
import torch.nn.functional as F

from rewriter.passes.attention import math as amath

HEAD_DIM = 64
LENGTHS = [128, 256, 512, 1024, 2048, 4096]
PEERS = ("sdpa", "softmax", "sigmoid", "soft")
LONG = [16384]  # only sdpa and SOFT: the explicit n×n peers would need 2 GiB per head


def timed(function: Callable[[], torch.Tensor], repeat: int) -> float:
    """Minimum seconds of ``function()`` after one warm-up: ``repeat`` runs and 0.5 s (200 at most)."""
    runs = timing.samples({"f": function}, rounds=repeat, seconds=0.5, max_rounds=200)
    return timing.fastest(runs)["f"]


def peers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int, iterations: int
) -> dict[str, Callable[[], torch.Tensor]]:
    scale = 1.0 / math.sqrt(HEAD_DIM)
    n = q.shape[-2]
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "softmax": lambda: amath.softmax_attention(q, k, v, scale=scale),
        "sigmoid": lambda: amath.sigmoid_attention(q, k, v, scale=scale, bias=-math.log(n)),
        "soft": lambda: amath.softmax_free_attention(
            q, k, v, scale=scale, landmarks=landmarks, iterations=iterations
        ),
    }


def tvm_peers(n: int, heads: int) -> dict[str, Callable[[], object]]:
    """Compiled softmax and (inlined) sigmoid attention at length ``n``, or {} with a note."""
    import sys
    from pathlib import Path

    import numpy as np

    from rewriter.backends import tvm as backend

    # The same models as the fused-kernel benchmark beside this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sigmoid_attention_tvm import models

    built = models(n, heads)
    softmax, sigmoid = built["softmax"], built["inlined"]
    shape = [1, heads, n, HEAD_DIM]
    rng = np.random.default_rng(n)
    feeds = {x: rng.standard_normal(shape).astype(np.float32) for x in "qkv"}
    peers: dict[str, Callable[[], object]] = {}
    for name, model in (("tvm-softmax", softmax), ("tvm-sigmoid", sigmoid)):
        try:
            compiled = backend.compile(model, "llvm")
        except Exception as exc:  # report and go on: the torch peers still stand
            print(f"  {name} at n={n}: not compiled ({type(exc).__name__}: {exc})")
            continue
        peers[name] = lambda compiled=compiled: compiled.run(feeds)
    return peers


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--landmarks", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="lengths 128..1024 only")
    parser.add_argument("--no-long", action="store_true", help="skip 16384")
    parser.add_argument("--tvm", action="store_true", help="add TVM (llvm) columns, up to 4096")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = LENGTHS[:4] if args.quick else LENGTHS
    long = [] if args.quick or args.no_long else LONG
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, heads {args.heads}, "
        f"head dim {HEAD_DIM}, float32, SOFT m={args.landmarks} iterations={args.iterations}"
    )
    header = f"{'n':>6} {'sdpa ms':>9} {'softmax ms':>11} {'sigmoid ms':>11} {'soft ms':>9}   {'softmax/sdpa':>12} {'sigmoid/sdpa':>12} {'soft/sdpa':>9} {'sigmoid/softmax':>15}"
    print(header)
    crossover = None
    with torch.no_grad():
        for n in lengths + long:
            generator = torch.Generator().manual_seed(n)
            q, k, v = (
                torch.randn(1, args.heads, n, HEAD_DIM, generator=generator) for _ in range(3)
            )
            functions = peers(q, k, v, args.landmarks, args.iterations)
            if n in long:
                functions = {name: functions[name] for name in ("sdpa", "soft")}
            ms = {name: 1e3 * timed(function, args.repeat) for name, function in functions.items()}
            if crossover is None and ms["soft"] < ms["sdpa"]:
                crossover = n
            cell = {name: f"{ms[name]:.3f}" if name in ms else "-" for name in PEERS}
            ratio = {name: f"{ms[name] / ms['sdpa']:.2f}" if name in ms else "-" for name in PEERS}
            sigmoid_vs_softmax = f"{ms['sigmoid'] / ms['softmax']:.2f}" if "sigmoid" in ms else "-"
            print(
                f"{n:>6} {cell['sdpa']:>9} {cell['softmax']:>11} {cell['sigmoid']:>11} "
                f"{cell['soft']:>9}   {ratio['softmax']:>12} {ratio['sigmoid']:>12} "
                f"{ratio['soft']:>9} {sigmoid_vs_softmax:>15}",
                flush=True,
            )
    where = f"n = {crossover}" if crossover else "not within the lengths measured"
    print(f"SOFT is faster than sdpa from {where}")
    if args.tvm:
        print(f"{'n':>6} {'tvm-softmax ms':>15} {'tvm-sigmoid ms':>15} {'sigmoid/softmax':>16}")
        for n in lengths:
            timings = {
                name: 1e3 * timed(f, args.repeat) for name, f in tvm_peers(n, args.heads).items()
            }  # type: ignore[arg-type]
            if len(timings) == 2:
                ratio = timings["tvm-sigmoid"] / timings["tvm-softmax"]
                print(
                    f"{n:>6} {timings['tvm-softmax']:>15.3f} {timings['tvm-sigmoid']:>15.3f} {ratio:>16.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
