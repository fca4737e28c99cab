"""Make ``import torchvision`` (and so ``transformers``) work with the CPU torch here.

The torchvision 0.28 wheel that pairs with torch 2.13 ships compiled ops
(``torchvision/_C.so``) linked against a CUDA build of torch; they fail to load, and
torchvision's import then fails on ``torchvision::nms`` not existing. transformers
imports torchvision whenever it is installed, so ``from transformers import BertModel``
fails the same way ("Could not import module 'BertModel'"). Defining the two op
schemas torchvision checks for, before either is imported, is enough for the imports:
the model code is pure Python. Where torchvision's compiled ops do load (a torchvision
built for the torch installed, as on a CUDA machine), they are loaded instead and the
shim defines nothing: torchvision registering its own ``nms`` over the shim's aborts the
process. ``nms`` also gets a CPU kernel in Python (greedy, as
torchvision's) and a fake one (a data-dependent length, for ``torch.export``); nothing
here calls ``qnms``.

:func:`install` (which checks whether the schemas exist, so a second call, or another
definition of them, changes nothing) is what every user of transformers calls first: ``tests/conftest.py``, :mod:`examples.bert`, :mod:`examples.minilm`.
:func:`import_torchvision` also tells torchvision that its ops are there, so that
``torchvision.ops.nms`` and the detectors' post-processing run on the CPU kernel::

    from examples.torchvision_shim import import_torchvision

    torchvision = import_torchvision()  # None when torchvision is not installed
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from typing import Any

# The library fragment that defines the schemas: it must stay alive for the schemas
# (and the kernels) to stay registered.
_LIBRARY: Any = None


def install() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` unless they exist (idempotent:
    a second call, another shim's, or torchvision's own ops having loaded, leaves
    everything as it is)."""
    global _LIBRARY
    import torch

    if _LIBRARY is not None or torch._C._jit_get_schemas_for_operator("torchvision::nms"):
        return
    if _load_compiled_ops():  # torchvision's own ops work here: they define both
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", _nms, "CPU")
    library._register_fake("nms", _nms_fake)
    _LIBRARY = library


def _load_compiled_ops() -> bool:
    """Load torchvision's compiled ops (``torchvision/_C*.so``) as its import would, without
    importing it; False where torchvision or its ops library is missing, or the library
    does not load against this torch (undefined symbols of a CUDA build)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            library = Path(folder) / f"_C{suffix}"
            if library.exists():
                try:
                    torch.ops.load_library(str(library))
                except (OSError, RuntimeError):
                    return False
                return bool(torch._C._jit_get_schemas_for_operator("torchvision::nms"))
    return False


def import_torchvision() -> Any:
    """``torchvision`` with its ops usable (the shim's CPU kernel), or None when it is not
    installed.

    >>> tv = import_torchvision()  # doctest: +SKIP
    >>> tv.ops.nms(boxes, scores, 0.5)  # doctest: +SKIP
    """
    if importlib.util.find_spec("torchvision") is None:
        return None
    install()
    import torchvision
    import torchvision.extension

    if _LIBRARY is not None:  # our schemas, not torchvision's compiled ops
        # torchvision.ops.nms asks _has_ops() before calling torch.ops.torchvision.nms.
        torchvision.extension._has_ops = _has_ops
    return torchvision


def _has_ops() -> bool:
    """torchvision's ops are there (the shim's): a function, not a lambda, because
    TorchScript compiles it where torchvision's scripted code asks."""
    return True


def _nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy non-maximum suppression of ``[N, 4]`` (x1, y1, x2, y2) boxes: the indices
    kept, by decreasing score, as ``torchvision.ops.nms`` returns them."""
    import torch

    order = scores.argsort(descending=True, stable=True)
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


def _nms_fake(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """The output of ``nms`` on fake tensors: a data-dependent number of int64 indices."""
    import torch

    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64)
