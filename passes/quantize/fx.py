"""nn.Linear / nn.Conv weight -> rewriter::dequantize_weight(int weight, scale), with per-layer widths.

The fx front of :mod:`rewriter.passes.quantize.onnx` (Dumitru et al., "Layer-Wise
Quantization", 2024, arXiv 2406.17415); approximate. The same options, the same math
(:mod:`rewriter.passes.quantize.math`: symmetric per-channel or per-group int8/int4, ZD, LIM,
allocation) on the ``call_module`` nodes of ``nn.Linear`` and ``nn.Conv1d/2d/3d``:
each such module is replaced by a :class:`QuantizedWeight` module that stores the
integer weight (an int8 tensor: ``weight_int8``, or ``weight_int4`` holding values in
[-8, 7]) and its float scales, and computes ``linear``/``conv`` with
``torch.ops.rewriter.dequantize_weight(q, scale, axis, group_size)`` (``q * scale``).

A layer (the unit the allocation moves) is the group of modules under one numbered
path component (``encoder.layer.3.*``: a transformer layer, as in the paper); a
module outside any numbered container is its own layer. LIM compares the input of a
layer's first module with the output of its last module (for a BERT layer: the
hidden state entering it and the LayerNorm output leaving it), measured by running the
graph on ``calibration`` inputs.

:func:`export_onnx` exports the result with ``torch.onnx.export(dynamo=True)``: each
``dequantize_weight`` becomes ``DequantizeLinear`` on an integer initializer, and the
``weight_int4`` initializers are packed into INT4 (opset 21), the ONNX pass's form.

``activations=int8`` (needs ``calibration``) measures the input of every quantized module
on the calibration batches (the float model; ``calibrate`` min-max or percentile, the
ONNX pass's math in :mod:`rewriter.passes.quantize.math`) and inserts, once per distinct input,
``torch.ops.rewriter.quantize_linear`` -> ``dequantize_linear`` (asymmetric int8, scalar
scale and zero point stored as buffers ``<input>_act_scale`` / ``<input>_act_zero_point``
of the graph module). They run in torch as ONNX's QuantizeLinear (divide, round half to
even, saturate) and DequantizeLinear, and :func:`export_onnx` writes them as those ops:
the QDQ form of the ONNX pass.

The pass is not in the fx registry by name yet (``rewriter.fx.register_fx_pass``
checks it mirrors the ONNX pass's options); give an instance to ``rewrite``.

>>> gm, report = rewrite(model, [QuantizeFxPass(QuantizeOptions(bits=8))], (x,))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import fx, nn

from rewriter import io
from rewriter.errors import InputError
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.passes.quantize import math as qm
from rewriter.passes.quantize.onnx import INT4_IR_VERSION, INT4_OPSET, QuantizeOptions, validate

WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
EXPORT_OPSET = 18  # the dynamo exporter's own opset; int4 needs INT4_OPSET
_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


@torch.library.custom_op("rewriter::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """``q * scale``, the scales broadcast along ``axis`` (per channel) or repeated
    ``group_size`` times along ``axis`` (per group), as DequantizeLinear does."""
    if group_size:
        full = scale.repeat_interleave(group_size, dim=axis)
    else:
        shape = [1] * q.dim()
        shape[axis] = -1
        full = scale.reshape(shape)
    return q.to(scale.dtype) * full


@dequantize_weight.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=scale.dtype)


@torch.library.custom_op("rewriter::quantize_linear", mutates_args=())
def quantize_linear(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """ONNX QuantizeLinear, per tensor: ``saturate(round(x / scale) + zero_point)`` (round half
    to even) in the zero point's integer type."""
    info = torch.iinfo(zero_point.dtype)
    q = torch.round(x / scale) + zero_point.to(x.dtype)
    return q.clamp(info.min, info.max).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=zero_point.dtype)


@torch.library.custom_op("rewriter::dequantize_linear", mutates_args=())
def dequantize_linear(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """ONNX DequantizeLinear, per tensor: ``(q - zero_point) * scale`` (the difference exact)."""
    return (q.to(torch.int32) - zero_point.to(torch.int32)).to(scale.dtype) * scale


@dequantize_linear.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=scale.dtype)


class QuantizedWeight(nn.Module):
    """A Linear or Conv whose weight is stored as integers and scales.

    ``inner`` is the original module without its weight (it keeps the bias and the
    convolution's settings).
    """

    def __init__(self, inner: nn.Module, q: np.ndarray, scale: np.ndarray, *, bits: int, axis: int, group_size: int) -> None:
        super().__init__()
        # A shallow copy without the weight: the original module (shared with the
        # caller's model) keeps its own.
        inner = copy.copy(inner)
        inner._parameters = {key: value for key, value in inner._parameters.items() if key != "weight"}
        self.inner = inner
        self.bits, self.axis, self.group_size = bits, axis, group_size
        self.register_buffer(f"weight_int{bits}", torch.from_numpy(q.astype(np.int8)))
        self.register_buffer("weight_scale", torch.from_numpy(scale.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = getattr(self, f"weight_int{self.bits}")
        weight = torch.ops.rewriter.dequantize_weight(q, self.weight_scale, self.axis, self.group_size)
        if isinstance(self.inner, nn.Linear):
            # Stored as [in, out], as the ONNX exporters lay out MatMul weights.
            y = torch.matmul(x, weight)
            return y if self.inner.bias is None else y + self.inner.bias
        return self.inner._conv_forward(x, weight, self.inner.bias)  # type: ignore[operator]


class QuantizeFxPass(FxPass):
    """Quantize the weights of nn.Linear / nn.Conv modules with layer-wise widths.

    ``calibration`` is a list of argument tuples of the module (needed for
    ``importance=lim``).
    """

    name = "quantize"
    exact = False
    Options = QuantizeOptions

    def __init__(self, options: QuantizeOptions | None = None, calibration: Sequence[tuple[Any, ...]] = ()) -> None:
        super().__init__(options)
        validate(self.options)
        self.calibration = list(calibration)
        if self.options.activations == "int8" and not self.calibration:
            raise InputError(
                "quantize (fx): activations=int8 needs calibration inputs: "
                "QuantizeFxPass(options, calibration=[args, ...])"
            )

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        options: QuantizeOptions = self.options
        notes: list[str] = []
        nodes, excluded = [], 0
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if not isinstance(module, WEIGHT_MODULES):
                continue
            if any(fnmatch.fnmatchcase(node.target, glob) for glob in options.exclude):
                excluded += 1
            elif module.weight.dtype != torch.float32:
                notes.append(f"{node.target}: weight type {module.weight.dtype} left as is (only float32)")
            else:
                nodes.append(node)
        stats = {"weights_quantized": 0, "excluded": excluded, "skipped": len(notes)}
        if not nodes:
            notes.append("no float nn.Linear/nn.Conv module to quantize (graphs from torch.export are not supported)")
            return FxPassResult(gm, False, stats, notes)
        size_before = _module_bytes(gm)
        # Activation ranges are measured on the float model, as the ONNX pass does.
        ranges = self._activation_ranges(gm, nodes) if options.activations == "int8" else {}
        units = {str(node.target): _unit(str(node.target)) for node in nodes}
        params = {node.target: _weight(gm, node).numel() for node in nodes}
        importance = self._importance(gm, nodes, units, notes) if options.avg_bits is not None else {}
        groups = {str(node.target): _group(gm.get_submodule(node.target), options.group_size) for node in nodes}
        per_channel = {str(node.target): _per_channel(gm, str(node.target)) for node in nodes}
        if options.avg_bits is None:
            unit_bits = {unit: options.bits or 8 for unit in units.values()}
        else:
            members: dict[str, list[str]] = {}
            for target, unit in units.items():
                members.setdefault(unit, []).append(target)

            def stored(targets: list[str], bits: int, grouped: bool) -> float:
                per_scale = [groups[t] if grouped and groups[t] else per_channel[t] for t in targets]
                return qm.average_bits(
                    [params[t] for t in targets], [qm.storage_bits(bits, n) for n in per_scale]
                )

            ranked = [
                qm.Unit(
                    unit,
                    sum(params[t] for t in targets),
                    importance.get(unit, float("nan")),
                    stored(targets, options.high, False),
                    stored(targets, options.low, options.low == 4),
                )
                for unit, targets in members.items()
            ]
            unit_bits = qm.allocate(ranked, avg_bits=options.avg_bits, high=options.high, low=options.low)
        rows = []
        for node in nodes:
            module = gm.get_submodule(node.target)
            bits = unit_bits[units[node.target]]
            group = groups[str(node.target)] if bits == 4 else 0
            weight = _weight(gm, node).detach().cpu().numpy()
            if isinstance(module, nn.Linear):
                # [in, out] as an ONNX MatMul weight: channels on axis 1, groups along axis 0.
                q, scale = qm.quantize_weight(weight.T, bits=bits, axis=1, group_size=group, group_axis=0, clip=options.clip)
                axis = 0 if group else 1
            else:  # Conv [out, in, *kernel]: per output channel
                q, scale = qm.quantize_weight(weight, bits=bits, axis=0, clip=options.clip)
                axis = 0
            gm.add_submodule(node.target, QuantizedWeight(module, q, scale, bits=bits, axis=axis, group_size=group))
            per_scale = group or per_channel[str(node.target)]
            rows.append(
                qm.Row(
                    node.target,
                    units[node.target],
                    params[node.target],
                    importance.get(units[node.target], float("nan")),
                    bits,
                    group,
                    qm.storage_bits(bits, per_scale),
                )
            )
        if ranges:
            stats["activations_quantized"] = _quantize_activations(gm, nodes, ranges)
        widths = [row.bits for row in rows]
        stats.update(
            weights_quantized=len(rows),
            int8_weights=widths.count(8),
            int4_weights=widths.count(4),
            grouped_weights=sum(bool(row.group) for row in rows),
            params_quantized=sum(row.params for row in rows),
            avg_bits_x100=round(100 * qm.average_bits([row.params for row in rows], [row.stored for row in rows])),
            weight_bits_x100=round(100 * qm.average_bits([row.params for row in rows], widths)),
            size_before_bytes=size_before,
            size_after_bytes=_module_bytes(gm, packed=True),
        )
        notes.extend(qm.format_table(rows))
        return FxPassResult(gm, True, stats, notes)

    def _activation_ranges(
        self, gm: fx.GraphModule, nodes: list[fx.Node]
    ) -> dict[fx.Node, tuple[float, float]]:
        """The calibrated range of each distinct float input of the modules ``nodes``."""
        options: QuantizeOptions = self.options
        inputs = {node.args[0] for node in nodes if isinstance(node.args[0], fx.Node)}
        recorded = _record(gm, inputs, self.calibration)
        return {
            node: qm.activation_range(arrays, options.calibrate, options.percentile)
            for node, arrays in recorded.items()
            if arrays and all(np.issubdtype(a.dtype, np.floating) for a in arrays)
        }

    def _importance(self, gm: fx.GraphModule, nodes: list[fx.Node], units: dict[str, str], notes: list[str]) -> dict[str, float]:
        options: QuantizeOptions = self.options
        order = list(dict.fromkeys(units.values()))
        if options.importance == "random":
            rng = np.random.default_rng(options.seed)
            return {unit: float(rng.random()) for unit in order}
        if options.importance == "zd":
            weights: dict[str, list[np.ndarray]] = {}
            for node in nodes:
                weights.setdefault(units[str(node.target)], []).append(_weight(gm, node).detach().cpu().numpy())
            return {unit: qm.zd_importance(arrays) for unit, arrays in weights.items()}
        if not self.calibration:
            raise InputError("quantize (fx): importance=lim needs calibration inputs: QuantizeFxPass(options, calibration=[args])")
        ends = _unit_ends(gm, set(order))
        recorded = _record(gm, {node for pair in ends.values() for node in pair}, self.calibration)
        scores = {}
        for unit, (entry, exit_) in ends.items():
            pairs = [(a, b) for a, b in zip(recorded[entry], recorded[exit_], strict=True) if a.shape == b.shape]
            scores[unit] = float(np.mean([qm.lim_importance(a, b) for a, b in pairs])) if pairs else float("nan")
            if not pairs:
                notes.append(f"{unit}: LIM not measurable (input and output shapes differ): kept at {options.high} bits")
        return scores



def _quantize_activations(
    gm: fx.GraphModule, nodes: list[fx.Node], ranges: dict[fx.Node, tuple[float, float]]
) -> int:
    """Insert ``quantize_linear`` -> ``dequantize_linear`` once per input in ``ranges``; the
    modules ``nodes`` that read it read the dequantized value. Returns how many."""
    done: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        x = node.args[0]
        if not isinstance(x, fx.Node) or x not in ranges:
            continue
        if x not in done:
            scale, zero = qm.activation_qparams(*ranges[x])
            names = (f"{x.name}_act_scale", f"{x.name}_act_zero_point")
            gm.register_buffer(names[0], torch.tensor(scale, dtype=torch.float32))
            gm.register_buffer(names[1], torch.tensor(zero, dtype=torch.int8))
            with gm.graph.inserting_after(x):
                scale_node = gm.graph.get_attr(names[0])
            with gm.graph.inserting_after(scale_node):
                zero_node = gm.graph.get_attr(names[1])
            with gm.graph.inserting_after(zero_node):
                quantized = gm.graph.call_function(
                    torch.ops.rewriter.quantize_linear.default, (x, scale_node, zero_node)
                )
            with gm.graph.inserting_after(quantized):
                done[x] = gm.graph.call_function(
                    torch.ops.rewriter.dequantize_linear.default, (quantized, scale_node, zero_node)
                )
        node.args = (done[x], *node.args[1:])
    return len(done)


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    weight = gm.get_submodule(str(node.target)).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _group(module: nn.Module, group_size: int) -> int:
    """The group size a module's weight gets at 4 bits: ``group_size`` along ``in_features``
    of an nn.Linear it divides, else 0 (per channel; always for convolutions)."""
    if isinstance(module, nn.Linear) and group_size and module.in_features % group_size == 0:
        return group_size
    return 0


def _per_channel(gm: fx.GraphModule, target: str) -> int:
    """Weights of one output channel of the module at ``target`` (those sharing one scale)."""
    weight = gm.get_submodule(target).weight
    assert isinstance(weight, torch.Tensor)
    return max(1, weight.numel() // int(weight.shape[0]))


def _unit(target: str) -> str:
    """The layer a module belongs to: its path up to the first numbered component."""
    match = _NUMBERED.match(target)
    return match.group(1) if match else target


def _unit_ends(gm: fx.GraphModule, units: set[str]) -> dict[str, tuple[fx.Node, fx.Node]]:
    """Each unit's entry (the first module's input) and exit (the last module's output)."""
    first: dict[str, fx.Node] = {}
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        unit = _unit(node.target)
        if unit in units:
            first.setdefault(unit, node.args[0])
            last[unit] = node
    return {unit: (first[unit], last[unit]) for unit in first}


def _record(gm: fx.GraphModule, wanted: set[fx.Node], batches: Sequence[tuple[Any, ...]]) -> dict[fx.Node, list[np.ndarray]]:
    """The values of ``wanted`` nodes on each calibration batch."""
    recorded: dict[fx.Node, list[np.ndarray]] = {node: [] for node in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            value = super().run_node(node)
            if node in recorded and isinstance(value, torch.Tensor):
                recorded[node].append(value.detach().float().cpu().numpy())
            return value

    with torch.no_grad():
        for args in batches:
            Recorder(gm).run(*args)
    return recorded


def _module_bytes(gm: nn.Module, *, packed: bool = False) -> int:
    """Bytes of parameters and buffers; with ``packed``, int4 buffers count half a byte each."""
    total = sum(p.numel() * p.element_size() for p in gm.parameters())
    for name, buffer in gm.named_buffers():
        total += buffer.numel() // 2 if packed and name.endswith("weight_int4") else buffer.numel() * buffer.element_size()
    return total


def export_onnx(gm: nn.Module, args: tuple[Any, ...], path: str | Path) -> Path:
    """Export a quantized module to ONNX at ``path``: DequantizeLinear on int8 / int4 initializers.

    >>> export_onnx(gm, (torch.randn(2, 16),), "quantized.onnx")  # doctest: +SKIP
    """
    from onnxscript import opset18, opset21

    int4 = any(name.endswith("weight_int4") for name, _ in gm.named_buffers())

    def translate(q: Any, scale: Any, axis: int, group_size: int) -> Any:
        if group_size:
            return opset21.DequantizeLinear(q, scale, axis=axis, block_size=group_size)
        return opset18.DequantizeLinear(q, scale, axis=axis)

    def quantize(x: Any, scale: Any, zero_point: Any) -> Any:
        return opset18.QuantizeLinear(x, scale, zero_point)

    def dequantize(q: Any, scale: Any, zero_point: Any) -> Any:
        return opset18.DequantizeLinear(q, scale, zero_point)

    program = torch.onnx.export(
        gm,
        args,
        dynamo=True,
        opset_version=INT4_OPSET if int4 else EXPORT_OPSET,
        custom_translation_table={
            torch.ops.rewriter.dequantize_weight.default: translate,
            torch.ops.rewriter.quantize_linear.default: quantize,
            torch.ops.rewriter.dequantize_linear.default: dequantize,
        },
        verbose=False,
    )
    assert program is not None
    model = program.model
    if int4:
        _pack_int4(model)
    io.save(model, Path(path))
    return Path(path)


def _pack_int4(model: ir.Model) -> None:
    """Store the ``weight_int4`` initializers (int8 values in [-8, 7]) as INT4."""
    for name, value in list(model.graph.initializers.items()):
        if name.endswith("weight_int4") and value.const_value is not None:
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array.astype(ml_dtypes.int4), name=name)
            value.dtype = ir.DataType.INT4
    model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)
