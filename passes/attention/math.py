"""softmax(QKᵀ·s + mask)·V -> sigmoid / SOFT attention: the math in torch, in one place.

The torch.fx custom operators (:mod:`rewriter.passes.attention.fx_match`), the benchmark
(``benchmarks/attention.py``) and the fine-tuning example call these functions; the
ONNX function bodies of ``passes/sigmoid_attention/body.py`` and
``passes/softmax_free_attention/body.py`` compute the same formulas, and the tests check
them against each other and against numpy.

* Sigmoid attention, Ramapuram et al. 2024 (arXiv 2409.04431):
  ``sigmoid(QKᵀ·s + b + mask)·V`` with b = -ln(n); masked positions give exactly 0.
* SOFT, Lu et al. 2021 (arXiv 2110.11945) and 2022 (arXiv 2207.03341): Gaussian-kernel
  attention ``K(Q, K̃)·pinv(K(Q̃, K̃))·K(Q̃, K)·V`` with average-pooled landmarks and a
  Newton–Schulz pseudo-inverse, linear in the sequence length.

Masks are additive (float; <= :data:`MASKED_AT_OR_BELOW` is masked) or boolean
(True = attend), broadcastable to [..., n_q, n_k], as in
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch

MASKED_AT_OR_BELOW = -1e4  # attention.onnx_match.MASKED_AT_OR_BELOW (no onnx import here)
EMPTY_SEGMENT = 1e-6
TINY = 1e-30


def keep_mask(
    mask: torch.Tensor | None, causal: bool, n_q: int, n_k: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean "may attend" mask from an additive/boolean mask and ``causal``."""
    keep = None
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > MASKED_AT_OR_BELOW
    if causal:
        lower = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
        keep = lower if keep is None else keep & lower
    return keep


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    bias: float,
    causal: bool = False,
) -> torch.Tensor:
    """``sigmoid(QKᵀ·scale + bias + mask)·V``; masked positions contribute 0.

    >>> q = k = v = torch.zeros(1, 1, 2, 4)
    >>> sigmoid_attention(q, k, v, scale=0.5, bias=-math.log(2)).shape
    torch.Size([1, 1, 2, 4])
    """
    logits = (q * scale) @ k.transpose(-2, -1) + bias
    if mask is not None and mask.dtype != torch.bool:
        logits = logits + mask
    probs = torch.sigmoid(logits)
    keep = keep_mask(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)
    return probs @ v


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``exp(-||a_i - b_j||²/2)`` as ``exp(a·b - ||a||²/2 - ||b||²/2)``, [..., p, q]."""
    dots = a @ b.transpose(-2, -1)
    return torch.exp(
        dots - 0.5 * (a * a).sum(-1, keepdim=True) - 0.5 * (b * b).sum(-1).unsqueeze(-2)
    )


def newton_schulz_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """pinv(a) by Newton–Schulz: X0 = aᵀ/(||a||₁·||a||∞), X ← 2X − X·a·X.

    >>> a = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> newton_schulz_pinv(a, 30).diagonal()
    tensor([0.5000, 0.2500])
    """
    absolute = a.abs()
    norm_1 = absolute.sum(-2, keepdim=True).amax(-1, keepdim=True)
    norm_inf = absolute.sum(-1, keepdim=True).amax(-2, keepdim=True)
    x = a.transpose(-2, -1) / (norm_1 * norm_inf).clamp_min(TINY)
    for _ in range(iterations):
        x = 2 * x - x @ a @ x
    return x


def landmark_pools(n: int, m: int, keep: torch.Tensor) -> torch.Tensor:
    """[..., m, n] averaging weights: segment j holds positions i with floor(i·m/n) = j,
    and only kept positions (``keep`` [..., 1, n], float 0/1) are averaged."""
    m = min(m, n)
    segment = torch.arange(n, device=keep.device) * m // n
    onehot = (segment[:, None] == torch.arange(m, device=keep.device)[None, :]).to(keep.dtype)
    weights = onehot * keep.transpose(-2, -1)  # [..., n, m]
    counts = weights.sum(-2, keepdim=True).clamp_min(EMPTY_SEGMENT)
    return (weights / counts).transpose(-2, -1)


def softmax_free_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    landmarks: int,
    iterations: int,
    causal: bool = False,
) -> torch.Tensor:
    """SOFT: ``K(Q, K̃)·pinv(K(Q̃, K̃))·K(Q̃, K)·V`` on Q, K scaled by sqrt(scale).

    Pass ``k=q`` for the paper's symmetric form. A query-dependent mask (causal) is
    reduced to its key padding: SOFT is bidirectional. The queries are pooled over their
    own positions (there may be fewer keys: SegFormer), keeping the keys' padding when
    they are as many. Computed in float32 (or wider).

    >>> x = torch.randn(1, 1, 8, 4)
    >>> softmax_free_attention(x, x, x, scale=0.5, landmarks=4, iterations=20).shape
    torch.Size([1, 1, 8, 4])
    """
    dtype = q.dtype
    wide = torch.promote_types(dtype, torch.float32)
    root = math.sqrt(scale)
    qs, ks, vs = q.to(wide) * root, k.to(wide) * root, v.to(wide)
    n = ks.shape[-2]
    keep_bool = keep_mask(mask, False, q.shape[-2], n, q.device)
    if keep_bool is None:
        keep = torch.ones(1, n, dtype=wide, device=q.device)
    else:
        keep = keep_bool.to(wide).amax(-2, keepdim=True)  # [..., 1, n]
    n_q = qs.shape[-2]
    m = min(landmarks, n_q, n)
    pools = landmark_pools(n, m, keep)
    keep_q = keep if n_q == n else torch.ones(1, n_q, dtype=wide, device=q.device)
    q_land, k_land = landmark_pools(n_q, m, keep_q) @ qs, pools @ ks
    left = gaussian_kernel(qs, k_land)
    middle = gaussian_kernel(q_land, k_land)
    right = gaussian_kernel(q_land, ks) * keep
    return (left @ (newton_schulz_pinv(middle, iterations) @ (right @ vs))).to(dtype)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
) -> torch.Tensor:
    """The reference: ``softmax(QKᵀ·scale + mask)·V`` (explicit, for benchmarks)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, -1) @ v
