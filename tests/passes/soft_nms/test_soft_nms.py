"""The soft-nms pass: conformance (hard = NonMaxSuppression), the body against the numpy
reference, structure, the scores rewiring (also through an If), negatives, idempotence,
validity and bad options."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter.errors import InputError
from rewriter.pass_base import DOMAIN
from rewriter.passes.soft_nms import METHODS, OP_TYPE, SoftNmsOptions, SoftNmsPass, soft_nms
from tests import nms_models as nm
from tests.faults import assert_refused, run_cli
from tests.helpers import model_from_text, op_types, run, to_proto


def rewrite(model: ir.Model, **options: object) -> object:
    return SoftNmsPass(SoftNmsOptions(**options))(model)  # type: ignore[arg-type]


CASES = sorted(nm.conformance_cases())


def test_every_conformance_case_was_found():
    assert len(CASES) == 10  # onnx 1.17+: the ten test_nonmaxsuppression_* cases


@pytest.mark.parametrize(
    "opset",
    [11, pytest.param(13, marks=pytest.mark.slow), pytest.param(18, marks=pytest.mark.slow), 21],
)
@pytest.mark.parametrize("name", CASES)
def test_hard_equals_nonmaxsuppression_on_the_conformance_cases(name, opset):
    proto, data_sets = nm.conformance_cases()[name]
    restamped = onnx.ModelProto()
    restamped.CopyFrom(proto)
    restamped.opset_import[0].version = opset  # NonMaxSuppression-11 is current to 21
    result = rewrite(ir.serde.deserialize_model(restamped), method="hard")
    assert result.stats["nms_replaced"] == 1
    assert SoftNmsPass(SoftNmsOptions(method="hard")).exact
    rewritten = to_proto(result.model)
    onnx.checker.check_model(rewritten, full_check=True)
    for inputs, outputs in data_sets:
        got = run(rewritten, nm.feeds_of(proto, inputs))
        np.testing.assert_array_equal(got[proto.graph.output[0].name], outputs[0], err_msg=name)


@pytest.mark.parametrize("name", CASES)
def test_reference_hard_equals_the_conformance_outputs(name):
    proto, data_sets = nm.conformance_cases()[name]
    attributes = {a.name: a.i for a in proto.graph.node[0].attribute}
    for inputs, outputs in data_sets:
        boxes, scores, most, iou, *score = inputs
        selected, decayed = soft_nms(
            boxes,
            scores,
            int(most.reshape(-1)[0]),
            float(iou.reshape(-1)[0]),
            float(score[0].reshape(-1)[0]) if score else None,
            center_point_box=attributes.get("center_point_box", 0),
            method="hard",
        )
        np.testing.assert_array_equal(selected, outputs[0])
        np.testing.assert_array_equal(
            decayed, scores[selected[:, 0], selected[:, 1], selected[:, 2]]
        )


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("center_point_box", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_body_matches_the_reference_on_crowded_scenes(method, center_point_box, seed):
    boxes, scores = nm.crowded_scene(seed)
    if center_point_box:  # [x_c, y_c, w, h] of the same boxes
        boxes = np.concatenate(
            [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1
        )
    model = nm.soft_model(
        METHODS[method], opset=11 if seed == 0 else 17, center_point_box=center_point_box, sigma=0.5
    )
    most, iou, threshold = 20, 0.4, 0.01
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([most]),
        "iou": np.array([iou], np.float32),
        "score": np.array([threshold], np.float32),
    }
    got = run(model, feeds)
    expected = soft_nms(
        boxes,
        scores,
        most,
        iou,
        threshold,
        center_point_box=center_point_box,
        method=method,
        sigma=0.5,
    )
    nm.assert_same_selection((got["selected"], got["decayed"]), expected)
    if method == "hard":  # the same as ONNX Runtime's NonMaxSuppression
        np.testing.assert_array_equal(got["selected"], _ort_nms(feeds, center_point_box))


def _ort_nms(feeds: dict[str, np.ndarray], center_point_box: int) -> np.ndarray:
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node(
                    "NonMaxSuppression",
                    ["boxes", "scores", "m", "iou", "score"],
                    ["selected"],
                    center_point_box=center_point_box,
                )
            ],
            "nms",
            [
                onnx.helper.make_tensor_value_info(
                    k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape
                )
                for k, v in feeds.items()
            ],
            [onnx.helper.make_tensor_value_info("selected", onnx.TensorProto.INT64, None)],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    return run(proto, feeds)["selected"]


def test_gaussian_decays_every_box_and_linear_only_above_the_threshold():
    # Box 1 overlaps box 0 with IoU 0.25 (below 0.5): linear leaves it, gaussian decays it.
    boxes = np.array([[[0, 0, 10, 10], [0, 5, 10, 15], [0, 50, 10, 60]]], np.float32)
    scores = np.array([[[0.9, 0.8, 0.1]]], np.float32)
    iou = np.float32(50) / np.float32(150)
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([3]),
        "iou": np.array([0.5], np.float32),
        "score": np.array([0.0], np.float32),
    }
    gaussian = run(nm.soft_model(METHODS["gaussian"], sigma=0.5), feeds)
    np.testing.assert_allclose(
        gaussian["decayed"], [0.9, 0.8 * np.exp(-iou * iou / 0.5), 0.1], rtol=1e-6
    )
    linear = run(nm.soft_model(METHODS["linear"]), feeds)
    np.testing.assert_array_equal(linear["decayed"], np.array([0.9, 0.8, 0.1], np.float32))
    feeds["iou"] = np.array([0.3], np.float32)  # now IoU 1/3 is above it
    linear = run(nm.soft_model(METHODS["linear"]), feeds)
    np.testing.assert_allclose(linear["decayed"], [0.9, 0.8 * (1 - iou), 0.1], rtol=1e-6)
    hard = run(nm.soft_model(METHODS["hard"]), feeds)
    np.testing.assert_array_equal(hard["selected"][:, 2], [0, 2])


def test_ties_go_to_the_lower_box_and_max_zero_selects_nothing():
    boxes = np.array([[[0, 0, 1, 1], [0, 2, 1, 3], [0, 4, 1, 5]]], np.float32)
    scores = np.array([[[0.5, 0.7, 0.7]]], np.float32)
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([3]),
        "iou": np.array([0.5], np.float32),
        "score": np.array([-np.inf], np.float32),
    }
    got = run(nm.soft_model(METHODS["gaussian"]), feeds)
    np.testing.assert_array_equal(got["selected"][:, 2], [1, 2, 0])
    feeds["m"] = np.array([0])
    got = run(nm.soft_model(METHODS["gaussian"]), feeds)
    assert got["selected"].shape == (0, 3) and got["decayed"].shape == (0,)


def test_export_pattern_scores_are_rewired():
    model = model_from_text(nm.nms_model_text())
    original = to_proto(model)
    result = rewrite(model, method="linear")
    assert result.stats == {"nms_replaced": 1, "scores_rewired": 1, "scores_not_found": 0}
    assert result.notes == []
    assert "NonMaxSuppression" not in op_types(result.model)
    assert op_types(result.model).count(OP_TYPE) == 1
    assert (DOMAIN, OP_TYPE, "") in result.model.functions
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    boxes = np.array([[0, 0, 10, 10], [0, 2, 10, 12], [0, 30, 10, 40]], np.float32)
    scores = np.array([0.9, 0.85, 0.1], np.float32)
    got = run(proto, {"boxes": boxes, "scores": scores})
    iou = np.float32(80) / np.float32(120)
    np.testing.assert_allclose(got["kept_scores"], [0.9, 0.85 * (1 - iou)], rtol=1e-6)
    np.testing.assert_array_equal(got["kept_boxes"], boxes[:2])
    hard = rewrite(model_from_text(nm.nms_model_text()), method="hard")
    expected = run(original, {"boxes": boxes, "scores": scores})
    got = run(hard.model, {"boxes": boxes, "scores": scores})
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


IF_MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[n, 4] boxes, float[n] scores, bool empty) => (float[k] kept_scores) {
        keep = If (empty) <
            then_branch = t () => (int64[z] none) {
                none = Constant <value = int64[0] {}> ()
            },
            else_branch = e () => (int64[m] found) {
                zero = Constant <value = int64[1] {0}> ()
                b3 = Unsqueeze (boxes, zero)
                s2 = Unsqueeze (scores, zero)
                s3 = Unsqueeze (s2, zero)
                most = Constant <value = int64[1] {100}> ()
                iou = Constant <value = float[1] {0.5}> ()
                selected = NonMaxSuppression (b3, s3, most, iou)
                two = Constant <value = int64[1] {2}> ()
                column = Gather <axis = 1> (selected, two)
                one = Constant <value = int64[1] {1}> ()
                found = Squeeze (column, one)
            }
        >
        start = Constant <value = int64[1] {0}> ()
        stop = Constant <value = int64[1] {2}> ()
        top = Slice (keep, start, stop)
        kept_scores = Gather <axis = 0> (scores, top)
    }
"""


def test_nms_in_an_if_branch_is_rewritten_and_its_scores_rewired():
    result = rewrite(model_from_text(IF_MODEL), method="gaussian")
    assert result.stats == {"nms_replaced": 1, "scores_rewired": 1, "scores_not_found": 0}
    proto = to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    if_node = next(n for n in result.model.graph if n.op_type == "If")
    assert len(if_node.outputs) == 2
    boxes = np.array([[0, 0, 10, 10], [0, 2, 10, 12], [0, 30, 10, 40]], np.float32)
    scores = np.array([0.9, 0.85, 0.1], np.float32)
    got = run(proto, {"boxes": boxes, "scores": scores, "empty": np.array(False)})
    iou = np.float32(80) / np.float32(120)
    np.testing.assert_allclose(
        got["kept_scores"], [0.9, 0.85 * np.exp(-iou * iou / 0.5)], rtol=1e-6
    )
    none = run(proto, {"boxes": boxes, "scores": scores, "empty": np.array(True)})
    assert none["kept_scores"].shape == (0,)


def test_missing_optional_inputs_get_the_nonmaxsuppression_defaults():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 4] boxes, float[1, 1, 4] scores, int64[1] most) => (int64[k, 3] a, int64[j, 3] b) {
            a = NonMaxSuppression (boxes, scores)
            b = NonMaxSuppression (boxes, scores, most)
        }
        """
    )
    original = to_proto(model)
    result = rewrite(model, method="hard")
    assert result.stats["nms_replaced"] == 2
    assert result.stats["scores_not_found"] == 2 and len(result.notes) == 2
    feeds = {
        "boxes": np.array(
            [[[0, 5, 1, 6], [0, 1.5, 1, 2.5], [0, 0, 1, 1.01], [0, 0.99, 1, 1.2]]], np.float32
        ),
        "scores": np.array([[[-0.5, 0.2, 0.4, 0.1]]], np.float32),  # negative: no threshold at all
        "most": np.array([4]),
    }
    expected, got = run(original, feeds), run(result.model, feeds)
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name], expected[name])
    assert got["a"].shape[0] == 0  # max_output_boxes_per_class 0
    # IoU threshold 0: the slightest overlap suppresses box 3; box 0 (score -0.5) is kept.
    np.testing.assert_array_equal(got["b"][:, 2], [2, 1, 0])


def test_negative_no_nms_is_left_alone_and_idempotent():
    model = model_from_text(nm.nms_model_text())
    rewrite(model)
    again = rewrite(model)
    assert not again.modified
    assert again.stats == {"nms_replaced": 0, "scores_rewired": 0, "scores_not_found": 0}
    assert op_types(model).count(OP_TYPE) == 1
    plain = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu (x) }
        """
    )
    assert rewrite(plain).stats["nms_replaced"] == 0 and not plain.functions


def test_scores_that_are_not_one_vector_are_noted():
    proto, _ = nm.conformance_cases()["test_nonmaxsuppression_two_classes"]
    result = rewrite(ir.serde.deserialize_model(proto))
    assert result.stats == {"nms_replaced": 1, "scores_rewired": 0, "scores_not_found": 1}
    assert "not a 1-D tensor" in result.notes[0]


def test_old_opset_is_refused():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 10]>
        g (float[1, 3, 4] boxes, float[1, 1, 3] scores) => (int64[k, 3] a) {
            a = NonMaxSuppression (boxes, scores)
        }
        """
    )
    with pytest.raises(Exception, match="opset >= 11"):
        rewrite(model)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"method": "soft"}, "method must be one of hard, linear, gaussian"),
        ({"sigma": 0.0}, "sigma must be a positive"),
    ],
)
def test_bad_options_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        rewrite(model_from_text(nm.nms_model_text()), **options)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("soft-nms(method=soft)", "method must be one of"),
        ("soft-nms(sigma=-1)", "sigma must be a positive"),
        ("soft-nms(sigma=abc)", "option 'sigma' expects float"),
        ("soft-nms(radius=2)", "has no option 'radius'"),
    ],
)
def test_bad_options_exit_2_from_the_cli(spec, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(to_proto(model_from_text(nm.nms_model_text())), "m.onnx")
    code, lines = run_cli(["m.onnx", "--passes", spec, "-o", "o.onnx"], capsys)
    assert_refused(code, lines, message)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_hard_is_verified_as_exact_and_gaussian_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(to_proto(model_from_text(nm.nms_model_text())), "m.onnx")
    code, _ = run_cli(
        ["m.onnx", "--passes", "soft-nms(method=hard)", "-o", "h.onnx", "--report-json", "h.json"],
        capsys,
    )
    assert code == 0
    import json

    report = json.loads((tmp_path / "h.json").read_text())
    assert report["exact"] and report["verification"]["passed"]
    code, _ = run_cli(
        ["m.onnx", "--passes", "soft-nms", "-o", "g.onnx", "--report-json", "g.json"], capsys
    )
    assert code == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert not report["exact"] and report["passes"][0]["stats"]["scores_rewired"] == 1


def test_cli_refuses_an_opset_10_model_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = """
        <ir_version: 8, opset_import: ["" : 10]>
        g (float[1, 3, 4] boxes, float[1, 1, 3] scores) => (int64[k, 3] a) {
            a = NonMaxSuppression (boxes, scores)
        }
        """
    onnx.save(to_proto(model_from_text(text)), "m.onnx")
    code, lines = run_cli(["m.onnx", "--passes", "soft-nms", "-o", "o.onnx"], capsys)
    assert_refused(code, lines, "soft-nms needs opset >= 11")
    assert not (tmp_path / "o.onnx").exists()
