"""The Soft-NMS kernels and their lowering: the CPU kernel against the function body (ONNX
Runtime) on the conformance cases and on seeded crowded scenes, the compiled rewritten
model, and the CUDA variant generated and built (run with ``-m cuda`` on a GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx  # noqa: E402
from rewriter.backends.tvm.kernels.soft_nms import compact, soft_nms  # noqa: E402
from rewriter.backends.tvm.kernels.soft_nms_cuda import compact_cuda, soft_nms_cuda  # noqa: E402
from rewriter.backends.tvm.ops.soft_nms import COMPACT_NAME, KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.targets import resolve  # noqa: E402
from rewriter.passes.soft_nms import METHODS  # noqa: E402
from rewriter.registry import parse_pipeline  # noqa: E402
from tests import nms_models as nm  # noqa: E402
from tests.helpers import cpu_has, run  # noqa: E402

CPU = "avx512" if cpu_has("avx512f") else "avx2" if cpu_has("avx2", "fma") else "llvm"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build CUDA")


def rewritten(proto: onnx.ModelProto, spec: str = "soft-nms(method=hard)") -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    assert parse_pipeline(spec)[0](model).stats["nms_replaced"] == 1
    return ir.serde.serialize_model(model)


# Three cases compile in the default run (each compile takes 1-3 s); all ten are slow.
DEFAULT_CASES = {
    "test_nonmaxsuppression_iou_threshold_boundary",
    "test_nonmaxsuppression_center_point_box_format",
    "test_nonmaxsuppression_two_batches",
}
CASES = [
    name if name in DEFAULT_CASES else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(nm.conformance_cases())
]


@pytest.mark.parametrize("name", CASES)
def test_compiled_hard_equals_the_conformance_outputs(name):
    proto, data_sets = nm.conformance_cases()[name]
    model = rewritten(proto)
    mod = import_onnx.import_onnx(model, target=resolve(CPU))
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert KERNEL_NAME in names and COMPACT_NAME in names  # our kernels, not the Loop body
    compiled = backend.compile(model, target=CPU)
    for inputs, outputs in data_sets:
        got = compiled.run(nm.feeds_of(proto, inputs))
        np.testing.assert_array_equal(got[proto.graph.output[0].name], outputs[0])


def run_kernel(
    boxes: np.ndarray,
    scores: np.ndarray,
    most: int,
    iou: float,
    threshold: float,
    *,
    method: str,
    center_point_box: int = 0,
    target: str = CPU,
) -> tuple[np.ndarray, np.ndarray]:
    """The CPU kernel and the compaction, built and run directly."""
    batches, classes, count = scores.shape
    k = min(most, count)
    tgt = resolve(target)
    func = soft_nms(
        batches,
        classes,
        count,
        k,
        method=METHODS[method],
        sigma=0.5,
        center_point_box=center_point_box,
        target=tgt,
    )
    kernel = tvm.compile(func, target=tgt)
    rows = batches * classes
    args = [
        tvm.runtime.tensor(a)
        for a in (
            boxes,
            scores,
            np.array([most], np.int64),
            np.array([iou], np.float32),
            np.array([threshold], np.float32),
            np.zeros((rows, max(k, 1)), np.int64),
            np.zeros((rows, max(k, 1)), np.float32),
            np.zeros(rows, np.int64),
            np.zeros(1, np.int64),
        )
    ]
    kernel(*args)
    m = int(args[-1].numpy()[0])
    selected = tvm.runtime.tensor(np.zeros((m, 3), np.int64))
    decayed = tvm.runtime.tensor(np.zeros(m, np.float32))
    tvm.compile(compact(batches, classes, k), target=tgt)(*args[5:8], m, selected, decayed)
    return selected.numpy(), decayed.numpy()


def body_run(boxes, scores, most, iou, threshold, *, method, center_point_box=0):
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([most], np.int64),
        "iou": np.array([iou], np.float32),
        "score": np.array([threshold], np.float32),
    }
    got = run(nm.soft_model(METHODS[method], center_point_box=center_point_box), feeds)
    return got["selected"], got["decayed"]


# Seeded crowded scenes (property-style: every seed is a new scene of heavily overlapping
# objects with jittered detections and clutter); the kernel must pick what the body picks.
SCENES = [
    (seed, method, center)
    if seed < 2
    else pytest.param(seed, method, center, marks=pytest.mark.slow)
    for seed in range(6)
    for method, center in (("gaussian", seed % 2), ("linear", 1 - seed % 2), ("hard", seed % 2))
]


@pytest.mark.parametrize("seed,method,center_point_box", SCENES)
def test_kernel_agrees_with_the_body_on_crowded_scenes(seed, method, center_point_box):
    boxes, scores = nm.crowded_scene(seed, objects=8 + seed, per_object=10, clutter=20)
    if center_point_box:
        boxes = np.concatenate(
            [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1
        )
    most, iou, threshold = (60, 0.5, 0.001) if seed % 2 else (1000, 0.3, -np.inf)
    got = run_kernel(
        boxes, scores, most, iou, threshold, method=method, center_point_box=center_point_box
    )
    expected = body_run(
        boxes, scores, most, iou, threshold, method=method, center_point_box=center_point_box
    )
    nm.assert_same_selection(got, expected)
    if method != "gaussian":  # no exponential: the same float32 arithmetic, bit for bit
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_duplicates_ties_and_degenerate_boxes():
    # Identical boxes (linear's 1 - IoU = 0), equal scores (ties to the lower index),
    # zero-area and flipped boxes (IoU 0 with everything, per ONNX Runtime).
    boxes = np.array(
        [
            [
                [0, 0, 1, 1],
                [0, 0, 1, 1],
                [0, 0, 1, 1],
                [2, 2, 2, 3],
                [1, 1, 0, 0],
                [5, 5, 6, 6],
                [5, 5, 6, 6],
            ]
        ],
        np.float32,
    )
    scores = np.array([[[0.5, 0.5, 0.4, 0.9, 0.45, 0.3, 0.3]]], np.float32)
    for method in ("linear", "gaussian", "hard"):
        got = run_kernel(boxes, scores, 7, 0.5, 0.0, method=method, target="llvm")
        expected = body_run(boxes, scores, 7, 0.5, 0.0, method=method)
        assert np.isfinite(got[1]).all()
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=nm.SCORE_RTOL)


def test_compiled_gaussian_model_agrees_with_the_body():
    boxes, scores = nm.crowded_scene(7, batches=1, classes=3)
    proto = nm.soft_model(METHODS["gaussian"])
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([25], np.int64),
        "iou": np.array([0.5], np.float32),
        "score": np.array([0.05], np.float32),
    }
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.inputs:  # static shapes for the kernel
        value.shape = ir.Shape(list(feeds[value.name].shape))
    compiled = backend.compile(ir.serde.serialize_model(model), target=CPU)
    got = compiled.run(feeds)
    expected = run(proto, feeds)
    nm.assert_same_selection(
        (got["selected"], got["decayed"]), (expected["selected"], expected["decayed"])
    )


@needs_nvcc
@pytest.mark.parametrize("method", ["gaussian", pytest.param("hard", marks=pytest.mark.slow)])
def test_cuda_kernels_build_to_ptx(method, tmp_path: Path):
    cuda = resolve("cuda")
    for func in (
        soft_nms_cuda(2, 3, 300, 100, method=METHODS[method], sigma=0.5, center_point_box=0),
        compact_cuda(2, 3, 100),
    ):
        source = str(tvm.compile(func, target=cuda).mod.imports[0].inspect_source("cuda"))
        assert "__global__" in source
        cu = tmp_path / "kernel.cu"
        cu.write_text(source)
        ptx = tmp_path / "kernel.ptx"
        subprocess.run(
            ["nvcc", "-ptx", "-arch=sm_90", str(cu), "-o", str(ptx)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert ".entry" in ptx.read_text()


@needs_nvcc
def test_rewritten_model_compiles_for_cuda_with_our_kernels():
    proto, _ = nm.conformance_cases()["test_nonmaxsuppression_two_classes"]
    compiled = backend.compile(rewritten(proto, "soft-nms"), target="cuda")
    source = compiled.device_source()
    assert source is not None and KERNEL_NAME in source and COMPACT_NAME in source


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_cuda_run_agrees_with_the_body(method):
    boxes, scores = nm.crowded_scene(3)
    model = ir.serde.deserialize_model(nm.soft_model(METHODS[method]))
    feeds = {
        "boxes": boxes,
        "scores": scores,
        "m": np.array([40]),
        "iou": np.array([0.4], np.float32),
        "score": np.array([0.01], np.float32),
    }
    for value in model.graph.inputs:
        value.shape = ir.Shape(list(feeds[value.name].shape))
    proto = ir.serde.serialize_model(model)
    got = backend.compile(proto, target="cuda").run(feeds)
    expected = run(proto, feeds)
    nm.assert_same_selection(
        (got["selected"], got["decayed"]), (expected["selected"], expected["decayed"])
    )


def test_symbolic_shapes_are_a_clean_error():
    from rewriter.errors import InputError

    with pytest.raises(InputError, match="Loop"):
        backend.compile(nm.soft_model(METHODS["gaussian"]), target="llvm")
