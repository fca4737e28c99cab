"""Exports of the zoo's models with both torch exporters, cached on disk.

* ``torchscript``: ``torch.onnx.export(dynamo=False)``, opset 17, ``dynamic_axes``
  named as the model's symbolic axes;
* ``dynamo``: ``torch.onnx.export(dynamo=True)``, opset 18, ``dynamic_shapes`` by
  ``torch.export.Dim`` (the weights in ``<file>.data``).

A dynamo export whose dynamic shapes fail is retried with static shapes (the note
says why); an export that fails outright is a result (:class:`Export` with an
``error``), not an exception. Results, failures included, are cached under
``<cache>/<model key>/`` (:meth:`ZooModel.key` changes with the builder's source and
the package versions), so reruns skip the exports.

>>> result = exported(MODELS["bert"], "dynamo", default_cache())  # doctest: +SKIP
>>> result.ok, result.path  # doctest: +SKIP
(True, '/root/.cache/rewriter/zoo/bert-0123456789/dynamo.onnx')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.zoo_builders import TEXT
from benchmarks.zoo_models import ZooModel, feeds

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
# Sizes of the symbolic axes in the example inputs the exporters trace with. Batch 2
# and 32 tokens: torch.export specializes sizes 0 and 1, and 32 differs from the run
# sizes, so a size baked into the graph shows up as a failing run.
EXPORT_SIZES = {"batch": 2, "sequence": 32, "samples": 8000}


@dataclasses.dataclass
class Export:
    """The outcome of one export: ``path`` on success, else ``error`` (its first line)."""

    model: str
    exporter: str
    path: str | None
    seconds: float
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/rewriter/zoo`` (``~/.cache/rewriter/zoo``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rewriter" / "zoo"


def exported(model: ZooModel, exporter: str, cache: Path) -> Export:
    """The export of ``model`` by ``exporter``, from ``cache`` if an earlier run made it
    (failures are cached too); else exported now and recorded there.

    >>> exported(MODELS["resnet18"], "dynamo", Path("/tmp/zoo")).ok  # doctest: +SKIP
    True
    """
    folder = cache / model.key()
    record = folder / f"{exporter}-{_exporter_digest()}.json"
    if record.is_file():
        result = Export(**json.loads(record.read_text()))
        if result.path is None or Path(result.path).is_file():
            return result
    folder.mkdir(parents=True, exist_ok=True)
    result = export(model, exporter, record.with_suffix(".onnx"))
    record.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result


def _exporter_digest() -> str:
    """A hash of this module's export code, so that a change to it re-exports."""
    functions = (_example, _export_torchscript, _export_dynamo, _dynamo)
    source = "".join(inspect.getsource(f) for f in functions) + repr(EXPORT_SIZES)
    return hashlib.sha256(source.encode()).hexdigest()[:8]


def export(model: ZooModel, exporter: str, path: Path) -> Export:
    """Export ``model`` with ``exporter`` to ``path``; a failure is returned, not raised."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r}: expected one of {EXPORTERS}")
    start = time.perf_counter()
    note = ""
    try:
        module = model.make()
        if exporter == "torchscript":
            _export_torchscript(model, module, path)
        else:
            note = _export_dynamo(model, module, path)
    except Exception as exc:  # the exporters raise many types; each is a result
        logger.warning("%s by %s: %s", model.name, exporter, first_line(exc))
        return Export(
            model.name, exporter, None, time.perf_counter() - start, note, first_line(exc)
        )
    return Export(model.name, exporter, str(path), time.perf_counter() - start, note)


def _example(model: ZooModel) -> dict[str, Any]:
    import torch

    sizes = EXPORT_SIZES | {k: v for k, v in model.sizes.items() if k not in EXPORT_SIZES}
    arrays = feeds(model, EXPORT_SIZES["batch"], sizes=sizes)
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; transformers emits TracerWarnings.
        warnings.simplefilter("ignore")
        yield


def _export_torchscript(model: ZooModel, module: Any, path: Path) -> None:
    """TorchScript exporter, opset 17, with ``dynamic_axes`` named as the model's axes.

    Exported with autograd on: under ``no_grad``, ``nn.MultiheadAttention`` (torchvision's
    ViT) takes a fused fast path the exporter cannot handle.
    """
    import torch

    example = _example(model)
    axes = {
        spec.name: {i: axis for i, axis in enumerate(spec.axes) if isinstance(axis, str)}
        for spec in model.inputs
    }
    axes[model.output] = {0: "batch"}
    with _quiet(), torch.enable_grad():
        torch.onnx.export(
            module,
            tuple(example.values()),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(example),
            output_names=[model.output],
            dynamic_axes=axes,
        )


def _export_dynamo(model: ZooModel, module: Any, path: Path) -> str:
    """Dynamo exporter, opset 18, ``dynamic_shapes`` by ``torch.export.Dim``; if those
    fail, static shapes (the returned note says why)."""
    from torch.export import Dim

    example = _example(model)
    dims = {
        "batch": Dim("batch", min=1, max=1024),
        "sequence": Dim("sequence", min=2, max=TEXT["positions"]),
        "samples": Dim("samples", min=4000, max=480000),
    }
    dynamic = {
        spec.name: {i: dims[axis] for i, axis in enumerate(spec.axes) if isinstance(axis, str)}
        for spec in model.inputs
    }
    try:
        _dynamo(module, example, path, dynamic, model.output)
        return ""
    except Exception as exc:  # torch.export raises many types on unsupported dynamism
        note = f"static shapes: dynamic shapes failed ({first_line(exc)})"
        logger.warning("%s: %s", model.name, note)
    _dynamo(module, example, path, None, model.output)
    return note


def _dynamo(module: Any, example: dict[str, Any], path: Path, dynamic: Any, output: str) -> None:
    import torch

    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module,
            (),
            str(path),
            kwargs=example,
            dynamo=True,
            opset_version=18,
            dynamic_shapes=dynamic,
            output_names=[output],
            verbose=False,
        )


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` that is not part of a traceback (at most 300
    characters; TVM's errors carry a C++ or Python traceback in their message)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    frame = re.compile(r'^(Traceback|File "|\d+: |at |\^|During handling|The above exception)')
    lines = [line for line in lines if line and not frame.match(line)]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
