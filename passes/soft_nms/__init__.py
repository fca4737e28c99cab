"""soft-nms: NonMaxSuppression -> SoftNonMaxSuppression, Soft-NMS (Bodla et al. 2017).

* :mod:`.onnx`: the ONNX pass (registered as ``soft-nms``);
* :mod:`.scores`: the rewiring of "the scores of the selected boxes" to the decayed scores;
* :mod:`.body`: the ONNX function body of ``SoftNonMaxSuppression``;
* :mod:`.math`: the algorithm, its IoU and the numpy reference;
* :mod:`.fx`: the torch.fx twin (``torchvision.ops.nms`` / ``batched_nms`` ->
  ``torch.ops.rewriter.soft_nms``).
"""

from __future__ import annotations

from rewriter.passes.soft_nms.body import OP_TYPE, function_proto
from rewriter.passes.soft_nms.math import METHODS, soft_nms
from rewriter.passes.soft_nms.onnx import SoftNmsOptions, SoftNmsPass

__all__ = ["METHODS", "OP_TYPE", "SoftNmsOptions", "SoftNmsPass", "function_proto", "soft_nms"]
