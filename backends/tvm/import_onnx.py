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
   ``ai.rewriter`` node that has a lowering of ours (:mod:`rewriter.backends.tvm.ops`,
   by op type) to ``ai.rewriter::<OpType>`` (its model-local function body is dropped,
   not inlined; ops without a lowering yet are inlined from their function body and
   logged), and a subclass of TVM's ``ONNXGraphImporter`` that overrides only
   ``_convert_operator`` and ``_check_for_unsupported_ops`` hands those nodes to their
   lowering (``R.call_tir`` of our TIR kernel). A lowering whose kernel needs static
   shapes (``SigmoidAttention``, the fused losses) says which nodes it refuses once the
   shapes are inferred, and those are inlined from their function body; one that is
   CPU-only (the losses) is inlined on GPU targets; ``prepare(fuse_attention=False,
   fuse_loss=False)`` inline them too. Which path each node takes is logged. Nothing
   global is patched.

>>> mod = import_onnx("model_tp.onnx", target=resolve("avx512"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from rewriter import input_sizes
from rewriter.backends.tvm import (
    attention_fusion,
    einsum,
    grid_sample,
    ops,
    recurrent,
    shape_ops,
    shape_values,
    spectral,
    standard_functions,
)
from rewriter.backends.tvm.ops import KernelFactory
from rewriter.backends.tvm.relax_passes import dims_of, in_placeholder_vars, onnx_simplify
from rewriter.backends.tvm.relax_passes.loss_decompose import expand_losses
from rewriter.backends.tvm.relax_passes.unroll import unroll_loops
from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN

if TYPE_CHECKING:
    import tvm
    from tvm import relax

logger = logging.getLogger(__name__)

# The largest max_output_boxes_per_class of a NonMaxSuppression over a box count known
# only at run time that TVM may size its output by (int32, and 2**20 boxes per class of
# 3 int64 indices is 24 MiB per class).
MAX_NMS_BOXES = 1 << 20
# ONNX ops TVM's importer lacks, converted by rewriter.backends.tvm.recurrent.
RECURRENT = frozenset(recurrent.KERNEL_NAMES)
# ONNX ops TVM's importer lacks, converted here (and by the modules named above).
OWN_CONVERTERS = RECURRENT | spectral.OPS | {"Col2Im"}

# Appended to the op type of a node that gets a static-shape kernel, while prepare runs
# the optimizer again: no function has that name, so the node is kept as it is.
_STATIC_MARK = "__static_kernel"

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model


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
    int8_amx: bool = False,
    gpu: bool = False,
) -> onnx.ModelProto:
    """Clean ``model`` up for TVM's importer; returns a new proto.

    ``dims`` fixes symbolic input dimensions by name (``{"batch": 1, "sequence":
    128}``) or by ``input.axis`` (``{"input_ids.1": 128}``); fixed shapes let every
    shape computation fold to a constant.

    ``fuse_attention=False`` inlines ``SigmoidAttention`` from its function body (the
    fused kernels exist for CPU and CUDA targets; this is for other backends and tests)
    and leaves ``TwoPassSoftmax`` attention unfused; by default a static float32 one
    becomes one fused kernel on CPU targets (:mod:`rewriter.backends.tvm.attention_fusion`).
    ``fuse_loss=False`` inlines ``FusedCrossEntropy``/``FusedLinearCrossEntropy`` from
    their function bodies. ``gpu=True`` (a GPU target) inlines the ops whose kernels are
    CPU only (the losses).

    ``int8_matmul=True`` rewrites QDQ MatMuls (int8 activations and weights) into
    integer matmuls (:func:`rewriter.backends.tvm.relax_passes.qdq_matmul.fuse`), their weights
    packed for the AMX kernel with ``int8_amx``; :func:`import_onnx` sets them for targets
    with AVX-512 VNNI or AMX-INT8.

    >>> proto = prepare("bert.onnx", dims={"batch": 1, "sequence": 128})  # doctest: +SKIP
    """
    work = to_ir(model)
    input_names = [value.name or "" for value in work.graph.inputs]
    if dims:
        _fix_dims(work, dims)
    # Ops with a kernel of ours lose their function body here; the others keep it and
    # the optimizer inlines it into standard ops (said in the log: no fused kernel yet).
    # Ops whose kernel needs static shapes keep their body aside until the optimizer
    # has inferred the shapes of their inputs.
    options = {"fuse_attention": fuse_attention, "fuse_loss": fuse_loss}
    held: dict[ir.OperatorIdentifier, ir.Function] = {}
    if any(key[0] == DOMAIN for key in work.functions):
        # Shapes through our ops while their bodies still say them: once a body is gone,
        # nothing past the op has a shape (and the int8 matmuls after a TwoPassSoftmax,
        # which need static shapes, stayed in float).
        ir.passes.common.ShapeInferencePass(strict_mode=False)(work)
    for key in [key for key in work.functions if key[0] == DOMAIN]:
        lowering = ops.lowering(key[1])
        if lowering is None or not lowering.wanted(options, gpu=gpu):
            logger.warning("%s has no TVM kernel yet: compiled from its ONNX function body", key[1])
        elif lowering.refusal is None:
            del work.functions[key]
        else:
            held[key] = work.functions.pop(key)
    standard_functions.expand(work, converters())
    _optimize(work)
    recurrent.fold_weights(work)
    if held:
        inline = False
        for node in ir.traversal.RecursiveGraphIterator(work.graph):
            lowering = ops.lowering(node.op_type) if node.domain == DOMAIN else None
            if lowering is not None and lowering.refusal is not None:
                refusal = lowering.refusal(node)
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
    if fuse_attention and not gpu and attention_fusion.fuse(work):
        _optimize(work)  # the fused ops' operands: shape arithmetic that folds
    ir.passes.common.RemoveUnusedNodesPass()(work)
    logger.debug("simplified for the importer: %s", onnx_simplify.simplify(work))
    _widen_4bit_initializers(work)
    expand_losses(work)
    if unroll_loops(work):  # the copied bodies fold (their iteration number is a constant now)
        _optimize(work)
    _expand_blocked_dequantize(work)
    for node in list(ir.traversal.RecursiveGraphIterator(work.graph)):
        lowering = ops.lowering(node.op_type.removesuffix(_STATIC_MARK))
        if node.domain != DOMAIN or lowering is None or lowering.before_import is None:
            continue
        if node.op_type.endswith(_STATIC_MARK) or lowering.refusal is None:  # gets the kernel
            lowering.before_import(node)
    for node in ir.traversal.RecursiveGraphIterator(work.graph):
        if node.domain == DOMAIN:
            op_type = node.op_type.removesuffix(_STATIC_MARK)
            if ops.lowering(op_type) is None:
                raise InputError(f"{DOMAIN} op {node.op_type!r} has no TVM lowering")
            node.op_type, node.domain = ops.renamed(op_type), ""
    work.opset_imports.pop(DOMAIN, None)
    if int8_matmul:
        from rewriter.backends.tvm.relax_passes import qdq_matmul  # imports tvm (the kernel's)

        qdq_matmul.fuse(work, amx=int8_amx)
    _restore_input_names(work.graph, input_names)
    return ir.serde.serialize_model(work)


def converters() -> frozenset[str]:
    """The default-domain ops the importer converts: TVM's converters and ours
    (:data:`OWN_CONVERTERS`)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map()) | OWN_CONVERTERS


def _restore_input_names(graph: ir.Graph, names: list[str]) -> None:
    """Give the graph inputs their names back where onnxscript's optimizer changed them.

    Its ``OutputFixPass`` renames an input that is also a graph output (a model that
    returns an input as it is: ``x`` -> ``x_orig``) and copies it to the output by an
    Identity; the library then asked its callers for ``x_orig``. The Identity goes
    again, the output is the input itself (TVM returns the argument; the library copies
    it into a buffer of its own: ``outputs_as_params``)."""
    if len(graph.inputs) != len(names):
        return
    for value, name in zip(graph.inputs, names, strict=True):
        if not name or value.name == name:
            continue
        for index, output in enumerate(graph.outputs):
            producer = output.producer()
            if (
                output.name == name
                and producer is not None
                and producer.op_type == "Identity"
                and producer.inputs[0] is value
                and not output.uses()
            ):
                graph.outputs[index] = value
                graph.remove(producer, safe=True)
                value.name = name
                break


# onnxscript rewrite rules that break a model: Flatten2Reshape names the Shape it inserts
# after its input ("x/shape_1"), so two Flattens of one tensor insert two values of one
# name and a Reshape reads one that no node produces (BART's TorchScript export flattens
# its attention mask in the encoder and the decoder: a KeyError at import). TVM imports
# Flatten as it is.
_BROKEN_REWRITE_RULES = frozenset({"Flatten2Reshape"})


def _optimize(work: ir.Model) -> None:
    """onnxscript's optimizer (folding, local-function inlining), ConstantOfShape folded,
    without the rewrite rules in :data:`_BROKEN_REWRITE_RULES`."""
    from onnxscript import rewriter as onnx_rewriter
    from onnxscript.optimizer._optimizer import optimize_ir

    # The folder logs a warning for every node it tries and cannot evaluate (shape ops
    # on symbolic dims), and the deduplication one for every initializer that is also a
    # graph input (old Caffe2 exports: hundreds of lines); both leave the model right.
    quiet = [
        logging.getLogger("onnxscript.optimizer._constant_folding"),
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication"),
    ]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    rules = onnx_rewriter._DEFAULT_REWRITE_RULES  # optimize_ir reads them at each call
    onnx_rewriter._DEFAULT_REWRITE_RULES = tuple(
        rule for rule in rules if getattr(rule, "name", None) not in _BROKEN_REWRITE_RULES
    )
    try:
        optimize_ir(work, should_fold=_fold_constant_of_shape)
        if _fold_static_sizes(work):  # what they feed (float shape arithmetic) folds now
            optimize_ir(work, should_fold=_fold_constant_of_shape)
    finally:
        onnx_rewriter._DEFAULT_REWRITE_RULES = rules
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _fold_static_sizes(work: ir.Model) -> int:
    """Replace each ``Gather(Shape(x), i)`` with a scalar constant ``i`` (TorchScript's
    ``x.size(i)``) by ``x``'s size ``i`` where that is static; returns how many.

    onnxscript's folder takes such a Gather of a 1-D index only. With the batch symbolic,
    the rest of ``Shape(x)`` is unknown, and what is computed from a static size
    (MobileViT's ``ceil(h / 2) * 2`` in floats, for a Reshape into patches) stayed
    tensors, which TVM's Reshape refuses ("requires the input new shape to be Shape")."""
    folded = 0
    for node in list(ir.traversal.RecursiveGraphIterator(work.graph)):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        source, index = node.inputs
        producer = source.producer() if source is not None else None
        if producer is None or producer.op_type != "Shape" or producer.domain not in ("", "ai.onnx"):
            continue
        axis = node.attributes.get_int("axis", 0)
        position = index.const_value if index is not None else None
        data = producer.inputs[0]
        if axis != 0 or position is None or position.numpy().ndim != 0 or data is None or data.shape is None:
            continue
        if node.outputs[0].is_graph_output() or node.graph is None:
            continue
        start = producer.attributes.get_int("start", 0)
        end = producer.attributes.get_int("end", None)
        dims = list(data.shape)[start:end]
        at = int(position.numpy())
        if not -len(dims) <= at < len(dims) or not isinstance(dims[at], int):
            continue
        constant = ir.node(
            "Constant", [], attributes={"value": ir.tensor(np.array(dims[at], np.int64))}
        )
        node.graph.insert_before(node, constant)
        ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
        folded += 1
    return folded


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

    ``kernel`` replaces the two-pass softmax kernel factory (default
    :func:`rewriter.backends.tvm.kernels.softmax.two_pass_softmax`); it is called as
    ``kernel(rows, cols, dtype=..., log=..., target=...)`` and returns a PrimFunc with
    parameters ``(X[rows, cols], Y[rows, cols])``. ``int8_matmul`` (default: whether
    ``target`` has AVX-512 VNNI or AMX-INT8) runs QDQ MatMuls as integer matmuls (see
    :func:`prepare`), with the AMX kernel where the target has AMX-INT8.

    >>> mod = import_onnx("model_tp.onnx", target=resolve("avx512"))  # doctest: +SKIP
    >>> any(gv.name_hint.startswith("rewriter_two_pass") for gv in mod.get_global_vars())  # doctest: +SKIP
    True
    """
    from rewriter.backends.tvm.kernels import amx_matmul
    from rewriter.backends.tvm.kernels import int8_matmul as int8_kernel

    amx = amx_matmul.supported(target, "int8")
    if int8_matmul is None:
        int8_matmul = amx or int8_kernel.supported(target)
    gpu = target.kind.name == "cuda"
    proto = prepare(model, dims=dims, gpu=gpu, int8_matmul=int8_matmul, int8_amx=amx)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _importer_class()(target=target, kernel=kernel, smallest=smallest_sizes(proto))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The importer warns about every renamed input and unknown dimension, and prints
        # "Error converting operator ..." before it re-raises (our errors say it).
        warnings.simplefilter("ignore")
        try:
            mod = importer.from_onnx(proto.graph, opset)
        except Exception as exc:
            if type(exc).__name__ == "OpNotImplemented":
                raise InputError(f"TVM cannot import the model: {exc}") from exc
            raise
    largest = importer.largest_sizes()
    return _with_largest(mod, largest) if largest else mod


def _with_largest(mod: tvm.IRModule, largest: Mapping[str, int]) -> tvm.IRModule:
    """``mod`` with ``main`` stating the largest size of each input dimension the model's
    fixed-length tables take (:data:`LARGEST_SIZES`)."""
    mod["main"] = mod["main"].with_attr(LARGEST_SIZES, {name: int(bound) for name, bound in largest.items()})
    return mod


def largest_sizes(mod: tvm.IRModule) -> dict[str, int]:
    """The largest size of each input dimension (by name) at which the imported model
    reads its fixed-length tables in bounds (BERT's 512 positions: ``{"sequence":
    512}``); ONNX Runtime fails past it, and the library refuses it. Empty where none."""
    attrs = mod["main"].attrs
    if attrs is None or LARGEST_SIZES not in attrs:
        return {}
    return {str(name): int(bound) for name, bound in attrs[LARGEST_SIZES].items()}



_IMPORTER: type | None = None
# The attribute of the imported ``main`` that holds :func:`largest_sizes`.
LARGEST_SIZES = "rewriter_largest_sizes"


def _bounds_safe_take(bb: Any, expr: Any) -> Any:
    """TVM lowers ONNX Gather to ``take(mode="fast")``, which reads out of bounds (and can
    crash the process) on an invalid index such as a token id past the vocabulary; a
    deployed library must not. ``mode="clip"`` costs a clamp per index."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.take") and expr.attrs.mode == "fast":
        return bb.normalize(relax.op.take(expr.args[0], expr.args[1], expr.attrs.axis, mode="clip"))
    return expr


# Ops through which a tensor of positions keeps its values (reshaped, broadcast, cast).
_POSITIONS_KEPT = ("relax.expand_dims", "relax.reshape", "relax.broadcast_to", "relax.astype", "relax.squeeze")


def _limit_by_positions(bb: Any, inputs: list, attrs: dict, sizes: shape_values.Sizes) -> None:
    """A ``Gather`` from a table of fixed length by positions ``start .. end - 1`` (an
    ``arange`` of the sizes, as :func:`shape_values.symbolic_range` reads ``Range``:
    GPT-2's 1024 learned positions at ``arange(sequence)``) bounds ``end`` by the table's
    length (:meth:`Sizes.limit`): past it ONNX Runtime fails on the index, and the clamped
    take would repeat the last row."""
    import tvm
    from tvm import relax

    shape = getattr(getattr(inputs[0], "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not shape.values:
        return
    extent = shape.values[int(attrs.get("axis", 0)) % len(shape.values)]
    positions = _arange(bb, inputs[1])
    if not isinstance(extent, tvm.tirx.IntImm) or positions is None:
        return
    start, end = positions
    if sizes.can_prove(start >= 0) and not sizes.can_prove(end <= extent):
        sizes.limit(end, int(extent))


def _arange(bb: Any, expr: Any, depth: int = 0) -> tuple[Any, Any] | None:
    """``(start, end)`` where ``expr`` holds ``arange(start, end)`` (step 1), reshaped,
    broadcast or cast; None otherwise."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var) and depth < 16:
        bound = bb.lookup_binding(expr)
        return None if bound is None else _arange(bb, bound, depth + 1)
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op) or depth >= 16:
        return None
    if expr.op.name in _POSITIONS_KEPT:
        return _arange(bb, expr.args[0], depth + 1)
    if expr.op.name in ("relax.add", "relax.subtract"):  # BART's positions, offset by 2
        operand, shift = expr.args[0], _integer_scalar(expr.args[1])
        if shift is None and expr.op.name == "relax.add":  # 2 + arange(...)
            operand, shift = expr.args[1], _integer_scalar(expr.args[0])
        positions = None if shift is None else _arange(bb, operand, depth + 1)
        if positions is None or shift is None:
            return None
        shift = shift if expr.op.name == "relax.add" else -shift
        return positions[0] + shift, positions[1] + shift
    if expr.op.name == "relax.arange" and isinstance(step := expr.args[2], tvm.tirx.IntImm) and int(step) == 1:
        return expr.args[0], expr.args[1]
    return None


def _integer_scalar(expr: Any) -> int | None:
    """The value of an integer constant of one element, or None."""
    import tvm

    if not isinstance(expr, tvm.ir.GenericConst) or shape_values.dtype_of(expr) not in ("int32", "int64"):
        return None
    read = shape_values.prim_values(None, expr, max_elements=1)
    return int(read[0]) if read and isinstance(read[0], tvm.tirx.IntImm) else None


def _gather_elements(bb: Any, inputs: list, attrs: dict) -> Any | None:
    """``GatherElements`` as one kernel that wraps a negative index, clamps it (as
    :func:`_bounds_safe_take` does for ``Gather``) and reads an index that is an
    ``Expand`` of a smaller one through its broadcast. TVM's converter first builds the
    data's shape as a tensor, then a ``less``, an ``add`` and a ``where`` over the whole
    index: over symbolic sizes four kernels and a copy of the index per call, and a
    broadcast index copied to the output's shape (DeBERTa's relative positions, [sequence,
    sequence], expanded to [batch x heads, sequence, sequence] twice per layer: 4 MiB of
    int64 written and read again per gather at batch 8). None where the shapes are not
    known ranks (TVM's converter then)."""
    import tvm
    from tvm import relax, te, tirx

    data, indices = inputs[0], inputs[1]
    shape = getattr(getattr(indices, "ty", None), "shape", None)
    data_shape = getattr(getattr(data, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not isinstance(data_shape, relax.ShapeExpr):
        return None
    out_shape = list(shape.values)
    axis = attrs.get("axis", 0) % len(out_shape)
    # The importer hands over a value as the call that makes it, or as a bound variable.
    binding = bb.lookup_binding(indices) if isinstance(indices, relax.Var) else indices
    if (
        isinstance(binding, relax.Call)
        and binding.op == tvm.ir.Op.get("relax.broadcast_to")
        and _broadcasts_by_ones(getattr(binding.args[0].ty, "shape", None), out_shape)
    ):
        indices = binding.args[0]  # read through the broadcast

    def gather(values: te.Tensor, index: te.Tensor) -> te.Tensor:
        extent = values.shape[axis]
        lead = len(out_shape) - len(index.shape)

        def element(*at: Any) -> Any:
            read = [
                tirx.const(0, "int64") if isinstance(dim, tirx.IntImm) and dim.value == 1 else at[lead + i]
                for i, dim in enumerate(index.shape)
            ]
            position = index[tuple(read)].astype("int64")
            if not str(index.dtype).startswith("uint"):
                position = tirx.Select(position < 0, position + extent, position)
            position = tirx.max(tirx.min(position, extent - 1), tirx.const(0, "int64"))
            return values[tuple(position if i == axis else at[i] for i in range(len(at)))]

        return te.compute(out_shape, element, name="gather_elements")

    return bb.normalize(bb.call_te(gather, data, indices, primfunc_name_hint="gather_elements"))


def _broadcasts_by_ones(source: Any, target: list[Any]) -> bool:
    """Whether ``source`` (a ShapeExpr) broadcasts to ``target`` only along its dimensions
    of a constant 1: every other dimension is the target's own (a symbolic one that is 1
    only at run time cannot be read through)."""
    import tvm_ffi
    from tvm import relax, tirx

    if not isinstance(source, relax.ShapeExpr) or len(source.values) > len(target):
        return False
    lead = len(target) - len(source.values)
    return all(
        (isinstance(dim, tirx.IntImm) and dim.value == 1) or tvm_ffi.structural_equal(dim, target[lead + i])
        for i, dim in enumerate(source.values)
    )


def _is_shape(expr: Any) -> bool:
    from tvm import relax

    return isinstance(expr, relax.ShapeExpr)


def _reduce_shape(op_name: str, inputs: list, attrs: dict) -> Any:
    """ReduceMin/ReduceMax over a shape's values (``min(topk_candidates, boxes kept)`` in
    torchvision's detectors, where the count is data-dependent): ``tir.min``/``tir.max``
    of the dimensions, a one-value shape (``keepdims``) or a PrimValue. TVM's converter
    takes tensors only ("cannot handle ShapeExpr inputs")."""
    from tvm import relax, tirx

    values = list(inputs[0].values)
    combine = tirx.min if op_name == "ReduceMin" else tirx.max
    result = reduce(combine, values)
    if attrs.get("keepdims", 1):
        return relax.ShapeExpr([result])
    return relax.prim_value(result)


def _runtime_k(k: Any) -> bool:
    """Whether TopK's ``k`` is known only at run time (TVM's converter takes a constant)."""
    import tvm

    return not isinstance(k, tvm.ir.GenericConst)


def _topk_runtime_k(bb: Any, inputs: list, attrs: dict) -> Any:
    """TopK with a ``k`` known at run time: a sort along the axis (descending for
    ``largest``), the first ``k`` indices, and the values gathered at them; ``k`` is a
    shape, a PrimValue or a one-element int64 tensor (made a shape variable)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import _tensor_to_shape_expr

    data, k = inputs[0], inputs[1]
    if tvm.ir.is_prim_expr(k):
        k = relax.ShapeExpr([k])
    if not isinstance(k, relax.ShapeExpr):
        k = _tensor_to_shape_expr(bb, bb.normalize(relax.op.reshape(k, [1])), 1, "topk_k")
    if attrs.get("sorted", 1) != 1:
        raise InputError("TopK with sorted=0 and a k known only at run time: TVM's importer has no form for it")
    ndim = data.ty.ndim
    axis = attrs.get("axis", -1) % ndim
    order = bb.normalize(relax.op.argsort(data, axis=axis, descending=bool(attrs.get("largest", 1)), dtype="int64"))
    indices = bb.normalize(relax.op.strided_slice(order, axes=[axis], begin=[0], end=[k.values[0]]))
    values = bb.normalize(relax.op.gather_elements(data, indices, axis=axis))
    return relax.Tuple([values, indices])


def _narrow_float_scalar(result: Any, inputs: list) -> Any:
    """``result`` (an arithmetic op's) as a float32 scalar where TVM's converter computed
    it from float32 scalars as a Python float, a float64 ``R.prim_value``: sizes cast to
    float and divided (TorchScript's MViT scales its relative positions by
    ``Cast(size_q) / Cast(size_k)``), which a float32 tensor then could not be multiplied
    by ("Binary operators must have the same datatype")."""
    import tvm
    from tvm import tirx

    if not isinstance(result, tirx.FloatImm) or str(result.ty) != "float64":
        return result
    widths = {str(value.ty) for value in inputs if tvm.ir.is_prim_expr(value)}
    widths |= {str(value.ty.dtype) for value in inputs if isinstance(value, tvm.ir.GenericConst)}
    return tirx.const(result.value, "float32") if widths == {"float32"} else result


def _pad(bb: Any, inputs: list, attrs: dict, sizes: Any) -> Any | None:
    """A ``Pad`` (opset 11 on, no ``axes``, a constant value) in one of two forms of ours,
    else None (TVM's converter takes it, or refuses):

    * constant pads, constant mode: Relax's ``nn.pad``, whose layout the convolution pass
      carries channels-last (:func:`~rewriter.backends.tvm.relax_passes.conv.pads_as_pools`);
      TVM's converter emits the padding PrimFunc itself, which no later pass can read as
      a pad;
    * pads that are shape arithmetic (EnCodec's reflect pads, computed from the signal's
      length so that its frames divide it): one TE kernel that reads each output
      element's source, in ``constant`` (the value outside), ``reflect`` or ``edge``
      mode. TVM's converter refuses such pads ("Dynamic pads are not supported yet"),
      so the model kept no symbolic length."""
    import tvm
    from tvm import relax

    mode = ops.attribute_text(attrs.get("mode", b"constant"))
    if not 2 <= len(inputs) <= 3:
        return None
    pads, value = inputs[1], inputs[2] if len(inputs) == 3 else None
    if not (value is None or isinstance(value, tvm.ir.GenericConst)):
        return None
    fill = 0.0 if value is None else float(value.value.numpy().reshape(-1)[0])
    if not isinstance(pads, tvm.ir.GenericConst):
        if mode not in ("constant", "reflect", "edge"):
            return None
        widths = shape_ops.values(bb, pads, sizes)
        dims = dims_of(inputs[0])
        if widths is None or dims is None or len(widths) != 2 * len(dims):
            return None
        amounts, shape = widths, dims

        def kernel(x: Any) -> Any:
            # The widths in the placeholder's own copies of the shape's variables: the
            # caller's would be a second variable of the same name, and the output's
            # shape, in both, would not match its readers' when fused (FuseTIR).
            own = [in_placeholder_vars(width, shape, x.shape) for width in amounts]
            return _padded(x, own, mode, fill)

        # Named ``{mode}_pad``: conv_frames.after_computed_pad finds it by that name.
        return bb.normalize(bb.call_te(kernel, inputs[0], primfunc_name_hint=f"{mode}_pad"))
    if mode != "constant":
        return None
    widths = [int(width) for width in pads.value.numpy().reshape(-1)]
    rank = len(widths) // 2
    if getattr(inputs[0].ty, "ndim", -1) != rank:
        return None
    if not any(widths):
        return inputs[0]  # (Swin pads its windows by nothing where they divide the map)
    interleaved = [width for axis in range(rank) for width in (widths[axis], widths[rank + axis])]
    return bb.normalize(relax.op.nn.pad(inputs[0], interleaved, pad_value=fill))


def _padded(x: Any, widths: list, mode: str, fill: float) -> Any:
    """The TE compute of :func:`_pad`'s kernel: ``x`` padded by ``widths`` (ONNX order,
    TIR expressions) in ``mode``."""
    from tvm import te, tirx

    rank = len(x.shape)
    extents = [x.shape[axis] + widths[axis] + widths[rank + axis] for axis in range(rank)]

    def element(*index: Any) -> Any:
        source, inside = [], []
        for axis, position in enumerate(index):
            size, j = x.shape[axis], position - widths[axis]
            if mode == "reflect":  # ONNX: pads shorter than the axis
                j = tirx.if_then_else(j < 0, -j, tirx.if_then_else(j >= size, 2 * (size - 1) - j, j))
            else:
                inside += [j >= 0, j < size]
                j = tirx.max(tirx.min(j, size - 1), 0)
            source.append(j)
        read = x[tuple(source)]
        if mode != "constant":
            return read
        return tirx.if_then_else(tirx.all(*inside), read, tirx.const(fill, x.dtype))

    return te.compute(extents, element, name="pad")


def _col2im(bb: Any, inputs: list, attrs: dict) -> Any:
    """``Col2Im`` (opset 18: ``torch.nn.functional.fold``, MobileViTV2's patches back to
    a map) as one gather kernel: each output pixel sums the block entries that cover it,
    ``out[n, c, y, x] = Σ_ij in[n, (c·kh + i)·kw + j, by·nbw + bx]`` over the kernel
    offsets (i, j) with ``y + pad_top = by·stride + i·dilation`` (and so for x), so no two
    threads write one pixel. ``image_shape`` and ``block_shape`` must be constants."""
    import tvm
    from tvm import te, tirx

    data, image, block = inputs[:3]
    if not all(isinstance(value, tvm.ir.GenericConst) for value in (image, block)):
        raise InputError("Col2Im: image_shape and block_shape must be constants")
    height, width = (int(v) for v in image.value.numpy().reshape(-1))
    kh, kw = (int(v) for v in block.value.numpy().reshape(-1))
    dh, dw = attrs.get("dilations", [1, 1])
    sh, sw = attrs.get("strides", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    blocks_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    blocks_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1

    def fold(columns: te.Tensor) -> te.Tensor:
        batch, rows = columns.shape[0], columns.shape[1]
        i, j = te.reduce_axis((0, kh), "i"), te.reduce_axis((0, kw), "j")

        def pixel(n: Any, c: Any, y: Any, x: Any) -> Any:
            ty, tx = y + top - i * dh, x + left - j * dw
            by, bx = tirx.floordiv(ty, sh), tirx.floordiv(tx, sw)
            inside = tirx.all(
                ty >= 0, tirx.floormod(ty, sh) == 0, by < blocks_h,
                tx >= 0, tirx.floormod(tx, sw) == 0, bx < blocks_w,
            )
            read = columns[n, (c * kh + i) * kw + j, tirx.max(by, 0) * blocks_w + tirx.max(bx, 0)]
            return te.sum(tirx.if_then_else(inside, read, tirx.const(0, columns.dtype)), axis=[i, j])

        return te.compute((batch, rows // (kh * kw), height, width), pixel, name="col2im")

    return bb.normalize(bb.call_te(fold, data, primfunc_name_hint="col2im"))


def _clip(bb: Any, inputs: list, attrs: dict, opset: int) -> Any | None:
    """A float ``Clip`` as Relax's ``maximum`` and ``minimum`` ops; None for other types
    (TVM's converter takes them).

    TVM's converter emits ``topi.maximum``/``topi.minimum`` PrimFuncs itself, which the
    convolution pass cannot carry channels-last: MobileNetV2's ReLU6 (``Clip(x, 0, 6)``
    after every convolution but the projections) went back to channels-first between two
    transposes, out of the convolution's epilogue (a fifth of its time at batch 1). A bound
    that is absent or a constant NaN is none (as ONNX Runtime reads it); a computed bound
    is replaced by infinity where it is NaN, as TVM's converter does. Exact (the same
    comparisons)."""
    from tvm import relax

    x = inputs[0]
    dtype = str(getattr(x.ty, "dtype", ""))
    if not dtype.startswith("float"):
        return None
    if opset < 11:
        bounds = [relax.const(attrs[key], dtype) if key in attrs else None for key in ("min", "max")]
    else:
        bounds = [*inputs[1:3], None, None][:2]
    result = x
    for bound, op, unbounded in ((bounds[0], relax.op.maximum, -np.inf), (bounds[1], relax.op.minimum, np.inf)):
        if bound is None:
            continue
        value = ops.constant_value(bound)
        if value is not None and np.isnan(value).all():
            continue
        if value is None or np.isnan(value).any():
            bound = bb.emit(relax.op.where(relax.op.isnan(bound), relax.const(unbounded, dtype), bound))
        result = bb.emit(op(result, bound))
    return result


def _empty(value: Any) -> bool:
    """Whether ``value``'s shape has a static 0 (a tensor with no elements).

    Swin3D-T's TorchScript export builds its shifted-window mask with 54 ``ScatterND``s,
    one per window region; at a symbolic batch they are not folded, and where the shift
    is 0 along the clip's frames a region is empty: TVM's ``scatter_nd`` lowering then
    indexes modulo a zero extent, and the compile failed ("Divide by zero")."""
    from tvm import tirx

    dims = dims_of(value)
    return dims is not None and any(isinstance(d, tirx.IntImm) and int(d) == 0 for d in dims)


def _nms_box_limit(inputs: list) -> list:
    """NonMaxSuppression's inputs with ``max_output_boxes_per_class`` at most the number of
    boxes. TVM sizes its output by that limit (and makes an int32 literal of it), so
    torchvision's ``batched_nms`` export, whose limit is ``2**63 - 1``, would allocate
    terabytes: the limit becomes the boxes' count when their shape is fixed (the same
    result: no class keeps more boxes than there are), else the model is refused."""
    import tvm
    from tvm import relax

    limit = inputs[2] if len(inputs) > 2 else None
    if not isinstance(limit, tvm.ir.GenericConst):
        return inputs
    value = int(limit.value.numpy().reshape(-1)[0])
    shape = getattr(inputs[0].ty, "shape", None)
    boxes = shape[1] if shape is not None and len(shape) == 3 else None
    if isinstance(boxes, tvm.tirx.IntImm):
        if value > int(boxes):
            inputs = [*inputs[:2], relax.const(np.array([int(boxes)], dtype=np.int64)), *inputs[3:]]
        return inputs
    if value > MAX_NMS_BOXES:
        raise InputError(
            f"TVM cannot import the model: NonMaxSuppression with max_output_boxes_per_class {value} on boxes "
            "of a size known only at run time: TVM sizes its output by that limit (give the boxes a fixed "
            "count, or a smaller limit)"
        )
    return inputs


def smallest_sizes(proto: onnx.ModelProto) -> dict[str, int]:
    """The smallest size of each named symbolic input dimension at which the model's
    convolution and pooling windows all give an output (ONNX Runtime fails below it;
    :mod:`rewriter.input_sizes`), where that is more than 1.

    >>> smallest_sizes(onnx.load("wav2vec2.onnx"))  # doctest: +SKIP
    {'samples': 400}
    """
    axes: dict[str, list[tuple[str, int, int]]] = {}
    for name, shape, _ in input_signature(proto):
        for axis, dim in enumerate(shape):
            if isinstance(dim, str):
                axes.setdefault(dim, []).append((name, axis, len(shape)))
    smallest = {}
    for dim, where in axes.items():
        size = input_sizes.smallest_size(proto, where, start=1)
        if size is not None and size > 1:
            smallest[dim] = size
    return smallest


def _dimension_sizes(inputs: Any, smallest: Mapping[str, int]) -> dict[Any, int]:
    """Each symbolic dimension (a TIR variable) of the imported graph inputs with its
    smallest size: ``smallest``'s, else 0."""
    import tvm

    sizes: dict[Any, int] = {}
    for value in inputs:
        for dim in getattr(getattr(getattr(value, "ty", None), "shape", None), "values", None) or []:
            if isinstance(dim, tvm.tirx.Var):
                sizes[dim] = smallest.get(dim.name, 0)
    return sizes


class _OneNode:
    """A graph of one node, for TVM's node loop (which reads ``graph.node`` only)."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self.node = [node]


def _importer_class() -> type:
    """TVM's ``ONNXGraphImporter`` with our ops added (built on first use: tvm is lazy)."""
    global _IMPORTER
    if _IMPORTER is not None:
        return _IMPORTER
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    # Our ops by the name prepare gives them (ai.rewriter::<OpType>, default domain).
    ours = {lowering.renamed: lowering for lowering in ops.lowerings().values()}

    class Importer(ONNXGraphImporter):
        def __init__(
            self,
            *,
            target: tvm.target.Target,
            kernel: KernelFactory | None,
            smallest: Mapping[str, int] | None = None,
        ) -> None:
            super().__init__(
                shape_dict={}, dtype_dict={}, keep_params_in_input=False, sanitize=True
            )
            self._target = target
            self._kernel = kernel
            self._smallest = dict(smallest or {})
            self._sizes = shape_values.Sizes()

        def largest_sizes(self) -> dict[str, int]:
            """The largest sizes the import found (see :func:`largest_sizes`)."""
            return dict(self._sizes.largest)

        def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
            standard = onnx.GraphProto()
            standard.CopyFrom(graph)
            kept = [node for node in standard.node if node.op_type not in ours and node.op_type not in OWN_CONVERTERS]
            del standard.node[:]
            standard.node.extend(kept)
            super()._check_for_unsupported_ops(standard)

        def _construct_nodes(self, graph: onnx.GraphProto) -> None:
            # The graph inputs are parsed: their dimensions are TIR variables now.
            self._sizes = shape_values.Sizes(_dimension_sizes(self._inputs.values(), self._smallest))
            # TVM's node loop rejects an R.shape input of the ops whose converters do not
            # take one; each node gets such inputs as int64 tensors (see shape_ops), the
            # other nodes still see the R.shape.
            for node in graph.node:
                names = [name for name in node.input if name]
                tensors = shape_ops.as_tensors(self.bb, node.op_type, [self._nodes[name] for name in names])
                kept = {names[index]: self._nodes[names[index]] for index in tensors}
                self._nodes.update({names[index]: tensor for index, tensor in tensors.items()})
                try:
                    super()._construct_nodes(_OneNode(node))
                finally:
                    self._nodes.update(kept)

        def _convert_operator(
            self, op_name: str, inputs: list, attrs: dict, opset: int
        ) -> relax.Expr:
            lowering = ours.get(op_name)
            if lowering is not None:
                call = ops.OpCall(self.bb, inputs, attrs, self._target, self._kernel)
                return lowering.emit(call)
            inputs = shape_ops.operands(self.bb, op_name, inputs, attrs, self._sizes)
            lowered = shape_ops.lower(self.bb, op_name, inputs, self._sizes)
            if lowered is not None:
                return lowered
            if op_name == "Slice":
                sliced = shape_ops.symbolic_slice(self.bb, inputs, self._sizes)
                if sliced is None:
                    sliced = super()._convert_operator(op_name, inputs, attrs, opset)
                return shape_ops.unclamped_slice(self.bb, inputs, sliced, self._sizes)
            if op_name == "Range":
                # Shape arithmetic gives arange a size of the input dimensions, not a
                # fresh run-time variable (see shape_values).
                positions = shape_values.symbolic_range(self.bb, inputs, self._sizes)
                if positions is not None:
                    return positions
            if op_name in RECURRENT:
                return recurrent.convert(self.bb, op_name, inputs, attrs, self._target)
            if op_name == "Col2Im":
                return _col2im(self.bb, inputs, attrs)
            if op_name == "GridSample" and (
                sampled := grid_sample.convert(self.bb, inputs, attrs, self._target)
            ) is not None:
                return sampled
            if op_name == "Einsum" and (product := einsum.convert(self.bb, inputs, attrs)) is not None:
                return product
            if op_name in spectral.OPS:
                return spectral.convert(self.bb, inputs, attrs, opset, self._sizes)
            if op_name == "Gather":
                _limit_by_positions(self.bb, inputs, attrs, self._sizes)
                return _bounds_safe_take(self.bb, super()._convert_operator(op_name, inputs, attrs, opset))
            if op_name == "GatherElements" and (gathered := _gather_elements(self.bb, inputs, attrs)) is not None:
                return gathered
            if op_name in ("ReduceMin", "ReduceMax") and _is_shape(inputs[0]):
                return _reduce_shape(op_name, inputs, attrs)
            if op_name == "TopK" and len(inputs) > 1 and _runtime_k(inputs[1]):
                return _topk_runtime_k(self.bb, inputs, attrs)
            if op_name == "NonMaxSuppression":
                inputs = _nms_box_limit(inputs)
            if op_name == "Pad" and (padded := _pad(self.bb, inputs, attrs, self._sizes)) is not None:
                return padded
            if op_name == "Clip" and (clipped := _clip(self.bb, inputs, attrs, opset)) is not None:
                return clipped
            if op_name in ("ScatterND", "ScatterElements") and _empty(inputs[2]):
                return inputs[0]  # no update: the data as it is (TVM's lowering divides by 0)
            converted = super()._convert_operator(op_name, inputs, attrs, opset)
            if op_name in ("Add", "Sub", "Mul", "Div"):
                return _narrow_float_scalar(converted, inputs)
            return converted

    _IMPORTER = Importer
    return Importer
