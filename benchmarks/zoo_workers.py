"""The steps of ``benchmarks/zoo.py`` that run in their own process, one job each.

Each takes the job as a dict and returns a JSON-able dict; ``zoo.py --worker KIND``
runs ``WORKERS[KIND](job)`` with ``TVM_NUM_THREADS`` set for the job (TVM reads it when its
thread pool starts, so thread counts cannot change within a process), and a crash or
a hang costs only that job.

* :func:`compile_library`: one library, and which rule scheduled each PrimFunc;
* :func:`time_against_ort`: one model and exporter at one thread count: agreement with ONNX Runtime
  and interleaved timing of each library against it, batch by batch;
* :func:`profile_library`: seconds per VM call of one library, and ORT's time per op type.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.zoo_export import first_line


def compile_library(job: dict[str, Any]) -> dict[str, Any]:
    """Compile ``job["onnx"]`` for ``job["target"]`` with ``job["dims"]`` (None: symbolic)
    and ``job["max_dims"]`` (bounds of symbolic dimensions, if any), and export it to ``job["lib"]``. ``status``: compiled, refused (our ``InputError``:
    its message) or crashed (any other exception: its type and first line)."""
    import tvm

    from benchmarks import zoo_profile
    from rewriter.backends import tvm as backend
    from rewriter.errors import InputError

    capture = zoo_profile.schedule_capture()
    start = time.perf_counter()
    result: dict[str, Any] = {"lib": job["lib"]}
    try:
        with tvm.transform.PassContext(instruments=[capture]):
            compiled = backend.compile(
                job["onnx"], job["target"], dims=job["dims"], max_dims=job.get("max_dims")
            )
        compiled.export(job["lib"])
        result["status"] = "compiled"
    except InputError as exc:
        result |= {"status": "refused", "error": str(exc).splitlines()[0][:400]}
    except Exception as exc:  # TVM raises many types; each is a result
        result |= {"status": "crashed", "error": first_line(exc)}
    if "error" in result:
        operator = node_op_type(result["error"], job["onnx"])
        result |= {"operator": operator} if operator else {}
    result["seconds"] = time.perf_counter() - start
    if capture.after and result["status"] == "compiled" and compiled.schedules is not None:
        try:
            result["primfuncs"] = zoo_profile.schedule_table(capture, compiled.schedules)
        except Exception as exc:  # the table is extra information: keep the library
            result["primfuncs_error"] = first_line(exc)
    return result


def node_op_type(message: str, path: str) -> str | None:
    """The op type of the node an error message names (TVM's importer says ``Node
    /encoder/layer.0/attention/self/Tile cannot handle ...``), read from the model."""
    import onnx

    found = re.search(r"\bNode (\S+?)[:,]? (?:cannot|has|is|failed)", message)
    if not found:
        return None
    graph = onnx.load(path, load_external_data=False).graph
    return next((node.op_type for node in graph.node if node.name == found.group(1)), None)


def time_against_ort(job: dict[str, Any]) -> dict[str, Any]:
    """Per batch: run ONNX Runtime on the original export and each library of
    ``job["libs"]`` (``symbolic``, ``bounded``, ``fixed/<batch>``) on the same inputs, compare, and
    time them interleaved. Returns ``rows``, one per library and batch."""
    from benchmarks import zoo_models
    from rewriter import verify
    from rewriter.backends import tvm as backend

    model = zoo_models.MODELS[job["model"]]
    threads = job["threads"]
    session = ort_session(job["original"], threads)
    loaded = {key: backend.load(lib) for key, lib in job["libs"].items()}
    rows = []
    for batch in job["batches"]:
        feeds = zoo_models.feeds(model, batch)
        reference = session.run([model.output], feeds)[0]
        calls: dict[str, Callable[[], None]] = {"ort": _caller(session.run, [model.output], feeds)}
        base = {"model": job["model"], "exporter": job["exporter"], "threads": threads}
        cases = {}
        for dims in ("fixed", "symbolic", "bounded"):
            key = f"fixed/{batch}" if dims == "fixed" else dims
            if key not in loaded:
                continue
            row = base | {"dims": dims, "batch": batch}
            try:
                output = loaded[key].run(feeds)[model.output]
                compared = verify.compare(model.output, reference, output)
            except Exception as exc:  # a library that cannot run this shape is a result
                rows.append(row | {"error": first_line(exc)})
                continue
            row |= {"max_rel_err": compared.max_rel_err, "cosine": compared.cosine}
            calls[dims] = _caller(loaded[key].run, feeds)
            cases[dims] = row
        if not cases:
            continue
        seconds, method = measure(calls, job["seconds"], job["slow"])
        for dims, row in cases.items():
            rows.append(
                row
                | {
                    "ours_ms": seconds[dims] * 1e3,
                    "ort_ms": seconds["ort"] * 1e3,
                    "ratio": seconds[dims] / seconds["ort"],
                    "method": method,
                }
            )
    return {"rows": rows}


def _caller(function: Callable[..., object], *args: object) -> Callable[[], None]:
    """``function(*args)`` as a call without arguments or result, to time."""

    def call() -> None:
        function(*args)

    return call


def measure(
    calls: dict[str, Callable[[], None]], seconds: float, slow: float
) -> tuple[dict[str, float], str]:
    """Seconds per call of each contender, all warmed up: the medians of interleaved
    rounds (``benchmarks/timing.py``) for ``seconds``; or, when one call of some contender
    takes over ``slow`` seconds, the faster of two calls of each, in turn (one call each
    past ``5 * slow``)."""
    from benchmarks.timing import interleaved

    once = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        once[name] = time.perf_counter() - start
    if max(once.values()) < slow:
        return interleaved(calls, seconds), "interleaved"
    if max(once.values()) > 5 * slow:  # tens of times ORT's: one call tells enough
        return once, "1 call"
    best = dict(once)
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        best[name] = min(best[name], time.perf_counter() - start)
    return best, "best of 2"


def ort_session(path: str, threads: int) -> Any:
    """An ONNX Runtime CPU session on ``threads`` threads whose idle threads sleep."""
    import onnxruntime as ort
    import timing

    options = timing.ort_options(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def profile_library(job: dict[str, Any]) -> dict[str, Any]:
    """Seconds per run of each VM call symbol of ``job["lib"]`` and of each ORT op type of
    ``job["original"]``, at ``job["batch"]`` and ``job["threads"]``; runs enough to take
    about 3 s (at least 1)."""
    from benchmarks import zoo_models, zoo_profile

    model = zoo_models.MODELS[job["model"]]
    feeds = zoo_models.feeds(model, job["batch"])
    runs = max(1, min(20, int(3.0 / max(job["seconds_per_run"], 1e-3))))
    ours = zoo_profile.profile_kernels(job["lib"], feeds, runs=runs)
    session_runs = max(runs, 5)
    ort_rows = zoo_profile.profile_ort(
        job["original"], feeds, job["threads"], session_runs, Path(job["folder"])
    )
    return {
        "runs": runs,
        "ours": [{"name": n, "calls": c, "seconds": s} for n, c, s in ours],
        "ort": [{"op": n, "nodes": c, "seconds": s} for n, c, s in ort_rows],
    }


WORKERS = {"compile": compile_library, "time": time_against_ort, "profile": profile_library}
