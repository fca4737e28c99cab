"""two-pass-softmax: Softmax(x) -> TwoPassSoftmax(x), exact (Dukhan & Ablavatski 2020).

* :mod:`.onnx`: the ONNX pass (registered as ``two-pass-softmax``);
* :mod:`.fx`: its torch.fx twin and the custom ops ``torch.ops.rewriter.two_pass_softmax``
  / ``two_pass_log_softmax``;
* :mod:`.math`: the algorithm's constants and a numpy reference, shared by the ONNX
  bodies, the torch op and the TVM kernels;
* :mod:`.body`: the ONNX function bodies of ``TwoPassSoftmax`` / ``TwoPassLogSoftmax``
  and of their float64 ops ``TwoPassSoftmaxDouble`` / ``TwoPassLogSoftmaxDouble``.
"""

from __future__ import annotations

from rewriter.passes.two_pass_softmax.body import DOUBLE_TARGETS, TARGETS, function_proto
from rewriter.passes.two_pass_softmax.onnx import TwoPassSoftmaxOptions, TwoPassSoftmaxPass

__all__ = ["DOUBLE_TARGETS", "TARGETS", "TwoPassSoftmaxOptions", "TwoPassSoftmaxPass", "function_proto"]
