"""soft-nms on a real torchvision detector (SSD-lite 320, random weights, TorchScript
export: the NonMaxSuppression sits in an If branch): rewritten, checked, verified; the
fidelity figures of examples/detector.py. Slow (the export takes ~10-25 s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from examples.torchvision_shim import import_torchvision
from rewriter.job import rewrite_file
from rewriter.registry import parse_pipeline
from tests.helpers import op_types, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(import_torchvision() is None, reason="needs torchvision (the dev extra)"),
]


@pytest.fixture(scope="module")
def ssdlite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    from examples import detector

    path = tmp_path_factory.mktemp("detector") / "ssdlite.onnx"
    feeds = detector.export(detector.build("ssdlite"), path)
    return path, feeds


def test_nms_in_the_if_branch_is_rewritten_and_scores_rewired(ssdlite):
    path, feeds = ssdlite
    original = onnx.load(str(path))
    hard = run(original, feeds)
    for method in ("hard", "linear", "gaussian"):
        model = ir.serde.deserialize_model(original)
        result = parse_pipeline(f"soft-nms(method={method})")[0](model)
        assert result.stats == {"nms_replaced": 1, "scores_rewired": 1, "scores_not_found": 0}
        assert "NonMaxSuppression" not in op_types(model)
        proto = ir.serde.serialize_model(model)
        onnx.checker.check_model(proto, full_check=True)
        soft = run(proto, feeds)
        if method == "hard":
            for name, value in hard.items():
                np.testing.assert_array_equal(soft[name], value)
            continue
        from examples import detector

        figures = detector.fidelity(hard, soft)
        assert figures["detections_soft"] >= figures["detections_hard"] > 0
        assert figures["score_ratio_min"] > 0 and figures["score_ratio_mean"] <= 1.0
        # Decayed scores never exceed the box's original score, and come in order of selection.
        assert (np.diff(soft["scores"]) <= 0).all()
        assert soft["scores"].max() == pytest.approx(hard["scores"].max())


def test_cli_reports_the_changed_detections(ssdlite, tmp_path):
    path, feeds = ssdlite
    np.savez(tmp_path / "image.npz", **feeds)
    report = rewrite_file(
        path,
        tmp_path / "soft.onnx",
        "soft-nms",
        inputs=tmp_path / "image.npz",
        report_json=tmp_path / "r.json",
    )
    assert not report.exact and report.verification is not None
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0]["stats"]["scores_rewired"] == 1
    outputs = {o["name"]: o for o in data["verification"]["outputs"]}
    assert set(outputs) == {"boxes", "scores", "labels"}
    hard = rewrite_file(
        path, tmp_path / "hard.onnx", "soft-nms(method=hard)", inputs=tmp_path / "image.npz"
    )
    assert hard.exact and hard.verification is not None and hard.verification.passed
