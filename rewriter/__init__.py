"""rewriter: compiler-style graph rewriting for neural networks.

>>> import rewriter
>>> model = rewriter.load("model.onnx")  # doctest: +SKIP
>>> result = rewriter.run_pipeline(model, rewriter.parse_pipeline("two-pass-softmax"))  # doctest: +SKIP
>>> rewriter.save(result.model, "out.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from rewriter.errors import InputError, RewriterError, VerificationError
from rewriter.io import load, save
from rewriter.manager import PipelineResult, run_pipeline
from rewriter.registry import available, create_pass, load_pipeline, parse_pipeline

__version__ = "0.1.0"

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
