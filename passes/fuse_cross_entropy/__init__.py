"""fuse-cross-entropy: SoftmaxCrossEntropyLoss / NLL(LogSoftmax) / ... -> FusedCrossEntropy, exact.

Fed by an LM head, -> ``FusedLinearCrossEntropy`` (Liger-Kernel, Hsu et al. 2024; Cut
Cross-Entropy, Wijmans et al. 2024).

* :mod:`.onnx`: the ONNX pass (registered as ``fuse-cross-entropy``);
* :mod:`.fx`: its torch.fx twin, which calls the chunked losses of :mod:`.loss`;
* :mod:`.loss`: ``fused_linear_cross_entropy`` / ``fused_cross_entropy``, autograd
  functions that never hold the ``[tokens x vocab]`` logits;
* :mod:`.body`: the ONNX function bodies of ``FusedCrossEntropy`` /
  ``FusedLinearCrossEntropy``.
"""

from __future__ import annotations

from rewriter.passes.fuse_cross_entropy.body import LINEAR_LOSS, LOSS, function_proto
from rewriter.passes.fuse_cross_entropy.onnx import FuseCrossEntropyOptions, FuseCrossEntropyPass

__all__ = ["LINEAR_LOSS", "LOSS", "FuseCrossEntropyOptions", "FuseCrossEntropyPass", "function_proto"]
