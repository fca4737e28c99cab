"""Padded channels carried from one convolution to the next, not sliced after each.

:func:`.conv.pad_channels` gives a convolution whose output channels no whole vector
divides (72, 40, 120) zero output channels up to a multiple of 16 or 32, and slices
them off after it: everything between it and the next convolution (bias, activation,
the depthwise convolution, the residual add) then runs on 72 channels, in 8-lane
vectors, and a convolution with 24 outputs runs in 8-wide register tiles. MNASNet-1.0's
early layers (24, 40, 72, 120 channels) ran 1.1-1.6x ONNX Runtime's time there, whose
blocked layout pads channels to 16 through the whole network. This pass moves each
such slice down the graph, past every op that treats channels apart:

- element-wise ops whose other operands are carried too, constants (padded: with
  zeros, a divisor with ones) or broadcast along the channels; pools, reductions over
  positions, a pad of the positions: the op runs on the padded tensor, and the slice
  follows it;
- a depthwise convolution: its weight gets zero channels, its groups as many;
- a dense convolution (the end): its weight gets zero input channels, which read the
  padded ones. Its output is the same.

Only where every use of the value leads, through such ops, into dense convolutions
(:meth:`_Graph.absorbed`): elsewhere (a grouped convolution, a transpose out of the
convolutions, a model output) the slice stays where it was. A convolution whose output
no vector divides and whose every use leads so is padded here as well, to a multiple of
16 channels where that wastes at most :data:`MAX_CARRIED_WASTE` (24 -> 32): ORT's
blocked layout pays the same.

Exact: a padded channel starts as a zero (a zero weight's output, a constant's padding)
and every carried op keeps it finite (no logarithm, no division by it), so the zero
weights that finally read it add exact zeros; the real channels are computed as before.

>>> mod = carried()(conv.channels_last()(mod))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rewriter.backends.tvm.relax_passes import dims_of
from rewriter.backends.tvm.relax_passes.conv import (
    CHANNEL_MULTIPLE,
    _conv_like,
    _is_op,
    _number,
    pad_axis,
    padded_channels,
)

if TYPE_CHECKING:
    import tvm

# Element-wise ops of one tensor that map finite values to finite values.
UNARY = frozenset(
    f"relax.{name}"
    for name in (
        "nn.relu",
        "nn.leakyrelu",
        "nn.gelu",
        "nn.gelu_tanh",
        "nn.silu",
        "sigmoid",
        "tanh",
        "erf",
        "negative",
        "abs",
        "clip",
    )
)
# Element-wise ops of two tensors; a padded divisor is never carried (its zeros).
BINARY = frozenset(
    f"relax.{name}" for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum")
)
POOLS = frozenset(
    f"relax.nn.{name}"
    for name in (
        "max_pool1d",
        "max_pool2d",
        "avg_pool1d",
        "avg_pool2d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
    )
)
REDUCTIONS = frozenset(f"relax.{name}" for name in ("mean", "sum", "max", "min"))
CONVS = frozenset({"relax.nn.conv1d", "relax.nn.conv2d"})
# A convolution whose output channels are carried is padded to a multiple of
# conv.CHANNEL_MULTIPLE where that wastes at most this share (24 -> 32, 40 -> 48; not
# 8 -> 16).
MAX_CARRIED_WASTE = 1 / 3


def carried_channels(channels: int) -> int:
    """The output channels of a convolution whose padding is carried: the
    :func:`.conv.padded_channels` ones, or a multiple of ``CHANNEL_MULTIPLE`` within
    :data:`MAX_CARRIED_WASTE`.

    >>> [carried_channels(n) for n in (24, 40, 72, 120, 8, 3, 64)]
    [32, 48, 80, 128, 8, 8, 64]
    """
    whole = -(-channels // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    padded = padded_channels(channels)
    return whole if padded < whole and whole - channels <= MAX_CARRIED_WASTE * channels else padded


def carried() -> tvm.transform.Pass:
    """The Relax pass: :func:`carry_padded_channels`, after
    :func:`.conv.channels_last` (which pads the channels)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="CarryPaddedChannels")
    def pass_(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return carry_padded_channels(mod)

    return pass_


def carry_padded_channels(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the channel slices moved as the module docstring says, unused
    bindings dropped."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Carry(relax.PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any, graph: _Graph) -> None:
            super().__init__(mod)
            self.graph = graph
            self.binding: Any = None  # the variable the call being visited is bound to

        def visit_var_binding_(self, binding: Any) -> None:
            self.binding = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            kind = _kind(call)
            if kind == "dense":
                return self._dense(call)
            if kind == "binary":
                return self._binary(call)
            slice_ = self._wide(call.args[0]) if kind in ("along", "depthwise") else None
            if slice_ is None:
                return call
            source, channels = slice_
            if kind == "along":
                return self._narrow(
                    relax.Call(call.op, [source, *call.args[1:]], call.attrs), channels
                )
            if int(call.attrs.groups) != channels:
                return call
            weight = _constant(call.args[1])
            wide = int(source.ty.shape.values[-1])
            # Zero weights for the padded channels, one group each.
            padded = _conv_with(call, source, pad_axis(weight, -1, wide - channels), groups=wide)
            return self._narrow(padded, channels)

        def _wide(self, arg: Any) -> tuple[Any, int] | None:
            """(the padded tensor, its real channels) where ``arg`` is carried (a slice
            of the first channels of a padded tensor, every use of it leading into dense
            convolutions; elsewhere the slice stays where it is: a grouped convolution
            reads RegNetY's 104 channels, 112 padded, sliced)."""
            if not isinstance(arg, relax.Var) or not self.graph.carried(arg):
                return None
            return _channel_slice(self.lookup_binding(arg))

        def _narrow(self, wide: Any, channels: int) -> Any:
            value = self.builder_.emit(wide)
            return relax.op.strided_slice(
                value, axes=[value.ty.ndim - 1], begin=[0], end=[channels]
            )

        def _binary(self, call: Any) -> Any:
            slices = [self._wide(arg) for arg in call.args]
            known = [slice_ for slice_ in slices if slice_ is not None]
            if not known or (call.op.name == "relax.divide" and slices[1] is not None):
                return call
            widths = {(int(source.ty.shape.values[-1]), channels) for source, channels in known}
            if len(widths) != 1:
                return call
            ((wide, channels),) = widths
            args = []
            for index, (arg, slice_) in enumerate(zip(call.args, slices, strict=True)):
                fill = 1.0 if call.op.name == "relax.divide" and index == 1 else 0.0
                padded = slice_[0] if slice_ is not None else _padded(arg, channels, wide, fill)
                if padded is None:
                    return call
                args.append(padded)
            return self._narrow(relax.Call(call.op, args, call.attrs), channels)

        def _dense(self, call: Any) -> Any:
            slice_ = self._wide(call.args[0])
            outputs = (_constant_shape(call.args[1]) or [0])[-1]  # a constant (_kind)
            wider = carried_channels(outputs)
            widened = wider != outputs and self.graph.absorbed(self.binding)
            if slice_ is None and not widened:
                return call  # its weight is not copied out
            weight = _constant(call.args[1])
            if slice_ is not None:  # zero input channels read the padded ones
                source, channels = slice_
                weight = pad_axis(weight, -2, int(source.ty.shape.values[-1]) - channels)
                call = _conv_with(call, source, weight)
            if not widened:
                return call
            return self._narrow(
                _conv_with(call, call.args[0], pad_axis(weight, -1, wider - outputs)), outputs
            )

    graph = _Graph()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            graph.visit_expr(func)
    if not any(_kind(call) == "dense" for call in graph.values.values()):
        return mod  # no convolution: nothing is padded
    mutator = Carry(mod, graph)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def _channel_slice(expr: Any) -> tuple[Any, int] | None:
    """(source, channels) where ``expr`` is ``strided_slice(source)`` of the first
    ``channels`` along the last axis, a float ``source`` with
    :func:`carried_channels` or ``padded_channels(channels)`` channels there."""
    import tvm

    if not _is_op(expr, "relax.strided_slice"):
        return None
    source, axes, begins, ends, *steps = expr.args
    shape = dims_of(source)
    if (
        shape is None
        or not str(source.ty.dtype).startswith(("float", "bfloat"))
        or len(axes.fields) != 1
    ):
        return None
    if steps and any(int(step) != 1 for step in steps[0].fields):
        return None
    axis, begin, end = int(axes.fields[0]), begins.fields[0], ends.fields[0]
    if axis % len(shape) != len(shape) - 1 or not isinstance(shape[-1], tvm.tirx.IntImm):
        return None
    if not (
        isinstance(begin, tvm.tirx.IntImm) and isinstance(end, tvm.tirx.IntImm) and int(begin) == 0
    ):
        return None
    wide, channels = int(shape[-1]), int(end)
    if not 0 < channels < wide or wide not in (
        padded_channels(channels),
        carried_channels(channels),
    ):
        return None
    return source, channels


def _channels_last(attrs: Any) -> bool:
    """Whether a convolution's or pool's attributes put the channels last."""
    layout = str(getattr(attrs, "data_layout", getattr(attrs, "layout", "")))
    out = str(getattr(attrs, "out_layout", layout) or layout)
    kernel = str(getattr(attrs, "kernel_layout", "WIO"))
    return layout in ("NHWC", "NWC") and out == layout and kernel in ("HWIO", "WIO")


def _over_positions(call: Any) -> bool:
    """Whether ``call`` reduces or pads positions only (a mean over the pixels, a zero pad
    of the map), never the last axis."""
    name = call.op.name
    rank = getattr(call.args[0].ty, "ndim", -1)
    if rank < 2:
        return False
    if name in REDUCTIONS:
        axes = call.attrs.axis
        return axes is not None and all(int(axis) % rank != rank - 1 for axis in axes)
    if name == "relax.nn.pad":
        widths = [int(width) for width in call.attrs.pad_width]
        value = _number(call.attrs.pad_value)
        return (
            call.attrs.pad_mode == "constant"
            and value is not None
            and math.isfinite(value)
            and widths[-2:] == [0, 0]
        )
    return False


def _constant_shape(expr: Any) -> list[int] | None:
    """The shape of a constant tensor (its value left on the device), or None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return [int(extent) for extent in expr.value.shape]
    return None


def _constant(expr: Any) -> Any:
    """The numpy value of a constant tensor, or None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    return None


def _padded(arg: Any, channels: int, wide: int, fill: float) -> Any:
    """``arg`` (the other operand of an element-wise op) against ``wide`` channels: as it
    is where it is broadcast along them, padded with ``fill`` where it is a constant of
    ``channels``; None otherwise."""
    import tvm
    from tvm import relax

    shape = dims_of(arg)
    if shape is None:
        return None
    if not shape or (isinstance(shape[-1], tvm.tirx.IntImm) and int(shape[-1]) == 1):
        return arg
    value = _constant(arg)
    if value is None or value.shape[-1] != channels:
        return None
    return relax.const(pad_axis(value, -1, wide - channels, fill), str(value.dtype))


def _conv_with(call: Any, data: Any, weight: Any, **changes: Any) -> Any:
    """``call`` (a convolution) over ``data`` and the constant ``weight``."""
    from tvm import relax

    return _conv_like(call, data, relax.const(weight, str(weight.dtype)), **changes)


class _Graph:
    """The dataflow of the functions visited: which values can be padded (:meth:`paddable`)
    and which lead only into dense convolutions (:meth:`absorbed`). A value is carried
    padded where both hold; the pass's rewrites follow the same rules, so that an op
    carried finds each of its operands padded, a constant, or broadcast."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}  # var -> the call it is bound to
        # var -> (the user's var, its call, the argument the var is)
        self.reads: dict[Any, list[tuple[Any, Any, int]]] = {}
        self.other: set[Any] = set()  # read elsewhere: a tuple, an output, a non-call binding
        self.memo: dict[Any, bool] = {}  # paddable
        self.leading: set[Any] | None = None  # absorbed

    def visit_expr(self, func: Any) -> None:
        from tvm import relax

        graph = self

        @relax.expr_functor.visitor
        class Visitor(relax.PyExprVisitor):  # type: ignore[misc]
            def visit_var_binding_(self, binding: Any) -> None:
                value = binding.value
                if isinstance(value, relax.Call):
                    graph.values[binding.var] = value
                    for index, arg in enumerate(value.args):
                        if isinstance(arg, relax.Var):
                            graph.reads.setdefault(arg, []).append((binding.var, value, index))
                        else:
                            self.visit_expr(arg)
                else:
                    self.visit_expr(value)

            def visit_var_(self, var: Any) -> None:
                graph.other.add(var)

            def visit_dataflow_var_(self, var: Any) -> None:
                graph.other.add(var)

        Visitor().visit_expr(func)

    def carried(self, var: Any) -> bool:
        """Whether ``var`` is carried padded."""
        return self.paddable(var) and self.absorbed(var)

    def paddable(self, var: Any) -> bool:
        """Whether ``var`` is a channel slice of a padded tensor, a dense convolution's
        output that :func:`carried_channels` pads, or the result of an op this pass
        carries over such values."""
        if var not in self.memo:
            self.memo[var] = False  # a value never reaches itself; the guard is for safety
            self.memo[var] = self._paddable(var)
        return self.memo[var]

    def absorbed(self, var: Any) -> bool:
        """Whether every use of ``var`` leads, through ops this pass carries, into dense
        convolutions (which read padded channels with zero weights)."""
        if self.leading is None:
            self.leading = self._leading()
        return var in self.leading

    def _paddable(self, var: Any) -> bool:
        call: Any = self.values.get(var)
        kind = _kind(call)
        if kind is None:
            return False
        if kind == "slice":
            return _channel_slice(call) is not None
        if kind == "dense":
            outputs = (_constant_shape(call.args[1]) or [0])[-1]  # a constant (_kind)
            return carried_channels(outputs) > outputs
        if kind == "binary":
            return self._operands_paddable(call)
        return self._is_paddable(call.args[0])  # along, depthwise

    def _operands_paddable(self, call: Any) -> bool:
        """Whether a binary op's operands are padded, constants or broadcast, one at
        least padded (never its divisor)."""
        padded = [self._is_paddable(arg) for arg in call.args]
        if not any(padded) or (call.op.name == "relax.divide" and padded[1]):
            return False
        return all(
            known or _broadcast_or_constant(arg)
            for arg, known in zip(call.args, padded, strict=True)
        )

    def _is_paddable(self, arg: Any) -> bool:
        from tvm import relax

        return isinstance(arg, relax.Var) and self.paddable(arg)

    def _leading(self) -> set[Any]:
        """The variables :meth:`absorbed` holds for: the largest set in which every use
        of each is absorbing (a fixed point from all variables down; the least one would
        miss cycles of the test: a squeeze-excitation multiplies two values, each carried
        only where the other is)."""
        leading = {var for var, reads in self.reads.items() if reads and var not in self.other}
        # Users are bound after what they read: swept last to first, a value is tested
        # after its users, and a sweep or two more settle the operands of binary ops.
        position = {var: index for index, var in enumerate(self.values)}
        order = sorted(leading, key=lambda var: -position.get(var, -1))
        changed = True
        while changed:
            changed = False
            for var in order:
                if var in leading and not all(
                    self._absorbs(*read, leading) for read in self.reads[var]
                ):
                    leading.discard(var)
                    changed = True
        return leading

    def _absorbs(self, user: Any, call: Any, index: int, leading: set[Any]) -> bool:
        kind = _kind(call)
        if kind == "dense":
            return index == 0
        if kind == "binary":
            if call.op.name == "relax.divide" and index == 1:
                return False
            others = [arg for position, arg in enumerate(call.args) if position != index]
            carried = [
                _broadcast_or_constant(arg) or (arg in leading and self._is_paddable(arg))
                for arg in others
            ]
            return all(carried) and user in leading
        if kind in ("along", "depthwise"):
            return index == 0 and user in leading
        return False


def _kind(call: Any) -> str | None:
    """How this pass treats ``call``: "slice" (a channel slice), "dense" (an ungrouped
    channels-last convolution with a constant weight), "depthwise" (one channel per
    group), "binary", "along" (an element-wise op of one tensor, a pool, a reduction or
    pad of the positions), or None (the end of a carried value)."""
    import tvm
    from tvm import relax

    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
        return None
    name = call.op.name
    if name == "relax.strided_slice":
        return "slice"
    if name in CONVS:
        shape = _constant_shape(call.args[1])
        if shape is None or not _channels_last(call.attrs):
            return None
        groups = int(call.attrs.groups)
        if groups == 1:
            return "dense"
        return "depthwise" if shape[-2] == 1 and groups == shape[-1] else None
    if name in BINARY:
        return "binary"
    if name in UNARY or (name in POOLS and _channels_last(call.attrs)) or _over_positions(call):
        return "along"
    return None


def _broadcast_or_constant(arg: Any) -> bool:
    """Whether ``arg`` (an element-wise op's other operand) is a constant (padded at
    compile time) or broadcast along the channels (its last axis 1, or none)."""
    import tvm

    if _constant_shape(arg) is not None:
        return True
    shape = dims_of(arg)
    return shape is not None and (
        not shape or (isinstance(shape[-1], tvm.tirx.IntImm) and int(shape[-1]) == 1)
    )
