"""softmax attention -> torch.ops.rewriter.sigmoid_attention, on torch.fx.

The fx twin of ``sigmoid-attention`` (Ramapuram et al. 2024, arXiv 2409.04431), with the
ONNX pass's name and ``Options``. Approximate, like its ONNX twin: the point of this front
is that the rewritten module trains, so it can be fine-tuned to recover the accuracy the
swap costs (``examples/finetune_attention.py``). Attention is found by
:mod:`rewriter.passes.attention.fx_match`; each site becomes one call of the custom op
``rewriter::sigmoid_attention``, whose math is
:func:`rewriter.passes.attention.math.sigmoid_attention` and whose backward differentiates
it, and which exports to ``ai.rewriter::SigmoidAttention`` with the ONNX pass's body.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from rewriter.errors import InputError
from rewriter.fx.export import register_onnx_export
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes.attention import fx_match
from rewriter.passes.attention import math as amath
from rewriter.passes.sigmoid_attention import body
from rewriter.passes.sigmoid_attention import onnx as onnx_sigmoid


@torch.library.custom_op("rewriter::sigmoid_attention", mutates_args=())
def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    bias: float,
    causal: bool,
) -> torch.Tensor:
    """Sigmoid attention (see :func:`rewriter.passes.attention.math.sigmoid_attention`).

    >>> x = torch.zeros(1, 1, 2, 4)
    >>> torch.ops.rewriter.sigmoid_attention(x, x, x, None, 0.5, -0.69, False).shape
    torch.Size([1, 1, 2, 4])
    """
    return amath.sigmoid_attention(q, k, v, mask, scale=scale, bias=bias, causal=causal)


fx_match.register_attention_op(
    sigmoid_attention,
    lambda q, k, v, mask, a: amath.sigmoid_attention(
        q, k, v, mask, scale=a[0], bias=a[1], causal=a[2]
    ),
)


@register_fx_pass
class SigmoidAttentionFxPass(FxPass):
    """Attention -> ``torch.ops.rewriter.sigmoid_attention`` (b = -ln ``max_seq_len``).

    >>> gm = torch.fx.symbolic_trace(module)  # doctest: +SKIP
    >>> SigmoidAttentionFxPass(SigmoidAttentionOptions(max_seq_len=128))(gm).stats  # doctest: +SKIP
    {'attention_replaced': 2, 'softmax_left': 0}
    """

    name = onnx_sigmoid.SigmoidAttentionPass.name
    exact = onnx_sigmoid.SigmoidAttentionPass.exact
    Options = onnx_sigmoid.SigmoidAttentionOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        sites, notes = fx_match.find_sites(gm)
        n = self.options.max_seq_len
        for site in sites:
            length = n or fx_match.key_length(site)
            if length is None:
                raise InputError(
                    f"{self.name}: the sequence length of {site.output.name!r} is unknown; give "
                    "max_seq_len=N or example_inputs with the training length"
                )
            if site.dropout:
                notes.append(
                    f"{site.output.name!r}: the dropout on the attention weights is removed"
                )
            fx_match.replace_site(
                gm,
                site,
                torch.ops.rewriter.sigmoid_attention.default,
                [site.scale, -math.log(length), site.causal],
            )
        stats = {
            "attention_replaced": len(sites),
            "softmax_left": sum("left as is" in n for n in notes),
        }
        return FxPassResult(gm, bool(sites), stats, notes)


register_onnx_export(
    lambda: {
        torch.ops.rewriter.sigmoid_attention.default: fx_match.dynamo_translation(
            body.OP_TYPE, ("scale", "bias", "causal")
        )
    },
    {body.OP_TYPE: body.function_proto},
)
