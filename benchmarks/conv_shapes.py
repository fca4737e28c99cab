"""Benchmark: convolution and pooling layers of real CNNs, ViTs and speech encoders.

Each layer (``Conv`` + bias + ReLU, ``MaxPool``, depthwise ``Conv``, ...) is one small
ONNX model in NCHW, as the exporters write them, compiled through our pipeline
(``rewriter.backends.tvm.compile``: channels-last layout, the implicit-GEMM conv
schedule with packed weights, the window schedule for depthwise convs and pooling) and
timed side by side, in interleaved rounds, against ONNX Runtime on the same model
(its NCHWc convolution kernels, MLAS). GFLOP/s count multiply-adds as 2 flops; the
ratio is ORT's time / ours (above 1: faster than ORT). Run::

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/conv_shapes.py [--seconds 3] [--only resnet]
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnxruntime as ort
import timing
from onnx import TensorProto, helper, numpy_helper
from timing import interleaved

from rewriter.backends import tvm as backend


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: ``Conv`` (``groups``; ``pool`` for MaxPool/AveragePool) on ``[batch, c, *size]``."""

    name: str
    c: int
    size: tuple[int, ...]
    out: int = 0
    kernel: int = 3
    stride: int = 1
    pad: int = 0
    groups: int = 1
    pool: str = ""
    batch: int = 1
    instance_norm: bool = False  # InstanceNormalization between the Conv and the Relu

    @property
    def flops(self) -> float:
        outputs = float(self.batch)
        for extent in self.size:
            outputs *= (extent + 2 * self.pad - self.kernel) // self.stride + 1
        if self.pool:
            return outputs * self.c * self.kernel ** len(self.size)
        return 2.0 * outputs * self.out * (self.c // self.groups) * self.kernel ** len(self.size)


LAYERS = [
    Layer("resnet stem 7x7/2", 3, (224, 224), 64, 7, 2, 3),
    Layer("resnet maxpool 3x3/2", 64, (112, 112), kernel=3, stride=2, pad=1, pool="MaxPool"),
    Layer("resnet 3x3 56x56x64", 64, (56, 56), 64, 3, 1, 1),
    Layer("resnet 3x3/2 56->28 x128", 64, (56, 56), 128, 3, 2, 1),
    Layer("resnet 3x3 28x28x128", 128, (28, 28), 128, 3, 1, 1),
    Layer("resnet 3x3 14x14x256", 256, (14, 14), 256, 3, 1, 1),
    Layer("resnet 3x3 7x7x512", 512, (7, 7), 512, 3, 1, 1),
    Layer("resnet 1x1/2 downsample x128", 64, (56, 56), 128, 1, 2, 0),
    Layer("densenet 3x3 56x56 128->32", 128, (56, 56), 32, 3, 1, 1),
    Layer("densenet 3x3 56x56 128->32 b8", 128, (56, 56), 32, 3, 1, 1, batch=8),
    Layer("densenet 3x3 14x14 128->32", 128, (14, 14), 32, 3, 1, 1),
    Layer("vit patch 16x16/16", 3, (224, 224), 768, 16, 16, 0),
    Layer("mobilenet 1x1 56x56 24->72", 24, (56, 56), 72, 1, 1, 0),
    Layer("mobilenet dw 3x3 56x56x72", 72, (56, 56), 72, 3, 1, 1, groups=72),
    Layer("mobilenet dw 5x5/2 28x28x96", 96, (28, 28), 96, 5, 2, 2, groups=96),
    Layer("mobilenet dw 5x5 14x14x240", 240, (14, 14), 240, 5, 1, 2, groups=240),
    Layer("convnext dw 7x7 56x56x96", 96, (56, 56), 96, 7, 1, 3, groups=96),
    Layer("wav2vec2 conv1d 10/5 x512", 1, (16000,), 512, 10, 5, 0),
    Layer("wav2vec2 conv1d 3/2 512", 512, (3199,), 512, 3, 2, 0),
    Layer("whisper conv1d 3 80->384", 80, (3000,), 384, 3, 1, 1),
    # RAFT's feature encoder: instance norms after its convolutions (channels-last).
    Layer("raft 3x3 112x112x32 + instance norm", 32, (112, 112), 32, 3, 1, 1, batch=2, instance_norm=True),
]


def model(layer: Layer) -> onnx.ModelProto:
    """The layer as a one-node ONNX model (``Conv`` then ``Relu``, an instance norm
    between them if asked, or the pool), NCHW."""
    rng = np.random.default_rng(0)
    dims = len(layer.size)
    attrs = {
        "kernel_shape": [layer.kernel] * dims,
        "strides": [layer.stride] * dims,
        "pads": [layer.pad] * (2 * dims),
    }
    inits: list[onnx.TensorProto] = []
    if layer.pool:
        nodes = [helper.make_node(layer.pool, ["x"], ["y"], **attrs)]
    else:
        fan_in = layer.c // layer.groups * layer.kernel**dims
        weight = rng.standard_normal((layer.out, layer.c // layer.groups, *[layer.kernel] * dims))
        inits = [
            numpy_helper.from_array((weight / np.sqrt(fan_in)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(layer.out).astype(np.float32), "b"),
        ]
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], group=layer.groups, **attrs),
            helper.make_node("Relu", ["n" if layer.instance_norm else "c"], ["y"]),
        ]
        if layer.instance_norm:
            inits += [
                numpy_helper.from_array(rng.uniform(0.5, 2, layer.out).astype(np.float32), "scale"),
                numpy_helper.from_array(rng.standard_normal(layer.out).astype(np.float32), "shift"),
            ]
            nodes.insert(1, helper.make_node("InstanceNormalization", ["c", "scale", "shift"], ["n"]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [layer.batch, layer.c, *layer.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    timing.quiet_threads()  # every runtime's idle threads sleep (see timing.py)
    args = timing.case_arguments(__doc__.split("\n")[0], 3.0, "layer")
    options = timing.ort_options(1)
    print(f"{'layer':<30} {'ours GF/s':>10} {'ORT GF/s':>9} {'ORT/ours':>9} {'max err':>9}")
    for layer in LAYERS:
        if args.only not in layer.name:
            continue
        proto = model(layer)
        x = np.random.default_rng(1).standard_normal((layer.batch, layer.c, *layer.size)).astype(np.float32)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        compiled = backend.compile(proto, args.target)
        reference = session.run(None, {"x": x})[0]
        error = float(np.abs(compiled.run({"x": x})["y"] - reference).max() / np.abs(reference).max())
        feeds = {"x": x}
        times = interleaved(
            {"ours": functools.partial(compiled.run, feeds), "ort": functools.partial(session.run, None, feeds)},
            args.seconds,
        )
        ours, peer = times["ours"], times["ort"]
        print(
            f"{layer.name:<30} {layer.flops / ours / 1e9:>10.1f} {layer.flops / peer / 1e9:>9.1f} "
            f"{peer / ours:>9.2f} {error:>9.1e}"
        )


if __name__ == "__main__":
    main()
