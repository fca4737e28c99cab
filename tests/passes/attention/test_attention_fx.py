"""The fx twins of sigmoid-attention and softmax-free-attention: matching, custom ops,
gradients, and agreement with the ONNX function bodies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewriter import fx as rewriter_fx
from rewriter.errors import InputError
from rewriter.passes.attention import math as attention_math
from rewriter.passes.sigmoid_attention import OP_TYPE as SIGMOID_OP
from rewriter.passes.sigmoid_attention import SigmoidAttentionOptions
from rewriter.passes.sigmoid_attention import function_proto as sigmoid_body
from rewriter.passes.sigmoid_attention.fx import SigmoidAttentionFxPass
from rewriter.passes.softmax_free_attention import OP_TYPE as SOFT_OP
from rewriter.passes.softmax_free_attention import function_proto as soft_body
from tests import attention_models as am
from tests.helpers import run

# float32 on both sides, different operation orders: a few ulp of outputs ~10.
ATOL = 1e-5


class Explicit(nn.Module):
    """matmul-softmax-matmul as modules write it, ending in a (non-attention) softmax."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        probs = self.dropout(torch.softmax(scores + mask, dim=-1))
        return (probs @ v).transpose(1, 2).reshape(b, n, d).softmax(-1)


class Sdpa(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.qkv, self.heads, self.causal = nn.Linear(dim, 3 * dim), heads, causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, d)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 5:] = float("-inf")
    return torch.randn(2, 8, 16), mask


def op_targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if "rewriter" in str(node.target)]


@pytest.mark.parametrize("module", [Explicit, Sdpa])
@pytest.mark.parametrize(
    "spec,op",
    [
        ("sigmoid-attention", "sigmoid_attention"),
        ("softmax-free-attention(landmarks=4)", "softmax_free_attention"),
    ],
)
def test_structure_gradients_and_notes(module, spec, op):
    model = module().eval()
    gm, report = rewriter_fx.rewrite(model, spec, inputs())
    record = report.passes[0]
    other = 1 if module is Explicit else 0
    assert record.stats == {"attention_replaced": 1, "softmax_left": other}
    assert op_targets(gm) == [f"rewriter.{op}.default"]
    gm.graph.lint()
    if module is Explicit:
        assert any("not attention" in note for note in record.notes)
        assert any("dropout" in note for note in record.notes)
    assert report.verification is not None and not report.verification.enforced
    # The rewritten module trains: gradients reach the projection.
    gm(*inputs()).square().sum().backward()
    grad = model.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_idempotent_and_negative():
    gm, _ = rewriter_fx.rewrite(Sdpa().eval(), "sigmoid-attention", inputs())
    again, report = rewriter_fx.rewrite(gm, "sigmoid-attention", inputs())
    assert report.passes[0].stats == {"attention_replaced": 0, "softmax_left": 0}
    _, report = rewriter_fx.rewrite(nn.Softmax(-1), "sigmoid-attention", (torch.randn(2, 5),))
    assert report.passes[0].stats == {"attention_replaced": 0, "softmax_left": 1}


def test_sigmoid_needs_a_length_without_shapes():
    gm = torch.fx.symbolic_trace(Explicit())  # no example inputs: no shapes
    with pytest.raises(InputError, match="max_seq_len"):
        SigmoidAttentionFxPass()(gm)
    options = SigmoidAttentionOptions(max_seq_len=8)
    # Without shapes the SDPA scale (1/sqrt(d)) is unknown: skipped and said why.
    result = SigmoidAttentionFxPass(options)(torch.fx.symbolic_trace(Sdpa()))
    assert result.stats["attention_replaced"] == 0 and "head dimension" in result.notes[0]


def test_causal_sdpa_matches_the_formula():
    model = Sdpa(causal=True).eval()
    x, _ = inputs()
    gm, _ = rewriter_fx.rewrite(model, "sigmoid-attention(max_seq_len=16)", (x, torch.zeros(1)))
    with torch.no_grad():
        q, k, v = model.qkv(x).reshape(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(8) - math.log(16)
        probs = torch.sigmoid(logits).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), 0.0)
        expected = (probs @ v).transpose(1, 2).reshape(2, 8, 16)
        torch.testing.assert_close(gm(x, torch.zeros(1)), expected, rtol=0, atol=ATOL)


def test_torch_export_graph():
    model = Sdpa().eval()
    program = torch.export.export(model, inputs())
    gm, report = rewriter_fx.rewrite(
        program.module(), "softmax-free-attention(landmarks=4)", inputs()
    )
    assert report.passes[0].stats["attention_replaced"] == 1


def test_custom_op_gradients_match_the_torch_math():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(
        torch.ops.rewriter.sigmoid_attention.default, (q, k, v, None, 0.5, -2.0, False)
    )
    torch.library.opcheck(
        torch.ops.rewriter.softmax_free_attention.default, (q, k, v, None, 0.5, 3, 8)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.ops.rewriter.sigmoid_attention(a, b, c, None, 0.5, -2.0, False),
        (q, k, v),
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.ops.rewriter.softmax_free_attention(a, b, c, None, 0.5, 3, 8),
        (q, k, v),
    )


@pytest.mark.parametrize("op_type", [SIGMOID_OP, SOFT_OP])
def test_one_math_two_fronts(op_type):
    """The ONNX function body computes what the torch math (the fx custom op) computes."""
    feeds = am.feeds("div_transpose_additive")
    q, k, v, mask = (torch.from_numpy(feeds[name]) for name in ("q", "k", "v", "mask"))
    if op_type == SIGMOID_OP:
        model = am.op_model(op_type, sigmoid_body(18), {"scale": 0.5, "bias": -2.0})
        expected = attention_math.sigmoid_attention(q, k, v, mask, scale=0.5, bias=-2.0)
    else:
        model = am.op_model(
            op_type, soft_body(18), {"scale": 0.5, "landmarks": 4, "iterations": 20}
        )
        expected = attention_math.softmax_free_attention(
            q, k, v, mask, scale=0.5, landmarks=4, iterations=20
        )
    scale = float(expected.abs().max())
    np.testing.assert_allclose(
        run(model, feeds)["y"], expected.numpy(), rtol=0, atol=ATOL * max(scale, 1.0)
    )


@pytest.mark.parametrize(
    "module,spec,op_type",
    [
        (lambda: Sdpa(causal=True), "sigmoid-attention", SIGMOID_OP),
        (Explicit, "softmax-free-attention(landmarks=4)", SOFT_OP),
    ],
)
def test_export_onnx_runs_in_onnxruntime(tmp_path, module, spec, op_type):
    import onnx

    from rewriter import verify

    gm, _ = rewriter_fx.rewrite(module().eval(), spec, inputs())
    path = rewriter_fx.export_onnx(gm, inputs(), tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [node.op_type for node in proto.graph.node if node.domain] == [op_type]
    x, mask = inputs()
    feeds = dict(zip([i.name for i in proto.graph.input], [x.numpy(), mask.numpy()], strict=True))
    (actual,) = verify.run(str(path), feeds).values()
    with torch.no_grad():
        np.testing.assert_allclose(actual, gm(x, mask).numpy(), rtol=0, atol=ATOL)


@pytest.mark.slow  # trains a model (~20 s on 2 cores even with one epoch each)
def test_finetune_example_runs(capsys):
    pytest.importorskip("sklearn")
    from examples import finetune_attention

    finetune_attention.main(["--epochs", "1", "--finetune-epochs", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert (
        sum(line.startswith(("sigmoid-attention", "softmax-free-attention")) for line in lines) == 3
    )
