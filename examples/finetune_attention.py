"""Swap softmax attention for sigmoid attention or SOFT, then fine-tune it back.

A small vision transformer is trained here, on the CPU in well under a minute, on
scikit-learn's handwritten digits (1797 8x8 images, shipped with scikit-learn: nothing
is downloaded): 16 tokens of 2x2 pixels, 2 layers, 2 heads of 16 dimensions, using
``F.scaled_dot_product_attention``. Then, for each pass, on a copy of it:

1. accuracy with softmax attention (the trained model);
2. accuracy right after the swap (``rewriter.fx.rewrite`` with the fx pass: the
   custom operators of :mod:`rewriter.passes.attention.fx_match`), no training;
3. accuracy after a short fine-tune of the rewritten module (all weights, Adam).

Run: ``.venv/bin/python examples/finetune_attention.py`` (``--epochs``, ``--finetune-epochs``,
``--seed``); it prints one line per pass with the three accuracies.

Sigmoid attention: Ramapuram et al. 2024 (arXiv 2409.04431); SOFT: Lu et al. 2021
(arXiv 2110.11945).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewriter import fx as rewriter_fx

PATCH = 2
TOKENS = (8 // PATCH) ** 2  # 16
DIM, HEADS, LAYERS, CLASSES = 32, 2, 2, 10


class Block(nn.Module):
    """Pre-norm transformer block with ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.position = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(x).mean(1))


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test patches [N, 16, 4] in [0, 1] and labels, an 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8]
    patches = (
        images.reshape(-1, 4, PATCH, 4, PATCH)
        .permute(0, 1, 3, 2, 4)
        .reshape(-1, TOKENS, PATCH * PATCH)
    )
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return patches[train], labels[train], patches[test], labels[test]


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(y) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    start = time.perf_counter()
    model = DigitsViT()
    train(model, x_train, y_train, epochs=args.epochs, lr=3e-3, seed=args.seed)
    base = accuracy(model, x_test, y_test)
    print(
        f"trained softmax model in {time.perf_counter() - start:.1f} s: test accuracy {base:.1f}%",
        flush=True,
    )
    print(f"{'pass':<40} {'softmax':>8} {'swapped':>8} {'tuned':>8}")
    for spec in (
        f"sigmoid-attention(max_seq_len={TOKENS})",
        "softmax-free-attention(landmarks=4)",
        "softmax-free-attention(landmarks=4,symmetric=true)",
    ):
        start = time.perf_counter()
        gm, report = rewriter_fx.rewrite(copy.deepcopy(model), spec, (x_test[:8],))
        assert report.passes[0].stats["attention_replaced"] == LAYERS, report.passes[0].stats
        swapped = accuracy(gm, x_test, y_test)
        train(gm, x_train, y_train, epochs=args.finetune_epochs, lr=1e-3, seed=args.seed + 1)
        tuned = accuracy(gm, x_test, y_test)
        seconds = time.perf_counter() - start
        print(
            f"{spec:<40} {base:7.1f}% {swapped:7.1f}% {tuned:7.1f}%   ({seconds:.1f} s)", flush=True
        )


if __name__ == "__main__":
    main()
