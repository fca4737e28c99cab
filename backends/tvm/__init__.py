"""Compile models with Apache TVM (Relax + TIR): the public API of the backend.

``compile`` a model (ONNX, or a ``torch.export.ExportedProgram``) for a target preset,
run it, ``export`` it as a shared library and ``load`` it back. Where things live:

* :mod:`.build`: compile, :class:`Compiled` (run, export), :func:`load`, the signature;
* :mod:`.session`: :class:`Session`, repeated runs without copies (``Compiled.session()``);
* :mod:`.pipeline`: the Relax pipeline, stage by stage.

>>> from rewriter.backends import tvm as backend
>>> compiled = backend.compile("model.onnx", "avx512", dims={"batch": 1})  # doctest: +SKIP
>>> backend.load(compiled.export("model.so")).run({"x": x})  # doctest: +SKIP
"""

from __future__ import annotations

from rewriter.backends.tvm.build import (
    METADATA_SUFFIX,
    METADATA_VERSION,
    Compiled,
    Signature,
    SymbolicDimsError,
    UnsupportedModelError,
    compile,
    compile_and_run,
    file_sha256,
    load,
    shape_dims,
)
from rewriter.backends.tvm.pipeline import relax_pipeline
from rewriter.backends.tvm.session import Session, aligned_empty

__all__ = [
    "METADATA_SUFFIX",
    "METADATA_VERSION",
    "Compiled",
    "Session",
    "Signature",
    "SymbolicDimsError",
    "UnsupportedModelError",
    "aligned_empty",
    "compile",
    "compile_and_run",
    "file_sha256",
    "load",
    "relax_pipeline",
    "shape_dims",
]
