"""Compiled speed on every architecture: our TVM libraries against ONNX Runtime, model by model.

For each model of the zoo (:mod:`benchmarks.zoo_models`: 45 small random-weight
models from ``transformers`` and ``torchvision``; ``--models survey`` for the 49 more
architectures of ``zoo_models.SURVEY``, off the default run) and each torch exporter
(:mod:`benchmarks.zoo_export`, exports cached in ``--cache``):

1. rewrite with ``two-pass-softmax`` (``rewriter.job.rewrite_file``, verified on the
   run inputs at batch 1);
2. compile for ``--target`` twice or more, each in its own process (a crash costs one
   variant): ``symbolic`` (no dims: one library for every batch and sequence; the
   outcome is recorded: compiled, refused with TVM's one-line reason, crashed with the
   exception's first line) and ``fixed`` (dims fixed to each ``--batch``); with
   ``--dims bounded`` also ``bounded``: symbolic with ``max_dims`` (``--max-dim``) at the
   largest ``--batch`` and the model's run sizes, its memory planned statically. Each compile
   also records which rule scheduled each PrimFunc (:mod:`benchmarks.zoo_profile`);
3. per ``--threads`` count, in a fresh process (``TVM_NUM_THREADS``, TVM's idle workers
   sleeping: ``TVM_THREAD_POOL_SPIN_COUNT=0``; ORT with ``intra_op_num_threads`` and
   ``session.intra_op.allow_spinning=0``, so neither steals the other's cores): run both
   libraries and ONNX Runtime on the original export at each batch, compare the outputs
   (max |ours - ORT| / max |ORT|, cosine), and time the three interleaved
   (``benchmarks/timing.py``). A library that takes over ``--slow`` seconds a call is
   timed by the faster of two calls instead (one past 5x ``--slow``; its ratio is far
   from 1 anyway);
4. ``--breakdown N``: for the N slowest models (ours/ORT at the fewest threads, the
   smallest batch, ``--breakdown-dims``: fixed by default), seconds per PrimFunc with
   the rule that scheduled it, beside ORT's per-op-type profile, and both summed by op
   family.

It prints the results as Markdown tables (long: one row per model, exporter, dims,
threads and batch; wide: one row per model, both exporters in a cell), a summary
(geometric mean and worst ratio per column), the compile failures, and the PrimFuncs
of all libraries by op family and by what scheduled them; ``--json`` writes everything.
Times are medians on a shared machine: compare the ratios. ::

    .venv/bin/python benchmarks/zoo.py --quick --models bert resnet18
    .venv/bin/python benchmarks/zoo.py --threads 1 --batch 1 --breakdown 5 --json zoo.json
    .venv/bin/python benchmarks/zoo.py              # all models, threads 1 2, batch 1 8
    .venv/bin/python benchmarks/zoo.py --report zoo.json   # the tables again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timing

ROOT = Path(__file__).resolve().parents[1]
DIMS = ("fixed", "symbolic", "bounded")


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))  # for ``benchmarks.*`` when run as a script
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        from benchmarks import zoo_workers

        job = json.loads(Path(args.job).read_text())
        result = zoo_workers.WORKERS[args.worker](job)
        Path(args.out).write_text(json.dumps(result))
        return
    if args.report:
        from benchmarks import zoo_report

        zoo_report.print_all(json.loads(args.report.read_text()))
        return
    run(args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model or family names (default: all)")
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    parser.add_argument(
        "--dims",
        nargs="+",
        default=["fixed", "symbolic"],
        choices=DIMS,
        help="default: fixed symbolic (bounded: symbolic with --max-dim, one more compile a model)",
    )
    parser.add_argument("--threads", type=int, nargs="+", help="default: 1 2 (--quick: 1)")
    parser.add_argument("--batch", type=int, nargs="+", help="default: 1 8 (--quick: 1)")
    parser.add_argument("--seconds", type=float, help="timing per case (default 2, --quick 0.5)")
    parser.add_argument("--quick", action="store_true", help="1 thread, batch 1, short timing")
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds a call: time 2 calls")
    parser.add_argument("--breakdown", type=int, nargs="?", const=5, default=0, metavar="N")
    parser.add_argument("--breakdown-dims", default="fixed", choices=DIMS)
    parser.add_argument("--cache", type=Path, help="exports (default ~/.cache/rewriter/zoo)")
    parser.add_argument("--workdir", type=Path, help="keep rewrites and libraries here")
    parser.add_argument("--compile-timeout", type=float, default=1200.0)
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument(
        "--report", type=Path, help="print the tables of a --json file; run nothing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.batch = args.batch or ([1] if args.quick else [1, 8])
    args.seconds = args.seconds or (0.5 if args.quick else 2.0)
    return args


def run(args: argparse.Namespace) -> None:
    from benchmarks import zoo_export, zoo_models, zoo_report

    models = zoo_models.select(args.models)
    cache = args.cache or zoo_export.default_cache()
    scratch = None if args.workdir else tempfile.mkdtemp(prefix="zoo-")
    work = args.workdir or Path(scratch)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "options": {k: str(v) for k, v in vars(args).items() if v is not None},
        "exports": [],
        "rewrites": [],
        "compiles": [],
        "timings": [],
        "breakdowns": [],
    }
    print(zoo_report.machine_line(results["machine"]), flush=True)
    try:
        for model in models:
            for exporter in args.exporters:
                measure_model(args, model, exporter, cache, work, results)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
        if args.breakdown:
            cases = zoo_report.slowest(results["timings"], args.breakdown, args.breakdown_dims)
            for case in cases:
                print(f"breakdown: {case['model']} ({case['exporter']})", flush=True)
                results["breakdowns"].append(breakdown(args, case, results, work))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    zoo_report.print_all(results)


def measure_model(
    args: argparse.Namespace,
    model: Any,
    exporter: str,
    cache: Path,
    work: Path,
    results: dict[str, Any],
) -> None:
    """Export, rewrite, compile and time one model and exporter; append to ``results``."""
    from benchmarks import zoo_export, zoo_models
    from rewriter.backends import tvm as backend
    from rewriter.job import rewrite_file

    start = time.perf_counter()
    export = zoo_export.exported(model, exporter, cache)
    results["exports"].append(dataclasses.asdict(export) | {"family": model.family})
    if export.path is None:
        print(f"{model.name} ({exporter}): export failed: {export.error}", flush=True)
        return
    stem = work / f"{model.name}_{exporter}"
    rewritten = stem.with_name(stem.name + "_tp.onnx")
    try:
        report = rewrite_file(
            export.path, rewritten, "two-pass-softmax", inputs=zoo_models.feeds(model, 1)
        )
    except Exception as exc:  # a failing rewrite is a result too
        record = {"model": model.name, "exporter": exporter, "error": zoo_export.first_line(exc)}
        results["rewrites"].append(record)
        print(f"{model.name} ({exporter}): rewrite failed: {record['error']}", flush=True)
        return
    results["rewrites"].append(
        {
            "model": model.name,
            "exporter": exporter,
            "stats": report.passes[0].stats,
            "verified": report.verification is not None and report.verification.passed,
        }
    )
    variants: list[tuple[str, int | None]] = []
    if "symbolic" in args.dims:
        variants.append(("symbolic", None))
    if "bounded" in args.dims:
        variants.append(("bounded", None))
    if "fixed" in args.dims:
        variants += [("fixed", batch) for batch in args.batch]
    libs: dict[str, str] = {}
    for dims, batch in variants:
        lib = stem.with_name(f"{stem.name}_{dims}{'' if batch is None else f'_b{batch}'}.so")
        fixed = None
        if batch is not None:
            fixed = backend.shape_dims(rewritten, zoo_models.feeds(model, batch))
        job = {"onnx": str(rewritten), "target": args.target, "dims": fixed, "lib": str(lib)}
        if dims == "bounded":  # the largest sizes the run feeds
            sizes = {"batch": max(args.batch)} | model.sizes
            job["max_dims"] = {axis: sizes[axis] for axis in zoo_models.symbolic_axes(model)}
        outcome = subprocess_job("compile", job, work, timeout=args.compile_timeout)
        outcome |= {"model": model.name, "exporter": exporter, "dims": dims, "batch": batch}
        results["compiles"].append(outcome)
        if outcome["status"] == "compiled":
            libs[dims if batch is None else f"fixed/{batch}"] = str(lib)
    for threads in args.threads:
        job = {
            "model": model.name,
            "exporter": exporter,
            "original": export.path,
            "libs": libs,
            "threads": threads,
            "batches": args.batch,
            "seconds": args.seconds,
            "slow": args.slow,
        }
        outcome = subprocess_job("time", job, work, threads=threads, timeout=3600)
        if "rows" in outcome:
            results["timings"] += outcome["rows"]
        else:
            results["timings"].append(
                {"model": model.name, "exporter": exporter, "threads": threads, **outcome}
            )
    mine = [r for r in results["timings"] if r["model"] == model.name and r["exporter"] == exporter]
    ratios = ", ".join(
        f"{r['dims']} {r['threads']}t b{r['batch']} {r['ratio']:.2f}x" for r in mine if "ratio" in r
    )
    print(
        f"{model.name} ({exporter}): {ratios or 'no timings'} "
        f"[{time.perf_counter() - start:.0f} s]",
        flush=True,
    )


def breakdown(
    args: argparse.Namespace, case: dict[str, Any], results: dict[str, Any], work: Path
) -> dict[str, Any]:
    """The per-PrimFunc and per-ORT-op-type profile of one timed case (in a subprocess)."""
    compile_record = next(
        c
        for c in results["compiles"]
        if (c["model"], c["exporter"], c["dims"]) == (case["model"], case["exporter"], case["dims"])
        and c["batch"] in (None, case["batch"])
    )
    export = next(
        e
        for e in results["exports"]
        if (e["model"], e["exporter"]) == (case["model"], case["exporter"])
    )
    job = {
        "model": case["model"],
        "lib": compile_record["lib"],
        "original": export["path"],
        "batch": case["batch"],
        "threads": case["threads"],
        "seconds_per_run": case["ours_ms"] * 1e-3,
        "folder": str(work),
    }
    outcome = subprocess_job("profile", job, work, threads=case["threads"], timeout=3600)
    return outcome | {
        "model": case["model"],
        "exporter": case["exporter"],
        "dims": case["dims"],
        "batch": case["batch"],
        "threads": case["threads"],
        "primfuncs": compile_record.get("primfuncs", []),
    }


def subprocess_job(
    kind: str, job: dict[str, Any], work: Path, *, threads: int = 1, timeout: float
) -> dict[str, Any]:
    """Run ``zoo_workers.<kind>(job)`` in a fresh process; its JSON result, or the way it
    died (``status`` crashed/timeout, ``error``: the signal or the last stderr line)."""
    with tempfile.TemporaryDirectory(dir=work) as folder:
        job_path, out_path = Path(folder) / "job.json", Path(folder) / "out.json"
        job_path.write_text(json.dumps(job))
        command = [sys.executable, __file__, "--worker", kind, "--job", str(job_path)]
        command += ["--out", str(out_path)]
        env = timing.quiet_env(threads)
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {
                "status": "timeout",
                "error": f"killed after {timeout:.0f} s",
                "seconds": timeout,
            }
        seconds = time.perf_counter() - start
        operator = _failing_operator(done.stdout + done.stderr)
        if done.returncode == 0 and out_path.is_file():
            result = json.loads(out_path.read_text())
            return ({"operator": operator} if operator else {}) | result
    if done.returncode < 0:
        error = f"killed by {signal.Signals(-done.returncode).name}"
    else:
        error = _last_error_line(done.stderr) or f"exit status {done.returncode}"
    result = {"status": "crashed", "error": error, "seconds": seconds}
    return result | ({"operator": operator} if operator else {})


def _failing_operator(output: str) -> str | None:
    """The ONNX op TVM's importer names (on stdout) when it fails to convert one."""
    found = re.search(r"Error converting operator ([\w.:]+)", output)
    return found.group(1) if found else None


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b", line)]
    return (errors or lines or [""])[-1][:300]


def machine() -> dict[str, Any]:
    """The CPU (model name and the SIMD/AMX flags that matter here), cores, load, versions."""
    info: dict[str, Any] = {"date": datetime.date.today().isoformat()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        info["cpu"] = model.group(1) if model else platform.processor()
        wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
        have = set(flags.group(1).split()) if flags else set()
        info["flags"] = [flag for flag in (*wanted, "amx_int8") if flag in have]
    except OSError:
        info["cpu"] = platform.processor()
    info["cpus"] = len(os.sched_getaffinity(0))
    info["load"] = os.getloadavg()[0]
    from importlib.metadata import version

    for package in ("apache-tvm", "onnxruntime", "torch", "transformers", "torchvision"):
        try:
            info[package] = version(package)
        except Exception:
            info[package] = None
    import rewriter  # the code measured: its checkout's commit, wherever this script is

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(rewriter.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    info["commit"] = commit.stdout.strip()
    return info


if __name__ == "__main__":
    main()
