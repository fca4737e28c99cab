"""The attention matcher and math shared by ``sigmoid-attention`` and ``softmax-free-attention``.

No pass of its own:

* :mod:`.onnx_match`: scaled dot-product attention in an ONNX graph, one onnxscript
  pattern with alternatives, giving an :class:`~.onnx_match.AttentionMatch` each pass
  rewrites from;
* :mod:`.onnx_build`: a fused operator's Q, K, V and additive mask built from a match, and
  its output put back in the graph's layout;
* :mod:`.static`: what the matcher reads from the graph without running it: scales
  computed from static shapes, and whether an additive term is a mask or a bias;
* :mod:`.fx_match`: the same in a torch.fx graph (``scaled_dot_product_attention`` and
  explicit ``matmul(softmax(q @ kᵀ), v)``);
* :mod:`.math`: sigmoid and SOFT attention in torch, the one copy the custom ops, the
  benchmarks and the tests use.
"""
