"""softmax attention -> torch.ops.rewriter.softmax_free_attention (SOFT), on torch.fx.

The fx twin of ``softmax-free-attention`` (SOFT, Lu et al. 2021, arXiv 2110.11945), with
the ONNX pass's name and ``Options``. Approximate, like its ONNX twin: the rewritten
module trains, so it can be fine-tuned to recover the accuracy the swap costs
(``examples/finetune_attention.py``). Attention is found by
:mod:`rewriter.passes.attention.fx_match`; each site becomes one call of the custom op
``rewriter::softmax_free_attention``, whose math is
:func:`rewriter.passes.attention.math.softmax_free_attention` and whose backward
differentiates it, and which exports to ``ai.rewriter::SoftmaxFreeAttention`` with the
ONNX pass's body.
"""

from __future__ import annotations

import torch
from torch import fx

from rewriter.fx.export import register_onnx_export
from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes.attention import fx_match
from rewriter.passes.attention import math as amath
from rewriter.passes.softmax_free_attention import body
from rewriter.passes.softmax_free_attention import onnx as onnx_soft


@torch.library.custom_op("rewriter::softmax_free_attention", mutates_args=())
def softmax_free_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    landmarks: int,
    iterations: int,
) -> torch.Tensor:
    """SOFT attention (see :func:`rewriter.passes.attention.math.softmax_free_attention`).

    >>> x = torch.randn(1, 1, 8, 4)
    >>> torch.ops.rewriter.softmax_free_attention(x, x, x, None, 0.5, 4, 20).shape
    torch.Size([1, 1, 8, 4])
    """
    return amath.softmax_free_attention(
        q, k, v, mask, scale=scale, landmarks=landmarks, iterations=iterations
    )


fx_match.register_attention_op(
    softmax_free_attention,
    lambda q, k, v, mask, a: amath.softmax_free_attention(
        q, k, v, mask, scale=a[0], landmarks=a[1], iterations=a[2]
    ),
)


@register_fx_pass
class SoftmaxFreeAttentionFxPass(FxPass):
    """Attention -> ``torch.ops.rewriter.softmax_free_attention`` (SOFT).

    >>> SoftmaxFreeAttentionFxPass()(torch.fx.symbolic_trace(module)).stats  # doctest: +SKIP
    {'attention_replaced': 2, 'softmax_left': 0}
    """

    name = onnx_soft.SoftmaxFreeAttentionPass.name
    exact = onnx_soft.SoftmaxFreeAttentionPass.exact
    Options = onnx_soft.SoftmaxFreeAttentionOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        sites, notes = fx_match.find_sites(gm)
        options = self.options
        for site in sites:
            if site.causal:
                notes.append(f"{site.output.name!r}: is_causal dropped, SOFT is bidirectional")
            if site.dropout:
                notes.append(
                    f"{site.output.name!r}: the dropout on the attention weights is removed"
                )
            if options.symmetric:
                site.k, site.k_t = site.q, None
            fx_match.replace_site(
                gm,
                site,
                torch.ops.rewriter.softmax_free_attention.default,
                [site.scale, options.landmarks, options.iterations],
            )
        stats = {
            "attention_replaced": len(sites),
            "softmax_left": sum("left as is" in n for n in notes),
        }
        return FxPassResult(gm, bool(sites), stats, notes)


register_onnx_export(
    lambda: {
        torch.ops.rewriter.softmax_free_attention.default: fx_match.dynamo_translation(
            body.OP_TYPE, ("scale", "landmarks", "iterations")
        )
    },
    {body.OP_TYPE: body.function_proto},
)
