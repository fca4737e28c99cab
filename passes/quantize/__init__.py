"""quantize: MatMul/Gemm/Conv weights -> int8/int4 initializers + DequantizeLinear, approximate.

Layer-wise mixed precision (Dumitru et al. 2024, arXiv 2406.17415).

* :mod:`.onnx`: the ONNX pass (registered as ``quantize``);
* :mod:`.fx`: its torch.fx front (``QuantizeFxPass``, ``torch.ops.rewriter.dequantize_weight``
  and the int8 activation ops) and its ONNX export;
* :mod:`.math`: the numpy math both fronts share: symmetric per-channel / per-group
  quantization, the LIM and ZD importance scores, the bit allocation.
"""

from __future__ import annotations

from rewriter.passes.quantize.onnx import QuantizeOptions, QuantizePass

__all__ = ["QuantizeOptions", "QuantizePass"]
