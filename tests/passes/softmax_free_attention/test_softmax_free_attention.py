"""The softmax-free-attention (SOFT) pass: structure, negatives, idempotence, validity, numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest
import torch

from rewriter.job import rewrite_file
from rewriter.pass_base import DOMAIN
from rewriter.passes.attention import math as amath
from rewriter.passes.softmax_free_attention import OP_TYPE, SoftmaxFreeAttentionPass, function_proto
from tests import attention_models as am
from tests.helpers import model_from_text, op_types, run, to_proto
from tests.real_models import count_ops

# With m = n landmarks every token is its own landmark, K(Q, K̃)·pinv(K(K̃, K̃)) = I and
# SOFT is exact kernel attention; what is left is float32 rounding amplified by the
# condition number of the 8x8 kernel matrix (~1e2 here) through Newton–Schulz:
# 1e-4 absolute on outputs of magnitude ~3.
EXACT_KERNEL_ATOL = 1e-4
# The ONNX body and the torch math compute the same float32 operations in different
# orders (ORT's MatMul blocking, the Loop): agreement to 1e-4 relative of the output scale.
ONNX_VS_TORCH_RTOL = 1e-4


def rewrite(model, **options):
    return SoftmaxFreeAttentionPass(SoftmaxFreeAttentionPass.Options(**options))(model)


def torch_soft(feeds, *, scale, landmarks, iterations, symmetric=False):
    q, k, v = (torch.from_numpy(feeds[name]) for name in "qkv")
    mask = None
    if "mask" in feeds:
        mask = torch.from_numpy(feeds["mask"])
    elif "keep" in feeds:
        mask = torch.from_numpy(feeds["keep"])
    out = amath.softmax_free_attention(
        q, q if symmetric else k, v, mask, scale=scale, landmarks=landmarks, iterations=iterations
    )
    return out.numpy()


@pytest.mark.parametrize("form", list(am.FORMS))
def test_every_form_is_rewritten_and_matches_the_torch_math(form):
    model = am.attention_model(form)
    result = rewrite(model, landmarks=4)
    assert result.stats == {"attention_replaced": 1, "softmax_left": 0}
    assert op_types(result.model).count(OP_TYPE) == 1 and "Softmax" not in op_types(result.model)
    assert (DOMAIN, OP_TYPE, "") in result.model.functions
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = am.feeds(form)
    actual = run(proto, feeds)["y"]
    expected = torch_soft(feeds, scale=0.5, landmarks=4, iterations=20)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ONNX_VS_TORCH_RTOL * scale)


@pytest.mark.parametrize("symmetric", [False, True])
def test_m_equal_n_approaches_exact_kernel_attention(symmetric):
    model = am.attention_model("div_transpose_additive")
    result = rewrite(model, landmarks=am.N, iterations=60, symmetric=symmetric)
    feeds = am.feeds("div_transpose_additive")
    expected_feeds = {**feeds, "k": feeds["q"]} if symmetric else feeds
    expected = am.kernel_reference(expected_feeds, scale=0.5)
    np.testing.assert_allclose(
        run(result.model, feeds)["y"], expected, rtol=0, atol=EXACT_KERNEL_ATOL
    )
    reference = onnx.reference.ReferenceEvaluator(to_proto(result.model)).run(None, feeds)[0]
    np.testing.assert_allclose(reference, expected, rtol=0, atol=EXACT_KERNEL_ATOL)


def test_symmetric_ties_k_to_q():
    result = rewrite(am.attention_model("div_transpose_additive"), symmetric=True)
    node = next(n for n in result.model.graph if n.op_type == OP_TYPE)
    assert node.inputs[1] is node.inputs[0]
    assert node.attributes["landmarks"].value == 32 and node.attributes["iterations"].value == 20


def test_masked_keys_contribute_exactly_zero():
    model = am.op_model(
        OP_TYPE, function_proto(18), {"scale": 0.5, "landmarks": 4, "iterations": 20}
    )
    onnx.checker.check_model(model, full_check=True)
    feeds = am.feeds("div_transpose_additive")
    clean = run(model, feeds)["y"]
    # Anything at a masked key (its k and v) must not change the output.
    feeds["v"][1, :, am.N - 3 :, :] = 1e6
    feeds["k"][1, :, am.N - 3 :, :] = 7.0
    np.testing.assert_array_equal(run(model, feeds)["y"], clean)


def test_causal_mask_is_noted_as_reduced_to_padding():
    result = rewrite(am.attention_model("mul_mask_first"), landmarks=4)
    assert result.stats["attention_replaced"] == 1
    assert any("bidirectional" in note for note in result.notes)


def test_more_landmarks_than_positions_uses_every_position():
    model = am.op_model(
        OP_TYPE, function_proto(18), {"scale": 0.5, "landmarks": 64, "iterations": 60}
    )
    feeds = am.feeds("div_transpose_additive")
    np.testing.assert_allclose(
        run(model, feeds)["y"],
        am.kernel_reference(feeds, scale=0.5),
        rtol=0,
        atol=EXACT_KERNEL_ATOL,
    )


def test_negative_and_idempotent():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 10] x) => (float[2, 10] y) {
            y = Softmax<axis = -1>(x)
        }
        """
    )
    result = rewrite(model)
    assert not result.modified and result.stats == {"attention_replaced": 0, "softmax_left": 1}
    model = am.attention_model("no_mask_reshaped_key")
    assert rewrite(model).modified
    again = rewrite(model)
    assert not again.modified and again.stats == {"attention_replaced": 0, "softmax_left": 0}


REAL = [
    ("bert_eager_torchscript", 2, 0),
    ("vit_torchscript", 2, 1),
    ("llama_eager_dynamo", 2, 0),
    pytest.param("bert_eager_dynamo", 2, 0, marks=pytest.mark.slow),
    pytest.param("llama_sdpa_dynamo", 2, 0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,layers,other", REAL)
def test_real_export(real_model, tmp_path, name, layers, other):
    source = real_model(name)
    out = tmp_path / "soft.onnx"
    passes = [SoftmaxFreeAttentionPass(SoftmaxFreeAttentionPass.Options(landmarks=8))]
    report = rewrite_file(source.path, out, passes, inputs=source.inputs)
    record = report.passes[0]
    assert record.stats == {"attention_replaced": layers, "softmax_left": other}
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    assert count_ops(proto, "Softmax") == other
    assert sum(node.op_type == OP_TYPE for node in proto.graph.node) == layers
    assert report.verification is not None and not report.verification.enforced
    for output in report.verification.outputs:
        assert np.isfinite(output.cosine)
