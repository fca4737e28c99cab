"""The pruning family: prune, prune-2to4, prune-width, approximate.

* :mod:`.prune`: ``prune``, layer-adaptive magnitude pruning with the sparsity of each
  layer allocated by rate-distortion (Xu et al., ICCV 2023); its distortion curves are
  measured in ONNX Runtime by :mod:`.probe`;
* :mod:`.prune_2to4`: ``prune-2to4``, 2:4 semi-structured sparsity;
* :mod:`.prune_width`: ``prune-width``, MAW width pruning of the MLPs (arXiv 2512.22671);
* :mod:`.fx`: their torch.fx twins, which call the torch implementations
  :mod:`.prune_torch` and :mod:`.prune_width_torch`;
* :mod:`.math`: the arithmetic both fronts share (magnitudes, allocation, MAW scores).
"""

from __future__ import annotations

from rewriter.passes.pruning.prune import PruneOptions, PrunePass
from rewriter.passes.pruning.prune_2to4 import Prune2to4Options, Prune2to4Pass
from rewriter.passes.pruning.prune_width import PruneWidthOptions, PruneWidthPass

__all__ = [
    "Prune2to4Options",
    "Prune2to4Pass",
    "PruneOptions",
    "PrunePass",
    "PruneWidthOptions",
    "PruneWidthPass",
]
