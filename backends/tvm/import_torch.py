"""torch ``ExportedProgram`` -> Relax, our fx ops as ``call_tir`` to our kernels.

``tvm.relax.frontend.torch.from_exported_program`` takes a ``custom_convert_map``
(keyed by the op overload's name); each of our torch ops that has a lowering in
:mod:`rewriter.backends.tvm.ops` (registered with its ``torch_op``, e.g.
``rewriter::two_pass_softmax``, see :mod:`rewriter.fx`) is lowered there by the same
function as the ONNX front's op: its tensor arguments become the call's inputs, the
others its attributes, by the names of the op's schema. The ops are found by name,
without importing the fx front: a program that holds them was made where they exist.

>>> program = torch.export.export(model, (x,))  # doctest: +SKIP
>>> mod = import_exported_program(program, target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm import ops
from rewriter.backends.tvm.ops import KernelFactory

if TYPE_CHECKING:
    import torch
    import tvm
    from typing_extensions import TypeIs

logger = logging.getLogger(__name__)


def is_exported_program(model: object) -> TypeIs[torch.export.ExportedProgram]:
    """True for a ``torch.export.ExportedProgram`` (checked without importing torch)."""
    return type(model).__name__ == "ExportedProgram" and type(model).__module__.startswith("torch.")


def import_exported_program(
    program: Any,
    *,
    target: tvm.target.Target,
    kernel: KernelFactory | None = None,
) -> tvm.IRModule:
    """Import ``program`` into Relax; our fx ops become ``call_tir`` to our kernels.

    >>> mod = import_exported_program(program, target=resolve("llvm"))  # doctest: +SKIP
    """
    from tvm.relax.frontend.torch import from_exported_program

    custom = {
        _overload_key(name): _converter(lowering, target, kernel)
        for name, lowering in ops.torch_lowerings().items()
    }
    return from_exported_program(program, custom_convert_map=custom)


def _overload_key(name: str) -> str:
    """TVM's key for the default overload of torch op ``name``: ``rewriter::two_pass_softmax``
    -> ``two_pass_softmax.default`` (the overload's ``__name__``)."""
    return f"{name.partition('::')[2]}.default"


def _converter(
    lowering: ops.Lowering, target: tvm.target.Target, kernel: KernelFactory | None
) -> Any:
    """TVM's converter of an fx node of our op: an :class:`ops.OpCall` to ``lowering``."""

    def convert(node: Any, importer: Any) -> Any:
        import torch

        inputs: list[Any] = []
        attrs: dict[str, Any] = {}
        for index, argument in enumerate(node.target._schema.arguments):
            if index < len(node.args):
                value = node.args[index]
            elif argument.name in node.kwargs:
                value = node.kwargs[argument.name]
            else:
                value = argument.default_value if argument.has_default_value() else None
            if isinstance(value, torch.fx.Node):
                inputs.append(importer.env[value])
            else:
                attrs[argument.name] = value
        call = ops.OpCall(importer.block_builder, inputs, attrs, target, kernel)
        return lowering.emit(call)

    return convert


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
