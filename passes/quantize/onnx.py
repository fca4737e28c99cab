"""W -> DequantizeLinear(W_int, scale) for MatMul/Gemm/Conv weights, with per-layer widths.

Layer-wise mixed-precision quantization after Dumitru et al., "Layer-Wise Quantization:
A Pragmatic and Effective Method for Quantizing LLMs Beyond Integer Bit-Levels" (2024,
arXiv 2406.17415). Approximate: each weight moves to its nearest quantization level
(with ``clip=mse`` the few beyond the clipped range saturate).

Each float weight initializer of a MatMul, Gemm or Conv is replaced by an int8 or int4
(packed) initializer and a float32 scale, followed by ``DequantizeLinear``: symmetric,
per output channel (``axis``), or for int4 per group of ``group_size`` (default 128)
weights along the reduction axis (``block_size``, DequantizeLinear-21). The file shrinks
by the bits: 4 bytes per weight become 1 (int8) or 1/2 (int4), plus the scales.

Widths: ``bits`` for all layers, or ``avg_bits`` (fractional) with ``high``/``low``:
the layers are ranked by importance (``lim``, ``zd`` or ``random``, see
:mod:`rewriter.passes.quantize.math`) and the least important move to ``low`` until the
storage bits per weight, scales included, are at most ``avg_bits``. A layer is a residual-stream block
(:func:`rewriter.analysis.residual_blocks`: for a BERT encoder, each attention and each
MLP sub-layer with its weight ops); a weight op outside every block is its own layer.
LIM runs the model in ONNX Runtime on the calibration data with the layers' input and
output values as extra outputs. ``activations=int8`` also inserts
QuantizeLinear/DequantizeLinear (asymmetric int8, min-max or percentile range from the
calibration data) on the activation inputs of the quantized ops.

Requires: float32 weights (others are skipped with a note). Ensures: opset >= 13 (per
axis DequantizeLinear) and >= 21 with int4 or per-group scales; a lower opset is
upgraded with ``onnx.version_converter`` (said in the notes); IR version >= 10 with int4.
Running again changes nothing: quantized weights are no longer float initializers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx import version_converter

from rewriter import distributed, io, plot
from rewriter.analysis import WeightOp, residual_blocks, weight_ops
from rewriter.errors import InputError
from rewriter.pass_base import RewritePass, RewriteResult
from rewriter.passes.quantize import importance
from rewriter.passes.quantize import math as qm
from rewriter.passes.quantize.views import FloatWeight, fold_views
from rewriter.registry import register

logger = logging.getLogger(__name__)

PER_AXIS_OPSET = 13  # DequantizeLinear's axis attribute
INT4_OPSET = 21  # int4 and block_size
INT4_IR_VERSION = 10
CALIBRATIONS = ("minmax", "percentile")
COLORS = {8: (70, 130, 180), 4: (230, 120, 40)}


@dataclasses.dataclass
class QuantizeOptions:
    """Options of ``quantize``.

    bits: one width for every layer (4 or 8; 8 when neither it nor avg_bits is given).
    avg_bits: target storage bits per weight, scales included (a size: 5 is the size of
        uniform int4 with a scale per 32 weights); layers get ``high`` or ``low``.
    importance: how layers are ranked for avg_bits: lim, zd or random (with ``seed``).
    group_size: int4 weights get a scale per this many weights along the reduction axis
        (128, as ONNX Runtime's MatMulNBits and GPTQ/AWQ use); 0: per output channel.
        Weights whose reduction size it does not divide, and Conv weights, get per-channel
        scales.
    activations: "none" or "int8" (QDQ on the activation inputs of quantized ops).
    calibrate: activation range, "minmax" or "percentile" (``percentile`` of each tail).
    clip: weight range, "mse" (per channel or group, the clipped range with the least
        squared error) or "none" (max|w|: every weight within half a step).
    exclude: node or weight name globs left in float, separated by ``|`` on the CLI.
    plot: write a PNG bar chart of the layers' importance (colored by width) here.
    """

    bits: int | None = None
    avg_bits: float | None = None
    high: int = 8
    low: int = 4
    importance: str = "lim"
    group_size: int = 128
    activations: str = "none"
    calibrate: str = "minmax"
    percentile: float = 99.99
    clip: str = "mse"
    exclude: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    plot: str = ""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A weight's output-channel axis and reduction axis (None: no per-group scales)."""

    axis: int
    group_axis: int | None


@dataclasses.dataclass
class Layer:
    """One row of the report: a weight op, its layer (unit), importance and width."""

    op: WeightOp
    layout: Layout
    unit: str
    importance: float = float("nan")
    bits: int = 8
    group: int = 0


@register
class QuantizePass(RewritePass):
    """Quantize weights (int8/int4, per channel or group) with layer-wise widths."""

    name = "quantize"
    exact = False
    description = "weights -> int8/int4 + DequantizeLinear, widths by layer importance (Dumitru et al. 2024)"
    Options = QuantizeOptions

    def __init__(self, options: QuantizeOptions | None = None) -> None:
        super().__init__(options)
        validate(self.options)

    def call(self, model: ir.Model) -> RewriteResult:
        options: QuantizeOptions = self.options
        notes: list[str] = []
        folded = fold_views(model, options.exclude)
        layers, excluded, left = self._layers(model)
        left = folded.left + left
        stats = {"weights_quantized": 0, "excluded": excluded + folded.excluded, "skipped": len(left)}
        notes.extend(weight.note() for weight in left)
        tables: dict[str, list[dict[str, object]]] = {}
        if left:
            tables["float_weights"] = [weight.to_json() for weight in left]
        if not layers:
            notes.append("no float MatMul/Gemm/Conv weight initializer to quantize")
            return RewriteResult(model, False, stats=stats, notes=notes, tables=tables)
        if folded.views:
            stats["views_folded"] = folded.views
            notes.append(
                f"{folded.views} weight(s) read through Identity/Transpose/Reshape of an initializer "
                "got initializers of their own values, quantized like the others"
            )
        size_before = initializer_bytes(model)
        measured = self._measure(model, layers, notes)
        self._assign_bits(layers, notes)
        notes.extend(_upgrade(model, layers))
        renamed = {value.name: value for value in _all_values(model)}
        consumers = {}
        for name, layer_group in _by_weight(layers).items():
            consumers[name] = _quantize_weight(model, renamed[name], layer_group, options.clip)
        if options.activations == "int8":
            stats["activations_quantized"] = _quantize_activations(model, consumers, measured, notes)
        params = [layer.op.params for layer in layers]
        widths = [layer.bits for layer in layers]
        stats.update(
            weights_quantized=len(_by_weight(layers)),
            int8_weights=sum(bits == 8 for bits in widths),
            int4_weights=sum(bits == 4 for bits in widths),
            grouped_weights=sum(bool(layer.group) for layer in layers),
            params_quantized=sum(params),
            avg_bits_x100=round(100 * storage_bits(layers)),
            weight_bits_x100=round(100 * qm.average_bits(params, widths)),
            size_before_bytes=size_before,
            size_after_bytes=initializer_bytes(model),
            opset=model.opset_imports.get("", 1),
        )
        notes.append(
            "ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits, which by default also "
            "quantizes activations to int8 (session config session.qdq_matmulnbits_accuracy_level=4); "
            "set it to 0 to compute with the dequantized weights as they are"
        )
        rows = layer_rows(layers)
        notes.extend(qm.format_table(rows))
        if options.plot:
            values = [layer.importance if options.avg_bits is not None else layer.op.params for layer in layers]
            values = [0.0 if np.isnan(value) else value for value in values]
            try:
                plot.bar_chart(
                    options.plot,
                    values,
                    [COLORS.get(layer.bits, (0, 0, 0)) for layer in layers],
                    labels=[layer.op.name for layer in layers],
                    ylabel="importance" if options.avg_bits is not None else "parameters",
                    title="quantize: blue int8, orange int4",
                )
            except OSError as exc:
                raise InputError(f"quantize: cannot write the plot {options.plot}: {exc}") from exc
            notes.append(f"plot written to {options.plot} (bars: importance per layer, blue int8, orange int4)")
        tables["layers"] = [row.to_json() for row in rows]
        return RewriteResult(model, True, stats=stats, notes=notes, tables=tables)

    def _layers(self, model: ir.Model) -> tuple[list[Layer], int, list[FloatWeight]]:
        """The weight ops to quantize, each with its layer (unit) name; the count excluded;
        the weights left in float with their reasons."""
        # A weight the user may override at run time (a graph input), or one the graph
        # returns (a graph output, which must stay the float tensor: a quantized copy
        # beside it would grow the file), stays in float.
        signature = {value.name: "input" for value in model.graph.inputs}
        signature.update({value.name: "output" for value in model.graph.outputs})
        layers: list[Layer] = []
        left: list[FloatWeight] = []
        excluded = 0
        for op in weight_ops(model):
            if any(fnmatch.fnmatchcase(name, glob) for glob in self.options.exclude for name in (op.name, op.weight.name or "")):
                excluded += 1
                continue
            where = signature.get(op.weight.name or "")
            layout = _layout(op) if where is None else f"its weight is also a graph {where}"
            if isinstance(layout, str):
                left.append(FloatWeight(op.node.name or "", op.node.op_type, op.weight.name or "", layout))
                continue
            layers.append(Layer(op, layout, unit=op.name))
        if layers and self.options.avg_bits is not None:
            chosen = {id(layer.op.node): layer for layer in layers}
            for block in residual_blocks(model):
                for op in block.ops:
                    if id(op.node) in chosen:
                        chosen[id(op.node)].unit = f"block{block.index}"
        return layers, excluded, left

    def _measure(self, model: ir.Model, layers: list[Layer], notes: list[str]) -> dict[str, tuple[float, float]]:
        """Importance of each unit (with avg_bits) and activation ranges (with activations)."""
        options: QuantizeOptions = self.options
        ranking = options.avg_bits is not None
        lim = ranking and options.importance == "lim"
        activations = options.activations == "int8"
        ends = _unit_ends(model, layers) if lim else {}
        batches: list[dict[str, np.ndarray]] = []
        values: dict[str, list[np.ndarray]] = {}
        if lim or activations:
            batches = self.context.calibration_inputs(model)
            if not self.context.calibration:
                notes.append(
                    "no calibration data given: measured on one generated batch (give real inputs "
                    "with --calibration for meaningful LIM scores and activation ranges)"
                )
            wanted = {value.name for pair in ends.values() for value in pair}
            if activations:
                wanted |= {layer.op.node.inputs[0].name for layer in layers if layer.op.node.inputs[0] is not None}
        pool = self.context.pool()
        named_ends = {unit: (entry.name or "", exit_.name or "") for unit, (entry, exit_) in ends.items()}
        per_batch: list[dict[str, float | None]] = []
        if lim and not activations and pool is not None and len(batches) > 1:
            # Each batch's scores on a Ray worker (the activation ranges need the values here).
            proto = importance.fetch_proto(model, sorted({name for pair in named_ends.values() for name in pair if name}))
            setup = (proto.SerializeToString(), named_ends, importance.data_dir(model))
            per_batch = distributed.map_tasks(pool, importance.LimWorker, setup, batches)
            notes.append(f"LIM measured on {len(batches)} calibration batches over Ray workers")
        elif lim or activations:
            values = importance.fetch(model, sorted(name for name in wanted if name), batches)
            if lim:
                per_batch = [importance.lim_scores(values, named_ends, batches, index=i) for i in range(len(batches))]
        score: dict[str, float] = {}
        if lim:
            for unit in ends:
                scores = [value for batch_scores in per_batch if (value := batch_scores[unit]) is not None]
                score[unit] = float(np.mean(scores)) if scores else float("nan")
                if not scores:
                    notes.append(f"{unit}: LIM not measurable (input and output shapes differ): kept at {options.high} bits")
            notes.append(
                f"importance lim = -cos(layer input, layer output) over tokens of {len(batches)} calibration "
                "batch(es); higher = more important"
            )
        elif ranking and options.importance == "zd":
            units: dict[str, list[np.ndarray]] = {}
            for layer in layers:
                units.setdefault(layer.unit, []).append(_weight_array(layer.op))
            score = {unit: qm.zd_importance(weights) for unit, weights in units.items()}
            notes.append(
                "importance zd = -(share of weights with |z| > 1); the paper's 'smaller is better': "
                "a smaller share (heavier tails) = more important"
            )
        elif ranking:
            rng = np.random.default_rng(options.seed)
            score = {unit: float(rng.random()) for unit in dict.fromkeys(layer.unit for layer in layers)}
            notes.append(f"importance random (seed {options.seed})")
        for layer in layers:
            layer.importance = score.get(layer.unit, float("nan"))
        if not activations:
            return {}
        return {name: _range(arrays, options) for name, arrays in values.items()}

    def _assign_bits(self, layers: list[Layer], notes: list[str]) -> None:
        options: QuantizeOptions = self.options
        low_groups = {id(layer): _group(layer, options.group_size) for layer in layers}
        ungrouped = [layer.op.name for layer in layers if options.group_size and not low_groups[id(layer)]]
        if options.avg_bits is None:
            bits = {layer.unit: options.bits or 8 for layer in layers}
        else:
            units: dict[str, list[Layer]] = {}
            for layer in layers:
                units.setdefault(layer.unit, []).append(layer)
            ranked = [
                qm.Unit(
                    unit,
                    sum(layer.op.params for layer in members),
                    members[0].importance,
                    _unit_bits(members, options.high, {}),
                    _unit_bits(members, options.low, low_groups),
                )
                for unit, members in units.items()
            ]
            bits = qm.allocate(ranked, avg_bits=options.avg_bits, high=options.high, low=options.low)
            moved = [unit for unit in units if bits[unit] == options.low]
            notes.append(f"avg_bits {options.avg_bits}: {len(moved)} of {len(units)} layers at {options.low} bits: {', '.join(moved)}")
        for layer in layers:
            layer.bits = bits[layer.unit]
            layer.group = low_groups[id(layer)] if layer.bits == 4 else 0
        if ungrouped and any(layer.bits == 4 for layer in layers):
            notes.append(
                f"per-channel scales for {len(ungrouped)} weight(s) whose reduction size is not a multiple of "
                f"{options.group_size} (or Conv): {', '.join(ungrouped[:5])}{' ...' if len(ungrouped) > 5 else ''}"
            )
        reached = storage_bits(layers)
        if options.avg_bits is not None and reached > options.avg_bits:
            notes.append(
                f"avg_bits {options.avg_bits} not reached ({reached:.2f} bits per weight): the layers without an "
                f"importance score stay at {options.high} bits"
            )


def _group(layer: Layer, group_size: int) -> int:
    """The group size ``layer`` gets at 4 bits: ``group_size`` if it divides the reduction axis, else 0."""
    shape = layer.op.weight.shape
    assert shape is not None  # weight_ops: initializers, whose shapes are known
    axis = layer.layout.group_axis
    size = shape[axis] if axis is not None else None
    return group_size if group_size and isinstance(size, int) and size % group_size == 0 else 0


def _per_scale(layer: Layer, group: int) -> int:
    """Weights that share one scale: the group, or one output channel."""
    shape = layer.op.weight.shape
    assert shape is not None
    channels = shape[layer.layout.axis]
    assert isinstance(channels, int)  # initializers have static shapes
    return group or max(1, layer.op.params // channels)


def _unit_bits(members: list[Layer], bits: int, groups: Mapping[int, int]) -> float:
    """Storage bits per weight of a unit's layers at ``bits`` (with the ``groups`` each gets)."""
    stored = [qm.storage_bits(bits, _per_scale(layer, groups.get(id(layer), 0))) for layer in members]
    return qm.average_bits([layer.op.params for layer in members], stored)


def storage_bits(layers: Sequence[Layer]) -> float:
    """Storage bits per weight of the quantized ``layers`` (integers and float32 scales)."""
    stored = [qm.storage_bits(layer.bits, _per_scale(layer, layer.group)) for layer in layers]
    return qm.average_bits([layer.op.params for layer in layers], stored)


def validate(options: QuantizeOptions) -> None:
    """Raise :class:`InputError` for options that contradict each other or are out of range."""
    widths = [options.high, options.low] if options.avg_bits is not None else [options.bits or 8]
    if any(width not in qm.SUPPORTED_BITS for width in widths):
        raise InputError(f"quantize: bit widths must be one of {qm.SUPPORTED_BITS}, got {widths}")
    if options.avg_bits is not None:
        if options.bits is not None:
            raise InputError("quantize: give bits (uniform) or avg_bits (mixed), not both")
        if options.high <= options.low:
            raise InputError(f"quantize: high ({options.high}) must exceed low ({options.low})")
        if not options.low <= options.avg_bits <= options.high:
            raise InputError(f"quantize: avg_bits {options.avg_bits} is outside [{options.low}, {options.high}]")
    if options.importance not in qm.IMPORTANCE:
        raise InputError(f"quantize: importance must be one of {qm.IMPORTANCE}, got {options.importance!r}")
    if options.activations not in ("none", "int8"):
        raise InputError(f"quantize: activations must be none or int8, got {options.activations!r}")
    if options.calibrate not in CALIBRATIONS:
        raise InputError(f"quantize: calibrate must be one of {CALIBRATIONS}, got {options.calibrate!r}")
    if options.clip not in qm.CLIPS:
        raise InputError(f"quantize: clip must be one of {qm.CLIPS}, got {options.clip!r}")
    if options.group_size < 0 or not 50.0 < options.percentile <= 100.0:
        raise InputError("quantize: group_size must be >= 0 and percentile in (50, 100]")


def _layout(op: WeightOp) -> Layout | str:
    """How ``op`` reads its weight, or why it is not quantized."""
    if op.weight.dtype != ir.DataType.FLOAT:
        return f"weight type {op.weight.dtype} (only float32 weights are quantized)"
    rank = len(op.weight.shape or ())
    if op.node.op_type == "Conv":
        return Layout(axis=0, group_axis=None)
    if rank != 2:
        return f"weight of rank {rank} (only 2-D MatMul/Gemm weights)"
    if op.node.op_type == "Gemm" and op.node.attributes.get_int("transB", False):
        return Layout(axis=0, group_axis=1)
    return Layout(axis=1, group_axis=0)


def _weight_array(op: WeightOp) -> np.ndarray:
    assert op.weight.const_value is not None
    return op.weight.const_value.numpy()


def _unit_ends(model: ir.Model, layers: list[Layer]) -> dict[str, tuple[ir.Value, ir.Value]]:
    """Each unit's input and output value: a block's stream values, or an op's own."""
    blocks = {f"block{block.index}": (block.entry, block.exit) for block in residual_blocks(model)}
    ends = {}
    for layer in layers:
        if layer.unit in blocks:
            ends[layer.unit] = blocks[layer.unit]
        elif layer.op.node.inputs[0] is not None:
            ends[layer.unit] = (layer.op.node.inputs[0], layer.op.node.outputs[0])
    return ends


def _range(arrays: list[np.ndarray], options: QuantizeOptions) -> tuple[float, float]:
    """The calibrated (low, high) of an activation, widened to include 0."""
    return qm.activation_range(arrays, options.calibrate, options.percentile)


def _upgrade(model: ir.Model, layers: list[Layer]) -> list[str]:
    """Raise the opset (and IR version) to what the chosen widths need, in place."""
    int4 = any(layer.bits == 4 or layer.group for layer in layers)
    needed = INT4_OPSET if int4 else PER_AXIS_OPSET
    notes = []
    opset = model.opset_imports.get("", 1)
    if opset < needed:
        why = "int4 and per-group scales need" if int4 else "per-channel DequantizeLinear needs"
        try:
            converted = version_converter.convert_version(ir.serde.serialize_model(model), needed)
        except Exception as exc:  # the converter raises several types
            raise InputError(f"quantize: {why} opset {needed}; converting from {opset} failed: {exc}") from exc
        upgraded = ir.serde.deserialize_model(converted)
        folder = io.external_data_dir(model)
        if folder is not None:
            # The converted proto's external tensors are references relative to the model's folder.
            ir.external_data.set_base_dir(upgraded.graph, str(folder))
        model.graph = upgraded.graph
        notes.append(f"opset upgraded from {opset} to {needed} with onnx.version_converter ({why} {needed})")
    if int4:
        model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)
    return notes


def _all_values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    values += [output for node in model.graph for output in node.outputs]
    return values


def _by_weight(layers: list[Layer]) -> dict[str, list[Layer]]:
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.op.weight.name or "", []).append(layer)
    return groups


def _quantize_weight(model: ir.Model, weight: ir.Value, layers: list[Layer], clip: str) -> list[ir.Node]:
    """Replace the float initializer ``weight`` by int + scale + DequantizeLinear.

    Returns the weight ops that read it (nodes of the current graph, which an opset
    upgrade may have rebuilt).
    """
    widest = max(layers, key=lambda layer: layer.bits)
    for layer in layers:  # a weight shared by ops gets the widest width they were given
        layer.bits, layer.group = widest.bits, widest.group
    layout, bits, group = widest.layout, widest.bits, widest.group
    assert weight.const_value is not None
    q, scale = qm.quantize_weight(
        weight.const_value.numpy(),
        bits=bits,
        axis=layout.axis,
        group_size=group,
        group_axis=layout.group_axis,
        clip=clip,
    )
    name = weight.name or "weight"
    q_value = _initializer(model, f"{name}_quantized", q.astype(ml_dtypes.int4) if bits == 4 else q)
    s_value = _initializer(model, f"{name}_scale", scale)
    attributes = {"axis": layout.group_axis, "block_size": group} if group else {"axis": layout.axis}
    node = ir.node("DequantizeLinear", [q_value, s_value], attributes, name=f"{name}_DequantizeLinear")
    output = node.outputs[0]
    output.name, output.dtype, output.shape = f"{name}_dequantized", ir.DataType.FLOAT, weight.shape
    readers = [user for user, index in weight.uses() if index == 1 and user.op_type in ("MatMul", "Gemm", "Conv")]
    ir.convenience.replace_all_uses_with(weight, output)
    model.graph.insert_before(next(iter(model.graph)), node)
    model.graph.initializers.pop(name)
    return readers


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    model.graph.register_initializer(value)
    return value


def _quantize_activations(
    model: ir.Model,
    consumers: dict[str, list[ir.Node]],
    ranges: dict[str, tuple[float, float]],
    notes: list[str],
) -> int:
    """Insert asymmetric int8 QuantizeLinear/DequantizeLinear on the quantized ops' inputs."""
    done: dict[str, ir.Value] = {}
    for node in (node for readers in consumers.values() for node in readers):
        x = node.inputs[0]
        if x is None or x.name not in ranges or x.dtype not in (ir.DataType.FLOAT, None):
            notes.append(f"{node.name!r}: activation left in float (no float calibration range)")
            continue
        if x.name not in done:
            scale, zero = qm.activation_qparams(*ranges[x.name])
            s_value = _initializer(model, f"{x.name}_act_scale", np.array(scale, dtype=np.float32))
            z_value = _initializer(model, f"{x.name}_act_zero_point", np.array(zero, dtype=np.int8))
            quant = ir.node("QuantizeLinear", [x, s_value, z_value], name=f"{x.name}_QuantizeLinear")
            dequant = ir.node("DequantizeLinear", [quant.outputs[0], s_value, z_value], name=f"{x.name}_DequantizeLinear")
            quant.outputs[0].name = f"{x.name}_quantized"
            quant.outputs[0].dtype = ir.DataType.INT8
            out = dequant.outputs[0]
            out.name, out.dtype, out.shape = f"{x.name}_dequantized", ir.DataType.FLOAT, x.shape
            producer = x.producer()
            if producer is not None and producer.graph is model.graph:
                model.graph.insert_after(producer, [quant, dequant])
            else:
                model.graph.insert_before(next(iter(model.graph)), [quant, dequant])
            done[x.name] = out
        node.replace_input_with(0, done[x.name])
    return len(done)


def initializer_bytes(model: ir.Model) -> int:
    """The bytes of the model's initializers (int4 counted packed)."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def layer_rows(layers: list[Layer]) -> list[qm.Row]:
    """The per-layer report rows: layer, block, params, importance, bits, bits per weight."""
    return [
        qm.Row(
            layer.op.name,
            layer.unit,
            layer.op.params,
            layer.importance,
            layer.bits,
            layer.group,
            qm.storage_bits(layer.bits, _per_scale(layer, layer.group)),
        )
        for layer in layers
    ]
