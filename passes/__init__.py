"""The built-in passes; importing this package registers each of them."""

from rewriter.passes import (  # noqa: F401
    quantize,
    sigmoid_attention,
    softmax_free_attention,
    two_pass_softmax,
)
