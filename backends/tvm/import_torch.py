"""torch ``ExportedProgram`` -> Relax, our fx ops as ``call_tir`` to our kernels.

``tvm.relax.frontend.torch.from_exported_program`` takes a ``custom_convert_map``
(keyed by the op overload's name); ``torch.ops.rewriter.two_pass_softmax`` and
``two_pass_log_softmax`` (see :mod:`rewriter.fx`) are lowered there by
:func:`rewriter.backends.lowering.emit_two_pass_softmax`, the same lowering as the
ONNX front's.

>>> program = torch.export.export(model, (x,))  # doctest: +SKIP
>>> mod = import_exported_program(program, target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rewriter.backends import lowering

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# fx op overload name -> log-softmax flag.
CUSTOM_OPS = {"two_pass_softmax.default": False, "two_pass_log_softmax.default": True}


def is_exported_program(model: object) -> bool:
    """True for a ``torch.export.ExportedProgram`` (checked without importing torch)."""
    return type(model).__name__ == "ExportedProgram" and type(model).__module__.startswith("torch.")


def import_exported_program(
    program: Any,
    *,
    target: tvm.target.Target,
    kernel: lowering.KernelFactory | None = None,
) -> tvm.IRModule:
    """Import ``program`` into Relax; our fx ops become ``call_tir`` to our kernels.

    >>> mod = import_exported_program(program, target=resolve("llvm"))  # doctest: +SKIP
    """
    from tvm.relax.frontend.torch import from_exported_program

    import rewriter.fx  # noqa: F401  (registers torch.ops.rewriter.*)

    def converter(log: bool) -> Any:
        def convert(node: Any, importer: Any) -> Any:
            x = importer.env[node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
            return lowering.emit_two_pass_softmax(
                importer.block_builder, x, log=log, target=target, kernel=kernel, axis=int(dim)
            )

        return convert

    custom = {name: converter(log) for name, log in CUSTOM_OPS.items()}
    return from_exported_program(program, custom_convert_map=custom)


def signature(program: Any) -> tuple[list[tuple[str, list[int | str | None], str]], list[str]]:
    """``([(name, shape, numpy dtype), ...], output names)`` of the program's user inputs/outputs.

    Outputs are named ``output_0``, ``output_1``, ... in order.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs: list[tuple[str, list[int | str | None], str]] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta["val"]
        shape: list[int | str | None] = [
            int(d) if str(d).lstrip("-").isdigit() else str(d) for d in value.shape
        ]
        inputs.append((spec.arg.name, shape, str(value.dtype).removeprefix("torch.")))
    user = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    return inputs, [f"output_{index}" for index in range(len(user))]
