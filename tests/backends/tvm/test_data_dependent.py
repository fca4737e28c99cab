"""Data-dependent sizes of torchvision detector exports through TVM.

SSD-lite's post-processing keeps the boxes whose score passes a threshold (``NonZero``),
takes ``TopK`` of them with ``k = min(candidates, count)`` (``ReduceMin`` of a
``Concat`` of a constant and a ``Shape``), and runs ``NonMaxSuppression`` in an ``If``
(``batched_nms``: an empty result when there are no boxes). :func:`detector_tail` is
that graph in small; it compiles and agrees with ONNX Runtime, whatever the count.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends.tvm import compile_and_run
from rewriter.errors import InputError
from rewriter.verify import run

CANDIDATES = 3


def detector_tail() -> onnx.ModelProto:
    """scores [8] -> kept = scores[scores > 0] -> TopK(kept, min(3, |kept|)) -> values * 2,
    and If(no score > 0, [], kept) + 1 (an If whose branches differ in shape)."""
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([CANDIDATES], np.int64), "candidates"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "shape1"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
    ]
    empty = helper.make_graph(
        [helper.make_node("Constant", [], ["empty"], value=numpy_helper.from_array(np.zeros(0, np.float32)))],
        "then", [], [helper.make_tensor_value_info("empty", TensorProto.FLOAT, [0])],
    )
    kept_branch = helper.make_graph(
        [helper.make_node("Identity", ["kept"], ["same"])],
        "else", [], [helper.make_tensor_value_info("same", TensorProto.FLOAT, ["count"])],
    )
    nodes = [
        helper.make_node("Greater", ["scores", "zero"], ["positive"]),
        helper.make_node("NonZero", ["positive"], ["where"]),
        helper.make_node("Squeeze", ["where", "axis0"], ["index"]),
        helper.make_node("Gather", ["scores", "index"], ["kept"]),
        helper.make_node("Shape", ["where"], ["where_shape"]),
        helper.make_node("Gather", ["where_shape", "one"], ["count"]),
        helper.make_node("Unsqueeze", ["count", "axis0"], ["count1"]),
        helper.make_node("Concat", ["candidates", "count1"], ["ks"], axis=0),
        helper.make_node("ReduceMin", ["ks"], ["k_min"], keepdims=0),
        helper.make_node("Reshape", ["k_min", "shape1"], ["k"]),
        helper.make_node("TopK", ["kept", "k"], ["top", "top_index"]),
        helper.make_node("Mul", ["top", "two"], ["y"]),
        helper.make_node("Cast", ["positive"], ["positive_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["positive_f"], ["any_positive"], keepdims=0),
        helper.make_node("Equal", ["any_positive", "zero"], ["no_boxes"]),
        helper.make_node("If", ["no_boxes"], ["branch"], then_branch=empty, else_branch=kept_branch),
        helper.make_node("Add", ["branch", "one_f"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector_tail",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"]),
            helper.make_tensor_value_info("top_index", TensorProto.INT64, ["k"]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["count"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("positives", [5, 2, 0])
def test_topk_of_a_data_dependent_count_and_an_if_of_two_shapes(positives):
    rng = np.random.default_rng(positives)
    scores = -rng.uniform(0.1, 1.0, 8).astype(np.float32)
    scores[rng.permutation(8)[:positives]] *= -1
    model = detector_tail()
    expected = run(model.SerializeToString(), {"scores": scores})
    got = compile_and_run(model, {"scores": scores}, target="llvm")
    assert got["y"].shape == (min(CANDIDATES, positives),)
    for name in ("y", "top_index", "z"):
        np.testing.assert_array_equal(got[name], expected[name])


def nms(limit: int, boxes: int | str) -> onnx.ModelProto:
    """NonMaxSuppression over [1, boxes, 4] with max_output_boxes_per_class ``limit``."""
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "limit", "iou"], ["selected"])],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, boxes, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, boxes]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, ["n", 3])],
        [
            numpy_helper.from_array(np.array([limit], np.int64), "limit"),
            numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nms_limit_past_the_boxes_is_their_count():
    # torchvision's batched_nms exports a limit of 2**63 - 1; TVM sizes its output by it.
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 1, (1, 6, 2)).astype(np.float32)
    feeds = {
        "boxes": np.concatenate([corners, corners + 0.3], axis=2),
        "scores": rng.uniform(0, 1, (1, 1, 6)).astype(np.float32),
    }
    model = nms(2**63 - 1, 6)
    np.testing.assert_array_equal(compile_and_run(model, feeds, target="llvm")["selected"], run(model.SerializeToString(), feeds)["selected"])


def test_nms_unbounded_limit_on_a_run_time_box_count_is_refused():
    from rewriter.backends.tvm import compile

    with pytest.raises(InputError, match=r"NonMaxSuppression with max_output_boxes_per_class 9223372036854775807"):
        compile(nms(2**63 - 1, "boxes"), "llvm")


@pytest.mark.slow
def test_ssdlite_export_is_refused_with_exit_2_naming_the_nms(tmp_path, capsys):
    # torchvision's SSD-lite 320 (random weights): TopK over the boxes above the score
    # threshold and the If of batched_nms import; its NMS limit of 2**63 - 1 over a box
    # count known only at run time is refused, in one line, not an internal error.
    from examples import detector
    from rewriter.cli import main

    path = tmp_path / "ssdlite.onnx"
    detector.export(detector.build("ssdlite"), path)
    code = main([str(path), "-o", str(tmp_path / "out.onnx"), "--passes", "two-pass-softmax", "--target", "llvm",
                 "--lib", str(tmp_path / "ssd.so")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert [line for line in lines if line.startswith("rewrite:")] == [
        "rewrite: error: TVM cannot import the model: NonMaxSuppression with max_output_boxes_per_class "
        "9223372036854775807 on boxes of a size known only at run time: TVM sizes its output by that limit "
        "(give the boxes a fixed count, or a smaller limit)"
    ]
    assert "Error converting operator" not in captured.out
