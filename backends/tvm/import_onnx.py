"""ONNX -> Relax import: clean the model up so real exports import, and lower our ops.

TVM's importer (``tvm.relax.frontend.onnx.from_onnx``) has two gaps this module closes:

1. It fails on common exports. A transformers BERT export builds ``Expand`` shapes with
   ``Where(Equal(shape, -1), ConstantOfShape(...) * -1, shape)``; onnxscript's
   optimizer keeps ``ConstantOfShape`` unfolded on purpose, and the importer then
   sees a rank-0 shape. :func:`prepare` runs the optimizer (constant folding, model
   -local function inlining, dead-code removal) with ``ConstantOfShape`` folding
   allowed, after optionally fixing symbolic input dimensions (``dims``), which
   folds every shape computation away.
2. It has no hook for custom ops and ignores domains. :func:`prepare` renames each
   ``ai.rewriter`` node that has a kernel of ours to ``ai.rewriter::<OpType>`` (its
   model-local function body is dropped, not inlined; ops without a kernel yet are
   inlined from their function body and logged), and a subclass of TVM's
   ``ONNXGraphImporter`` that overrides only ``_convert_operator`` and
   ``_check_for_unsupported_ops`` lowers those nodes with
   :func:`rewriter.backends.lowering.emit_two_pass_softmax` (``R.call_tir`` of our TIR
   kernel from :mod:`rewriter.backends.tvm.kernels.softmax`, N-D inputs reshaped to
   ``[rows, cols]`` around it). ``SigmoidAttention`` (:data:`STATIC_KERNEL_OPS`) has a
   fused kernel (CPU, and CUDA on GPU targets) for static 4-D float32 shapes
   (:func:`rewriter.backends.lowering_attention.emit_sigmoid_attention`); nodes with
   other shapes are inlined from the function body. ``FusedCrossEntropy`` and
   ``FusedLinearCrossEntropy`` (:data:`LOSS_OPS`) become ``call_tir`` to our loss kernels
   (:mod:`rewriter.backends.lowering_loss`) for static float32 inputs when
   ``fuse_loss`` (CPU targets); anything else, and CUDA targets, get the function body.
   Which path each node takes is logged. Nothing global is patched.

>>> mod = import_onnx("model_tp.onnx", target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from rewriter.backends.tvm.relax_passes.loss_decompose import expand_losses
from rewriter.backends.tvm.relax_passes.unroll import unroll_loops
from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# Our ops, renamed so that the importer (which sees only op_type) cannot confuse them
# with a standard op of the same name: renamed op_type -> log-softmax flag.
CUSTOM_OPS = {
    f"{DOMAIN}::TwoPassSoftmax": False,
    f"{DOMAIN}::TwoPassLogSoftmax": True,
}
# Our ops whose kernel needs static shapes: op_type -> renamed op_type. Nodes whose
# inputs the kernel takes (static 4-D float32 for SigmoidAttention, static float32 for
# the losses) get the kernel, the others their function body.
STATIC_KERNEL_OPS = {
    "SigmoidAttention": f"{DOMAIN}::SigmoidAttention",
    "FusedCrossEntropy": f"{DOMAIN}::FusedCrossEntropy",
    "FusedLinearCrossEntropy": f"{DOMAIN}::FusedLinearCrossEntropy",
}
# The loss ops (CPU kernels only: prepare(fuse_loss=False) inlines their bodies).
LOSS_OPS = ("FusedCrossEntropy", "FusedLinearCrossEntropy")
_STATIC_MARK = "__static_kernel"
# Name prefix of the kernels' GlobalVars in the Relax module (tests look for it).
KERNEL_PREFIX = "rewriter_two_pass"  # = lowering.KERNEL_PREFIX (kept here: no tvm import)

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model
KernelFactory = Callable[..., Any]


def to_ir(model: ModelLike) -> ir.Model:
    """A private copy of ``model`` as an onnx-ir model (the caller's object is untouched)."""
    # External tensors are read into memory: TVM embeds the weights as constants.
    if isinstance(model, ir.Model):
        proto = ir.serde.serialize_model(model)
        base_dirs = {
            value.const_value.base_dir
            for value in model.graph.initializers.values()
            if isinstance(value.const_value, ir.ExternalTensor)
        }
        for base_dir in base_dirs:
            onnx.external_data_helper.load_external_data_for_model(proto, str(base_dir))
        return ir.serde.deserialize_model(proto)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    from rewriter import io

    io.load(model)  # checks the file and its external data, with clear errors
    return ir.serde.deserialize_model(onnx.load(str(model), load_external_data=True))


def prepare(
    model: ModelLike,
    *,
    dims: Mapping[str, int] | None = None,
    fuse_attention: bool = True,
    fuse_loss: bool = True,
    int8_matmul: bool = False,
) -> onnx.ModelProto:
    """Clean ``model`` up for TVM's importer; returns a new proto.

    ``dims`` fixes symbolic input dimensions by name (``{"batch": 1, "sequence":
    128}``) or by ``input.axis`` (``{"input_ids.1": 128}``); fixed shapes let every
    shape computation fold to a constant.

    ``fuse_attention=False`` inlines ``SigmoidAttention`` from its function body (the
    fused kernels exist for CPU and CUDA targets; this is for other backends and tests).
    ``fuse_loss=False`` inlines ``FusedCrossEntropy``/``FusedLinearCrossEntropy`` from
    their function bodies (their kernels are CPU only: CUDA targets pass False).

    ``int8_matmul=True`` rewrites QDQ MatMuls (int8 activations and weights) into
    integer matmuls (:func:`rewriter.backends.tvm.relax_passes.qdq_matmul.fuse`); :func:`import_onnx`
    sets it for targets with AVX-512 VNNI.

    >>> proto = prepare("bert.onnx", dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    """
    work = to_ir(model)
    if dims:
        _fix_dims(work, dims)
    # Ops with a kernel of ours lose their function body here; the others keep it and
    # the optimizer inlines it into standard ops (said in the log: no fused kernel yet).
    # Ops whose kernel needs static shapes keep their body aside until the optimizer
    # has inferred the shapes of their inputs.
    held: dict[ir.OperatorIdentifier, ir.Function] = {}
    for key in [key for key in work.functions if key[0] == DOMAIN]:
        if f"{DOMAIN}::{key[1]}" in CUSTOM_OPS:
            del work.functions[key]
        elif key[1] in STATIC_KERNEL_OPS and (
            fuse_loss if key[1] in LOSS_OPS else fuse_attention
        ):
            held[key] = work.functions.pop(key)
        else:
            logger.warning("%s has no TVM kernel yet: compiled from its ONNX function body", key[1])
    _optimize(work)
    if held:
        inline = False
        for node in ir.traversal.RecursiveGraphIterator(work.graph):
            if node.domain == DOMAIN and node.op_type in STATIC_KERNEL_OPS:
                refusal = _kernel_refusal(node)
                if not refusal:
                    logger.info("%s %r: fused TIR kernel", node.op_type, node.name)
                    node.op_type += _STATIC_MARK  # no function of that name: kept as is
                else:
                    inline = True
                    logger.warning(
                        "%s %r: %s, no fused kernel: compiled from its ONNX function body",
                        node.op_type,
                        node.name,
                        refusal,
                    )
        if inline:
            work.functions.update(held)
            _optimize(work)
            for key in held:
                work.functions.pop(key, None)
    ir.passes.common.RemoveUnusedNodesPass()(work)
    _widen_4bit_initializers(work)
    expand_losses(work)
    unroll_loops(work)
    _expand_blocked_dequantize(work)
    for node in list(ir.traversal.RecursiveGraphIterator(work.graph)):
        if node.domain == DOMAIN and node.op_type == "FusedCrossEntropy" + _STATIC_MARK:
            _drop_unused_log_prob(node)
    for node in ir.traversal.RecursiveGraphIterator(work.graph):
        if node.domain == DOMAIN:
            if node.op_type.endswith(_STATIC_MARK):
                renamed = STATIC_KERNEL_OPS[node.op_type.removesuffix(_STATIC_MARK)]
            else:
                renamed = f"{DOMAIN}::{node.op_type}"
            if renamed not in CUSTOM_OPS and renamed not in STATIC_KERNEL_OPS.values():
                raise InputError(f"{DOMAIN} op {node.op_type!r} has no TVM lowering")
            node.op_type, node.domain = renamed, ""
    work.opset_imports.pop(DOMAIN, None)
    if int8_matmul:
        from rewriter.backends.tvm.relax_passes import qdq_matmul  # imports tvm (the kernel's)

        qdq_matmul.fuse(work)
    return ir.serde.serialize_model(work)


def _optimize(work: ir.Model) -> None:
    """onnxscript's optimizer (folding, local-function inlining), ConstantOfShape folded."""
    from onnxscript.optimizer._optimizer import optimize_ir

    # The folder logs a warning for every node it tries and cannot evaluate (shape ops
    # on symbolic dims); those nodes are simply left to TVM's importer.
    folding_logger = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_logger.level
    folding_logger.setLevel(logging.ERROR)
    try:
        optimize_ir(work, should_fold=_fold_constant_of_shape)
    finally:
        folding_logger.setLevel(level)


def _static_4d(node: ir.Node) -> bool:
    """Whether Q, K, V of ``node`` are static 4-D float32 and its mask static (or absent)."""
    if len(node.inputs) < 3 or any(value is None for value in node.inputs[:3]):
        return False
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        shape = value.shape
        if shape is None or not all(isinstance(dim, int) for dim in shape):
            return False
        if value.dtype != ir.DataType.FLOAT or (index < 3 and len(shape) != 4) or len(shape) > 4:
            return False
    return True


def _kernel_refusal(node: ir.Node) -> str:
    """Why our kernel cannot take ``node`` (one of STATIC_KERNEL_OPS), or "" when it can."""
    if node.op_type == "SigmoidAttention":
        return "" if _static_4d(node) else "shapes not static 4-D float32"
    labels = 2 if node.op_type == "FusedLinearCrossEntropy" else 1
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        shape = value.shape
        if shape is None or not all(isinstance(dim, int) for dim in shape):
            return f"input {index} has no static shape"
        wanted = (
            (ir.DataType.INT64, ir.DataType.INT32) if index == labels else (ir.DataType.FLOAT,)
        )
        if value.dtype not in wanted:
            return f"input {index} is {value.dtype}, not {' or '.join(str(w) for w in wanted)}"
    if len(node.inputs) <= labels or node.inputs[0] is None or node.inputs[labels] is None:
        return "missing inputs"
    if node.op_type == "FusedLinearCrossEntropy" and (
        node.inputs[1] is None or len(node.inputs[1].shape or ()) != 2
    ):
        return "the weight is not 2-D"
    return ""


def _drop_unused_log_prob(node: ir.Node) -> None:
    """Replace ``node`` (a FusedCrossEntropy) by one without its second output when nothing
    reads it, so that the kernel does not write the log-probabilities."""
    log_prob = node.outputs[1] if len(node.outputs) > 1 else None
    if log_prob is None or log_prob.uses() or log_prob.is_graph_output():
        return
    graph = node.graph
    assert graph is not None
    new = ir.node(
        node.op_type,
        list(node.inputs),
        attributes=dict(node.attributes),
        domain=node.domain,
        name=node.name,
        num_outputs=1,
    )
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
    )


_WIDER = {ir.DataType.INT4: ir.DataType.INT8, ir.DataType.UINT4: ir.DataType.UINT8}


def _widen_4bit_initializers(model: ir.Model) -> None:
    """Store int4/uint4 initializers (``quantize`` weights, zero points) as int8/uint8.

    TVM's importer copies packed 4-bit tensors with the byte size of an unpacked one
    and fails; DequantizeLinear gives the same values from the 8-bit form.
    """
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _WIDER:
            continue
        wide = _WIDER[tensor.dtype]
        value.const_value = ir.Tensor(tensor.numpy().astype(wide.numpy()), name=value.name)
        value.dtype = wide


def _expand_blocked_dequantize(model: ir.Model) -> None:
    """Rewrite blocked ``DequantizeLinear`` (per-group scales) of constant weights.

    TVM's importer has no blocked quantization; ``(x - zero_point) * scale`` with the
    scales repeated over each block computes the same weights with standard ops.
    """
    for node in list(model.graph):
        block = node.attributes.get_int("block_size", 0) if node.op_type == "DequantizeLinear" else 0
        if not block or any(v is None or v.const_value is None for v in node.inputs):
            continue
        axis = node.attributes.get_int("axis", 1)
        x, scale = node.inputs[0].const_value.numpy(), node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        zero = node.inputs[2].const_value.numpy() if len(node.inputs) > 2 else np.zeros_like(scale)  # type: ignore[union-attr]
        full_scale = _repeat_blocks(scale, block, axis, x.shape[axis]).astype(scale.dtype)
        full_zero = _repeat_blocks(zero.astype(np.float32), block, axis, x.shape[axis]).astype(scale.dtype)
        name = node.outputs[0].name or "dequantized"
        scale_value = ir.Value(name=f"{name}_scale_full", const_value=ir.Tensor(full_scale, name=f"{name}_scale_full"))
        zero_value = ir.Value(name=f"{name}_zero_full", const_value=ir.Tensor(full_zero, name=f"{name}_zero_full"))
        model.graph.register_initializer(scale_value)
        model.graph.register_initializer(zero_value)
        cast = ir.node("Cast", [node.inputs[0]], attributes={"to": _dtype_of(full_scale)})
        shifted = ir.node("Sub", [cast.outputs[0], zero_value])
        scaled = ir.node("Mul", [shifted.outputs[0], scale_value])
        model.graph.insert_before(node, [cast, shifted, scaled])
        ir.convenience.replace_all_uses_with(node.outputs[0], scaled.outputs[0])
        if node.outputs[0].is_graph_output():
            model.graph.outputs[model.graph.outputs.index(node.outputs[0])] = scaled.outputs[0]
        model.graph.remove(node, safe=True)


def _repeat_blocks(values: np.ndarray, block: int, axis: int, size: int) -> np.ndarray:
    """Repeat each entry ``block`` times along ``axis``, cut to ``size`` (a last partial block)."""
    return np.repeat(values, block, axis=axis).take(np.arange(size), axis=axis)


def _dtype_of(array: np.ndarray) -> ir.DataType:
    return ir.DataType.from_numpy(array.dtype)


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """Let the optimizer fold ``ConstantOfShape`` (it keeps it by default) when small."""
    if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        if shape is not None:
            size = reduce(lambda a, b: a * int(b), shape.numpy().tolist(), 1)
            return size <= 1 << 16
    return None


def _fix_dims(model: ir.Model, dims: Mapping[str, int]) -> None:
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        fixed: list[int | ir.SymbolicDim] = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                fixed.append(dim)
            elif f"{value.name}.{axis}" in dims:
                fixed.append(int(dims[f"{value.name}.{axis}"]))
            elif dim.value is not None and dim.value in dims:
                fixed.append(int(dims[dim.value]))
            else:
                fixed.append(dim)
        value.shape = ir.Shape(fixed)


def input_signature(proto: onnx.ModelProto) -> list[tuple[str, list[int | str | None], str]]:
    """``(name, shape, numpy dtype)`` of each graph input that is not an initializer."""
    initializers = {init.name for init in proto.graph.initializer}
    signature = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape: list[int | str | None] = [
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in tensor.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        signature.append((value.name, shape, dtype))
    return signature


def import_onnx(
    model: ModelLike,
    *,
    target: tvm.target.Target,
    dims: Mapping[str, int] | None = None,
    kernel: KernelFactory | None = None,
    int8_matmul: bool | None = None,
) -> tvm.IRModule:
    """Import ``model`` into a Relax module, our ops as ``call_tir`` to our kernels.

    ``kernel`` replaces the kernel factory (default
    :func:`rewriter.backends.tvm.kernels.softmax.two_pass_softmax`); it is called as
    ``kernel(rows, cols, dtype=..., log=..., target=...)`` and returns a PrimFunc with
    parameters ``(X[rows, cols], Y[rows, cols])``. ``int8_matmul`` (default: whether
    ``target`` has AVX-512 VNNI) runs QDQ MatMuls as integer matmuls (see :func:`prepare`).

    >>> mod = import_onnx("model_tp.onnx", target=resolve("avx512"))  # doctest: +SKIP
    >>> any(gv.name_hint.startswith(KERNEL_PREFIX) for gv in mod.get_global_vars())  # doctest: +SKIP
    True
    """
    if int8_matmul is None:
        from rewriter.backends.tvm.kernels import int8_matmul as int8_kernel

        int8_matmul = int8_kernel.supported(target)
    proto = prepare(
        model, dims=dims, fuse_loss=target.kind.name != "cuda", int8_matmul=int8_matmul
    )
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _importer_class()(target=target, kernel=kernel or default_kernel())
    with warnings.catch_warnings():
        # The importer warns about every renamed input and unknown dimension.
        warnings.simplefilter("ignore")
        try:
            return importer.from_onnx(proto.graph, opset)
        except Exception as exc:
            if type(exc).__name__ == "OpNotImplemented":
                raise InputError(f"TVM cannot import the model: {exc}") from exc
            raise


def default_kernel() -> KernelFactory:
    """The two-pass softmax kernel factory; see :func:`rewriter.backends.lowering.default_kernel`."""
    from rewriter.backends import lowering

    return lowering.default_kernel()


_IMPORTER: type | None = None


def _bounds_safe_take(bb: Any, expr: Any) -> Any:
    """TVM lowers ONNX Gather to ``take(mode="fast")``, which reads out of bounds (and can
    crash the process) on an invalid index such as a token id past the vocabulary; a
    deployed library must not. ``mode="clip"`` costs a clamp per index."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.take") and expr.attrs.mode == "fast":
        return bb.normalize(relax.op.take(expr.args[0], expr.args[1], expr.attrs.axis, mode="clip"))
    return expr


def _importer_class() -> type:
    """TVM's ``ONNXGraphImporter`` with our ops added (built on first use: tvm is lazy)."""
    global _IMPORTER
    if _IMPORTER is not None:
        return _IMPORTER
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from rewriter.backends import lowering, lowering_attention, lowering_loss
    from rewriter.backends.tvm.relax_passes import qdq_matmul

    ours_ops = {*CUSTOM_OPS, *STATIC_KERNEL_OPS.values(), qdq_matmul.OP_TYPE}
    loss_ops = {STATIC_KERNEL_OPS[op] for op in LOSS_OPS}

    class Importer(ONNXGraphImporter):
        def __init__(self, *, target: tvm.target.Target, kernel: KernelFactory) -> None:
            super().__init__(
                shape_dict={}, dtype_dict={}, keep_params_in_input=False, sanitize=True
            )
            self._target = target
            self._kernel = kernel

        def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
            ours = onnx.GraphProto()
            ours.CopyFrom(graph)
            kept = [node for node in ours.node if node.op_type not in ours_ops]
            del ours.node[:]
            ours.node.extend(kept)
            super()._check_for_unsupported_ops(ours)

        def _convert_operator(
            self, op_name: str, inputs: list, attrs: dict, opset: int
        ) -> relax.Expr:
            if op_name == STATIC_KERNEL_OPS["SigmoidAttention"]:
                return lowering_attention.emit_sigmoid_attention(
                    self.bb,
                    inputs[0],
                    inputs[1],
                    inputs[2],
                    inputs[3] if len(inputs) > 3 else None,
                    scale=float(attrs.get("scale", 1.0)),
                    bias=float(attrs.get("bias", 0.0)),
                    target=self._target,
                )
            if op_name == qdq_matmul.OP_TYPE:
                return qdq_matmul.emit_int8_matmul(self.bb, inputs, target=self._target)
            if op_name in loss_ops:
                return self._emit_loss(op_name, inputs, attrs)
            if op_name == "Gather":
                return _bounds_safe_take(self.bb, super()._convert_operator(op_name, inputs, attrs, opset))
            if op_name not in CUSTOM_OPS:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            return lowering.emit_two_pass_softmax(
                self.bb,
                inputs[0],
                log=CUSTOM_OPS[op_name],
                target=self._target,
                kernel=self._kernel,
            )

        def _emit_loss(self, op_name: str, inputs: list, attrs: dict) -> relax.Expr:
            args = list(inputs) + [None] * 5
            if op_name == STATIC_KERNEL_OPS["FusedCrossEntropy"]:
                return lowering_loss.emit_cross_entropy(
                    self.bb,
                    args[0],
                    args[1],
                    args[2],
                    attrs,
                    log_prob=attrs["tvm_custom"]["num_outputs"] > 1,
                    target=self._target,
                )
            return lowering_loss.emit_linear_cross_entropy(
                self.bb, args[0], args[1], args[2], args[3], args[4], attrs, target=self._target
            )

    _IMPORTER = Importer
    return Importer
