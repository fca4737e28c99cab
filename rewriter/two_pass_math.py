"""Transitional: the two-pass softmax math moved to :mod:`rewriter.passes.two_pass_softmax.math`.

Only the backends' kernels (``exp_pair``, ``pair_sum``, ``softmax_cuda``) and their tests
still import this name; it goes when they import the new one.
"""

from __future__ import annotations

from rewriter.passes.two_pass_softmax.math import (  # noqa: F401
    EXP_POLY,
    EXP_POLY_MAX_REL_ERROR,
    LN2,
    LN2_HI,
    LN2_LO,
    LOG2E,
    T_CLAMP,
    reference_softmax,
)
