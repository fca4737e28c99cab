"""The attention forms of DeBERTa, nn.MultiheadAttention, Swin and SegFormer, in small ONNX
text graphs written as their exports are: each is found, rewritten by both attention passes
(or left by SOFT with its true reason) and computes the formula.

* merged heads (DeBERTa, ``nn.MultiheadAttention``): Q, K, V of [B·H, n, d], the scores
  reshaped to [B, H, n, n] for the mask and back after the Softmax; the key divided by a
  scale the graph computes from Q's shape (``sqrt(3 d)``); a relative-position term
  computed from Q (DeBERTa's c2p) added to the scores; ``Where(drop, fill, scores)``;
  shapes of the scores and the probabilities read by ``Shape`` for the Reshapes;
* Swin's shifted windows: a learned bias added, then the scores viewed per window and the
  -100 window mask added there;
* SegFormer's reduced keys: fewer keys than queries;
* the TorchScript exporter's scaled_dot_product_attention: ``1/sqrt(Shape(q)[-1])``,
  its square root on Q and Kᵀ.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from rewriter.passes.attention import math as amath
from rewriter.passes.sigmoid_attention import OP_TYPE as SIGMOID
from rewriter.passes.sigmoid_attention import SigmoidAttentionPass
from rewriter.passes.softmax_free_attention import OP_TYPE as SOFT
from rewriter.passes.softmax_free_attention import SoftmaxFreeAttentionPass
from tests.helpers import model_from_text, op_types, run, to_proto

# The sigmoid body computes in float32 what the numpy formula computes in float64 (see
# tests/passes/sigmoid_attention: a few ulp of outputs of magnitude ~5).
ATOL = 2e-6
# SOFT with as many landmarks as keys is exact kernel attention up to float32 rounding
# through Newton–Schulz (tests/passes/softmax_free_attention: 1e-4 on outputs ~3).
EXACT_KERNEL_ATOL = 1e-4

B, H, N, D = 2, 2, 8, 4
RNG = np.random.default_rng(0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sigmoid_rewrite(model, **options):
    return SigmoidAttentionPass(SigmoidAttentionPass.Options(**options))(model)


def soft_rewrite(model, **options):
    return SoftmaxFreeAttentionPass(SoftmaxFreeAttentionPass.Options(**options))(model)


# --------------------------------------------------------------------------------------
# DeBERTa: merged heads, a computed scale on Kᵀ, a c2p bias from Q, Where(drop, fill, x)
# --------------------------------------------------------------------------------------

DEBERTA = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 8, 4] q, float[4, 8, 4] k, float[4, 8, 4] v, float[4, 4, 8] pos, bool[2, 1, 8, 8] drop) => (float[4, 8, 4] y) {
    kt = Transpose<perm = [0, 2, 1]>(k)
    d = Shape<start = -1>(q)
    d_f = Cast<to = 1>(d)
    three = Constant<value = float {3.0}>()
    d3 = Mul(d_f, three)
    root = Sqrt(d3)
    kt_scaled = Div(kt, root)
    scores = MatMul(q, kt_scaled)
    c2p = MatMul(q, pos)
    rel = Div(c2p, root)
    biased = Add(scores, rel)
    lengths = Shape<start = 1>(biased)
    heads = Constant<value = int64[2] {-1, 2}>()
    to4 = Concat<axis = 0>(heads, lengths)
    s4 = Reshape(biased, to4)
    fill = Constant<value = float {-3.4028234663852886e38}>()
    masked = Where(drop, fill, s4)
    p = Softmax<axis = -1>(masked)
    p_lengths = Shape<start = 2>(p)
    minus_one = Constant<value = int64[1] {-1}>()
    to3 = Concat<axis = 0>(minus_one, p_lengths)
    p3 = Reshape(p, to3)
    y = MatMul(p3, v)
}
"""


def deberta_feeds() -> dict[str, np.ndarray]:
    values = {name: RNG.standard_normal((B * H, N, D)).astype(np.float32) for name in "qkv"}
    values["pos"] = RNG.standard_normal((B * H, D, N)).astype(np.float32)
    drop = np.zeros((B, 1, N, N), dtype=bool)
    drop[1, ..., N - 3 :] = True
    values["drop"] = drop
    return values


def test_deberta_form_is_sigmoid_attention_with_the_bias_in_the_mask():
    model = model_from_text(DEBERTA)
    result = sigmoid_rewrite(model)
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    types = op_types(result.model)
    assert types.count(SIGMOID) == 1 and "Softmax" not in types and "Where" in types
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    feeds = deberta_feeds()
    q, k, v = (feeds[name].astype(np.float64) for name in "qkv")
    root = math.sqrt(3 * D)
    logits = (q @ k.transpose(0, 2, 1) + q @ feeds["pos"]) / root - math.log(N)
    keep = ~np.broadcast_to(feeds["drop"], (B, H, N, N)).reshape(B * H, N, N)
    expected = np.where(keep, sigmoid(logits), 0.0) @ v
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


def test_deberta_form_is_left_by_soft_for_its_relative_position_bias():
    result = soft_rewrite(model_from_text(DEBERTA))
    assert result.stats == {"attention_replaced": 0, "softmax_left": 1}
    assert "not a 0/-inf mask" in result.notes[0] and "per-pair" in result.notes[0]


def test_a_value_of_the_attention_used_elsewhere_is_left():
    text = DEBERTA.replace("(float[4, 8, 4] y)", "(float[4, 8, 4] y, float[4, 8, 8] biased)")
    result = sigmoid_rewrite(model_from_text(text))
    assert result.stats["attention_replaced"] == 0
    assert "graph output" in result.notes[0]


# --------------------------------------------------------------------------------------
# Swin: a learned bias, then the -100 mask of the shifted windows added per window
# --------------------------------------------------------------------------------------

WINDOWS = 2  # windows per image: the scores [B·nW, H, n, n] are viewed as [B, nW, H, n, n]


def swin_model() -> onnx.ModelProto:
    bias = RNG.standard_normal((1, H, N, N)).astype(np.float32)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{B * WINDOWS}, {H}, {N}, {D}] q, float[{B * WINDOWS}, {H}, {N}, {D}] k, float[{B * WINDOWS}, {H}, {N}, {D}] v, float[{WINDOWS}, {N}, {N}] window_mask) => (float[{B * WINDOWS}, {H}, {N}, {D}] y) {{
        c = Constant<value = float {{0.5}}>()
        qs = Mul(q, c)
        kt = Transpose<perm = [0, 1, 3, 2]>(k)
        scores = MatMul(qs, kt)
        biased = Add(scores, bias)
        to5 = Constant<value = int64[5] {{-1, {WINDOWS}, {H}, {N}, {N}}}>()
        s5 = Reshape(biased, to5)
        one = Constant<value = int64[1] {{1}}>()
        zero = Constant<value = int64[1] {{0}}>()
        m4 = Unsqueeze(window_mask, one)
        m5 = Unsqueeze(m4, zero)
        a5 = Add(s5, m5)
        back = Constant<value = int64[4] {{-1, {H}, {N}, {N}}}>()
        s4 = Reshape(a5, back)
        p = Softmax<axis = -1>(s4)
        y = MatMul(p, v)
    }}
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "bias"))
    onnx.checker.check_model(model, full_check=True)
    return model


def swin_feeds() -> dict[str, np.ndarray]:
    values = {name: RNG.standard_normal((B * WINDOWS, H, N, D)).astype(np.float32) for name in "qkv"}
    window_mask = np.zeros((WINDOWS, N, N), dtype=np.float32)
    window_mask[1, : N // 2, N // 2 :] = -100.0  # the shifted window's halves do not mix
    window_mask[1, N // 2 :, : N // 2] = -100.0
    values["window_mask"] = window_mask
    return values


def test_swin_shifted_windows_are_sigmoid_attention_with_bias_and_window_mask():
    import onnx_ir as ir

    proto = swin_model()
    result = sigmoid_rewrite(ir.serde.deserialize_model(proto))
    assert result.stats == {"attention_replaced": 1, "bias_from_run_time_length": 0, "softmax_left": 0}
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    feeds = swin_feeds()
    bias = onnx.numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    q, k, v = (feeds[name].astype(np.float64) for name in "qkv")
    logits = 0.5 * q @ k.transpose(0, 1, 3, 2) + bias
    per_window = logits.reshape(B, WINDOWS, H, N, N) + feeds["window_mask"][None, :, None]
    expected = sigmoid(per_window.reshape(B * WINDOWS, H, N, N) - math.log(N)) @ v
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


def test_swin_is_left_by_soft_for_its_bias_and_window_mask():
    import onnx_ir as ir

    result = soft_rewrite(ir.serde.deserialize_model(swin_model()))
    assert result.stats == {"attention_replaced": 0, "softmax_left": 1}
    assert "not a 0/-inf mask" in result.notes[0]


# --------------------------------------------------------------------------------------
# SegFormer: fewer keys than queries (the keys of a spatially reduced sequence)
# --------------------------------------------------------------------------------------

CROSS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 2, nq, 4] q, float[2, 2, nk, 4] k, float[2, 2, nk, 4] v) => (float[2, 2, nq, 4] y) {
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    s = MatMul(q, kt)
    c = Constant<value = float {0.5}>()
    z = Mul(s, c)
    p = Softmax<axis = -1>(z)
    y = MatMul(p, v)
}
"""


def cross_feeds(n_q: int = 8, n_k: int = 4) -> dict[str, np.ndarray]:
    return {
        "q": RNG.standard_normal((2, 2, n_q, 4)).astype(np.float32),
        "k": RNG.standard_normal((2, 2, n_k, 4)).astype(np.float32),
        "v": RNG.standard_normal((2, 2, n_k, 4)).astype(np.float32),
    }


def test_fewer_keys_than_queries_soft_runs_and_is_kernel_attention_with_every_key_a_landmark():
    result = soft_rewrite(model_from_text(CROSS), landmarks=4, iterations=60)
    assert result.stats == {"attention_replaced": 1, "softmax_left": 0}
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    feeds = cross_feeds()
    root = math.sqrt(0.5)
    q, k, v = (feeds[name].astype(np.float64) for name in "qkv")
    distances = (((q * root)[..., :, None, :] - (k * root)[..., None, :, :]) ** 2).sum(-1)
    expected = np.exp(-0.5 * distances) @ v  # m = n_k landmarks: the exact kernel
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=EXACT_KERNEL_ATOL)


@pytest.mark.parametrize("n_q,n_k", [(8, 4), (5, 12), (9, 9)])
def test_fewer_or_more_keys_the_body_is_the_torch_math(n_q, n_k):
    result = soft_rewrite(model_from_text(CROSS), landmarks=3)
    feeds = cross_feeds(n_q, n_k)
    q, k, v = (torch.from_numpy(feeds[name]) for name in "qkv")
    expected = amath.softmax_free_attention(q, k, v, scale=0.5, landmarks=3, iterations=20).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=1e-4 * scale)


def test_symmetric_soft_leaves_attention_whose_lengths_may_differ():
    result = soft_rewrite(model_from_text(CROSS), symmetric=True)
    assert result.stats == {"attention_replaced": 0, "softmax_left": 1}
    assert result.notes[0].endswith(
        "needs as many keys as queries; the graph does not show they are equal (n_q = nq, n_k = nk)"
    )


def test_fewer_keys_sigmoid_takes_b_from_the_key_length():
    result = sigmoid_rewrite(model_from_text(CROSS))
    assert result.stats["bias_from_run_time_length"] == 1
    feeds = cross_feeds()
    q, k, v = (feeds[name].astype(np.float64) for name in "qkv")
    expected = sigmoid(0.5 * q @ k.transpose(0, 1, 3, 2) - math.log(4)) @ v
    np.testing.assert_allclose(run(result.model, feeds)["y"], expected, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------
# The TorchScript exporter's scaled_dot_product_attention: the scale from Shape(q)
# --------------------------------------------------------------------------------------

SDPA = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[b, 2, n, 4] q, float[b, 2, n, 4] k, float[b, 2, n, 4] v) => (float[b, 2, n, 4] y) {
    shape = Shape(q)
    minus_one = Constant<value = int64[1] {-1}>()
    big = Constant<value = int64[1] {9223372036854775807}>()
    last = Slice(shape, minus_one, big)
    d = Cast<to = 1>(last)
    one = Constant<value = float[1] {1.0}>()
    root_d = Sqrt(d)
    scale = Div(one, root_d)
    root = Sqrt(scale)
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    qs = Mul(q, root)
    ks = Mul(kt, root)
    s = MatMul(qs, ks)
    p = Softmax<axis = -1>(s)
    y = MatMul(p, v)
}
"""


@pytest.mark.parametrize("rewrite", [sigmoid_rewrite, soft_rewrite])
def test_scale_computed_from_the_static_head_dimension(rewrite):
    result = rewrite(model_from_text(SDPA))
    assert result.stats["attention_replaced"] == 1
    node = next(n for n in result.model.graph if n.op_type in (SIGMOID, SOFT))
    assert node.attributes["scale"].value == pytest.approx(0.5, rel=1e-6)  # 1/sqrt(4)


def test_scale_from_a_dynamic_head_dimension_is_not_attention():
    result = sigmoid_rewrite(model_from_text(SDPA.replace("n, 4]", "n, d]")))
    assert result.stats["attention_replaced"] == 0
    assert "q factor is not a nonzero constant scalar" in result.notes[0]
