"""Standard ONNX ops TVM's importer lacks, or reads as another op: written out as ONNX defines them.

Many ONNX ops are defined by a function of other ONNX ops (``Celu``, ``Swish``, the
windows, ``CenterCropPad``, and, from opset 23, ``Attention`` and ``RotaryEmbedding``,
which the dynamo exporter writes for ``scaled_dot_product_attention`` and rotary
embeddings at opset >= 23). TVM's importer has no converter for most of them, and it
converts a default-domain ``Attention`` as ONNX Runtime's ``com.microsoft`` contrib op
(packed QKV weights, a ``num_heads`` attribute): an opset-23 export failed to import with
``'num_heads'``.

:func:`expand` gives each such node a model-local function holding the op's definition
from ONNX's own schema (the version the model's opset selects; a context-dependent one
is built for the node's attributes and input types), so the optimizer inlines it into
ops TVM converts. An ``Attention`` that ``two-pass-softmax`` wrote out already reaches
the backend as ``MatMul``/``TwoPassSoftmax``/``MatMul`` and gets the fused kernel
(:mod:`rewriter.backends.tvm.attention_fusion`); one left as the operator is compiled
from its definition here, with TVM's softmax.

>>> expand(model, supported={"Add", "MatMul"})  # doctest: +SKIP
2
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import onnx
import onnx.defs
import onnx_ir as ir
import onnx_ir.passes.common

from rewriter.function_body import FunctionBody

logger = logging.getLogger(__name__)

# The domain of the functions expand adds (inlined by the optimizer, then gone).
DOMAIN = "ai.rewriter.onnx_definitions"
# Ops TVM's importer converts by a same-named op of another domain.
MISREAD = frozenset({"Attention"})


def expand(model: ir.Model, supported: Collection[str]) -> int:
    """Give each default-domain node of ``model``'s main graph whose op is not in
    ``supported`` (TVM's converters), or is in :data:`MISREAD`, and that ONNX defines
    by a function, a model-local function with that definition; returns how many.

    Nodes inside subgraphs keep their op (a model-local function is called from the main
    graph's level of the optimizer's inlining)."""
    opset = model.opset_imports.get("", 1)
    nodes = [
        (node, version)
        for node in model.graph
        if node.domain in ("", "ai.onnx")
        and (node.op_type not in supported or node.op_type in MISREAD)
        and (version := _definition_version(node.op_type, opset)) is not None
    ]
    if not nodes:
        return 0
    if any(dependent for _, (_, dependent) in nodes):
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)  # their input types
    imports = dict(model.opset_imports)
    count = 0
    for index, (node, version) in enumerate(nodes):
        try:
            function = _definition(node, opset, version)
        except (onnx.defs.SchemaError, RuntimeError, ValueError) as error:
            logger.warning("%s %r: ONNX's definition could not be built: %s", node.op_type, node.name, error)
            continue
        changed = _changed_signatures(function, opset)
        if changed:
            logger.warning(
                "%s %r: ONNX's definition uses %s, whose inputs changed by opset %d: left as is",
                node.op_type, node.name, ", ".join(changed), opset,
            )
            continue
        # The body runs at the model's opsets (the inliner wants them equal).
        function.name, function.domain = f"{node.op_type}_{index}", DOMAIN
        del function.opset_import[:]
        function.opset_import.extend(
            onnx.helper.make_opsetid(domain, version) for domain, version in imports.items()
        )
        expanded = ir.serde.deserialize_function(function)
        model.functions[expanded.identifier()] = expanded
        model.opset_imports[DOMAIN] = 1
        logger.info("%s %r: compiled from its ONNX definition", node.op_type, node.name)
        node.op_type, node.domain = function.name, DOMAIN
        # A context-dependent body has the node's attributes resolved already.
        declared = set(function.attribute) | {attribute.name for attribute in function.attribute_proto}
        for name in [name for name in node.attributes if name not in declared]:
            del node.attributes[name]
        count += 1
    return count


# Ops whose inputs or attributes changed meaning between opsets (axes, pads, sizes and
# bounds moved from attributes to inputs): a body written at an older opset that uses
# one is not valid at the model's.
_SIGNATURE_CHANGES = frozenset(
    {"Clip", "Pad", "Resize", "Slice", "Split", "Squeeze", "TopK", "Unsqueeze", "Upsample"}
    | {f"Reduce{kind}" for kind in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "LogSum", "LogSumExp", "SumSquare")}
)


def _changed_signatures(function: onnx.FunctionProto, opset: int) -> list[str]:
    """The ops of ``function``'s body in :data:`_SIGNATURE_CHANGES` whose definition
    differs between the body's opset and ``opset``."""
    own = next((entry.version for entry in function.opset_import if entry.domain == ""), opset)
    changed = set()
    for node in function.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _SIGNATURE_CHANGES:
            before = onnx.defs.get_schema(node.op_type, own, "").since_version
            if before != onnx.defs.get_schema(node.op_type, opset, "").since_version:
                changed.add(node.op_type)
    return sorted(changed)


def _definition_version(op_type: str, opset: int) -> tuple[int, bool] | None:
    """(the opset version of the function that defines ``op_type`` at ``opset``,
    whether it is context-dependent), or None when ONNX defines it by no function."""
    try:
        schema: Any = onnx.defs.get_schema(op_type, opset, "")  # (stubs lack the function API)
    except onnx.defs.SchemaError:
        return None
    plain = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    if not plain and not dependent:
        return None
    if dependent and (not plain or max(dependent) >= max(plain)):
        return max(dependent), True
    return max(plain), False


def _definition(node: ir.Node, opset: int, version: tuple[int, bool]) -> onnx.FunctionProto:
    """The FunctionProto that defines ``node``'s op at ``opset``, for ``node``, from the
    function ``version`` (:func:`_definition_version`)."""
    function_opset, dependent = version
    schema: Any = onnx.defs.get_schema(node.op_type, opset, "")
    function = onnx.FunctionProto()
    if dependent:
        types = [
            ir.serde.serialize_type(value.type).SerializeToString()
            if value is not None and value.type is not None
            else onnx.TypeProto().SerializeToString()
            for value in node.inputs
        ]
        # The schema reads the node for its attributes and which optional inputs are present.
        proto = ir.serde.serialize_node(node)
        function.ParseFromString(
            schema.get_context_dependent_function_with_opset_version(
                function_opset, proto.SerializeToString(), types
            )
        )
    else:
        function.ParseFromString(schema.get_function_with_opset_version(function_opset))
    if not function.node and node.op_type in OWN:  # ONNX's builder declined this node
        function = OWN[node.op_type](node, opset)
    if not function.node:
        raise ValueError("ONNX gives no definition for this node's inputs and attributes")
    # The schema lists every optional output; the body computes those the node has. An
    # absent one before a present one (``Y, , , qk``) keeps its place, as an empty
    # constant no one reads.
    outputs = list(function.output)[: len(node.outputs)]
    del function.output[:]
    function.output.extend(outputs)
    produced = {name for body_node in function.node for name in body_node.output} | set(function.input)
    for name in outputs:
        if name not in produced:
            empty = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [0], [])
            function.node.append(onnx.helper.make_node("Constant", [], [name], value=empty))
    return function


def _rotary_embedding(node: ir.Node, opset: int) -> onnx.FunctionProto:
    """``RotaryEmbedding`` (opset 23) by the formula of its specification, for the forms
    ONNX's own builder declines (cos/sin caches of [1 or batch, sequence, rotary/2], no
    ``position_ids``: what the dynamo exporter writes for Llama-family models).

    With x1, x2 the halves of the rotated channels (or the even and odd ones,
    ``interleaved``): ``x1·cos - x2·sin`` and ``x1·sin + x2·cos``, then the channels past
    ``rotary_embedding_dim`` as they are; a [batch, sequence, hidden] input is split into
    ``num_heads`` heads first and merged after."""
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) not in (3, 4):
        raise ValueError("RotaryEmbedding input of unknown rank")
    rank = len(x.shape)
    heads = node.attributes.get_int("num_heads", 0)
    interleaved = node.attributes.get_int("interleaved", 0)
    rotary = node.attributes.get_int("rotary_embedding_dim", 0)
    body = FunctionBody(opset)
    inputs = ["X", "cos_cache", "sin_cache"] + (["position_ids"] if len(node.inputs) > 3 and node.inputs[3] else [])
    x4 = "X"
    if rank == 3:
        if not heads:
            raise ValueError("RotaryEmbedding of a 3-D input without num_heads")
        split = body.node("Reshape", ["X", body.const("heads_shape", [0, 0, heads, -1])], "X_split")
        x4 = body.node("Transpose", [split], "X4", perm=[0, 2, 1, 3])
    cos, sin = "cos_cache", "sin_cache"
    if "position_ids" in inputs:
        cos = body.node("Gather", [cos, "position_ids"], "cos_at")
        sin = body.node("Gather", [sin, "position_ids"], "sin_at")
    head_axis = body.const("head_axis", [1])
    cos = body.node("Unsqueeze", [cos, head_axis], "cos4")  # [B, 1, S, rotary/2]
    sin = body.node("Unsqueeze", [sin, head_axis], "sin4")
    last = body.const("last_axis", [3])
    rotated, rest = x4, None
    if rotary:
        rotated = body.node("Slice", [x4, body.const("rot_start", [0]), body.const("rot_end", [rotary]), last], "x_rot")
        rest = body.node("Slice", [x4, body.const("rest_start", [rotary]), body.const("rest_end", [2**62]), last], "x_rest")
    if interleaved:
        pairs = body.node("Reshape", [rotated, body.const("pairs_shape", [0, 0, 0, -1, 2])], "x_pairs")
        pair_axis = body.const("pair_axis", [4])
        halves = []
        for index in (0, 1):
            start, end = body.const(f"p{index}_start", [index]), body.const(f"p{index}_end", [index + 1])
            half = body.node("Slice", [pairs, start, end, pair_axis], f"x{index}_5d")
            halves.append(body.node("Squeeze", [half, pair_axis], f"x{index}"))
    else:
        half = body.node("Div", [body.node("Shape", [rotated], "rot_size", start=3), body.const("two", [2])], "half")
        halves = [
            body.node("Slice", [rotated, body.const("h0_start", [0]), half, last], "x0"),
            body.node("Slice", [rotated, half, body.const("h1_end", [2**62]), last], "x1"),
        ]
    x1, x2 = halves
    real = body.node("Sub", [body.node("Mul", [x1, cos], "x1_cos"), body.node("Mul", [x2, sin], "x2_sin")], "real")
    imag = body.node("Add", [body.node("Mul", [x1, sin], "x1_sin"), body.node("Mul", [x2, cos], "x2_cos")], "imag")
    if interleaved:
        pair_axis = body.const("pair_axis_out", [4])
        joined = body.node(
            "Concat",
            [body.node("Unsqueeze", [real, pair_axis], "real5"), body.node("Unsqueeze", [imag, pair_axis], "imag5")],
            "joined",
            axis=4,
        )
        out = body.node("Reshape", [joined, body.node("Shape", [rotated], "rot_shape")], "y_rot")
    else:
        out = body.node("Concat", [real, imag], "y_rot", axis=3)
    if rest is not None:
        out = body.node("Concat", [out, rest], "y4", axis=3)
    if rank == 3:
        merged = body.node("Transpose", [out], "y_merged", perm=[0, 2, 1, 3])
        out = body.node("Reshape", [merged, body.const("hidden_shape", [0, 0, -1])], "Y")
    else:
        out = body.node("Identity", [out], "Y")
    return body.function("RotaryEmbedding", inputs, [out])


OWN = {"RotaryEmbedding": _rotary_embedding}
