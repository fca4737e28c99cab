"""``DQ(Q(x)) @ DQ(W_q) (+ bias) -> ai.rewriter::Int8MatMul(Q_u8(x), pack(W_q), scale, comp[, bias])``.

The QDQ form of ``quantize(activations=int8)`` (:mod:`rewriter.passes.quantize`) says
what to compute, in float: ``x_dq = sx (q - zx)`` with ``q = QuantizeLinear(x, sx, zx)``
(int8 or uint8, per tensor) and ``w_dq[k, n] = sw[n] W_q[k, n]`` (int8, per output
channel or per tensor, zero point 0). The product is an integer matmul::

    u = q + 128, zu = zx + 128        (int8 q; for uint8 q: u = q, zu = zx)
    y[m, n] = sx sw[n] (sum_k u[m, k] W_q[k, n] - zu colsum_n(W_q))

``u`` is ``QuantizeLinear(x, sx, zu)`` with a uint8 zero point (the same rounding and
clipping, shifted by 128), so the activation is quantized once, straight to uint8, and
``vpdpbusd`` (u8 x s8), or AMX's ``tdpbusd``, applies. The sum is exact in int32 (``|u W| <= 255 * 128`` per
term, so K up to 65793); ``comp[n] = zu colsum_n(W_q)`` and ``scale[n] = sx sw[n]``
(rounded once to float32) are computed here, at compile time, and a following ``Add`` of
a constant ``[N]`` bias is folded into the kernel's epilogue. The weight is packed as
``[ceil(N/16), K/4, 16, 4]`` for the kernel (:mod:`rewriter.backends.tvm.kernels.int8_matmul`),
zero past column N: a head of 1000 or 30522 classes computes whole groups of 16 channels
and stores its N (``scale``, ``comp`` and ``bias`` stay [N]). With ``amx=True`` (targets
with AMX-INT8) the same layout is padded for the AMX kernel
(:func:`rewriter.backends.tvm.kernels.amx_matmul.pack_weight`: whole pairs of groups,
``K`` zero-padded to a multiple of 64), and any ``K`` is taken.

Exact up to float32 rounding: ONNX Runtime on the QDQ model sums ``K`` float32 products
of dequantized values; here only the scale, the int32 -> float conversion and the bias
add round (see ``tests/backends/tvm/test_int8.py`` for the tolerance).

Fires only on MatMuls with a 2-D constant weight, static input shape and ``K % 4 == 0``
(any ``K`` with ``amx``; any ``N``); the others keep their QDQ form (TVM dequantizes and multiplies in float32),
and :func:`fuse` says why in its result. :mod:`rewriter.backends.tvm.ops.int8_matmul`
lowers the op into Relax as ``call_tir`` of the kernel.

>>> stats = fuse(model)  # doctest: +SKIP
>>> stats["int8_matmuls"]  # doctest: +SKIP
36
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.backends.tvm.kernels import amx_matmul
from rewriter.backends.tvm.kernels.int8_matmul import GROUP
from rewriter.backends.tvm.ops import renamed
from rewriter.backends.tvm.ops.int8_matmul import INT8_MATMUL
from rewriter.backends.tvm.relax_passes import pack_weights

logger = logging.getLogger(__name__)

# The op the rewrite emits, in the default domain under the name prepare gives our other
# ops (the rewrite runs after the renaming; the importer sees only op_type).
OP_TYPE = renamed(INT8_MATMUL)
LANES = 16  # output channels per vpdpbusd (int32 lanes of a zmm register)
SHIFT = 128  # int8 -> uint8
MAX_K = (2**31 - 1) // (255 * 128)  # the int32 sum cannot overflow up to this K


@dataclasses.dataclass
class Match:
    """A QDQ MatMul to rewrite: its nodes and the constants of its quantization."""

    quantize: ir.Node
    matmul: ir.Node
    add: ir.Node | None
    weight: np.ndarray  # int8 [K, N]
    weight_scale: np.ndarray  # float32 [N]
    scale: float
    zero: int  # zero point of the uint8 activation (zu)
    bias: np.ndarray | None


def fuse(model: ir.Model, *, amx: bool = False) -> dict[str, Any]:
    """Rewrite every matching QDQ MatMul of ``model`` in place, the weights packed for the
    AMX kernel with ``amx`` (else for the VNNI kernel); returns the statistics
    (``int8_matmuls``, ``bias_fused``) and, under ``skipped``, why the others were not.
    """
    shifted: dict[int, ir.Value] = {}
    stats: dict[str, Any] = {"int8_matmuls": 0, "bias_fused": 0, "skipped": []}
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match(node, amx=amx)
        if isinstance(match, str):
            if match:
                stats["skipped"].append(f"{node.name}: {match}")
            continue
        if id(match.quantize) not in shifted:
            shifted[id(match.quantize)] = _quantize_u8(model, match)
        _replace(model, match, shifted[id(match.quantize)], amx=amx)
        stats["int8_matmuls"] += 1
        stats["bias_fused"] += match.add is not None
    if stats["int8_matmuls"]:
        ir.passes.common.RemoveUnusedNodesPass()(model)
        logger.info(
            "%d QDQ MatMuls run as int8 matmuls (%d with their bias folded in)",
            stats["int8_matmuls"],
            stats["bias_fused"],
        )
    for reason in stats["skipped"]:
        logger.info("QDQ MatMul left in float: %s", reason)
    return stats


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return (
        node
        if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")
        else None
    )


def _match(node: ir.Node, *, amx: bool) -> Match | str:
    """The match of MatMul ``node``, or why not ("" when it is not a QDQ MatMul at all)."""
    if len(node.inputs) != 2:
        return ""
    dq_x, dq_w = (
        _producer(node.inputs[0], "DequantizeLinear"),
        _producer(node.inputs[1], "DequantizeLinear"),
    )
    quantize = _producer(dq_x.inputs[0], "QuantizeLinear") if dq_x is not None else None
    if dq_x is None or dq_w is None or quantize is None:
        return ""
    weight, weight_scale = _const(dq_w.inputs[0]), _const(dq_w.inputs[1])
    weight_zero = _const(dq_w.inputs[2]) if len(dq_w.inputs) > 2 else None
    if weight is None or weight_scale is None or weight.dtype != np.int8 or weight.ndim != 2:
        return "the weight is not a constant 2-D int8 tensor"
    if dq_w.attributes.get_int("block_size", 0) or (weight_zero is not None and weight_zero.any()):
        return "the weight has per-group scales or a nonzero zero point"
    k, n = weight.shape
    if (
        weight_scale.size == n
        and weight_scale.ndim == 1
        and dq_w.attributes.get_int("axis", 1) in (1, -1)
    ):
        per_channel = weight_scale.astype(np.float32)
    elif weight_scale.size == 1:
        per_channel = np.full(n, weight_scale.reshape(()), np.float32)
    else:
        return "the weight's scales are neither per output channel nor per tensor"
    activation = _activation(quantize, dq_x)
    if isinstance(activation, str):
        return activation
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return "the activation's shape is not static (fix the input dims)"
    if (k % GROUP and not amx) or k > MAX_K:
        return f"K={k}, N={n}: the kernel needs K % {GROUP} == 0, K <= {MAX_K}"
    add, bias = _bias(node, n)
    scale, zero = activation
    return Match(quantize, node, add, weight, per_channel, scale, zero, bias)


def _activation(quantize: ir.Node, dequantize: ir.Node) -> tuple[float, int] | str:
    """``(sx, zu)`` of a per-tensor QuantizeLinear -> DequantizeLinear pair, or why not."""
    scale, scale_dq = (_const(node.inputs[1]) for node in (quantize, dequantize))
    zero, zero_dq = (_zero_point(node) for node in (quantize, dequantize))
    if scale is None or scale.size != 1 or scale.dtype != np.float32:
        return "the activation's scale is not a constant float32 scalar"
    if scale_dq is None or not np.array_equal(scale, scale_dq):
        return "QuantizeLinear and DequantizeLinear have different scales"
    if quantize.attributes.get_int("output_dtype", 0):
        return "QuantizeLinear with output_dtype"
    if (
        zero is None
        or zero_dq is None
        or zero.dtype != zero_dq.dtype
        or not np.array_equal(zero, zero_dq)
    ):
        return "the zero points differ or are not constant"
    if zero.size != 1 or zero.dtype not in (np.int8, np.uint8):
        return f"activation zero point of type {zero.dtype} (int8 or uint8 scalars only)"
    shift = SHIFT if zero.dtype == np.int8 else 0
    return float(scale.reshape(())), int(zero.reshape(())) + shift


def _zero_point(node: ir.Node) -> np.ndarray | None:
    """The constant zero point of a QuantizeLinear/DequantizeLinear (absent: uint8 0)."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros((), np.uint8)
    return _const(node.inputs[2])


def _bias(matmul: ir.Node, n: int) -> tuple[ir.Node | None, np.ndarray | None]:
    """The ``Add`` of a constant float32 [N] vector that alone reads the MatMul's output."""
    output = matmul.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    bias = _const(add.inputs[1 - index])
    if bias is None or bias.dtype != np.float32 or bias.size != n or bias.shape[-1:] != (n,):
        return None, None
    return add, bias.reshape(n)


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """Pack ``weight`` [K, N] as ``[ceil(N/16), K/4, 16, 4]``: ``packed[n // 16, k // 4, n % 16,
    k % 4] = weight[k, n]``, zero past column N.

    >>> int(pack_weight(np.arange(8 * 16).reshape(8, 16))[0, 1, 2, 3])  # weight[7, 2]
    114
    """
    return pack_weights.pack_groups(weight, GROUP, LANES)


def constants(match: Match, *, amx: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(packed weight, scale, comp)`` of ``match``: ``scale[n] = sx sw[n]`` (float32),
    ``comp[n] = zu colsum_n(W_q)`` (int32); the weight packed for AMX with ``amx``."""
    scale = (np.float64(match.scale) * match.weight_scale.astype(np.float64)).astype(np.float32)
    comp = (match.zero * match.weight.astype(np.int64).sum(axis=0)).astype(np.int32)
    packed = amx_matmul.pack_weight("int8", match.weight) if amx else pack_weight(match.weight)
    return packed, scale, comp


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    name = _fresh(model, name)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
    )
    value.const_value = ir.tensor(array, name=name)
    model.graph.register_initializer(value)
    return value


def _fresh(model: ir.Model, name: str) -> str:
    taken = set(model.graph.initializers)
    candidate, index = name, 0
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def _quantize_u8(model: ir.Model, match: Match) -> ir.Value:
    """``QuantizeLinear(x, sx, zu)`` with a uint8 zero point, after the original one."""
    x = match.quantize.inputs[0]
    base = (x.name if x is not None else None) or "activation"
    scale = _initializer(model, f"{base}_u8_scale", np.array(match.scale, np.float32))
    zero = _initializer(model, f"{base}_u8_zero_point", np.array(match.zero, np.uint8))
    node = ir.node("QuantizeLinear", [x, scale, zero], name=f"{base}_QuantizeLinear_u8")
    output = node.outputs[0]
    output.name, output.dtype = f"{base}_u8", ir.DataType.UINT8
    output.shape = x.shape if x is not None else None
    model.graph.insert_after(match.quantize, node)
    return output


def _replace(model: ir.Model, match: Match, u8: ir.Value, *, amx: bool) -> None:
    packed, scale, comp = constants(match, amx=amx)
    name = match.matmul.name or "matmul"
    inputs = [
        u8,
        _initializer(model, f"{name}_weight_packed", packed),
        _initializer(model, f"{name}_scale", scale),
        _initializer(model, f"{name}_comp", comp),
    ]
    if match.bias is not None:
        inputs.append(_initializer(model, f"{name}_bias", match.bias))
    last = match.add or match.matmul
    node = ir.node(OP_TYPE, inputs, name=f"{name}_int8")
    old, new = last.outputs[0], node.outputs[0]
    original = old.name
    old.name = f"{original}_float"
    new.name, new.dtype, new.shape = original, ir.DataType.FLOAT, old.shape
    model.graph.insert_before(match.matmul, node)
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    for dead in (match.add, match.matmul):
        if dead is not None:
            model.graph.remove(dead, safe=True)
