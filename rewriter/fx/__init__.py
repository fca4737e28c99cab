"""The torch.fx front: the same passes, by the same names, on ``torch.fx.GraphModule``s.

``rewrite(module, "two-pass-softmax", example_inputs)`` traces the module
(``torch.fx.symbolic_trace``, else ``torch.export``), runs the fx passes, then runs the
original and the rewritten module on ``example_inputs`` and compares every output with
:mod:`rewriter.verify`, as the ONNX front does. Pass names and options are the ONNX
registry's: each fx pass takes its ONNX twin's ``Options`` dataclass.
:func:`export_onnx` writes the result as ONNX, our custom ops as ``ai.rewriter`` nodes
with their function bodies.

* :mod:`rewriter.fx.pass_base`: :class:`FxPass`, :class:`FxPassResult`;
* :mod:`rewriter.fx.registry`: the fx passes by name (:func:`register_fx_pass`);
* :mod:`rewriter.fx.rewrite`: trace, run, verify (:mod:`rewriter.fx.verify`), report;
* :mod:`rewriter.fx.export`: ONNX export and its registry of op translations.

The fx passes themselves live with their ONNX twins in the pass packages. Importing this
package loads them, so ``torch.ops.rewriter.*`` (our custom ops) exist after
``import rewriter.fx``.

>>> gm, report = rewrite(torch.nn.Softmax(-1), "two-pass-softmax", (torch.randn(2, 5),))  # doctest: +SKIP
>>> export_onnx(gm, (torch.randn(2, 5),), "model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from rewriter.fx.export import TORCHSCRIPT_OPSET, export_onnx, register_onnx_export
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import (
    available,
    load_builtin_fx_passes,
    parse_fx_pipeline,
    register_fx_pass,
)
from rewriter.fx.rewrite import FxReport, rewrite

__all__ = [
    "TORCHSCRIPT_OPSET",
    "FxPass",
    "FxPassResult",
    "FxReport",
    "available",
    "export_onnx",
    "parse_fx_pipeline",
    "register_fx_pass",
    "register_onnx_export",
    "rewrite",
]

load_builtin_fx_passes()
