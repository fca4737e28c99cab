"""ONNX ``LSTM`` and ``GRU`` for the importer: an input projection and a recurrence kernel.

TVM's ONNX importer has no recurrent ops. Both torch exporters write ``nn.LSTM`` and
``nn.GRU`` as these ops (torch: ``linear_before_reset=1``), one node per layer, so a
speech, time-series or OCR model with one was refused. Here a node becomes, in Relax::

    XW = reshape(matmul(X, Wp) + bp, [seq, batch, dirs, gates, hp])   # every step at once
    Y, Y_h(, Y_c) = call_tir(rewriter_lstm | rewriter_gru, (XW, RT, H0, ...))

``Wp`` is ``W`` transposed, each gate's units padded to ``hp`` (whole kernel tasks) and
the directions side by side, so the projection is one matmul with a constant weight (the
matmul rule's); ``bp`` holds the biases that do not depend on the step (``Wb + Rb``,
except a GRU's ``Rb`` of the h gate with ``linear_before_reset``, which the reset gate
multiplies). ``RT`` is ``R`` packed per kernel task
(:mod:`rewriter.backends.tvm.kernels.recurrent`). ``seq`` and ``batch`` stay symbolic.

Refused with one line naming the op (``InputError``): activations other than ONNX's
defaults, ``input_forget``, per-sequence lengths (``sequence_lens``), weights computed in
the graph, inputs other than float32 or of unknown shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewriter.backends.tvm.ops import attribute_text, constant_value
from rewriter.errors import InputError

DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}
KERNEL_NAMES = {"LSTM": "rewriter_lstm", "GRU": "rewriter_gru"}


def convert(bb: Any, op_name: str, inputs: list, attrs: dict, target: Any) -> Any:
    """The Relax tuple ``(Y, Y_h[, Y_c])`` of the ``LSTM`` or ``GRU`` node's ``inputs``."""
    from tvm import relax

    from rewriter.backends.tvm.kernels import recurrent as kernel
    from rewriter.backends.tvm.ops import scheduled_kernel

    kind = op_name.lower()
    gates = kernel.GATES[kind]
    x = bb.normalize(inputs[0])
    weights = [constant_value(value) for value in inputs[1:4]]
    _check(op_name, x, inputs, attrs, weights)
    w, r = weights[0], weights[1]
    assert w is not None and r is not None  # _check refused the others
    directions, hidden = r.shape[0], r.shape[2]
    bias = (
        weights[2]
        if weights[2] is not None
        else np.zeros((directions, 2 * gates * hidden), np.float32)
    )
    direction = attribute_text(attrs.get("direction", "forward"))
    layout = int(attrs.get("layout", 0))
    clip = attrs.get("clip")
    linear_before_reset = bool(int(attrs.get("linear_before_reset", 0)))
    hp = kernel.padded_hidden(hidden, target)

    if layout == 1:  # [batch, seq, input] -> [seq, batch, input]
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
    seq, batch, _ = x.ty.shape.values

    # The projection: every step's X W^T + the step-independent biases.
    wb, rb = bias[:, : gates * hidden], bias[:, gates * hidden :]
    step_bias = wb + rb
    if kind == "gru" and linear_before_reset:
        step_bias[:, 2 * hidden :] = wb[:, 2 * hidden :]
    wp = np.zeros((w.shape[2], directions, gates, hp), np.float32)
    bp = np.zeros((directions, gates, hp), np.float32)
    rt = np.zeros(
        (directions, hp // kernel.unit_of(target), hidden, gates, kernel.unit_of(target)),
        np.float32,
    )
    packed_r = np.zeros((directions, gates, hp, hidden), np.float32)
    packed_r[:, :, :hidden, :] = r.reshape(directions, gates, hidden, hidden)
    for d in range(directions):
        wp[:, d, :, :hidden] = w[d].reshape(gates, hidden, -1).transpose(2, 0, 1)
        bp[d, :, :hidden] = step_bias[d].reshape(gates, hidden)
        # RT[d, block, k, g, j] = R[d, g, block * unit + j, k]
        rt[d] = packed_r[d].reshape(gates, -1, kernel.unit_of(target), hidden).transpose(1, 3, 0, 2)
    # On [seq x batch, input] rows (views both ways): over symbolic sizes a matmul of
    # [seq, batch, input] runs flattened anyway (relax_passes/flat_rows.py), and its bias
    # then stayed a separate pass over the projection (4% of the model at batch 8).
    rows = bb.emit(relax.op.reshape(x, relax.ShapeExpr([seq * batch, w.shape[2]])))
    projected = bb.emit(relax.op.matmul(rows, relax.const(wp.reshape(wp.shape[0], -1))))
    projected = bb.emit(relax.op.add(projected, relax.const(bp.reshape(-1))))
    projected = bb.emit(relax.op.reshape(projected, relax.ShapeExpr([seq, batch, bp.size])))

    states = [
        _state(
            bb,
            inputs[index] if len(inputs) > index else None,
            directions,
            batch,
            hidden,
            hp,
            layout,
        )
        for index in ((5, 6) if kind == "lstm" else (5,))
    ]
    if kind == "lstm":
        peepholes = constant_value(inputs[7]) if len(inputs) > 7 and inputs[7] is not None else None
        p = np.zeros((directions, 3, hp), np.float32)
        if peepholes is not None:
            p[:, :, :hidden] = peepholes.reshape(directions, 3, hidden)
        extra = [relax.const(p)]
    else:
        recurrent_bias = np.zeros((directions, hp), np.float32)
        if linear_before_reset:
            recurrent_bias[:, :hidden] = rb[:, 2 * hidden :]
        extra = [relax.const(recurrent_bias)]
    func = kernel.recurrence(
        kind,
        hidden,
        directions,
        reverse=direction == "reverse",
        target=target,
        clip=None if clip is None else float(clip),
        peepholes=kind == "lstm" and peepholes is not None,
        linear_before_reset=linear_before_reset,
    )
    gvar = bb.add_func(scheduled_kernel(func), KERNEL_NAMES[op_name])
    state_type = relax.TensorType([directions, batch, hp], "float32")
    outs = [relax.TensorType([seq, directions, batch, hp], "float32"), state_type]
    outs += [state_type] if kind == "lstm" else []
    results = bb.emit(relax.call_tir(gvar, [projected, relax.const(rt), *states, *extra], outs))
    values = [bb.emit(relax.TupleGetItem(results, i)) for i in range(len(outs))]
    if hp != hidden:
        values = [
            bb.emit(relax.op.strided_slice(v, axes=[v.ty.ndim - 1], begin=[0], end=[hidden]))
            for v in values
        ]
    if layout == 1:  # Y [batch, seq, dirs, hidden], states [batch, dirs, hidden]
        values = [bb.emit(relax.op.permute_dims(values[0], [2, 0, 1, 3]))] + [
            bb.emit(relax.op.permute_dims(v, [1, 0, 2])) for v in values[1:]
        ]
    return relax.Tuple(values)


def _check(op_name: str, x: Any, inputs: list, attrs: dict, weights: list) -> None:
    """Refuse what the kernel does not compute, naming the op and the cause."""
    shape = getattr(x.ty, "shape", None)
    if getattr(x.ty, "dtype", None) != "float32":
        raise InputError(
            f"{op_name}: only float32 inputs are compiled, not {getattr(x.ty, 'dtype', '?')}"
        )
    if shape is None or not hasattr(shape, "values") or len(shape.values) != 3:
        raise InputError(f"{op_name}: the input X needs a known rank-3 shape")
    if (
        weights[0] is None
        or weights[1] is None
        or (len(inputs) > 3 and inputs[3] is not None and weights[2] is None)
    ):
        raise InputError(
            f"{op_name}: W, R and B must be initializers (weights computed in the graph)"
        )
    if len(inputs) > 4 and inputs[4] is not None:
        raise InputError(f"{op_name}: per-sequence lengths (sequence_lens) are not supported")
    if op_name == "LSTM" and int(attrs.get("input_forget", 0)):
        raise InputError("LSTM: input_forget=1 (coupled input and forget gates) is not supported")
    if (
        op_name == "LSTM"
        and len(inputs) > 7
        and inputs[7] is not None
        and constant_value(inputs[7]) is None
    ):
        raise InputError("LSTM: the peepholes P must be an initializer")
    defaults = DEFAULT_ACTIVATIONS[op_name]
    given = tuple(attribute_text(name).lower() for name in attrs.get("activations", ()) or ())
    if given and given != defaults * (len(given) // len(defaults)):
        raise InputError(
            f"{op_name}: activations {list(given)} are not supported (only ONNX's defaults, {list(defaults)})"
        )
    if any(v.dtype != np.float32 for v in weights if v is not None):
        raise InputError(f"{op_name}: only float32 weights are compiled")


def _state(
    bb: Any, value: Any, directions: int, batch: Any, hidden: int, hp: int, layout: int
) -> Any:
    """An initial state as the kernel's ``[dirs, batch, hp]`` (zeros where absent)."""
    from tvm import relax

    if value is None:
        return bb.emit(relax.op.zeros(relax.ShapeExpr([directions, batch, hp]), "float32"))
    value = bb.normalize(value)
    if layout == 1:
        value = bb.emit(relax.op.permute_dims(value, [1, 0, 2]))
    if hp != hidden:
        value = bb.emit(relax.op.nn.pad(value, [0, 0, 0, 0, 0, hp - hidden]))
    return value


def fold_weights(model: Any) -> int:
    """Fold the weights of every ``LSTM``/``GRU`` node computed from initializers alone
    into initializers; returns how many. The dynamo exporter slices torch's weights per
    gate and concatenates them again in ONNX's gate order (``Slice``, ``Concat``,
    ``Unsqueeze``), which onnxscript's folder leaves at its size limits (a weight read by
    four slices is never folded), and the kernel packs only constants."""
    import onnx
    import onnx.reference
    import onnx_ir as ir

    folded = 0
    done: dict[int, Any] = {}  # a weight two nodes read is folded once
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if (
            node.op_type not in KERNEL_NAMES
            or node.domain not in ("", "ai.onnx")
            or node.graph is None
        ):
            continue
        for index in (1, 2, 3, 7):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None or value.const_value is not None:
                continue
            if id(value) in done:
                node.replace_input_with(index, done[id(value)])
                continue
            cone = _constant_cone(value)
            if cone is None:
                continue
            nodes, leaves = cone
            name = value.name or ""
            graph = onnx.helper.make_graph(
                [ir.serde.serialize_node(n) for n in nodes],
                "weights",
                [],
                [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                [ir.serde.serialize_tensor(leaf.const_value) for leaf in leaves],
            )
            opsets = [
                onnx.helper.make_opsetid(domain, version)
                for domain, version in model.opset_imports.items()
            ]
            evaluator = onnx.reference.ReferenceEvaluator(
                onnx.helper.make_model(graph, opset_imports=opsets)
            )
            (result,) = evaluator.run(None, {})
            array = np.asarray(result)
            tensor = ir.tensor(array, name=f"{name}_folded")
            constant = ir.Value(
                name=tensor.name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
            )
            model.graph.register_initializer(constant)
            node.replace_input_with(index, constant)
            done[id(value)] = constant
            folded += 1
    return folded


def _constant_cone(value: Any) -> tuple[list, list] | None:
    """The nodes that compute ``value`` (in order) and the constants they read, or None
    where a graph input (or a subgraph's value) reaches it."""
    nodes: list = []
    leaves: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(v: Any) -> bool:
        if v is None or id(v) in seen:
            return True
        seen.add(id(v))
        if v.const_value is not None and v.producer() is None:
            leaves[id(v)] = v
            return True
        producer = v.producer()
        if producer is None or any(
            attr.type.name == "GRAPH" for attr in producer.attributes.values()
        ):
            return False
        if not all(visit(i) for i in producer.inputs):
            return False
        if producer not in nodes:
            nodes.append(producer)
        return True

    return (nodes, list(leaves.values())) if visit(value) else None
