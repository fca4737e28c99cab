"""MatMul(x, W) -> MatMul(x, W * mask): layer-adaptive unstructured magnitude pruning.

Implements Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning
in Deep Neural Networks" (ICCV 2023, arXiv 2308.10438). For every prunable layer
``l`` and every amount ``a`` on a grid, only that layer is pruned by magnitude and the
distortion ``D_l(a)`` of the model's output on calibration data is measured; the
amounts minimizing ``sum_l D_l(a_l)`` under the global sparsity target come from an
exact dynamic program (:func:`rewriter.passes.pruning.math.allocate_rd`). Baselines:
``allocation=uniform`` (every layer by the target) and ``global-magnitude`` (one
threshold over all layers).

The curves are measured in ONNX Runtime (:mod:`rewriter.passes.pruning.probe`): the prunable
weights are graph inputs, so pruning a layer is a change of feeds, never a rebuilt
session, and each layer runs only the part of the graph after its first use, fed with
values captured once from the dense model; each layer's weights are zeroed
incrementally in magnitude order.

Distortion (``distortion=``): ``mse`` is the paper's mean squared output error, over
the real tokens only when the model takes an attention mask; ``pooled`` is the squared
error of the mask-weighted mean over positions (the sentence embedding of an encoder).
Each output's error is divided by the mean square of its reference value, so outputs
of different scales add up.

Approximate: the function changes; verification reports fidelity.
Prunable: initializer weights of MatMul/Gemm/Conv (``exclude`` name globs; the LM head,
a last projection to a graph output that widens the features, unless
``include_lm_head``). Requires: float weights. Ensures: the global sparsity of the
prunable weights is the target within one grid step (exactly, up to rounding, for the
baselines); the graph, shapes and inputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rewriter import distributed, io, plot
from rewriter.analysis import weight_ops
from rewriter.errors import InputError
from rewriter.pass_base import RewritePass, RewriteResult
from rewriter.passes.pruning import math as pruning
from rewriter.passes.pruning.probe import (
    CurveWorker,
    DistortionProbe,
    shared_constants,
    with_weights_as_inputs,
)
from rewriter.registry import register

logger = logging.getLogger(__name__)

ALLOCATIONS = ("rd", "uniform", "global-magnitude")
DISTORTIONS = ("mse", "pooled")


@dataclasses.dataclass
class PruneOptions:
    """Options of ``prune``.

    sparsity: fraction of the prunable weights to zero, over all of them.
    allocation: ``rd`` (rate-distortion DP), ``uniform`` or ``global-magnitude``.
    distortion: ``mse`` (output error) or ``pooled`` (error of the mask-mean-pooled output).
    max_amount, steps: the grid of amounts ``0, 1/steps, ..., <= max_amount`` (rd).
    exclude: name globs (node or weight name) of layers left dense.
    include_lm_head: also prune the LM head (excluded by default).
    outputs: graph outputs the distortion is measured on (default: all float outputs).
    plot: write the distortion curves and the chosen amounts to this PNG.
    """

    sparsity: float = 0.5
    allocation: str = "rd"
    distortion: str = "mse"
    max_amount: float = 0.95
    steps: int = 32
    exclude: list[str] = dataclasses.field(default_factory=list)
    include_lm_head: bool = False
    outputs: list[str] = dataclasses.field(default_factory=list)
    plot: str = ""


@dataclasses.dataclass(frozen=True)
class Layer:
    """A prunable weight and the nodes using it."""

    name: str
    weight: ir.Value
    nodes: tuple[ir.Node, ...]

    @property
    def params(self) -> int:
        return int(self.array().size)

    def array(self) -> np.ndarray:
        assert self.weight.const_value is not None
        return self.weight.const_value.numpy()


@register
class PrunePass(RewritePass):
    """Zero weights by magnitude, layer amounts allocated by rate-distortion DP or a baseline."""

    name = "prune"
    exact = False
    description = "layer-adaptive magnitude pruning by rate-distortion DP (Xu et al. ICCV 2023)"
    Options = PruneOptions

    def call(self, model: ir.Model) -> RewriteResult:
        options = self.options
        _check_options(options)
        layers, notes = prunable_layers(
            model, exclude=options.exclude, include_lm_head=options.include_lm_head
        )
        if not layers:
            notes.append("no prunable weights (MatMul/Gemm/Conv with an initializer weight)")
            return RewriteResult(model, False, stats={"layers_pruned": 0}, notes=notes)
        weights = [layer.array() for layer in layers]
        params = [w.size for w in weights]
        start = time.perf_counter()
        if options.allocation == "uniform":
            allocation = pruning.allocate_uniform(params, options.sparsity)
        elif options.allocation == "global-magnitude":
            allocation = pruning.allocate_global_magnitude(weights, options.sparsity)
        else:
            amounts = pruning.amount_grid(options.max_amount, options.steps)
            curves = measure_curves(
                model,
                layers,
                amounts,
                self.context.calibration_inputs(model),
                options,
                pool=self.context.pool(),
            )
            zeros = [int(np.count_nonzero(w == 0)) for w in weights]
            allocation = pruning.allocate_rd(
                pruning.monotone(curves), params, amounts, options.sparsity, zeros=zeros
            )
            if options.plot:
                plot_curves(Path(options.plot), layers, amounts, curves, allocation)
        seconds = time.perf_counter() - start
        zeroed = 0
        modified = False
        for layer, weight, count in zip(layers, weights, allocation.counts, strict=True):
            pruned = pruning.magnitude_prune(weight, count)
            zeroed += int(np.count_nonzero(pruned == 0))
            if np.count_nonzero(pruned == 0) != np.count_nonzero(weight == 0):
                layer.weight.const_value = ir.Tensor(pruned, name=layer.weight.name)
                modified = True
        total = sum(params)
        stats = pruning.allocation_stats(allocation.counts, zeroed, total, seconds)
        notes.append(
            f"allocation {options.allocation}: {zeroed}/{total} weights zero "
            f"({zeroed / total:.4f}, target {options.sparsity:g}) in {seconds:.2f} s"
        )
        tables = {"layers": _table(layers, allocation)}
        return RewriteResult(model, modified, stats=stats, notes=notes, tables=tables)


def _check_options(options: PruneOptions) -> None:
    if not 0.0 <= options.sparsity < 1.0:
        raise InputError(f"prune: sparsity must be in [0, 1), got {options.sparsity}")
    if options.allocation not in ALLOCATIONS:
        raise InputError(
            f"prune: allocation must be one of {', '.join(ALLOCATIONS)}, got {options.allocation!r}"
        )
    if options.distortion not in DISTORTIONS:
        raise InputError(
            f"prune: distortion must be one of {', '.join(DISTORTIONS)}, got {options.distortion!r}"
        )


def _table(layers: Sequence[Layer], allocation: pruning.Allocation) -> list[dict[str, object]]:
    """The report's per-layer rows: name, parameters, sparsity, measured distortion (rd only)."""
    rows: list[dict[str, object]] = []
    for index, (layer, count) in enumerate(zip(layers, allocation.counts, strict=True)):
        distortion = allocation.distortion[index] if allocation.distortion is not None else None
        rows.append(
            {
                "layer": layer.name,
                "params": layer.params,
                "sparsity": count / layer.params,
                "distortion": distortion,
            }
        )
    return rows


def prunable_layers(
    model: ir.Model,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_lm_head: bool = False,
) -> tuple[list[Layer], list[str]]:
    """The distinct initializer weights of MatMul/Gemm/Conv, filtered, and notes on those left out.

    A layer is named after its first node (or its weight when the node has no name);
    ``include``/``exclude`` globs match the node names and the weight's name.

    >>> [layer.name for layer in prunable_layers(model)[0]]  # doctest: +SKIP
    ['/encoder/layer.0/attention/self/query/MatMul', ...]
    """
    by_weight: dict[int, list] = {}
    for op in weight_ops(model):
        by_weight.setdefault(id(op.weight), []).append(op)
    # A weight the user may override at run time (a graph input, valid since IR 4) or
    # that the graph returns (a graph output) is not the pass's to change.
    signature = {id(value): "input" for value in model.graph.inputs}
    signature.update({id(value): "output" for value in model.graph.outputs})
    layers, notes = [], []
    for ops in by_weight.values():
        nodes = tuple(op.node for op in ops)
        layer = Layer(ops[0].name, ops[0].weight, nodes)
        names = [node.name for node in nodes if node.name] + [layer.weight.name or ""]
        if include and not any(fnmatch.fnmatchcase(n, glob) for n in names for glob in include):
            continue
        if any(fnmatch.fnmatchcase(n, glob) for n in names for glob in exclude):
            notes.append(f"layer {layer.name}: excluded by name")
            continue
        if id(layer.weight) in signature:
            notes.append(f"layer {layer.name}: its weight is also a graph {signature[id(layer.weight)]}, left dense")
            continue
        if not include_lm_head and any(_is_lm_head(model, node) for node in nodes):
            notes.append(f"layer {layer.name}: LM head left dense (include_lm_head=true prunes it)")
            continue
        layers.append(layer)
    return layers, notes


def _is_lm_head(model: ir.Model, node: ir.Node) -> bool:
    """A MatMul/Gemm whose result (maybe plus a bias) is a graph output wider than its input."""
    if node.op_type not in ("MatMul", "Gemm"):
        return False
    outputs = set(model.graph.outputs)
    result = node.outputs[0]
    if result not in outputs:
        users = result.consumers()
        if not (len(users) == 1 and users[0].op_type == "Add" and users[0].outputs[0] in outputs):
            return False
    weight = node.inputs[1]
    shape = weight.shape if weight is not None else None
    if shape is None or len(shape) != 2 or not all(isinstance(dim, int) for dim in shape):
        return False
    rows, columns = (dim if isinstance(dim, int) else 0 for dim in shape)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    fan_in, fan_out = (columns, rows) if transposed else (rows, columns)
    return fan_out > fan_in


# --------------------------------------------------------------------------------------
# Distortion curves in ONNX Runtime
# --------------------------------------------------------------------------------------


def measure_curves(
    model: ir.Model,
    layers: Sequence[Layer],
    amounts: np.ndarray,
    batches: Sequence[dict[str, np.ndarray]],
    options: PruneOptions,
    *,
    pool: distributed.Pool | None = None,
) -> np.ndarray:
    """``curves[l, j]``: the output distortion with only layer ``l`` pruned by ``amounts[j]``.

    Measured by a :class:`rewriter.passes.pruning.probe.DistortionProbe` (weights as graph
    inputs, suffix sessions after each layer's first use); progress is logged per layer.
    With a Ray ``pool`` the layers are spread over its workers (one probe each,
    :class:`rewriter.passes.pruning.probe.CurveWorker`); the curves are the same bits.
    """
    weights = {layer.weight.name or "": layer.array() for layer in layers}
    if pool is not None:
        return _measure_curves_on(pool, model, weights, amounts, batches, options)
    probe = DistortionProbe(
        model, weights, batches, distortion=options.distortion, outputs=options.outputs
    )
    curves = np.zeros((len(layers), len(amounts)))
    start = time.perf_counter()
    for index, layer in enumerate(layers):
        curves[index] = probe.curve(layer.weight.name or "", amounts)
        logger.info(
            "prune: distortion curve %d/%d (%s) after %.1f s",
            index + 1,
            len(layers),
            layer.name,
            time.perf_counter() - start,
        )
    logger.info(
        "prune: %d curves x %d amounts in %.1f s",
        len(layers),
        len(amounts),
        time.perf_counter() - start,
    )
    return curves


def _measure_curves_on(
    pool: distributed.Pool,
    model: ir.Model,
    weights: dict[str, np.ndarray],
    amounts: np.ndarray,
    batches: Sequence[dict[str, np.ndarray]],
    options: PruneOptions,
) -> np.ndarray:
    """:func:`measure_curves` on Ray workers: each builds the probe once, then measures layers.

    Every worker's probe makes the serial probe's choices (suffix sessions or not, by the
    model's size: :func:`rewriter.passes.pruning.probe.wants_suffixes`), so every curve
    has the serial run's bits.
    """
    constants = shared_constants(model, weights)
    proto = with_weights_as_inputs(model, [*weights, *constants])
    folder = io.external_data_dir(model)
    start = time.perf_counter()
    setup = (
        proto.SerializeToString(),
        weights,
        list(batches),
        amounts,
        options.distortion,
        list(options.outputs),
        None if folder is None else str(folder),
        constants,
    )
    curves = np.array(distributed.map_tasks(pool, CurveWorker, setup, list(weights)))
    logger.info(
        "prune: %d curves x %d amounts in %.1f s on Ray workers",
        len(weights),
        len(amounts),
        time.perf_counter() - start,
    )
    return curves.reshape(len(weights), len(amounts))


def plot_curves(
    path: Path,
    layers: Sequence[Layer],
    amounts: np.ndarray,
    curves: np.ndarray,
    allocation: pruning.Allocation,
) -> None:
    """Write the distortion curves (log scale) and each layer's chosen amount to a PNG."""
    figure = plot.figure(8, 5)
    axes = figure.subplots()
    for index, layer in enumerate(layers):
        line = axes.plot(
            amounts, np.maximum(curves[index], 1e-12), linewidth=0.8, label=layer.name
        )[0]
        chosen = list(amounts).index(allocation.amounts[index])
        axes.plot(
            [amounts[chosen]], [max(curves[index, chosen], 1e-12)], "o", color=line.get_color()
        )
    axes.set_yscale("log")
    axes.set_xlabel("amount pruned")
    axes.set_ylabel("distortion")
    axes.set_title("per-layer distortion curves; dots: the DP's choice")
    if len(layers) <= 12:
        axes.legend(fontsize=6)
    plot.save(figure, path)
