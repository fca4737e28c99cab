"""ONNX export of a rewritten module: our custom ops become ``ai.rewriter`` nodes with bodies.

Each pass package with custom torch ops registers, with :func:`register_onnx_export`, how
they translate (onnxscript translations for the dynamo exporter, symbolic functions for
the TorchScript one) and the builders of its ONNX ops' function bodies;
:func:`export_onnx` uses every registered translation and attaches the bodies of the
``ai.rewriter`` ops the exported model uses.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rewriter import io
from rewriter.errors import InputError
from rewriter.fx.registry import load_builtin_fx_passes
from rewriter.pass_base import DOMAIN, DOMAIN_VERSION, add_function

logger = logging.getLogger(__name__)

# The TorchScript exporter's default opset; CastLike (15) lets the bodies keep the dtype.
TORCHSCRIPT_OPSET = 17
CASTLIKE_OPSET = 15


def export_onnx(
    gm: torch.nn.Module,
    args: tuple[Any, ...],
    path: str | Path,
    *,
    dynamo: bool = True,
    kwargs: dict[str, Any] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export a rewritten module to ONNX at ``path`` (atomically), with our function bodies.

    ``torch.ops.rewriter.*`` ops become ``ai.rewriter`` nodes (for example
    ``two_pass_softmax`` -> ``TwoPassSoftmax`` along the last axis), as the pass packages
    that :func:`register_onnx_export` say, with their function bodies.
    ``dynamo=False`` uses the (deprecated) TorchScript exporter.

    >>> export_onnx(gm, (torch.randn(2, 8),), "model.onnx")  # doctest: +SKIP
    """
    path = Path(path)
    if dynamo:
        program = torch.onnx.export(
            gm,
            args,
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset_version,
            custom_translation_table=_export_translations(),
            verbose=False,
        )
        assert program is not None
        model = program.model
    else:
        model = _torchscript_export(gm, args, kwargs, opset_version or TORCHSCRIPT_OPSET)
    opset = model.opset_imports.get("", 1)
    used = {node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN}
    for op_type in sorted(used):
        add_function(model, _ONNX_BODIES[op_type](opset))
    io.save(model, path)
    logger.info("exported %s (%s)", path, ", ".join(sorted(used)) or "no ai.rewriter ops")
    return path


# How our custom ops export to ONNX: each module with custom ops registers the dynamo
# translations of its torch ops, optionally their TorchScript symbolic functions, and the
# builders of its ONNX ops' function bodies.
_ONNX_TRANSLATIONS: list[Callable[[], dict[Any, Callable[..., Any]]]] = []
_TORCHSCRIPT_SYMBOLICS: list[Callable[[], dict[str, Callable[..., Any]]]] = []
_ONNX_BODIES: dict[str, Callable[[int], Any]] = {}


def register_onnx_export(
    translations: Callable[[], dict[Any, Callable[..., Any]]],
    bodies: dict[str, Callable[[int], Any]],
    torchscript: Callable[[], dict[str, Callable[..., Any]]] | None = None,
) -> None:
    """Make :func:`export_onnx` translate a module's custom ops and attach their bodies.

    ``translations()`` gives ``{torch op: onnxscript translation}``; ``bodies`` maps each
    ``ai.rewriter`` op type to ``opset -> onnx.FunctionProto``; ``torchscript()``, for ops
    the TorchScript exporter can write, gives ``{"rewriter::op": symbolic function}``.

    >>> register_onnx_export(translations, {"TwoPassSoftmax": body})  # doctest: +SKIP
    """
    _ONNX_TRANSLATIONS.append(translations)
    _ONNX_BODIES.update(bodies)
    if torchscript is not None:
        _TORCHSCRIPT_SYMBOLICS.append(torchscript)


def _export_translations() -> dict[Any, Callable[..., Any]]:
    load_builtin_fx_passes()
    table: dict[Any, Callable[..., Any]] = {}
    for translations in _ONNX_TRANSLATIONS:
        table.update(translations())
    return table


def _torchscript_export(
    gm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None, opset: int
) -> Any:
    """Export with the TorchScript exporter and load the result into onnx-ir."""
    if opset < CASTLIKE_OPSET:
        raise InputError(f"export_onnx(dynamo=False) needs opset >= {CASTLIKE_OPSET}, got {opset}")
    import onnx
    import onnx_ir as ir

    load_builtin_fx_passes()
    for symbolics in _TORCHSCRIPT_SYMBOLICS:
        for qualified, symbolic in symbolics().items():
            torch.onnx.register_custom_op_symbolic(qualified, symbolic, 9)
    with tempfile.TemporaryDirectory(prefix="rewriter-fx-") as folder:
        staged = Path(folder) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                gm,
                args,
                str(staged),
                kwargs=kwargs,
                dynamo=False,
                opset_version=opset,
                custom_opsets={DOMAIN: DOMAIN_VERSION},
            )
        # Read everything (external data included) before the folder goes away.
        return ir.serde.deserialize_model(onnx.load(str(staged)))
