"""The fx twin of soft-nms: torchvision.ops.nms / batched_nms -> torch.ops.rewriter.soft_nms,
the scores rewiring, verification, the custom op, and the ONNX export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from examples.torchvision_shim import import_torchvision
from rewriter import fx as rfx
from rewriter.passes.soft_nms import soft_nms
from tests.helpers import run

torchvision = import_torchvision()
pytestmark = pytest.mark.skipif(torchvision is None, reason="needs torchvision (the dev extra)")


class Post(torch.nn.Module):
    """What detectors do after NMS: keep the top detections, gather boxes and scores."""

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keep = torchvision.ops.nms(boxes, scores, 0.5)
        keep = keep[:6]
        return boxes[keep], scores[keep]


class BatchedPost(torch.nn.Module):
    def forward(
        self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
        return boxes[keep], scores[keep], labels[keep]


class KeepOnly(torch.nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torchvision.ops.nms(boxes, scores, 0.5)


def scene(seed: int = 0, count: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g) * 40
    boxes = torch.cat([corner, corner + 10 + torch.rand(count, 2, generator=g) * 20], 1)
    return boxes, torch.rand(count, generator=g), torch.randint(0, 3, (count,), generator=g)


def test_hard_is_exact_and_verified():
    boxes, scores, labels = scene()
    gm, report = rfx.rewrite(Post(), ["soft-nms(method=hard)"], (boxes, scores))
    assert report.stats == {"nms_replaced": 1, "scores_rewired": 1, "scores_not_found": 0}
    assert report.exact and report.verification.passed
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewriter.soft_nms.default in targets
    assert not any("torchvision" in str(t) for t in targets)
    gm, report = rfx.rewrite(BatchedPost(), ["soft-nms(method=hard)"], (boxes, scores, labels))
    assert report.stats["nms_replaced"] == 1 and report.verification.passed


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_methods_give_the_reference_decayed_scores(method):
    boxes, scores, _ = scene(1)
    gm, report = rfx.rewrite(Post(), [f"soft-nms(method={method})"], (boxes, scores))
    assert not report.exact and report.stats["scores_rewired"] == 1
    kept_boxes, kept_scores = gm(boxes, scores)
    selected, decayed = soft_nms(
        boxes.numpy()[None], scores.numpy()[None, None], 24, 0.5, None, method=method
    )
    np.testing.assert_array_equal(kept_boxes.numpy(), boxes.numpy()[selected[:6, 2]])
    np.testing.assert_array_equal(kept_scores.numpy(), decayed[:6])
    assert (kept_scores.numpy() <= scores.numpy()[selected[:6, 2]]).all()


def test_batched_soft_nms_never_decays_across_classes():
    boxes, scores, labels = scene(2)
    gm, _ = rfx.rewrite(BatchedPost(), ["soft-nms(method=linear)"], (boxes, scores, labels))
    kept_boxes, kept_scores, kept_labels = gm(boxes, scores, labels)
    assert len(kept_scores) == len(scores)  # linear Soft-NMS removes no box
    for label in range(3):
        mine = (labels == label).numpy()
        _, decayed = soft_nms(
            boxes.numpy()[mine][None],
            scores.numpy()[mine][None, None],
            24,
            0.5,
            None,
            method="linear",
        )
        # The class offsets (torchvision's coordinate trick) round the coordinates anew.
        np.testing.assert_allclose(
            kept_scores.numpy()[(kept_labels == label).numpy()], decayed, rtol=1e-5
        )
    assert (np.diff(kept_scores.numpy()) <= 0).all()  # in order of selection


def test_no_scores_gather_is_noted_and_no_nms_is_left_alone():
    boxes, scores, _ = scene()
    _, report = rfx.rewrite(KeepOnly(), ["soft-nms"], (boxes, scores))
    assert report.stats == {"nms_replaced": 1, "scores_rewired": 0, "scores_not_found": 1}
    assert "not rewired" in report.passes[0].notes[0]
    _, report = rfx.rewrite(torch.nn.ReLU(), ["soft-nms"], (scores,))
    assert report.stats == {"nms_replaced": 0, "scores_rewired": 0, "scores_not_found": 0}


def test_custom_op_fake_and_empty_input():
    keep, decayed = torch.ops.rewriter.soft_nms(
        torch.zeros(0, 4), torch.zeros(0), None, 0.5, 2, 0.5
    )
    assert keep.shape == (0,) and decayed.shape == (0,) and keep.dtype == torch.int64

    class Call(torch.nn.Module):
        def forward(
            self, boxes: torch.Tensor, scores: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ops.rewriter.soft_nms(boxes, scores, None, 0.5, 2, 0.5)

    boxes, scores, _ = scene()
    program = torch.export.export(Call(), (boxes, scores))  # runs the fake implementation
    keep, decayed = program.module()(boxes, scores)
    assert keep.shape == decayed.shape == (24,)


def test_export_to_onnx_runs_the_same_in_onnx_runtime(tmp_path):
    boxes, scores, labels = scene(3)
    gm, _ = rfx.rewrite(BatchedPost(), ["soft-nms(method=gaussian)"], (boxes, scores, labels))
    path = rfx.export_onnx(gm, (boxes, scores, labels), tmp_path / "post.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert "SoftNonMaxSuppression" in [n.op_type for n in model.graph.node]
    feeds = {
        i.name: t.numpy() for i, t in zip(model.graph.input, (boxes, scores, labels), strict=True)
    }
    got = list(run(model, feeds).values())
    for mine, theirs in zip(got, gm(boxes, scores, labels), strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-6)
