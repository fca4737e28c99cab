"""A torchvision detector as an ONNX file, and how its detections change under Soft-NMS.

Trained detector weights cannot be downloaded here, so the detector has random weights
(``weights=None``, seeded) and a re-initialised classification head: torchvision
initialises SSD-lite's head so that every class gets the same score, and then every NMS
decision is a tie. The point is the graph's structure: torchvision's TorchScript export
puts ``NonMaxSuppression`` in the ``else`` branch of an ``If`` (``batched_nms``), and
gathers the boxes, scores and labels of ``keep[:detections_per_img]`` after it.

Used by the slow soft-nms test and ``benchmarks/soft_nms.py``::

    model = build("ssdlite")
    feeds = export(model, Path("ssdlite.onnx"))
    print(fidelity(hard_outputs, soft_outputs))
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from examples.torchvision_shim import import_torchvision

SIZE = 320
NUM_CLASSES = 5  # background + 4
OUTPUTS = ("boxes", "scores", "labels")


def build(kind: str = "ssdlite", seed: int = 0) -> Any:
    """An eval-mode torchvision detector with seeded random weights: ``ssdlite``
    (SSD-lite 320, MobileNetV3) or ``fasterrcnn`` (Faster R-CNN MobileNetV3 320 FPN)."""
    import torch

    torchvision = import_torchvision()
    if torchvision is None:
        raise RuntimeError("torchvision is not installed (pip install -e '.[dev]')")
    torch.manual_seed(seed)
    detection = torchvision.models.detection
    if kind == "ssdlite":
        model = detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES
        )
        head = model.head.classification_head
    elif kind == "fasterrcnn":
        model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES
        )
        head = model.roi_heads.box_predictor
    else:
        raise ValueError(f"unknown detector {kind!r}")
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def image(seed: int = 0) -> np.ndarray:
    """A [3, SIZE, SIZE] float32 image in [0, 1]: smooth blobs, so the features vary."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    picture = np.zeros((3, SIZE, SIZE))
    for _ in range(12):
        cy, cx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.2)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        picture += blob[None] * rng.uniform(0, 1, (3, 1, 1))
    return np.clip(picture, 0, 1).astype(np.float32)


def export(model: Any, path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Export ``model`` with the TorchScript exporter (opset 17) at ``path``; returns
    feeds (``{"image": [3, SIZE, SIZE]}``). The dynamo exporter fails on the
    data-dependent NMS shapes."""
    import torch

    picture = image(seed)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            ([torch.from_numpy(picture)],),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=list(OUTPUTS),
        )
    return {"image": picture}


def fidelity(hard: dict[str, np.ndarray], soft: dict[str, np.ndarray]) -> dict[str, float]:
    """How the detections of a Soft-NMS model differ from the hard-NMS original's.

    A detection is a (box, label) pair; ``kept`` counts the original's that Soft-NMS
    also outputs (with the same box and label), ``kept_in_order`` those at the same rank
    among the kept, ``new`` the Soft-NMS detections the original suppressed. The score
    figures are Soft-NMS's decayed score over the original score of the kept ones, and
    the decayed scores of the new ones.

    >>> same = {"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.ones(1)}
    >>> fidelity(same, same)["kept"]
    1.0
    """

    def keys(out: dict[str, np.ndarray]) -> list[tuple[Any, ...]]:
        return [
            (*box.tolist(), int(label))
            for box, label in zip(out["boxes"], out["labels"], strict=True)
        ]

    hard_keys, soft_keys = keys(hard), keys(soft)
    soft_rank = {key: i for i, key in reversed(list(enumerate(soft_keys)))}
    kept = [(i, soft_rank[key]) for i, key in enumerate(hard_keys) if key in soft_rank]
    ratios = np.array(
        [soft["scores"][j] / hard["scores"][i] for i, j in kept if hard["scores"][i] > 0]
    )
    new = [j for j, key in enumerate(soft_keys) if key not in set(hard_keys)]
    order = [j for _, j in kept]
    return {
        "detections_hard": float(len(hard_keys)),
        "detections_soft": float(len(soft_keys)),
        "kept": float(len(kept)),
        "kept_in_order": float(
            sum(a < b for a, b in zip(order, order[1:], strict=False)) + bool(order)
        ),
        "new": float(len(new)),
        "score_ratio_mean": float(ratios.mean()) if ratios.size else 1.0,
        "score_ratio_min": float(ratios.min()) if ratios.size else 1.0,
        "decayed_of_kept": float(np.mean(ratios < 1)) if ratios.size else 0.0,
        "new_score_mean": float(soft["scores"][new].mean()) if new else 0.0,
        "new_score_max": float(soft["scores"][new].max()) if new else 0.0,
        "top_score_hard": float(hard["scores"].max()) if len(hard_keys) else 0.0,
    }
