"""Both attention passes on real exports of the architectures issue 15 found missed:
DeBERTa-v2 (disentangled attention), torchvision's ViT (``nn.MultiheadAttention``) and Swin
(relative-position bias, shifted windows), transformers' Swin and SegFormer (spatially
reduced keys), and a bare ``nn.MultiheadAttention`` block; each by the TorchScript and the
dynamo exporter, small and with random weights (:mod:`tests.real_models`).

Each test runs the pass as the CLI does (:func:`rewriter.job.rewrite_file`: rewrite, check,
verify against the original in ONNX Runtime, write) and checks how many attentions were
found, that every Softmax of them is gone, that SOFT leaves the others with their true
reason, and the fidelity verification measures (a cosine of 0.78-1.00 to the original for
sigmoid attention on these random-weight models; it says little of the rewrite: losing
the relative-position terms moves DeBERTa's from 0.78 to 0.75 only). What the rewrite
hands the fused operator is checked exactly instead: with softmax attention as the
operator's body (:func:`tests.attention_models.softmax_body_model`; softmax ignores
b = -ln n), the rewritten model must compute the original's outputs.
"""

from __future__ import annotations

import onnx
import pytest

from rewriter import verify
from rewriter.job import rewrite_file
from rewriter.passes.sigmoid_attention import OP_TYPE as SIGMOID
from rewriter.passes.sigmoid_attention import SigmoidAttentionPass
from rewriter.passes.softmax_free_attention import OP_TYPE as SOFT
from rewriter.passes.softmax_free_attention import SoftmaxFreeAttentionPass
from tests.attention_models import softmax_body_model
from tests.helpers import run
from tests.real_models import count_ops

# Softmax attention on the rewrite's operands against the original graph: float32
# operations in another order (the scale on Q instead of on the scores, the mask terms
# summed first), a few ulp per layer: verification's exact float32 tolerance, per row.
EXACT = verify.Tolerance(rtol=1e-5, atol=1e-6)
BIAS_NOTE = "not a 0/-inf mask"

# model -> (attention layers, layers SOFT rewrites, what SOFT says of the others)
EXPECTED = {
    "deberta_v2": (2, 0, BIAS_NOTE),
    "swin": (2, 0, BIAS_NOTE),
    "tv_swin": (2, 0, BIAS_NOTE),
    "segformer": (2, 2, None),
    "tv_vit": (2, 2, None),
    "mha": (1, 1, None),
}
TORCHVISION = ("tv_vit", "tv_swin")
# dynamo exports take 3-15 s each here; the TorchScript ones about a second.
CASES = [
    pytest.param(name, exporter, marks=[pytest.mark.slow] if exporter == "dynamo" else [])
    for name in EXPECTED
    for exporter in ("torchscript", "dynamo")
]


def _source(real_model, name: str, exporter: str):
    if name in TORCHVISION:
        pytest.importorskip("torchvision")
    return real_model(f"{name}_{exporter}")


@pytest.mark.parametrize("name,exporter", CASES)
def test_sigmoid_attention_finds_every_attention(real_model, tmp_path, name, exporter):
    source = _source(real_model, name, exporter)
    layers = EXPECTED[name][0]
    out = tmp_path / "sigmoid.onnx"
    report = rewrite_file(source.path, out, [SigmoidAttentionPass()], inputs=source.inputs)
    stats = report.passes[0].stats
    assert stats["attention_replaced"] == layers and stats["softmax_left"] == 0
    proto = onnx.load(str(out))
    assert count_ops(proto, "Softmax") == 0 and count_ops(proto, SIGMOID, "ai.rewriter") == layers
    assert report.verification is not None
    for output in report.verification.outputs:
        assert -1.0 <= output.cosine <= 1.0
    # The operands are exact: softmax on them is the original model.
    original = onnx.load(str(source.path))
    expected = run(original, source.inputs)
    got = run(softmax_body_model(proto, SIGMOID), source.inputs)
    for key, value in expected.items():
        comparison = verify.compare(key, value, got[key])
        assert verify.check_tolerance(comparison, value, EXACT), (name, comparison)


@pytest.mark.parametrize("name,exporter", CASES)
def test_softmax_free_attention_rewrites_or_says_why_not(real_model, tmp_path, name, exporter):
    source = _source(real_model, name, exporter)
    layers, rewritten, reason = EXPECTED[name]
    out = tmp_path / "soft.onnx"
    passes = [SoftmaxFreeAttentionPass(SoftmaxFreeAttentionPass.Options(landmarks=8))]
    report = rewrite_file(source.path, out, passes, inputs=source.inputs)
    record = report.passes[0]
    assert record.stats == {"attention_replaced": rewritten, "softmax_left": layers - rewritten}
    left = [note for note in record.notes if "left as is" in note]
    assert len(left) == layers - rewritten
    assert all(reason in note for note in left)
    proto = onnx.load(str(out))
    assert count_ops(proto, SOFT, "ai.rewriter") == rewritten
    # The rewritten model runs (SegFormer's 256 queries against 16 keys failed before).
    assert report.verification is not None
    for output in report.verification.outputs:
        assert -1.0 <= output.cosine <= 1.0
