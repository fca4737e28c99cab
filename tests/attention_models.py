"""Small attention graphs in ONNX text syntax, one per form the exporters emit, and
numpy references of the attention formulas (the test oracles of the attention passes)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from rewriter.pass_base import DOMAIN, DOMAIN_VERSION
from tests.helpers import model_from_text

B, H, N, D = 2, 2, 8, 4
SCALE = 1.0 / math.sqrt(D)

# name -> (inputs of the graph besides q, k, v, body lines producing y)
FORMS: dict[str, tuple[str, str]] = {
    "div_transpose_additive": (
        ", float[2, 1, 1, 8] mask",
        """kt = Transpose<perm = [0, 1, 3, 2]>(k)
           s = MatMul(q, kt)
           c = Constant<value = float {2.0}>()
           z = Div(s, c)
           a = Add(z, mask)
           p = Softmax<axis = -1>(a)
           y = MatMul(p, v)""",
    ),
    "mul_mask_first": (
        ", float[2, 1, 8, 8] mask",
        """kt = Transpose<perm = [0, 1, 3, 2]>(k)
           s = MatMul(q, kt)
           c = Constant<value = float {0.5}>()
           z = Mul(c, s)
           a = Add(mask, z)
           p = Softmax<axis = 3>(a)
           y = MatMul(p, v)""",
    ),
    "sqrt_scale_both_isnan_guard": (
        ", float[2, 1, 1, 8] mask",
        """kt = Transpose<perm = [0, 1, 3, 2]>(k)
           c = Constant<value = float {0.70710677}>()
           qs = Mul(q, c)
           ks = Mul(kt, c)
           s = MatMul(qs, ks)
           a = Add(s, mask)
           p = Softmax<axis = -1>(a)
           nan = IsNaN(p)
           zero = Constant<value = float {0.0}>()
           g = Where(nan, zero, p)
           y = MatMul(g, v)""",
    ),
    "scale_in_q_boolean_mask_cast": (
        ", bool[2, 1, 1, 8] keep",
        """kt = Transpose<perm = [0, 1, 3, 2]>(k)
           c = Constant<value = float {0.5}>()
           qs = Mul(q, c)
           s = MatMul(qs, kt)
           fill = Constant<value = float {-3.4028234663852886e38}>()
           a = Where(keep, s, fill)
           a64 = Cast<to = 11>(a)
           p64 = Softmax<axis = -1>(a64)
           p = Cast<to = 1>(p64)
           y = MatMul(p, v)""",
    ),
    "no_mask_reshaped_key": (
        "",
        """k3shape = Constant<value = int64[3] {4, 8, 4}>()
           k3 = Reshape(k, k3shape)
           k3t = Transpose<perm = [0, 2, 1]>(k3)
           k4shape = Constant<value = int64[4] {2, 2, 4, 8}>()
           kt = Reshape(k3t, k4shape)
           s = MatMul(q, kt)
           c = Constant<value = float {0.5}>()
           z = Mul(s, c)
           p = Softmax<axis = -1>(z)
           y = MatMul(p, v)""",
    ),
}


def attention_model(form: str, *, opset: int = 18) -> ir.Model:
    """The attention graph ``form`` (a key of :data:`FORMS`), checked."""
    extra, body = FORMS[form]
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v{extra}) => (float[2, 2, 8, 4] y) {{
            {body}
        }}
        """
    )


def feeds(form: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of ``form``; masks hide the last 3 keys of batch 1 (and, for the
    [2, 1, 8, 8] mask, the future: causal)."""
    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal((B, H, N, D)).astype(np.float32) * 1.5 for name in "qkv"}
    keep = np.ones((B, 1, 1, N), dtype=bool)
    keep[1, ..., N - 3 :] = False
    extra = FORMS[form][0]
    if "bool" in extra:
        values["keep"] = keep
    elif "8, 8] mask" in extra:
        causal = np.tril(np.ones((N, N), dtype=bool))[None, None] & keep
        values["mask"] = np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)
    elif "mask" in extra:
        values["mask"] = np.where(keep, 0.0, -np.inf).astype(np.float32)
    return values


def keep_of(values: dict[str, np.ndarray]) -> np.ndarray:
    """The boolean "may attend" mask of ``values`` (all True without a mask)."""
    if "keep" in values:
        return values["keep"]
    if "mask" in values:
        return values["mask"] > -1e4
    return np.ones((1, 1, 1, N), dtype=bool)


def sigmoid_reference(values: dict[str, np.ndarray], *, scale: float, n: int) -> np.ndarray:
    """``sigmoid(QKᵀ·scale - ln n)`` zeroed where masked, times V, in float64."""
    q, k, v = (values[name].astype(np.float64) for name in "qkv")
    logits = q @ np.swapaxes(k, -1, -2) * scale - math.log(n)
    probs = np.where(keep_of(values), 1.0 / (1.0 + np.exp(-logits)), 0.0)
    return probs @ v


def kernel_reference(values: dict[str, np.ndarray], *, scale: float) -> np.ndarray:
    """Exact Gaussian-kernel attention ``exp(-||q_i - k_j||²/2)·V`` on Q, K scaled by
    sqrt(scale), masked keys left out (what SOFT approximates), in float64."""
    q, k, v = (
        values[name].astype(np.float64) * (math.sqrt(scale) if name != "v" else 1.0)
        for name in "qkv"
    )
    distances = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    weights = np.exp(-0.5 * distances) * keep_of(values).any(axis=-2, keepdims=True)
    return weights @ v


def op_model(
    op_type: str,
    function: onnx.FunctionProto,
    attributes: dict[str, float | int],
    *,
    mask_shape: tuple[int, ...] = (B, 1, 1, N),
    opset: int = 18,
) -> onnx.ModelProto:
    """A one-node model of our operator ``op_type`` with its function body."""
    node = helper.make_node(op_type, ["q", "k", "v", "mask"], ["y"], domain=DOMAIN, **attributes)
    inputs = [
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [B, H, N, D]) for name in "qkv"
    ]
    inputs.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, list(mask_shape)))
    graph = helper.make_graph(
        [node],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [B, H, N, D])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[function],
        ir_version=8,
    )


def softmax_body_model(rewritten: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """``rewritten`` with the body of our attention op ``op_type`` replaced by softmax
    attention on the same inputs: ``Softmax(Q·scale·Kᵀ + bias + Mask)·V``.

    Softmax is invariant to the scalar ``bias`` (b = -ln n, as an attribute or in the
    mask), so where the rewrite handed the op the right Q, K, V, scale and mask, this
    model computes what the original did: a test of everything but the sigmoid itself.
    """
    from rewriter.function_body import FunctionBody

    opset = next(o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx"))
    body = FunctionBody(opset)
    scale = body.node("CastLike", [body.attribute("scale", "float"), "Q"], "scale")
    bias = body.node("CastLike", [body.attribute("bias", "float"), "Q"], "bias")
    k_t = body.node("Transpose", ["K"], "k_t", perm=[0, 1, 3, 2])
    scores = body.node("MatMul", [body.node("Mul", ["Q", scale], "q_scaled"), k_t], "scores")
    logits = body.node("Add", [body.node("Add", [scores, bias], "biased"), "Mask"], "logits")
    probs = body.node("Softmax", [logits], "probs", axis=-1)
    body.node("MatMul", [probs, "V"], "Y")
    function = body.function(op_type, ["Q", "K", "V", "Mask"], ["Y"], attributes=["scale", "bias"])
    swapped = onnx.ModelProto()
    swapped.CopyFrom(rewritten)
    for index, existing in enumerate(swapped.functions):
        if existing.name == op_type:
            swapped.functions[index].CopyFrom(function)
    return swapped


# The ONNX ``Attention`` operator (opset 23): name -> (graph inputs, the call).
OPERATOR_FORMS = {
    "additive mask": (
        "float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v, float[2, 1, 8, 8] m",
        "Attention<scale = 0.25>(q, k, v, m)",
    ),
    "boolean mask": (
        "float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v, bool[2, 1, 8, 8] m",
        "Attention(q, k, v, m)",
    ),
    "causal, grouped heads": (
        "float[2, 4, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v",
        "Attention<is_causal = 1>(q, k, v)",
    ),
}


def operator_model(form: str) -> ir.Model:
    """The ONNX ``Attention`` operator (opset 23) of ``form``."""
    inputs, call = OPERATOR_FORMS[form]
    heads = 4 if "grouped" in form else 2
    return model_from_text(
        f"""
        <ir_version: 10, opset_import: ["" : 23]>
        g ({inputs}) => (float[2, {heads}, 8, 4] y) {{
            y = {call}
        }}
        """
    )


def operator_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Q, K, V and masks for an operator model: a boolean mask with a row masked
    everywhere (the operator gives it zeros), an additive one of 0 and -inf."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = [int(d) for d in value.shape]
        if value.dtype == ir.DataType.BOOL:
            keep = rng.random(shape) > 0.3
            keep[..., 0] = True
            keep[1, :, 3, :] = False  # a row masked everywhere: the operator gives zeros
            feeds[value.name] = keep
        elif value.name == "m":
            mask = np.where(rng.random(shape) > 0.3, 0.0, -np.inf).astype(np.float32)
            mask[..., 0] = 0.0
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
