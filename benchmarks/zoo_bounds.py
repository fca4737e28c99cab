"""The largest size each zoo export's tables take, checked against ONNX Runtime.

For each model and exporter: the bounds the importer derives from fixed-length tables
read by a symbolic size (``import_onnx.largest_sizes``: BERT's 512 positions sliced to
the sequence), and whether ONNX Runtime runs at each bound and fails one past it. A bound
that ORT passes is too tight (the library would refuse what the model runs); one where
ORT fails is too loose.

    .venv/bin/python benchmarks/zoo_bounds.py --models bert gpt2 bart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model names (default: every text model)")
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    args = parser.parse_args()

    import onnxruntime as ort

    from benchmarks import zoo_export, zoo_models
    from rewriter.backends.tvm import import_onnx, targets

    target = targets.resolve("avx512")
    cache = zoo_export.default_cache()
    names = args.models or [
        name for name, model in zoo_models.MODELS.items() if "sequence" in model.sizes
    ]
    print("| model | exporter | bound | ORT at the bound | ORT one past it |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        model = zoo_models.MODELS[name]
        for exporter in args.exporters:
            export = zoo_export.exported(model, exporter, cache)
            if export.path is None:
                print(f"| {name} | {exporter} | export failed | | |", flush=True)
                continue
            largest = import_onnx.largest_sizes(import_onnx.import_onnx(export.path, target=target))
            if not largest:
                print(f"| {name} | {exporter} | none | | |", flush=True)
                continue
            session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
            for dim, bound in largest.items():
                runs = [_runs(session, zoo_models.feeds(model, 1, sizes={**model.sizes, dim: size})) for size in (bound, bound + 1)]
                print(f"| {name} | {exporter} | {dim} <= {bound} | {_word(runs[0])} | {_word(runs[1])} |", flush=True)


def _runs(session: object, feeds: dict[str, np.ndarray]) -> bool:
    try:
        session.run(None, feeds)  # type: ignore[attr-defined]
    except Exception:  # ORT's error at a size past the table: the point of the check
        return False
    return True


def _word(ran: bool) -> str:
    return "runs" if ran else "fails"


if __name__ == "__main__":
    main()
