"""down(act(x @ W_gate) * (x @ W_up)) -> the same with W_gate[:, K], W_up[:, K], W_down[K, :]: MLP width pruning.

Implements the max-absolute-weight (MAW, "peak-to-peak") criterion for GLU MLPs
(arXiv 2512.22671): channel ``k`` of the hidden layer scores
``max_i |W_up[i, k]| + max_i |W_gate[i, k]|``; the ``ratio`` lowest-scoring channels are
removed from up, gate and down together, so the initializers and the hidden shapes
really shrink (``criterion=l2``: column norms instead, the usual peer). A plain MLP
``down(act(x @ W_up + b))`` (BERT's GELU MLP) is pruned by the same criterion on
``W_up`` alone.

The pattern is found by data flow, not by op names: from the input of a down
projection (MatMul/Gemm with an initializer weight) back through elementwise ops
(Mul, Add, Sigmoid, Erf, Div, Gelu, Relu, ...) to the projections producing it. Its
other operands must be constants, either scalars or vectors over the hidden channels
(biases: they are sliced too). Two projections of the same input make a GLU, one a
plain MLP. Every value inside must be used only inside, and every weight only once.

Approximate: the function changes; verification reports fidelity. Exactly, the pruned
model is the dense one restricted to the kept channels. Requires: 2-D float weights. Ensures: the same graph inputs and outputs, a model the checker
accepts, the hidden width of each pruned MLP reduced to ``round((1 - ratio) * d)``
(rounded down to ``multiple``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from rewriter.errors import InputError
from rewriter.pass_base import RewritePass, RewriteResult
from rewriter.passes.pruning import math as pruning
from rewriter.registry import register

# Ops that act position by position and keep the hidden dimension last.
ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Relu",
    "LeakyRelu",
    "Gelu",
    "Elu",
    "Selu",
    "Softplus",
    "HardSigmoid",
    "HardSwish",
    "Exp",
    "Neg",
    "Abs",
    "Sqrt",
    "Identity",
    "Cast",
    "Clip",
    "Min",
    "Max",
    "Where",
    "Mish",
}
NONLINEAR = ELEMENTWISE - {"Add", "Sub", "Mul", "Div", "Neg", "Identity", "Cast"}


@dataclasses.dataclass
class PruneWidthOptions:
    """Options of ``prune-width``.

    ratio: fraction of each MLP's hidden channels to remove.
    multiple: keep a multiple of this many channels (hardware-friendly widths).
    criterion: ``maw`` (max |W|, the paper's) or ``l2`` (column norms, the usual peer).
    """

    ratio: float = 0.25
    multiple: int = 1
    criterion: str = "maw"


@dataclasses.dataclass(frozen=True)
class Projection:
    """A MatMul/Gemm with a 2-D initializer weight, and the weight axis of the hidden channels."""

    node: ir.Node
    weight: ir.Value
    axis: int


@dataclasses.dataclass(frozen=True)
class Mlp:
    """A matched MLP: its projections into the hidden layer, its down projection, what lies between."""

    sources: tuple[Projection, ...]
    down: Projection
    region: tuple[ir.Node, ...]
    constants: tuple[ir.Value, ...]
    hidden: int

    @property
    def kind(self) -> str:
        return "glu" if len(self.sources) == 2 else "mlp"


@register
class PruneWidthPass(RewritePass):
    """Remove the lowest-MAW hidden channels of GLU and plain MLPs."""

    name = "prune-width"
    exact = False
    description = "MLP width pruning by the max-absolute-weight criterion (GLU and plain MLPs)"
    Options = PruneWidthOptions

    def call(self, model: ir.Model) -> RewriteResult:
        ratio = self.options.ratio
        if not 0.0 <= ratio < 1.0:
            raise InputError(f"prune-width: ratio must be in [0, 1), got {ratio}")
        score = pruning.channel_criterion(self.options.criterion)
        mlps, notes = find_mlps(model)
        stats = {
            "glu_pruned": 0,
            "mlp_pruned": 0,
            "channels_before": 0,
            "channels_after": 0,
            "params_removed": 0,
        }
        table: list[dict[str, object]] = []
        for mlp in mlps:
            scores = score([(_array(p.weight), p.axis) for p in mlp.sources])
            keep = pruning.channels_to_keep(scores, ratio, multiple=self.options.multiple)
            stats["channels_before"] += mlp.hidden
            stats["channels_after"] += keep.size
            if keep.size == mlp.hidden:
                notes.append(
                    f"{mlp.kind} at {mlp.down.node.name!r}: ratio keeps all {mlp.hidden} channels"
                )
                continue
            removed = _shrink(model, mlp, keep)
            stats["params_removed"] += removed
            table.append(
                {
                    "down": mlp.down.node.name,
                    "kind": mlp.kind,
                    "hidden": mlp.hidden,
                    "kept": int(keep.size),
                    "params_removed": removed,
                }
            )
            stats[f"{mlp.kind}_pruned"] += 1
            notes.append(
                f"{mlp.kind} at {mlp.down.node.name!r}: hidden {mlp.hidden} -> {keep.size}"
            )
        modified = stats["glu_pruned"] + stats["mlp_pruned"] > 0
        return RewriteResult(model, modified, stats=stats, notes=notes, tables={"mlps": table})


def _array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return value.const_value.numpy()


def _initializer(model: ir.Model, value: ir.Value | None) -> bool:
    return value is not None and model.graph.initializers.get(value.name or "") is value


def _projection(model: ir.Model, node: ir.Node | None, *, into: bool) -> Projection | None:
    """``node`` as a projection: its weight and the hidden axis (output if ``into``, else input)."""
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if (
        not _initializer(model, weight)
        or weight is None
        or weight.shape is None
        or len(weight.shape) != 2
    ):
        return None
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
        return None
    out_axis, in_axis = (0, 1) if transposed else (1, 0)
    return Projection(node, weight, out_axis if into else in_axis)


def find_mlps(model: ir.Model) -> tuple[list[Mlp], list[str]]:
    """Every GLU or plain MLP of the main graph (see the module docstring), and why candidates failed.

    >>> [mlp.kind for mlp in find_mlps(model)[0]]  # doctest: +SKIP
    ['glu', 'glu']
    """
    mlps, notes = [], []
    for node in model.graph:
        down = _projection(model, node, into=False)
        if down is None or node.inputs[0] is None:
            continue
        found = _match(model, down)
        if isinstance(found, Mlp):
            mlps.append(found)
        elif found:
            notes.append(f"{node.op_type} {node.name!r}: not an MLP down projection ({found})")
    return mlps, notes


def _dim(value: ir.Value, axis: int) -> int:
    """A static dimension of a (2-D initializer) value."""
    assert value.const_value is not None
    return int(value.const_value.shape.numpy()[axis])


def _match(model: ir.Model, down: Projection) -> Mlp | str:
    """The MLP whose down projection is ``down``, or why there is none ("" when nothing resembles one)."""
    hidden = _dim(down.weight, down.axis)
    h = down.node.inputs[0]
    assert h is not None
    region: list[ir.Node] = []
    constants: list[ir.Value] = []
    sources: list[Projection] = []
    stack, seen = [h], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        source = _projection(model, producer, into=True)
        if source is not None and _dim(source.weight, source.axis) == hidden:
            sources.append(source)
            continue
        if (
            producer is None
            or producer.op_type not in ELEMENTWISE
            or producer.domain not in ("", "ai.onnx")
        ):
            return (
                ""
                if not region
                else f"{value.name!r} comes from {producer.op_type if producer else 'a graph input'}"
            )
        region.append(producer)
        for operand in producer.inputs:
            if operand is None:
                continue
            constant = ir.convenience.get_const_tensor(operand)
            if constant is None:
                stack.append(operand)
                continue
            size = int(np.prod(constant.shape.numpy())) if constant.shape is not None else 0
            if size == 1:
                continue
            if constant.shape[-1] != hidden or size != hidden or not _initializer(model, operand):
                return f"constant {operand.name!r} of shape {list(constant.shape)} is not per hidden channel"
            constants.append(operand)
    if not sources or len(sources) > 2 or not region:
        return "" if not region else f"{len(sources)} projections feed it"
    if len(sources) == 2 and sources[0].node.inputs[0] is not sources[1].node.inputs[0]:
        return "its two projections take different inputs"
    inside = set(map(id, region)) | {id(down.node)}
    for value in [s.node.outputs[0] for s in sources] + [n.outputs[0] for n in region]:
        if value in model.graph.outputs or any(
            id(user) not in inside for user in value.consumers()
        ):
            return f"{value.name!r} is also used outside the MLP"
    for shared in [s.weight for s in sources] + [down.weight]:
        if len(shared.uses()) != 1:
            return f"weight {shared.name!r} is shared with other nodes"
    # Sliced below: a weight or bias the user may override at run time (a graph input,
    # valid since IR 4) or that the graph returns must keep its values and shape.
    biases = [s.node.inputs[2] for s in sources if s.node.op_type == "Gemm" and len(s.node.inputs) > 2]
    sliced = [s.weight for s in sources] + [down.weight] + constants + [b for b in biases if b is not None]
    for value in sliced:
        for where, signature in (("input", model.graph.inputs), ("output", model.graph.outputs)):
            if value in signature:
                return f"{value.name!r} is also a graph {where}"
    if len({id(s.weight) for s in sources} | {id(down.weight)}) != len(sources) + 1:
        return "a weight is used twice inside the MLP"
    unique = list({id(c): c for c in constants}.values())
    return Mlp(tuple(sources), down, tuple(region), tuple(unique), hidden)


def _shrink(model: ir.Model, mlp: Mlp, keep: np.ndarray) -> int:
    """Slice weights, biases and shapes of ``mlp`` to the channels ``keep``; return params removed."""
    removed = 0
    targets = [(p.weight, p.axis) for p in mlp.sources] + [(mlp.down.weight, mlp.down.axis)]
    targets += [(_private(model, mlp, constant), -1) for constant in mlp.constants]
    for value, axis in targets:
        array = _array(value)
        sliced = np.take(array, keep, axis=axis)
        removed += array.size - sliced.size
        value.const_value = ir.Tensor(np.ascontiguousarray(sliced), name=value.name)
        value.shape = ir.Shape(sliced.shape)
    for source in mlp.sources:
        if (
            source.node.op_type == "Gemm"
            and len(source.node.inputs) > 2
            and source.node.inputs[2] is not None
        ):
            bias = source.node.inputs[2]
            array = _array(bias)
            if array.size == mlp.hidden:
                sliced = np.take(array.reshape(-1), keep).reshape(array.shape[:-1] + (keep.size,))
                removed += array.size - sliced.size
                bias.const_value = ir.Tensor(sliced, name=bias.name)
                bias.shape = ir.Shape(sliced.shape)
    for value in [s.node.outputs[0] for s in mlp.sources] + [n.outputs[0] for n in mlp.region]:
        shape = value.shape
        if shape is not None and len(shape) and shape[-1] == mlp.hidden:
            value.shape = ir.Shape([*list(shape)[:-1], keep.size])
    return removed


def _private(model: ir.Model, mlp: Mlp, constant: ir.Value) -> ir.Value:
    """``constant`` itself if only ``mlp`` uses it, else a copy that ``mlp``'s nodes now use.

    Exporters share equal initializers (the TorchScript exporter gives all the zero
    biases of a freshly initialized model one tensor), so slicing one in place would
    change other layers.
    """
    region = set(map(id, mlp.region))
    if all(id(use.node) in region for use in constant.uses()):
        return constant
    name = constant.name or "constant"
    index = 0
    while f"{name}_width{index}" in model.graph.initializers:
        index += 1
    copy = ir.Value(
        name=f"{name}_width{index}",
        shape=constant.shape,
        type=constant.type,
        const_value=ir.Tensor(_array(constant), name=f"{name}_width{index}"),
    )
    model.graph.register_initializer(copy)
    for use in list(constant.uses()):
        if id(use.node) in region:
            use.node.replace_input_with(use.idx, copy)
    return copy
