"""The ONNX function body of ``SoftmaxFreeAttention(Q, K, V, Mask)``: standard ops, float32 inside."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from rewriter.function_body import FunctionBody
from rewriter.passes.attention import onnx_match as attention

OP_TYPE = "SoftmaxFreeAttention"
# The landmark pools divide by the number of kept positions in a segment, at least this.
EMPTY_SEGMENT = 1e-6
# ||A||₁·||A||∞ below this is an all-zero kernel; its pinv is 0.
TINY = 1e-30


def function_proto(opset: int) -> onnx.FunctionProto:
    """The body of ``SoftmaxFreeAttention(Q, K, V, Mask)`` at ``opset``, float32 inside.

    Q [B, H, Nq, D], K [B, H, N, D], V [B, H, N, Dv], Mask additive of rank 4,
    broadcastable to [B, H, Nq, N]; attributes ``scale``, ``landmarks`` (m) and
    ``iterations``.

    >>> function_proto(18).name
    'SoftmaxFreeAttention'
    """
    body = FunctionBody(opset)
    node, const = body.node, body.const
    f32 = TensorProto.FLOAT
    root = node("Sqrt", [body.attribute("scale", "float")], "root_scale")
    q = node("Mul", [node("Cast", ["Q"], "q32", to=f32), root], "q")
    k = node("Mul", [node("Cast", ["K"], "k32", to=f32), root], "k")
    v = node("Cast", ["V"], "v32", to=f32)
    # keep [.., 1, N]: 1 for keys some query may attend to.
    masked_at = const("masked_at", attention.MASKED_AT_OR_BELOW, like="Mask")
    keep_all = node("Cast", [node("Greater", ["Mask", masked_at], "keep_bool")], "keep_all", to=f32)
    keep = body.reduce("ReduceMax", keep_all, [2], "keep")
    # Segment j of m holds positions i with floor(i·m/n) = j; the pools average the kept
    # ones. Keys and queries are pooled apart, over their own lengths (n_q may differ from
    # n_k: SegFormer's reduced keys); the queries keep the keys' padding when n_q = n_k.
    n = node("Shape", [k], "n", start=2, end=3)
    n_q = node("Shape", [q], "n_q", start=2, end=3)
    m_attribute = node(
        "Reshape", [body.attribute("landmarks", "int"), const("one_axis", [1])], "m_attr"
    )
    m = node("Min", [node("Min", [m_attribute, n], "m_k"), n_q], "m")
    no_dims = const("scalar_shape", [])

    def scalar(x: str) -> str:
        return node("Reshape", [x, no_dims], x + "_scalar")

    zero_i, one_i = const("zero_i", [0]), const("one_i", [1])
    start, step, m_s = scalar(zero_i), scalar(one_i), scalar(m)
    columns = node("Range", [start, m_s, step], "columns")
    columns_row = node("Unsqueeze", [columns, zero_i], "columns_row")

    def pools_of(length: str, kept: str, name: str) -> str:
        """[.., m, length] averaging weights over the kept positions (kept [.., 1, length])."""
        length_s = scalar(length)
        positions = node("Range", [start, length_s, step], f"{name}_positions")
        segment = node(
            "Div", [node("Mul", [positions, m_s], f"{name}_positions_m"), length_s], f"{name}_segment"
        )
        same = node(
            "Equal",
            [node("Unsqueeze", [segment, one_i], f"{name}_segment_col"), columns_row],
            f"{name}_same_segment",
        )
        onehot = node("Cast", [same], f"{name}_onehot", to=f32)  # [length, m]
        weights = node(
            "Mul", [onehot, attention.swap_last(body, kept, f"{name}_kept_col")], f"{name}_weights"
        )
        counts = node(
            "Max",
            [body.reduce("ReduceSum", weights, [2], f"{name}_counts"), const(f"{name}_empty", EMPTY_SEGMENT)],
            f"{name}_counts_safe",
        )
        return attention.swap_last(
            body, node("Div", [weights, counts], f"{name}_pool_weights"), f"{name}_pools"
        )

    # keep_q: keep where n_q = n_k, else ones ([.., 1, n_q] either way).
    keep_q_shape = node(
        "Concat", [node("Shape", [keep], "keep_lead", start=0, end=-1), n_q], "keep_q_shape", axis=0
    )
    ones_q = node("Expand", [node("Cast", [one_i], "one_f", to=f32), keep_q_shape], "ones_q")
    padded = node("Concat", [keep, ones_q], "keep_padded", axis=-1)
    leading = node("Slice", [padded, zero_i, n_q, const("last_axis", [-1])], "keep_leading")
    same_length = node("Equal", [n_q, n], "same_length")
    keep_q = node("Where", [same_length, leading, ones_q], "keep_q")
    pools = pools_of(n, keep, "k")  # [.., m, N]
    query_pools = pools_of(n_q, keep_q, "q")  # [.., m, N_q]
    q_land = node("MatMul", [query_pools, q], "q_landmarks")  # [.., m, D]
    k_land = node("MatMul", [pools, k], "k_landmarks")
    half_norms: dict[str, str] = {}

    def half_sq_norm(x: str) -> str:
        """||x||²/2 over the last axis, [.., p, 1] (computed once per tensor)."""
        if x not in half_norms:
            squared = body.reduce("ReduceSum", node("Mul", [x, x], x + "_sq"), [-1], x + "_sqsum")
            half_norms[x] = node("Mul", [squared, const(x + "_half", 0.5)], x + "_hsq")
        return half_norms[x]

    def kernel(a: str, b: str, out: str) -> str:
        """exp(a·bᵀ - ||a||²/2 - ||b||²/2), [.., p, q]."""
        dots = node("MatMul", [a, attention.swap_last(body, b, f"{b}_t_{out}")], out + "_dots")
        shifted = node("Sub", [dots, half_sq_norm(a)], out + "_a")
        b_norm = attention.swap_last(body, half_sq_norm(b), f"{b}_hsq_t_{out}")
        return node("Exp", [node("Sub", [shifted, b_norm], out + "_ab")], out)

    left = kernel(q, k_land, "left")  # [.., N, m]
    middle = kernel(q_land, k_land, "middle")  # [.., m, m]
    right = node("Mul", [kernel(q_land, k, "right_raw"), keep], "right")  # [.., m, N]
    right_v = node("MatMul", [right, v], "right_v")  # [.., m, Dv]
    # Newton–Schulz: X0 = Aᵀ / (||A||₁ ||A||∞), X <- 2X - X A X.
    absolute = node("Abs", [middle], "middle_abs")
    col_sums = body.reduce("ReduceSum", absolute, [-2], "col_sums")
    row_sums = body.reduce("ReduceSum", absolute, [-1], "row_sums")
    norm_1 = body.reduce("ReduceMax", col_sums, [-1], "norm_1")
    norm_inf = body.reduce("ReduceMax", row_sums, [-2], "norm_inf")
    norms = node(
        "Max", [node("Mul", [norm_1, norm_inf], "norm_product"), const("tiny", TINY)], "norms"
    )
    alpha = node("Reciprocal", [norms], "alpha")
    x0 = node("Mul", [attention.swap_last(body, middle, "middle_t"), alpha], "x0")
    step = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", middle], ["xa"]),
            helper.make_node("MatMul", ["xa", "x_in"], ["xax"]),
            helper.make_node("Add", ["x_in", "x_in"], ["two_x"]),
            helper.make_node("Sub", ["two_x", "xax"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "newton_schulz_step",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", f32, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", f32, None),
        ],
    )
    trips = body.attribute("iterations", "int")
    true = node(
        "Constant", [], "true", value=helper.make_tensor("true", TensorProto.BOOL, [], [True])
    )
    inverse = node("Loop", [trips, true, x0], "middle_pinv", body=step)
    y = node("MatMul", [left, node("MatMul", [inverse, right_v], "pinv_right_v")], "y32")
    node("CastLike", [y, "Q"], "Y")
    return body.function(
        OP_TYPE,
        ["Q", "K", "V", "Mask"],
        ["Y"],
        attributes=["scale", "landmarks", "iterations"],
        doc="SOFT attention (Lu et al. 2021): Gaussian-kernel Nystrom with Newton-Schulz pinv.",
    )
