"""Make ``import torchvision`` (and so ``transformers``) work with the CPU torch here.

The torchvision 0.28 wheel that pairs with torch 2.13 ships compiled ops
(``torchvision/_C.so``) linked against a CUDA build of torch; they fail to load, and
torchvision's import then fails on ``torchvision::nms`` not existing. transformers
imports torchvision whenever it is installed, so ``from transformers import BertModel``
fails the same way ("Could not import module 'BertModel'"). Defining the two op
schemas torchvision checks for, before either is imported, is enough: the model code
is pure Python. ``nms`` also gets a CPU kernel in Python (greedy, as torchvision's),
so detectors run; nothing here calls ``qnms``.

Call :func:`install` before the first import of torchvision or transformers::

    from benchmarks.torchvision_shim import install

    install()
    import torchvision
"""

from __future__ import annotations

from typing import Any

# The library fragment that defines the schemas: it must stay alive for the schemas
# (and the kernel) to stay registered.
_LIBRARY: Any = None


def install() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` unless they exist (idempotent:
    a second call, or torchvision's own ops having loaded, leaves everything as it is)."""
    global _LIBRARY
    import torch

    if _LIBRARY is not None or torch._C._jit_get_schemas_for_operator("torchvision::nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", _nms, "CPU")
    _LIBRARY = library


def _nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy non-maximum suppression of ``[N, 4]`` (x1, y1, x2, y2) boxes: the indices
    kept, by decreasing score, as ``torchvision.ops.nms`` returns them."""
    import torch

    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep = []
    while order.numel():
        best, order = order[0], order[1:]
        keep.append(best)
        width = (torch.minimum(x2[order], x2[best]) - torch.maximum(x1[order], x1[best])).clamp(0)
        height = (torch.minimum(y2[order], y2[best]) - torch.maximum(y1[order], y1[best])).clamp(0)
        overlap = width * height
        iou = overlap / (areas[order] + areas[best] - overlap)
        order = order[iou <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.int64)
