"""MatMul(x, W) -> MatMul(x, W * mask24): 2:4 semi-structured magnitude sparsity.

In every group of 4 consecutive weights along the input (reduction) dimension the 2 of
largest magnitude are kept, the pattern sparse tensor cores accelerate (NVIDIA Ampere
"2:4 fine-grained structured sparsity"; see Mishra et al., "Accelerating Sparse Deep
Neural Networks", 2021, arXiv 2104.08378). MaskLLM (Fang et al. 2024, arXiv 2409.17481)
learns these masks instead; here they are by magnitude, with no training.

The input dimension is axis 0 of a MatMul weight ``[in, out]``, axis 1 of a Gemm
weight with ``transB=1`` ``[out, in]`` (axis 0 without), axis 1 of a Conv weight
``[out, in/groups, kh, kw]`` (input channels). A layer whose input dimension is not a
multiple of 4 is left dense and reported.

Approximate: the function changes; verification reports fidelity. Chosen layers:
``include``/``exclude`` name globs over the MatMul/Gemm/Conv initializer weights
(the LM head is left dense unless ``include_lm_head``). Ensures: every chosen layer has
at most 2 nonzeros in each group of 4; shapes and graph unchanged. Idempotent.
Stats: ``params_total`` and ``params_zeroed`` (zeros after the pass, earlier ones
included) over the sparsified layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from rewriter.pass_base import RewritePass, RewriteResult
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning.prune import Layer, prunable_layers
from rewriter.registry import register


@dataclasses.dataclass
class Prune2to4Options:
    """Options of ``prune-2to4``.

    include: name globs of the layers to sparsify (default: all prunable layers).
    exclude: name globs of layers left dense.
    include_lm_head: also sparsify the LM head.
    """

    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    include_lm_head: bool = False


@register
class Prune2to4Pass(RewritePass):
    """Keep the 2 largest of every 4 consecutive weights along the input dimension."""

    name = "prune-2to4"
    exact = False
    description = "2:4 semi-structured magnitude sparsity on MatMul/Gemm/Conv weights"
    Options = Prune2to4Options

    def call(self, model: ir.Model) -> RewriteResult:
        layers, notes = prunable_layers(
            model,
            include=self.options.include,
            exclude=self.options.exclude,
            include_lm_head=self.options.include_lm_head,
        )
        stats = {"layers_sparsified": 0, "layers_skipped": 0, "params_total": 0, "params_zeroed": 0}
        modified = False
        table: list[dict[str, object]] = []
        for layer in layers:
            axis = input_axis(layer)
            weight = layer.array()
            if axis is None or weight.shape[axis] % 4:
                size = "unknown" if axis is None else str(weight.shape[axis])
                notes.append(
                    f"layer {layer.name}: input dimension {size} is not a multiple of 4, left dense"
                )
                stats["layers_skipped"] += 1
                continue
            pruned = np.where(
                pruning.two_four_mask(weight, axis), weight, np.zeros((), weight.dtype)
            )
            stats["layers_sparsified"] += 1
            stats["params_total"] += weight.size
            stats["params_zeroed"] += int(np.count_nonzero(pruned == 0))
            table.append(
                {
                    "layer": layer.name,
                    "params": weight.size,
                    "axis": axis,
                    "zeros": int(np.count_nonzero(pruned == 0)),
                }
            )
            if not np.array_equal(pruned, weight):
                layer.weight.const_value = ir.Tensor(
                    pruned.astype(weight.dtype), name=layer.weight.name
                )
                modified = True
        return RewriteResult(model, modified, stats=stats, notes=notes, tables={"layers": table})


def input_axis(layer: Layer) -> int | None:
    """The reduction (input) axis of the layer's weight, the same for all its nodes, else None."""
    axes = set()
    for node in layer.nodes:
        if node.op_type == "MatMul":
            rank = len(layer.weight.shape) if layer.weight.shape is not None else 0
            axes.add(rank - 2 if rank >= 2 else 0)
        elif node.op_type == "Gemm":
            axes.add(1 if node.attributes.get_int("transB", 0) else 0)
        elif node.op_type == "Conv":
            axes.add(1)
    return axes.pop() if len(axes) == 1 else None
