"""The zoo on a GPU: our CUDA libraries against TVM's stock CUDA lowering and PyTorch.

For each model of the zoo (:mod:`benchmarks.zoo_models`) and each ``--batch``:

1. rewrite the export with ``two-pass-softmax`` (verified on the CPU with ONNX Runtime);
2. compile for ``cuda`` at fixed sizes twice: the rewritten model (our softmax kernel,
   dlight schedules for the rest) and the original export (TVM's stock lowering of every
   op, the same dlight schedules);
3. run ours on the GPU and compare it with ONNX Runtime (CPU) on the original export:
   max |ours - ORT| / max |ORT| and cosine;
4. time, interleaved round by round (``benchmarks/timing.py``), with inputs and outputs
   on the GPU and a device synchronisation per call: ours, TVM's stock library, and the
   same architecture in PyTorch eager on the GPU (the zoo's builder, random weights:
   only the time is compared).

It prints one row per model and batch: our milliseconds and the ratios ours / stock TVM
and ours / PyTorch (under 1: ours is faster). Needs an NVIDIA GPU; exports come from
``--cache`` (exported there if missing, as ``benchmarks/zoo.py`` does). ::

    .venv/bin/python benchmarks/cuda_zoo.py --models bert gpt2 deit resnet18 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.zoo_export import first_line  # noqa: E402

DEFAULT_MODELS = [
    "bert",
    "gpt2",
    "llama",
    "deit",
    "swin",
    "resnet18",
    "mobilenet_v3_small",
    "convnext",
    "wav2vec2",
    "whisper_encoder",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--exporter", default="torchscript")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per case")
    parser.add_argument("--cuda-arch", default="sm_90")
    parser.add_argument("--cache", type=Path, help="exports (default ~/.cache/rewriter/zoo)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    import tvm

    if not tvm.cuda(0).exist:
        sys.exit("cuda_zoo: no CUDA device here (TVM finds none)")
    from benchmarks import zoo_models

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cuda-zoo-") as work:
        for model in zoo_models.select(args.models):
            for row in measure_model(args, model, Path(work)):
                rows.append(row)
                print(_row_line(row), flush=True)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def measure_model(args: argparse.Namespace, model: Any, work: Path) -> Iterator[dict[str, Any]]:
    """Rows for one model: per batch, agreement with ORT and the three times, or the
    first line of what failed (a failure is a result, not the end of the run)."""
    try:
        prepared = _prepare(args, model, work)
    except Exception as exc:
        yield {"model": model.name, "error": first_line(exc)}
        return
    for batch in args.batch:
        try:
            yield _measure(args, model, batch, *prepared)
        except Exception as exc:
            yield {"model": model.name, "batch": batch, "error": first_line(exc)}


def _prepare(args: argparse.Namespace, model: Any, work: Path) -> tuple[Path, Path, Any, Any]:
    """The export, its rewrite, an ORT session on the export and the PyTorch module."""
    import onnxruntime as ort

    from benchmarks import zoo_models
    from rewriter.job import rewrite_file

    original = _export_path(args, model)
    rewritten = work / f"{model.name}_tp.onnx"
    rewrite_file(original, rewritten, "two-pass-softmax", inputs=zoo_models.feeds(model, 1))
    reference_session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    module = None if args.no_torch else _torch_module(model)
    return original, rewritten, reference_session, module


def _measure(
    args: argparse.Namespace,
    model: Any,
    batch: int,
    original: Path,
    rewritten: Path,
    reference_session: Any,
    module: Any,
) -> dict[str, Any]:
    from benchmarks import zoo_models
    from benchmarks.timing import interleaved
    from rewriter import verify
    from rewriter.backends import tvm as backend

    feeds = zoo_models.feeds(model, batch)
    dims = backend.shape_dims(rewritten, feeds)
    start = time.perf_counter()
    ours = backend.compile(rewritten, "cuda", cuda_arch=args.cuda_arch, dims=dims)
    compile_s = time.perf_counter() - start
    try:
        stock = backend.compile(original, "cuda", cuda_arch=args.cuda_arch, dims=dims)
    except Exception as exc:  # TVM's stock lowering failing is a result too
        stock, stock_error = None, first_line(exc)
    reference = reference_session.run([model.output], feeds)[0]
    got = ours.run(feeds)[model.output]
    calls = {"ours": _device_call(ours, feeds)}
    if stock is not None:
        calls["stock"] = _device_call(stock, feeds)
    if module is not None:
        calls["torch"] = _torch_call(module, feeds)
    seconds = interleaved(calls, args.seconds)
    compared = verify.compare(model.output, reference, got)
    row: dict[str, Any] = {
        "model": model.name,
        "batch": batch,
        "max_rel_err": compared.max_rel_err,
        "cosine": compared.cosine,
        "ours_ms": seconds["ours"] * 1e3,
        "compile_s": compile_s,
    }
    if stock is None:
        row["stock_error"] = stock_error
    else:
        row["vs_stock_tvm"] = seconds["ours"] / seconds["stock"]
    if "torch" in seconds:
        row["vs_torch"] = seconds["ours"] / seconds["torch"]
    return row


def _export_path(args: argparse.Namespace, model: Any) -> Path:
    from benchmarks import zoo_export

    export = zoo_export.exported(model, args.exporter, args.cache or zoo_export.default_cache())
    if export.path is None:
        raise RuntimeError(f"export failed: {export.error}")
    return Path(export.path)


def _device_call(compiled: Any, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    """One call of the library's ``main`` on inputs already on the GPU, synchronised."""
    import tvm

    device = tvm.cuda(0)
    vm = compiled._machine()
    args = [tvm.runtime.tensor(feeds[name], device=device) for name in compiled.input_names]
    main = vm["main"]

    def call() -> None:
        main(*args)
        device.sync()

    return call


def _torch_module(model: Any) -> Any:
    """The zoo's PyTorch module on the GPU, or None where this torch cannot build it."""
    import torch

    try:
        return model.make().eval().to("cuda")
    except Exception as exc:  # another transformers or torchvision than the zoo's
        print(f"{model.name}: no PyTorch peer ({first_line(exc)})", flush=True)
        return None
    finally:
        torch.cuda.synchronize()


def _torch_call(module: Any, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    import torch

    inputs = {name: torch.from_numpy(array).to("cuda") for name, array in feeds.items()}

    def call() -> None:
        with torch.inference_mode():
            module(**inputs)
        torch.cuda.synchronize()

    return call


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['model']} b{row.get('batch', '-')}: {row['error']}"
    stock_part = f"{row['vs_stock_tvm']:.2f}" if "vs_stock_tvm" in row else row["stock_error"]
    torch_part = f", ours/PyTorch {row['vs_torch']:.2f}" if "vs_torch" in row else ""
    return (
        f"{row['model']} b{row['batch']}: {row['ours_ms']:.3f} ms, ours/stock TVM "
        f"{stock_part}{torch_part}, max rel err {row['max_rel_err']:.1e}"
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| model | batch | ours ms | ours / stock TVM | ours / PyTorch | max rel err vs ORT | cosine |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row.get('batch', '')} | {row['error']} | | | | |")
            continue
        torch_cell = f"{row['vs_torch']:.2f}" if "vs_torch" in row else "-"
        stock_cell = f"{row['vs_stock_tvm']:.2f}" if "vs_stock_tvm" in row else "fails"
        print(
            f"| {row['model']} | {row['batch']} | {row['ours_ms']:.3f} | {stock_cell} "
            f"| {torch_cell} | {row['max_rel_err']:.1e} | {row['cosine']:.6f} |"
        )


if __name__ == "__main__":
    main()
