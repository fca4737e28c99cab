"""Fused linear + cross-entropy vs the unfused loss: peak memory and forward+backward time.

Each (implementation, configuration) runs in a fresh subprocess; its peak memory is the
growth of the process's peak resident set (``ru_maxrss``) over the resident set measured
after the inputs were built, so it counts everything the loss's forward and backward
allocate (logits, log-softmax, gradients, chunk temporaries). Time is the fastest of
``--repeat`` forward+backward runs after one warm-up. Peers, measured in the same run:

* ``unfused``: ``F.cross_entropy(F.linear(h, W), y)`` in eager torch;
* ``compiled``: the same function under ``torch.compile`` (skipped with ``--no-compile``);
* ``fused``: :func:`rewriter.passes.fuse_cross_entropy.loss.fused_linear_cross_entropy`.

Ratios are fused / peer (memory: lower is better; time: lower is better). The compiled
(TVM) forward loss is benchmarked by ``benchmarks/cross_entropy_tvm.py``.

    python benchmarks/cross_entropy.py --quick          # < 2 min on 2 cores
    python benchmarks/cross_entropy.py                   # tokens 4k-16k, hidden 512-2048, vocab 32k-128k
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import timing

# --quick: one small configuration (< 1 min on 2 cores).
QUICK = [(2048, 256, 32768)]
FULL = [
    (4096, 512, 32768),
    (8192, 1024, 32768),
    (4096, 1024, 131072),
    (16384, 2048, 32768),
    (16384, 2048, 131072),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(kind: str, tokens: int, hidden: int, vocab: int, repeat: int, chunk: int | None) -> dict[str, float]:
    """Run in the child: build the inputs, then time and measure forward+backward."""
    import torch
    import torch.nn.functional as F

    from rewriter.passes.fuse_cross_entropy.loss import fused_linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))

    def unfused(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w), y)

    if kind == "fused":
        def loss_fn(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    elif kind == "compiled":
        loss_fn = torch.compile(unfused)
    else:
        loss_fn = unfused

    def step() -> None:
        h.grad = w.grad = None
        loss_fn(h, w, y).backward()

    step()  # warm-up (and compilation)
    h.grad = w.grad = None
    baseline = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = timing.samples({"step": step}, rounds=repeat, max_rounds=repeat, warmup=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss only grows: if warm-up set the peak, the steady-state peak is at most it.
    # The minimum: the least disturbed run on a shared machine.
    return {"peak_bytes": max(peak, peak_before) - baseline, "seconds": timing.fastest(times)["step"]}


def _child(kind: str, config: tuple[int, int, int], repeat: int, chunk: int | None) -> dict[str, float] | None:
    command = [sys.executable, __file__, "--child", kind, *map(str, config), str(repeat), str(chunk or 0)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        print(f"  {kind}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration (< 2 min on 2 cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per peer (default 3)")
    parser.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: automatic)")
    parser.add_argument("--config", action="append", default=[], help="TOKENS,HIDDEN,VOCAB (repeatable)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *numbers = args.child
        tokens, hidden, vocab, repeat, chunk = map(int, numbers)
        print(json.dumps(measure(kind, tokens, hidden, vocab, repeat, chunk or None)))
        return
    configs = [tuple(map(int, text.split(","))) for text in args.config] or (QUICK if args.quick else FULL)
    repeat = args.repeat or 3
    kinds = ["unfused", "fused"] + ([] if args.no_compile else ["compiled"])
    print(f"{'tokens':>6} {'hidden':>6} {'vocab':>6} | {'kind':<8} {'peak MiB':>9} {'time s':>7} | fused/peer mem  time")
    for config in configs:
        results = {kind: _child(kind, config, repeat, args.chunk or None) for kind in kinds}
        fused = results["fused"]
        for kind, result in results.items():
            if result is None:
                continue
            ratio = ""
            if fused is not None and kind != "fused":
                ratio = f"{fused['peak_bytes'] / result['peak_bytes']:13.3f} {fused['seconds'] / result['seconds']:5.2f}"
            print(
                f"{config[0]:>6} {config[1]:>6} {config[2]:>6} | {kind:<8} "
                f"{result['peak_bytes'] / 2**20:9.0f} {result['seconds']:7.2f} | {ratio}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
