"""Benchmark: ONNX ``GridSample`` as models use it, our kernel against ONNX Runtime and
TVM's own lowering.

Each case is one ``GridSample`` node (symbolic batch) compiled through our pipeline
(``rewriter.backends.tvm.compile``: the kernel of
``rewriter.backends.tvm.kernels.grid_sample``) and, as the peer "TVM", the same node
with our converter switched off (TVM's ``topi.image.grid_sample``, vectorized by our
elementwise rule: what the compiler did before the kernel), timed in interleaved rounds
with ONNX Runtime on the same inputs. Ratios are ours / peer (under 1: ours faster).
Run::

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/grid_sample.py [--seconds 2] [--only detr]
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import timing
from onnx import TensorProto, helper
from timing import interleaved

from rewriter.backends import tvm as backend
from rewriter.backends.tvm import grid_sample


@dataclasses.dataclass(frozen=True)
class Case:
    """``GridSample`` of ``data[batch, channels, *size]`` at ``grid[batch, *out, 2]``."""

    name: str
    batch: int
    channels: int
    size: tuple[int, int]
    out: tuple[int, int]
    mode: str = "bilinear"
    padding: str = "zeros"
    align_corners: int = 0


CASES = [
    # Deformable DETR (the zoo's survey config): 4 heads x 64 channels, 1045 queries x 4 points.
    Case("deformable detr encoder, 28x28 level", 4, 64, (28, 28), (1045, 4)),
    Case("deformable detr encoder, 4x4 level", 4, 64, (4, 4), (1045, 4)),
    # RT-DETR / Deformable DETR at full size: 8 heads x 32 channels, 300 queries x 4 points.
    Case("rt-detr decoder, 80x80 level", 8, 32, (80, 80), (300, 4)),
    # Optical flow (RAFT-style warp of features by a flow field, every pixel).
    Case("flow warp 128 ch, 46x62", 1, 128, (46, 62), (46, 62), align_corners=1),
    # Spatial transformer over images.
    Case("image warp 3 ch, 224x224, border", 8, 3, (224, 224), (224, 224), padding="border"),
    Case("nearest 32 ch, 56x56, reflection", 2, 32, (56, 56), (56, 56), "nearest", "reflection"),
]


def model(case: Case) -> onnx.ModelProto:
    node = helper.make_node(
        "GridSample",
        ["x", "grid"],
        ["y"],
        mode=case.mode,
        padding_mode=case.padding,
        align_corners=case.align_corners,
    )
    graph = helper.make_graph(
        [node],
        "grid_sample",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", case.channels, *case.size]),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, ["batch", *case.out, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    args = timing.case_arguments(__doc__.split("\n")[0], 2.0, "case")
    options = timing.ort_options(1)
    print(f"{'case':<40} {'ours ms':>8} {'ours/ORT':>9} {'ours/TVM':>9} {'max err':>9}")
    for case in CASES:
        if args.only not in case.name:
            continue
        proto = model(case)
        rng = np.random.default_rng(0)
        feeds = {
            "x": rng.standard_normal((case.batch, case.channels, *case.size)).astype(np.float32),
            "grid": rng.uniform(-1.1, 1.1, (case.batch, *case.out, 2)).astype(np.float32),
        }
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ours = backend.compile(proto, args.target)
        with mock.patch.object(grid_sample, "convert", lambda *_args, **_kwargs: None):
            stock = backend.compile(proto, args.target)
        reference = session.run(None, feeds)[0]
        error = max(
            float(np.abs(compiled.run(feeds)["y"] - reference).max() / np.abs(reference).max())
            for compiled in (ours, stock)
        )
        times = interleaved(
            {
                "ours": functools.partial(ours.run, feeds),
                "tvm": functools.partial(stock.run, feeds),
                "ort": functools.partial(session.run, None, feeds),
            },
            args.seconds,
        )
        print(
            f"{case.name:<40} {times['ours'] * 1e3:>8.2f} {times['ours'] / times['ort']:>9.2f} "
            f"{times['ours'] / times['tvm']:>9.2f} {error:>9.1e}"
        )


if __name__ == "__main__":
    main()
