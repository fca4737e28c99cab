"""Benchmark: Soft-NMS (Bodla et al. 2017) -- detection quality, a real detector, and runtime.

1. **mAP on crowded scenes.** Trained detector weights cannot be downloaded here, so the
   paper's setting is built honestly: synthetic images of crowds (groups of heavily
   overlapping ground-truth objects) and a simulated detector (several jittered
   detections per object, scored by how well they fit plus noise; misses; false
   positives). Each image's detections go through one ``NonMaxSuppression`` node, as
   written (hard NMS, ONNX Runtime) and after ``soft-nms`` (linear and Gaussian; ONNX
   Runtime running the rewritten model), keeping 100 per image; COCO mAP (pycocotools)
   scores each.
2. **A real detector.** torchvision's SSD-lite 320 with random weights, exported with
   the TorchScript exporter (its NMS sits in an ``If`` branch), rewritten: how many of
   its detections change (:func:`examples.detector.fidelity`).
3. **Runtime** at ``--boxes`` boxes (one batch, one class, crowded, IoU threshold 0.5;
   as torchvision exports NMS -- no cap, no score threshold -- and with a detector's
   cap of 300 boxes and score threshold 0.05), one thread, fastest of interleaved
   rounds: our TVM CPU kernel (hard and Gaussian; and the compiled model end to end)
   against ONNX Runtime's
   ``NonMaxSuppression`` (hard), ONNX Runtime running our function body (Gaussian),
   ``torchvision.ops.nms`` (hard; torchvision's C++ ops do not load on this CPU torch, so
   this is the shim's Python kernel, ``examples/torchvision_shim.py``), and Soft-NMS
   references in numpy (:func:`rewriter.passes.soft_nms.math.soft_nms`) and in torch.

    .venv/bin/python benchmarks/soft_nms.py                  # everything
    .venv/bin/python benchmarks/soft_nms.py --quick          # fewer images, 1k boxes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timing  # noqa: E402

IMAGE = 640
IOU = 0.5
SIGMA = 0.5
KEEP = 100


# ----------------------------------------------------------------------------------------
# Crowded scenes and a simulated detector
# ----------------------------------------------------------------------------------------


def crowd(rng: np.random.Generator) -> np.ndarray:
    """Ground-truth boxes (x1, y1, x2, y2) of one image: groups of 2-4 objects that
    overlap heavily (neighbours' IoU mostly 0.3-0.7), like people in a crowd."""
    boxes = []
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(100, IMAGE - 100, 2)
        width, height = rng.uniform(40, 110), rng.uniform(60, 160)
        for member in range(rng.integers(2, 5)):
            shift = member * width * rng.uniform(0.2, 0.45)
            x = cx + shift + rng.normal(0, 4)
            y = cy + rng.normal(0, height * 0.08)
            scale = rng.uniform(0.85, 1.15)
            boxes.append(
                [
                    x - width * scale / 2,
                    y - height * scale / 2,
                    x + width * scale / 2,
                    y + height * scale / 2,
                ]
            )
    return np.clip(np.array(boxes), 0, IMAGE)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def detect(truth: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Simulated detections of one image: per object (90% found) 3-8 jittered boxes whose
    score grows with their fit (IoU with the object), and 2-6 false positives."""
    boxes, scores = [], []
    for box in truth:
        if rng.random() < 0.1:
            continue
        size = np.tile(box[2:] - box[:2], 2)
        jittered = box + rng.normal(0, 0.07, (rng.integers(3, 9), 4)) * size
        fit = iou_matrix(jittered, box[None])[:, 0]
        boxes.append(jittered)
        scores.append(np.clip(0.25 + 0.7 * fit**2 + rng.normal(0, 0.08, len(fit)), 0.01, 0.99))
    count = rng.integers(2, 7)
    corner = rng.uniform(0, IMAGE - 80, (count, 2))
    boxes.append(np.concatenate([corner, corner + rng.uniform(30, 120, (count, 2))], 1))
    scores.append(rng.uniform(0.05, 0.6, count))
    return np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32)


def nms_model(count: int, *, max_output: int, score_threshold: float, path: Path) -> Path:
    """One NonMaxSuppression node: boxes [1, count, 4], scores [1, 1, count]."""
    import onnx
    from onnx import TensorProto, helper

    const = helper.make_tensor
    nodes = [
        helper.make_node(
            "Constant", [], ["m"], value=const("m", TensorProto.INT64, [1], [max_output])
        ),
        helper.make_node("Constant", [], ["i"], value=const("i", TensorProto.FLOAT, [1], [IOU])),
        helper.make_node(
            "Constant", [], ["s"], value=const("s", TensorProto.FLOAT, [1], [score_threshold])
        ),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "m", "i", "s"], ["selected"]),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "nms",
        [
            value("boxes", TensorProto.FLOAT, [1, count, 4]),
            value("scores", TensorProto.FLOAT, [1, 1, count]),
        ],
        [value("selected", TensorProto.INT64, ["k", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def rewritten(path: Path, method: str) -> Path:
    """``path`` after ``soft-nms(method=...)``, beside it; output 1 made a graph output."""
    import onnx_ir as ir

    from rewriter import io as rio
    from rewriter.registry import parse_pipeline

    model = rio.load(path)
    parse_pipeline(f"soft-nms(method={method},sigma={SIGMA})")[0](model)
    soft = next(node for node in model.graph if node.domain == "ai.rewriter")
    model.graph.outputs.append(soft.outputs[1])
    out = path.with_name(f"{path.stem}_{method}.onnx")
    rio.save(model, out)
    del ir
    return out


def session(path: Path) -> object:
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), timing.ort_options(1), providers=["CPUExecutionProvider"]
    )


def coco_map(
    images: list[tuple[np.ndarray, ...]], picks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[float, float, float]:
    """COCO mAP@[.5:.95], AP50, AP75 (pycocotools) of ``picks`` ((boxes, scores) kept per image)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image_id, ((truth, *_), (boxes, scores, _)) in enumerate(zip(images, picks, strict=True)):
        for box in truth:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for box, score in zip(boxes, scores, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth_set = COCO()
        truth_set.dataset = {
            "images": [{"id": i} for i in range(len(images))],
            "annotations": annotations,
            "categories": [{"id": 1}],
        }
        truth_set.createIndex()
        evaluation = COCOeval(truth_set, truth_set.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1]), float(evaluation.stats[2])


def fidelity_map(count: int, seed: int, work: Path) -> None:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        truth = crowd(rng)
        images.append((truth, *detect(truth, rng)))
    per_image_boxes = sum(len(boxes) for _, boxes, _ in images) / count
    methods: dict[
        str, Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    ] = {}
    cache: dict[tuple[str, int], object] = {}

    def runner(
        method: str,
    ) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        def run(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            key = (method, len(boxes))
            if key not in cache:
                base = nms_model(
                    len(boxes),
                    max_output=KEEP,
                    score_threshold=0.001,
                    path=work / f"nms{len(boxes)}.onnx",
                )
                cache[key] = session(base if method == "original" else rewritten(base, method))
            feeds = {"boxes": boxes[None], "scores": scores[None, None]}
            out = cache[key].run(None, feeds)  # type: ignore[attr-defined]
            keep = out[0][:, 2]
            kept_scores = scores[keep] if method == "original" else out[1]
            return boxes[keep], kept_scores, keep

        return run

    for method in ("original", "hard", "linear", "gaussian"):
        methods[method] = runner(method)
    picks = {
        name: [run(boxes, scores) for _, boxes, scores in images] for name, run in methods.items()
    }
    same = all(
        np.array_equal(a[2], b[2]) for a, b in zip(picks["original"], picks["hard"], strict=True)
    )
    truths = sum(len(t) for t, *_ in images)
    print(
        f"## mAP on crowded scenes: {count} images, {truths} objects, {per_image_boxes:.0f} detections per image,"
        f" IoU threshold {IOU}, sigma {SIGMA}, {KEEP} kept per image (seed {seed})\n"
    )
    print("| NMS | mAP@[.5:.95] | AP50 | AP75 | vs hard |")
    print("|---|---|---|---|---|")
    base = coco_map(images, picks["original"])[0]
    labels = {
        "original": "hard (ONNX NonMaxSuppression, as exported)",
        "hard": "soft-nms(method=hard)",
        "linear": "soft-nms(method=linear)",
        "gaussian": "soft-nms(method=gaussian)",
    }
    for name in methods:
        ap, ap50, ap75 = coco_map(images, picks[name])
        print(f"| {labels[name]} | {ap:.4f} | {ap50:.4f} | {ap75:.4f} | {ap - base:+.4f} |")
    print(
        f"\nsoft-nms(method=hard) selects exactly what NonMaxSuppression selects on every image: {same}\n"
    )


def detector_fidelity(work: Path) -> None:
    from examples.torchvision_shim import import_torchvision

    if import_torchvision() is None:
        print("## Real detector: skipped (torchvision is not installed)\n")
        return
    import onnx_ir as ir

    from examples import detector
    from rewriter import io as rio
    from rewriter.registry import parse_pipeline

    path = work / "ssdlite.onnx"
    feeds = detector.export(detector.build("ssdlite"), path)
    hard = session(path).run(None, feeds)  # type: ignore[attr-defined]
    names = list(detector.OUTPUTS)
    print(
        "## Real detector: SSD-lite 320 (random weights), TorchScript export, NMS in an If branch\n"
    )
    print(
        "| method | stats | detections (hard / soft) | hard's kept | new | decayed / original score of kept (mean, min) | new detections' score (mean, max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in ("hard", "linear", "gaussian"):
        model = rio.load(path)
        result = parse_pipeline(f"soft-nms(method={method})")[0](model)
        out = work / f"ssdlite_{method}.onnx"
        rio.save(model, out)
        soft = session(out).run(None, feeds)  # type: ignore[attr-defined]
        f = detector.fidelity(
            dict(zip(names, hard, strict=True)), dict(zip(names, soft, strict=True))
        )
        stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
        print(
            f"| {method} | {stats} | {f['detections_hard']:.0f} / {f['detections_soft']:.0f} | {f['kept']:.0f} |"
            f" {f['new']:.0f} | {f['score_ratio_mean']:.3f}, {f['score_ratio_min']:.3f} |"
            f" {f['new_score_mean']:.3f}, {f['new_score_max']:.3f} |"
        )
    del ir
    print()


# ----------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------


def crowded_boxes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` boxes in crowds (20 detections per object) and uniform scores."""
    rng = np.random.default_rng(seed)
    objects = max(1, count // 20)
    centers = rng.uniform(0, 1000, (objects, 2))
    sizes = rng.uniform(20, 80, (objects, 2))
    which = rng.integers(0, objects, count)
    center = centers[which] + rng.normal(0, 0.15, (count, 2)) * sizes[which]
    size = sizes[which] * rng.uniform(0.8, 1.2, (count, 2))
    boxes = np.concatenate([center - size / 2, center + size / 2], 1).astype(np.float32)
    return boxes, rng.uniform(0, 1, count).astype(np.float32)


def torch_soft_nms(boxes: object, scores: object, max_output: int, threshold: float) -> object:
    """A straightforward torch Soft-NMS (Gaussian), one selection at a time."""
    import torch

    assert isinstance(boxes, torch.Tensor) and isinstance(scores, torch.Tensor)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    s = scores.clone()
    keep = []
    for _ in range(max_output):
        best = int(torch.argmax(s))
        if not s[best] > threshold:
            break
        keep.append(best)
        w = (torch.minimum(x2, x2[best]) - torch.maximum(x1, x1[best])).clamp(min=0)
        h = (torch.minimum(y2, y2[best]) - torch.maximum(y1, y1[best])).clamp(min=0)
        inter = w * h
        iou = inter / (area + area[best] - inter)
        s = s * torch.exp(-(iou * iou) / SIGMA)
        s[best] = -float("inf")
    return torch.tensor(keep)


def kernel_call(
    boxes: np.ndarray,
    scores: np.ndarray,
    max_output: int,
    threshold: float,
    method: str,
    target: str,
) -> Callable[[], object]:
    """Our CPU kernel alone, on tensors placed beforehand."""
    import tvm

    from rewriter.backends.tvm.kernels.soft_nms import soft_nms
    from rewriter.backends.tvm.targets import resolve
    from rewriter.passes.soft_nms.math import METHODS

    count = len(scores)
    k = min(max_output, count)
    tgt = resolve(target)
    func = soft_nms(
        1, 1, count, k, method=METHODS[method], sigma=SIGMA, center_point_box=0, target=tgt
    )
    kernel = tvm.compile(func, target=tgt)
    arrays = (
        boxes[None],
        scores[None, None],
        np.array([max_output], np.int64),
        np.array([IOU], np.float32),
        np.array([threshold], np.float32),
        np.zeros((1, k), np.int64),
        np.zeros((1, k), np.float32),
        np.zeros(1, np.int64),
        np.zeros(1, np.int64),
    )
    args = [tvm.runtime.tensor(a) for a in arrays]
    return lambda: kernel(*args)


def runtime_row(
    count: int, max_output: int, threshold: float, rounds: int, work: Path, target: str
) -> str:
    """One table row: every contender on ``count`` crowded boxes."""
    import torch

    from examples.torchvision_shim import import_torchvision
    from rewriter.backends import tvm as backend
    from rewriter.passes.soft_nms import math as snms

    torchvision = import_torchvision()
    boxes, scores = crowded_boxes(count, seed=count)
    feeds = {"boxes": boxes[None], "scores": scores[None, None]}
    base = nms_model(
        count,
        max_output=max_output,
        score_threshold=threshold,
        path=work / f"rt{count}_{max_output}.onnx",
    )
    gauss_path = rewritten(base, "gaussian")
    compiled = backend.compile(gauss_path, target=target)
    ort_nms, ort_body = session(base), session(gauss_path)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    calls: dict[str, Callable[[], object]] = {
        "ours hard": kernel_call(boxes, scores, max_output, threshold, "hard", target),
        "ours gaussian": kernel_call(boxes, scores, max_output, threshold, "gaussian", target),
        "ours model": lambda: compiled.run(feeds),
        "ORT NMS": lambda: ort_nms.run(None, feeds),  # type: ignore[attr-defined]
    }
    # The peers that take seconds per call run where they take well under one.
    if count * min(max_output, count) <= 1000 * 1000:
        calls["ORT body"] = lambda: ort_body.run(None, feeds)  # type: ignore[attr-defined]
        calls["numpy"] = lambda: snms.soft_nms(
            boxes[None], scores[None, None], max_output, IOU, threshold, sigma=SIGMA
        )
        calls["torch"] = lambda: torch_soft_nms(tb, ts, max_output, threshold)
        if torchvision is not None:
            above = ts > threshold
            calls["torchvision"] = lambda: torchvision.ops.nms(tb[above], ts[above], IOU)[
                :max_output
            ]
    slow = {name: min(rounds, 3) for name in ("ORT body", "numpy", "torch", "torchvision")}
    times = timing.fastest(timing.samples(calls, rounds=rounds, max_samples=slow, rotate=True))
    expected = ort_nms.run(None, feeds)[0]  # type: ignore[attr-defined]
    hard = backend.compile(rewritten(base, "hard"), target=target).run(feeds)
    assert np.array_equal(hard["selected"], expected), "our hard kernel disagrees with ONNX Runtime"
    soft_count = len(compiled.run(feeds)["selected"])

    def cell(name: str, ours: str) -> str:
        if name not in times:
            return "-"
        return f"{times[name] * 1e3:.2f} ({times[name] / times[ours]:.1f}x)"

    cap = "all" if max_output >= count else str(max_output)
    bound = "none" if threshold == -np.inf else f"{threshold}"
    return (
        f"| {count} | {cap} | {bound} | {times['ours hard'] * 1e3:.3f} | {times['ours gaussian'] * 1e3:.3f} |"
        f" {times['ours model'] * 1e3:.3f} | {cell('ORT NMS', 'ours hard')} | {cell('ORT NMS', 'ours gaussian')} |"
        f" {cell('ORT body', 'ours gaussian')} | {cell('torchvision', 'ours hard')} | {cell('numpy', 'ours gaussian')} |"
        f" {cell('torch', 'ours gaussian')} | {len(expected)} / {soft_count} |"
    )


def runtime(sizes: list[int], rounds: int, work: Path, target: str) -> None:
    import torch

    torch.set_num_threads(1)
    print(
        f"## Runtime: one class, crowded boxes, IoU threshold {IOU}, one thread ({target}); ms, fastest of"
        " interleaved rounds; (ratio) = peer time / ours\n"
    )
    print(
        "| boxes | max output | score threshold | ours hard | ours gaussian | ours gaussian, compiled model |"
        " ORT NonMaxSuppression (vs ours hard) | ORT NonMaxSuppression (vs ours gaussian) |"
        " ORT running the body (gaussian) | torchvision nms (shim) | numpy Soft-NMS | torch Soft-NMS | selected hard / gaussian |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for count in sizes:
        # As torchvision exports it (no cap, no score threshold), and a detector's cap.
        for max_output, threshold in ((count, -np.inf), (300, 0.05)):
            print(runtime_row(count, max_output, threshold, rounds, work, target), flush=True)
    print(
        "\nours hard / gaussian: the kernel (candidates, selections) on tensors in place; compiled model:"
        " the rewritten op through the TVM VM from numpy (kernel, compaction, copies)."
    )


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--boxes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="avx512")
    parser.add_argument("--quick", action="store_true", help="60 images, 1000 boxes, 3 rounds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["map", "detector", "runtime"])
    args = parser.parse_args()
    if args.quick:
        args.images, args.boxes, args.rounds = 60, [1000], 3
    with tempfile.TemporaryDirectory(prefix="soft-nms-") as folder:
        work = Path(folder)
        if "map" not in args.skip:
            fidelity_map(args.images, args.seed, work)
        if "detector" not in args.skip:
            detector_fidelity(work)
        if "runtime" not in args.skip:
            runtime(args.boxes, args.rounds, work, args.target)


if __name__ == "__main__":
    main()
