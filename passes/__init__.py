"""The built-in passes; importing this package registers each of them."""

from rewriter.passes import (  # noqa: F401
    fuse_cross_entropy,
    pruning,
    quantize,
    sigmoid_attention,
    softmax_free_attention,
    two_pass_softmax,
)
