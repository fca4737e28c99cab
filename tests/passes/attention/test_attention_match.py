"""The shared attention matcher: every exporter form, the Attention operator, real exports."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from rewriter.passes.attention import onnx_match as attention
from tests import attention_models as am
from tests.helpers import model_from_text
from tests.real_models import count_ops

# form -> (scale, mask kind)
EXPECTED = {
    "div_transpose_additive": (0.5, "additive"),
    "mul_mask_first": (0.5, "additive"),
    "sqrt_scale_both_isnan_guard": (0.5, "additive"),
    "scale_in_q_boolean_mask_cast": (0.5, "boolean"),
    "no_mask_reshaped_key": (0.5, "none"),
}


@pytest.mark.parametrize("form", list(am.FORMS))
def test_every_form_gives_one_structured_match(form):
    model = am.attention_model(form)
    (match,) = attention.find_attention(model)
    scale, kind = EXPECTED[form]
    # sqrt(scale) as a float32 constant, squared: 0.70710677² = 0.49999998.
    assert match.scale == pytest.approx(scale, rel=1e-7)
    assert match.mask_kind == kind
    assert match.softmax is not None and match.softmax.op_type == "Softmax"
    assert match.query.name == "q" and match.value.name == "v"
    assert match.output.name == "y"
    assert match.key_length() == am.N
    assert (match.mask is None) == (kind == "none")


def test_find_does_not_change_the_model():
    model = am.attention_model("sqrt_scale_both_isnan_guard")
    before = [node.op_type for node in model.graph]
    attention.find_attention(model)
    assert [node.op_type for node in model.graph] == before


def test_attention_operator():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v, float[2, 1, 8, 8] m) => (float[2, 2, 8, 4] y) {
            y = Attention<scale = 0.25>(q, k, v, m)
        }
        """
    )
    (match,) = attention.find_attention(model)
    assert match.softmax is None and match.key is not None and match.key.name == "k"
    assert match.scale == 0.25 and match.mask_kind == "additive" and not match.causal


def test_grouped_attention_operator():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 4, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v) => (float[2, 4, 8, 4] y) {
            y = Attention(q, k, v)
        }
        """
    )
    (match,) = attention.find_attention(model)
    assert match.kv_groups == 2 and match.scale == 0.5


def test_attention_operator_with_kv_cache_is_not_matched():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 2, 8, 4] q, float[2, 2, 8, 4] k, float[2, 2, 8, 4] v, float[2, 2, 3, 4] pk, float[2, 2, 3, 4] pv) => (float[2, 2, 8, 4] y) {
            y = Attention(q, k, v, , pk, pv)
        }
        """
    )
    assert attention.find_attention(model) == []


def test_non_constant_scale_is_not_attention():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 2, 8, 4] q, float[2, 2, 4, 8] kt, float[2, 2, 8, 4] v, float s) => (float[2, 2, 8, 4] y) {
            z = MatMul(q, kt)
            a = Div(z, s)
            p = Softmax<axis = -1>(a)
            y = MatMul(p, v)
        }
        """
    )
    assert attention.find_attention(model) == []


# name -> attention layers; every other Softmax of the export is not attention.
REAL = [
    ("bert_eager_torchscript", 2),
    ("bert_sdpa_torchscript", 2),
    ("vit_torchscript", 2),
    ("llama_eager_dynamo", 2),
    pytest.param("bert_eager_dynamo", 2, marks=pytest.mark.slow),
    pytest.param("bert_sdpa_dynamo", 2, marks=pytest.mark.slow),
    pytest.param("llama_sdpa_dynamo", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,layers", REAL)
def test_real_exports_every_attention_found(real_model, name, layers):
    import onnx

    source = real_model(name)
    model = ir.load(source.path)
    found = attention.find_attention(model)
    assert len(found) == layers
    softmax_in_attention = {match.softmax.name for match in found if match.softmax is not None}
    assert len(softmax_in_attention) == layers
    total = count_ops(onnx.load(str(source.path), load_external_data=False), "Softmax")
    # ViT's output softmax is the one Softmax that is not attention.
    assert total - layers == (1 if name.startswith("vit") else 0)
    for match in found:
        head_dim = match.query.shape[-1] if match.query.shape is not None else None
        assert match.scale == pytest.approx(head_dim**-0.5, rel=1e-6)
        assert match.mask_kind == ("none" if name.startswith("vit") else "additive")
