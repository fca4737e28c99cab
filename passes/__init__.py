"""The built-in passes; importing this package registers each of them."""

from rewriter.passes import quantize, two_pass_softmax  # noqa: F401
