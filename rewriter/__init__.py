"""rewriter: compiler-style graph rewriting for neural networks.

>>> import rewriter
>>> model = rewriter.load("model.onnx")  # doctest: +SKIP
>>> result = rewriter.run_pipeline(model, rewriter.parse_pipeline("two-pass-softmax"))  # doctest: +SKIP
>>> rewriter.save(result.model, "out.onnx")  # doctest: +SKIP

The names below load their modules on first use (PEP 562), so that ``import rewriter``
itself imports nothing heavy: the ``rewrite`` command (:mod:`rewriter.entry`) handles
Ctrl-C and SIGTERM from its first moment, before onnx is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewriter.errors import InputError, RewriterError, VerificationError
    from rewriter.io import load, save
    from rewriter.manager import PipelineResult, run_pipeline
    from rewriter.registry import available, create_pass, load_pipeline, parse_pipeline

__version__ = "0.1.0"

# Each public name: the module that defines it.
_HOMES = {
    "InputError": "rewriter.errors",
    "PipelineResult": "rewriter.manager",
    "RewriterError": "rewriter.errors",
    "VerificationError": "rewriter.errors",
    "available": "rewriter.registry",
    "create_pass": "rewriter.registry",
    "load": "rewriter.io",
    "load_pipeline": "rewriter.registry",
    "parse_pipeline": "rewriter.registry",
    "run_pipeline": "rewriter.manager",
    "save": "rewriter.io",
}

__all__ = [
    "InputError",
    "PipelineResult",
    "RewriterError",
    "VerificationError",
    "available",
    "create_pass",
    "load",
    "load_pipeline",
    "parse_pipeline",
    "run_pipeline",
    "save",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
