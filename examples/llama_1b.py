"""A Llama-shaped decoder at LLM scale on one machine: export, rewrite, quantize, width-prune.

The TinyLlama-1.1B shape (hidden 2048, 22 layers, MLP 5632, 32 heads and 4 key-value
heads, vocabulary 32000: 1.10 B parameters, 4.4 GB in float32) with random weights from
``transformers.LlamaForCausalLM``, exported to ONNX with external data, then each step
with the CLI in a fresh process, timed, with its peak RSS:

1. ``export``: the dynamo exporter (``torch.onnx.export(dynamo=True)``; the TorchScript
   exporter took 1.3x the time and 3x the memory at a quarter of this size), saved as
   ``llama.onnx`` + ``llama.onnx.data``;
2. ``rewrite llama.onnx --passes two-pass-softmax``, verified on one sequence of 8 tokens;
3. ``--passes 'quantize(avg_bits=6)'`` (LIM importance measured on that sequence);
4. ``--passes 'prune-width(ratio=0.25)'`` (the MLPs' hidden width really shrinks);
5. ``probe``: the cost of ``prune(allocation=rd)``'s evaluations, measured on a sample of
   layers and amounts with the pass's own ``DistortionProbe`` (:func:`measure_evaluations`),
   the evaluations it would make counted, and its time extrapolated (:func:`estimate`).

    python examples/llama_1b.py                      # 1.1 B: ~9 GB of disk, ~7 GB of memory
    python examples/llama_1b.py --size tiny          # the few-hundred-kB model of the tests
    python examples/llama_1b.py --layers 11          # half the depth

Prints a Markdown table of time and peak RSS per step, the commands, and the estimate. The
work folder (a temporary one unless ``--workdir``) is deleted at the end unless ``--keep``.

>>> steps = run(SIZES["tiny"], Path("/tmp/llama"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger(__name__)

# Verification and calibration inputs: one sequence of 8 tokens (a 1B model's verification
# runs it twice in ONNX Runtime; the inputs only need to exercise every op).
DIMS = {"batch": 1, "sequence": 8}
PASSES = (
    ("two-pass-softmax", "two-pass-softmax"),
    ("quantize", "quantize(avg_bits=6)"),
    ("prune-width", "prune-width(ratio=0.25)"),
)
# The prune probe's runs: (calibration tokens, ONNX Runtime threads; 0: its default).
# The one-thread runs are a Ray worker's work and the estimate's basis.
PROBES = ((32, 1), (128, 1), (32, 0))
# Calibration sets the estimate is given for, in tokens: one 128-token sequence, 32
# sequences of 512, and the 128 sequences of 2048 tokens of the SparseGPT and Wanda papers.
CALIBRATION_TOKENS = (128, 32 * 512, 128 * 2048)
ESTIMATE_WORKERS = (1, 2, 4, 8, 16, 32, 64, 154)
# Per-worker efficiency of rewriter.distributed's Ray workers (the speedup of N workers
# over one, divided by N) beyond what the estimate counts itself (each worker's probe
# build, whole layers per worker). benchmarks/distributed.py could not measure it on the
# shared 2-core machine (2 workers ran at 0.77x one worker at a load average of 8; README,
# Scale), so the estimate is for idle cores, each with its own memory bandwidth.
EFFICIENCY = 1.0
SHAPE_FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """A ``LlamaConfig``'s sizes."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self) -> Any:
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=2048,
            attn_implementation="eager",
            use_cache=False,
        )

    def params(self) -> int:
        """Parameters: embedding and LM head, per layer attention, GLU MLP and two norms, final norm."""
        head = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * layer + self.hidden

    def arguments(self) -> list[str]:
        """The command-line options giving this shape."""
        return [
            arg
            for field in SHAPE_FIELDS
            for arg in (f"--{field.replace('_', '-')}", str(getattr(self, field)))
        ]


SIZES = {
    "1b": LlamaShape(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "tiny": LlamaShape(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2, vocab=512),
}


@dataclasses.dataclass
class Step:
    """One measured step: what ran, its wall and CPU (user + system) time, its peak RSS,
    and what it reported."""

    name: str
    command: str
    seconds: float
    cpu_seconds: float
    peak_rss: int
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


def random_llama(shape: LlamaShape, *, seed: int = 0) -> Any:
    """A ``transformers.LlamaForCausalLM`` of ``shape`` with seeded random float32 weights, in eval mode."""
    from examples.torchvision_shim import install

    install()  # transformers imports torchvision when it is installed
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(shape.config()).eval()


def export_llama(model: Any, path: Path) -> Path:
    """Export ``model`` (input_ids, attention_mask -> logits; dynamic batch and sequence)
    with the dynamo exporter to ``path`` and ``path.data`` (external data)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    ids = torch.zeros((1, 8), dtype=torch.int64)
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # transformers' tracing warnings
        program = torch.onnx.export(
            Logits().eval(),
            (ids, torch.ones_like(ids)),
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=18,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=True)
    return path


def measured(name: str, command: list[str]) -> Step:
    """Run ``command`` in a child process; its wall time, CPU time and peak RSS (``wait4``'s)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {child.returncode}):\n{output[-4000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Step(name, " ".join(command), seconds, cpu, usage.ru_maxrss * 1024)


def run(
    shape: LlamaShape, folder: Path, *, probes: tuple[tuple[int, int], ...] = PROBES
) -> list[Step]:
    """Export ``shape`` into ``folder`` and run the pipeline's steps, each in its own process.

    ``probes``: the prune probe's runs, (calibration tokens, threads) each (see :data:`PROBES`).
    """
    model = folder / "llama.onnx"
    me = [sys.executable, str(Path(__file__).resolve())]
    steps = [measured("export", [*me, "export", str(model), *shape.arguments()])]
    dims = [arg for name, value in DIMS.items() for arg in ("--dim", f"{name}={value}")]
    for name, spec in PASSES:
        out, report = folder / f"{name}.onnx", folder / f"{name}.json"
        command = [sys.executable, "-m", "rewriter.cli", str(model), "--passes", spec]
        step = measured(name, [*command, "-o", str(out), *dims, "--report-json", str(report), "-q"])
        step.report = json.loads(report.read_text())
        steps.append(step)
        for path in (out, Path(f"{out}.data")):
            path.unlink(missing_ok=True)  # each step reads the original: keep the disk
    for tokens, threads in probes:
        out = folder / f"probe-{tokens}-{threads}.json"
        options = ["--tokens", str(tokens), "--threads", str(threads), "-o", str(out)]
        step = measured(
            f"prune probe, {tokens} tokens, {threads or 'default'} thread(s)",
            [*me, "probe", str(model), *options],
        )
        step.report = json.loads(out.read_text())
        steps.append(step)
    return steps


def measure_evaluations(
    model_path: Path,
    *,
    tokens: int,
    threads: int | None,
    samples: int = 6,
    amounts: tuple[float, ...] = (0.25, 0.5, 0.9375),
) -> dict[str, Any]:
    """Time ``prune(allocation=rd)``'s unit of work on ``model_path`` and count the units.

    One evaluation is one forward over the calibration batch (``tokens`` tokens, one
    sequence) with one layer pruned by one amount, run by the pass's own
    :class:`DistortionProbe` (prunable weights as graph inputs, suffix sessions after a
    cut when the model is big enough): ``samples`` layers spread over the depth, each at
    ``amounts``. Also timed: building the probe (sessions, the capture run) and a layer's
    magnitude order (the pass sorts each layer once). Wall and CPU seconds: on a shared
    machine the CPU time is the work. Counted: prunable layers x the nonzero amounts of
    the default grid (``steps=32``, ``max_amount=0.95``).
    """
    from rewriter import io, verify
    from rewriter.passes.pruning import math as pruning
    from rewriter.passes.pruning import prune
    from rewriter.passes.pruning.probe import DistortionProbe

    model = io.load(model_path)
    layers, _ = prune.prunable_layers(model)
    weights = {layer.weight.name or "": layer.array() for layer in layers}
    batch = verify.make_inputs(model_path, dims={"batch": 1, "sequence": tokens}, seed=0)
    start, start_cpu = time.perf_counter(), time.process_time()
    probe = DistortionProbe(model, weights, [batch], distortion="mse", threads=threads)
    setup, setup_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    picks = sorted({int(i) for i in np.linspace(0, len(layers) - 1, samples).round()})
    wall, cpu, orders = [], [], []
    for index in picks:
        name = layers[index].weight.name or ""
        start = time.process_time()
        order = pruning.magnitude_order(weights[name])
        orders.append(time.process_time() - start)
        for amount in amounts:
            pruned = np.array(weights[name], copy=True)
            pruned.reshape(-1)[order[: pruning.pruned_count(pruned.size, amount)]] = 0
            start, start_cpu = time.perf_counter(), time.process_time()
            probe.distortion_of(name, pruned)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    grid = pruning.amount_grid(prune.PruneOptions.max_amount, prune.PruneOptions.steps)
    return {
        "tokens": tokens,
        "threads": threads or 0,
        "layers": len(layers),
        "amounts": int(np.count_nonzero(grid)),
        "evaluations": len(layers) * int(np.count_nonzero(grid)),
        "suffix_sessions": len({id(session) for session, _ in probe.runner.values()}),
        "setup_s": setup,
        "setup_cpu_s": setup_cpu,
        "evaluation_s": float(np.mean(wall)),
        "evaluation_min_s": float(np.min(wall)),
        "evaluation_max_s": float(np.max(wall)),
        "evaluation_cpu_s": float(np.mean(cpu)),
        "order_cpu_s": float(np.mean(orders)),
        "sampled": [layers[i].name for i in picks],
    }


def per_evaluation(probes: list[dict[str, Any]], tokens: int) -> float:
    """CPU seconds per evaluation at ``tokens`` calibration tokens: the line through the
    measured (tokens, seconds) points (least squares; one point: proportional)."""
    x = np.array([probe["tokens"] for probe in probes], float)
    y = np.array([probe["evaluation_cpu_s"] for probe in probes], float)
    if len(probes) == 1:
        return float(y[0] * tokens / x[0])
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * tokens)


def estimate(
    worker: list[dict[str, Any]], *, efficiency: float
) -> list[tuple[int, dict[int, float]]]:
    """``prune(allocation=rd)``'s curve time in seconds, extrapolated from one-thread probe runs.

    ``worker``: the probe's figures with one ONNX Runtime thread (a Ray worker's work;
    CPU seconds, which on an idle core are its wall time). For each calibration size of
    :data:`CALIBRATION_TOKENS` and N of :data:`ESTIMATE_WORKERS`: each worker builds
    its probe once (the measured build, plus one evaluation's time for the capture run
    at that size) and then measures whole
    layers (a magnitude order and ``amounts`` evaluations each), so the slowest of N
    takes ``ceil(layers / N)`` of them, at ``efficiency`` (the per-worker efficiency
    measured by benchmarks/distributed.py). N = 1 at efficiency 1 is the serial pass on
    one core.

    >>> estimate([{"tokens": 32, "layers": 2, "amounts": 3, "setup_cpu_s": 1.0,
    ...            "order_cpu_s": 0.5, "evaluation_cpu_s": 1.0}], efficiency=1.0)[0][1][1]
    30.0
    """
    first = worker[0]
    layers, amounts = first["layers"], first["amounts"]
    rows = []
    for tokens in CALIBRATION_TOKENS:
        evaluation = per_evaluation(worker, tokens)
        setup = first["setup_cpu_s"] + evaluation
        per_layer = first["order_cpu_s"] + amounts * evaluation
        spread = {
            n: setup + -(-layers // n) * per_layer / (1.0 if n == 1 else efficiency)
            for n in ESTIMATE_WORKERS
            if n <= layers
        }
        rows.append((tokens, spread))
    return rows


def estimate_table(rows: list[tuple[int, dict[int, float]]]) -> str:
    """:func:`estimate`'s rows as a Markdown table."""
    workers = list(rows[0][1])
    names = ["1 core (serial)", *(f"{n} workers" for n in workers[1:])]
    lines = [
        "| calibration tokens | " + " | ".join(names) + " |",
        "|---" * (1 + len(workers)) + "|",
    ]
    for tokens, spread in rows:
        lines.append(f"| {tokens} | " + " | ".join(_duration(spread[n]) for n in workers) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 36 * 3600:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def table(steps: list[Step]) -> str:
    """The steps as a Markdown table: wall and CPU seconds, peak RSS and the pass's figures."""
    lines = ["| step | wall | CPU | peak RSS | result |", "|---|---|---|---|---|"]
    for step in steps:
        times = f"{step.seconds:.1f} s | {step.cpu_seconds:.1f} s"
        rss = step.peak_rss / 2**30
        lines.append(f"| {step.name} | {times} | {rss:.2f} GiB | {summary(step)} |")
    return "\n".join(lines)


def summary(step: Step) -> str:
    """A short account of a step's report."""
    report = step.report
    if "passes" in report:
        stats = report["passes"][0]["stats"]
        keys = ("softmax_replaced", "avg_bits_x100", "int4_weights", "int8_weights")
        keys += ("channels_before", "channels_after", "size_after_bytes")
        shown = ", ".join(f"{key}={stats[key]}" for key in keys if key in stats)
        outputs = report.get("verification", {}).get("outputs", [])
        fidelity = ", ".join(
            f"cosine {o['cosine']:.4f}, max abs err {o['max_abs_err']:.2g}" for o in outputs
        )
        return f"{shown}; {fidelity}"
    if "evaluation_s" in report:
        return (
            f"{report['evaluation_s']:.3f} s per evaluation (CPU {report['evaluation_cpu_s']:.3f} s; "
            f"{report['evaluation_min_s']:.3f}-{report['evaluation_max_s']:.3f} s), probe built in "
            f"{report['setup_s']:.1f} s ({report['suffix_sessions']} suffix sessions), order "
            f"{report['order_cpu_s']:.2f} s CPU per layer; {report['layers']} layers x "
            f"{report['amounts']} amounts = {report['evaluations']} evaluations"
        )
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "export", "probe"))
    parser.add_argument("model", nargs="?", type=Path, help="export/probe: the ONNX file")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    for field in SHAPE_FIELDS:
        flag = f"--{field.replace('_', '-')}"
        parser.add_argument(flag, type=int, help=f"override the size's {field}")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder's files")
    parser.add_argument("--no-probe", action="store_true", help="skip the prune probe")
    parser.add_argument("--tokens", type=int, default=32, help="probe: calibration tokens")
    parser.add_argument("--threads", type=int, default=0, help="probe: threads (0: default)")
    parser.add_argument("-o", "--output", type=Path, help="probe: write its figures here (JSON)")
    parser.add_argument(
        "--efficiency",
        type=float,
        default=EFFICIENCY,
        help="per-worker efficiency of Ray workers for the estimate (default: the measured one)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {field: getattr(args, field) for field in SHAPE_FIELDS}
    shape = dataclasses.replace(
        SIZES[args.size], **{key: value for key, value in overrides.items() if value is not None}
    )
    if args.command == "export":
        export_llama(random_llama(shape), args.model)
        return
    if args.command == "probe":
        figures = measure_evaluations(args.model, tokens=args.tokens, threads=args.threads or None)
        text = json.dumps(figures, indent=1)
        if args.output:
            args.output.write_text(text)
        print(text)
        return
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="rewriter-llama-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Llama {shape}: {shape.params() / 1e9:.3f} B parameters; work folder {folder}")
    try:
        steps = run(shape, folder, probes=() if args.no_probe else PROBES)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(table(steps))
    for step in steps:
        print(f"{step.name}: {step.command}")
    worker = [step.report for step in steps if step.report.get("threads") == 1]
    if worker:
        print(
            f"prune(allocation=rd) curves, extrapolated (per-worker efficiency {args.efficiency:g}):"
        )
        print(estimate_table(estimate(worker, efficiency=args.efficiency)))


if __name__ == "__main__":
    main()
