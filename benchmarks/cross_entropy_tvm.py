"""TVM's fused linear + cross-entropy kernel against the unfused graph in TVM and ONNX Runtime.

The graph is an LM head and its loss, ``SoftmaxCrossEntropyLoss(h @ W, y)`` (mean,
``ignore_index=-100``, a quarter of the labels ignored), ``W`` an initializer. Peers, on the
same inputs, one thread each (``TVM_NUM_THREADS=1`` is set here, ORT
``intra_op_num_threads=1``):

* ``fused``: the graph after ``fuse-cross-entropy``, compiled by TVM: our chunked kernel
  (``backends/tvm/kernels/linear_cross_entropy.py``), no ``tokens x vocab`` logits;
* ``tvm``: the unfused graph compiled by TVM (MatMul with our CPU schedules, the loss
  spelled out by ``loss_decompose``: LogSoftmax, GatherElements, reductions);
* ``ort``: ONNX Runtime on the unfused graph.

With ``--logits`` the graph is the loss alone on given logits, ``SoftmaxCrossEntropyLoss(z,
y)``, and ``fused`` is our one-pass kernel (``backends/tvm/kernels/cross_entropy.py``);
configurations are then ``TOKENS,0,VOCAB``.

Time: after a warm-up run, the methods run in turn within each round (interleaved, so a
noisy machine slows all of them alike); the minimum and the median over rounds are
printed, and the ratios fused / peer of the medians. A peer whose warm-up took over
``SLOW_S`` is timed once. Memory, per peer:

* ``largest``: the largest intermediate of the compiled module: the Relax VM's memory
  plan and each kernel's own buffers (per thread), from
  :mod:`rewriter.backends.tvm.allocations` (TVM peers only: ORT's planner is not inspected);
* ``peak``: the growth of the peak resident set over the first run after the build, in
  a child process (the peak is reset after the build; the runtimes keep their pools after
  a run, so later runs allocate nothing new), for every peer.

    python benchmarks/cross_entropy_tvm.py --quick      # one small configuration, ~2 min
    python benchmarks/cross_entropy_tvm.py              # three LM-head shapes up to 128k vocab
    python benchmarks/cross_entropy_tvm.py --logits --quick   # the loss on given logits
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import timing

# (tokens, hidden, vocab). Quick: logits 128 MiB. Full: up to 500 MiB of logits and a
# 256 MiB weight (TVM holds a few copies of a constant weight while compiling; larger
# heads need more than the 24 GiB a shared 2-core machine can spare).
QUICK = [(1024, 256, 32768)]
FULL = [(2048, 512, 32000), (1024, 256, 50257), (1024, 512, 128256)]
# --logits: (tokens, 0, vocab), the logits a graph input (256 MiB and 512 MiB).
LOGITS_QUICK = [(2048, 0, 32768)]
LOGITS_FULL = [(2048, 0, 32768), (1024, 0, 128256)]
PEERS = ("fused", "tvm", "ort")
SLOW_S = 10.0
ROOT = Path(__file__).resolve().parents[1]


def lm_head_loss(
    tokens: int, hidden: int, vocab: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The unfused ONNX graph and its seeded inputs (``hidden == 0``: the loss on logits)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    loss = helper.make_node("SoftmaxCrossEntropyLoss", ["z", "y"], ["loss"], ignore_index=-100)
    labels = rng.integers(0, vocab, tokens)
    labels[::4] = -100
    feeds: dict[str, np.ndarray] = {"y": labels}
    if hidden:
        weight = (rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)).astype(np.float32)
        nodes, first = [helper.make_node("MatMul", ["h", "W"], ["z"]), loss], ("h", hidden)
        params = [numpy_helper.from_array(weight, "W")]
    else:
        nodes, first, params = [loss], ("z", vocab), []
    feeds[first[0]] = (rng.standard_normal((tokens, first[1])) * (1 if hidden else 3)).astype(
        np.float32
    )
    graph = helper.make_graph(
        nodes,
        "lm_head_loss" if hidden else "loss",
        [
            helper.make_tensor_value_info(first[0], TensorProto.FLOAT, [tokens, first[1]]),
            helper.make_tensor_value_info("y", TensorProto.INT64, [tokens]),
        ],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        params,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


def _fused(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir

    from rewriter.registry import create_pass

    model = ir.serde.deserialize_model(proto)
    result: Any = create_pass("fuse-cross-entropy")(model)
    stats = result.stats
    if stats["linear_cross_entropy_fused"] + stats["cross_entropy_fused"] != 1:
        raise RuntimeError(f"fuse-cross-entropy did not fuse the loss: {stats}")
    return ir.serde.serialize_model(model)


def build(peer: str, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Callable[[], float]:
    """A no-argument function running ``peer`` once on ``feeds``; it returns the loss."""
    if peer == "ort":
        import onnxruntime as ort

        session = ort.InferenceSession(
            proto.SerializeToString(), timing.ort_options(1), providers=["CPUExecutionProvider"]
        )
        return lambda: float(session.run(None, feeds)[0])
    import tvm
    from tvm import relax

    from rewriter.backends import tvm as backend

    compiled = backend.compile(_fused(proto) if peer == "fused" else proto, target="avx512")
    # The inputs are converted once, as ORT reads the numpy arrays in place: converting
    # 256 MiB of logits on every call would cost more than the loss itself.
    machine = relax.VirtualMachine(compiled.executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[name]) for name in compiled.input_names]
    return lambda: float(machine["main"](*args).numpy())


def largest_intermediate(peer: str, proto: onnx.ModelProto) -> int | None:
    """Bytes of the compiled module's largest allocation (TVM peers)."""
    if peer == "ort":
        return None
    from rewriter.backends.tvm.allocations import allocations, largest, lowered

    found = largest(allocations(lowered(_fused(proto) if peer == "fused" else proto, "avx512")))
    return None if found is None else found.nbytes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth(peer: str, config: tuple[int, int, int]) -> int:
    """In the child: bytes the peak resident set grows by during the first run of ``peer``."""
    proto, feeds = lm_head_loss(*config)
    run = build(peer, proto, feeds)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current resident set
    baseline = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - baseline) * 1024


def _child_peak(peer: str, config: tuple[int, int, int]) -> int | None:
    command = [sys.executable, __file__, "--child", peer, *map(str, config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [str(done.returncode)]
        print(f"  {peer}: peak measurement failed ({tail[0]})")
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def measure(config: tuple[int, int, int], rounds: int) -> None:
    tokens, hidden, vocab = config
    # Memory first, one peer at a time (children, then the parent's lowering): the
    # timing below holds all three peers' builds at once.
    peaks = {peer: _child_peak(peer, config) for peer in PEERS}
    proto, feeds = lm_head_loss(*config)
    largest = {peer: largest_intermediate(peer, proto) for peer in PEERS}
    gc.collect()
    runs, loss, warm_up = {}, {}, {}
    for peer in PEERS:
        runs[peer] = build(peer, proto, feeds)
        start = time.perf_counter()
        loss[peer] = runs[peer]()
        warm_up[peer] = time.perf_counter() - start
    # A peer slower than SLOW_S per run (see the module docstring) is timed once.
    slow = {peer: runs[peer] for peer in PEERS if warm_up[peer] >= SLOW_S}
    times = timing.samples(slow, rounds=1, max_rounds=1, warmup=0)
    timed = {peer: runs[peer] for peer in PEERS if peer not in slow}
    times |= timing.samples(timed, rounds=rounds, max_rounds=rounds, warmup=0)
    del runs, slow, timed
    gc.collect()
    median = timing.median(times)
    logits = tokens * vocab * 4
    head = f"hidden {hidden}" if hidden else "the loss on given logits"
    print(f"\ntokens {tokens}  {head}  vocab {vocab}  (logits {_mib(logits)} MiB)")
    print(
        f"{'peer':<6} {'min s':>8} {'median s':>9} {'fused/peer':>10} {'largest MiB':>12} {'peak MiB':>9} {'loss':>10}"
    )
    for peer in PEERS:
        ratio = median["fused"] / median[peer]
        print(
            f"{peer:<6} {min(times[peer]):8.4f} {median[peer]:9.4f} {ratio:10.3f} "
            f"{_mib(largest[peer]):>12} {_mib(peaks[peer]):>9} {loss[peer]:10.6f}"
        )
    sys.stdout.flush()


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--logits", action="store_true", help="the loss alone, on given logits")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds (each runs every peer once)"
    )
    parser.add_argument(
        "--config", action="append", default=[], help="TOKENS,HIDDEN,VOCAB (repeatable)"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer, *numbers = args.child
        tokens, hidden, vocab = map(int, numbers)
        print(json.dumps({"peak_bytes": peak_growth(peer, (tokens, hidden, vocab))}))
        return
    configs: list[tuple[int, int, int]] = [
        (int(t), int(h), int(v)) for t, h, v in (text.split(",") for text in args.config)
    ] or {
        (False, True): QUICK,
        (False, False): FULL,
        (True, True): LOGITS_QUICK,
        (True, False): LOGITS_FULL,
    }[(args.logits, args.quick)]
    print(
        f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, ORT intra-op threads 1; ratios of medians"
    )
    for config in configs:
        measure(config, args.rounds)


if __name__ == "__main__":
    main()
