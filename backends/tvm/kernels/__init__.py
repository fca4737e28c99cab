"""Our TIR kernels: the two-pass softmax (Dukhan & Ablavatski 2020) and its baselines."""

from __future__ import annotations

from rewriter.backends.tvm.kernels.softmax import three_pass_softmax, two_pass_softmax

__all__ = ["three_pass_softmax", "two_pass_softmax"]
