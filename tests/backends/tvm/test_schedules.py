"""The elementwise rule (:mod:`rewriter.backends.tvm.relax_passes.schedules`): on symbolic
shapes, and row by row where the last axis is whole (or half) vectors.

A copy over two symbolic loops (batch, tokens): fused with the vectors into one parallel
loop, every vector decoded its index by divisions by run-time extents (BERT's head
transpose ran at 1.6x its fixed-size time). The symbolic loops are the parallel loop
now, the vectors a serial loop inside it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as stages  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from rewriter import verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import pipeline, targets  # noqa: E402
from rewriter.backends.tvm.relax_passes import cpu_schedule  # noqa: E402

from .test_matmul import assert_agrees_with_ort, scheduled  # noqa: E402


@I.ir_module
class Heads:
    @R.function
    def main(x: R.Tensor(("batch", "sequence", 4, 64), "float32")):
        with R.dataflow():
            y = R.permute_dims(x, [0, 2, 1, 3])  # [b, s, h, d] -> [b, h, s, d]
            R.output(y)
        return y


def _scheduled(
    module: tvm.IRModule, record: cpu_schedule.ScheduleRecord | None = None
) -> tvm.tirx.PrimFunc:
    """``module``'s one PrimFunc, legalized and fused as the pipeline does, then scheduled."""
    target = targets.resolve("avx512")
    with target:
        mod = tvm.transform.Sequential(stages.legalize_passes(target))(module)
        mod = cpu_schedule.cpu_schedule(target, record)(mod)
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def _machine(
    module: tvm.IRModule, record: cpu_schedule.ScheduleRecord | None = None
) -> relax.VirtualMachine:
    """``module`` built through our pipeline for avx512 (its rules in ``record``), on the CPU."""
    target = targets.resolve("avx512")
    executable = relax.build(
        module, target=target, relax_pipeline=pipeline.relax_pipeline(target, record=record)
    )
    return relax.VirtualMachine(executable, tvm.cpu())


def _loops(func: tvm.tirx.PrimFunc) -> list[tvm.tirx.For]:
    loops: list[tvm.tirx.For] = []
    stmt = func.body
    while True:
        if isinstance(stmt, tvm.tirx.For):
            loops.append(stmt)
            stmt = stmt.body
        elif hasattr(stmt, "body"):
            stmt = stmt.body
        elif hasattr(stmt, "block"):
            stmt = stmt.block
        else:
            return loops


def _all_loops(func: tvm.tirx.PrimFunc) -> list[tvm.tirx.For]:
    loops: list[tvm.tirx.For] = []

    def note(loop: tvm.tirx.For) -> tvm.tirx.For:
        loops.append(loop)
        return loop

    tvm_ffi.structural_map(func.body, [(tvm.tirx.For, note)], order="post")
    return loops


def test_symbolic_loops_are_parallel_and_the_vectors_serial_inside():
    loops = _loops(_scheduled(Heads))
    kinds = [loop.kind for loop in loops]
    assert kinds == [
        tvm.tirx.ForKind.PARALLEL,
        tvm.tirx.ForKind.SERIAL,
        tvm.tirx.ForKind.VECTORIZED,
    ], kinds
    assert not isinstance(loops[0].extent, tvm.tirx.IntImm)  # batch x heads x sequence
    assert [int(loops[1].extent), int(loops[2].extent)] == [4, 16]  # 64 in 16-lane vectors


def test_symbolic_transpose_agrees_at_several_sizes():
    vm = _machine(Heads)
    rng = np.random.default_rng(0)
    for batch, sequence in [(1, 1), (2, 13), (1, 128)]:
        x = rng.standard_normal((batch, sequence, 4, 64)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, x.transpose(0, 2, 1, 3))


@I.ir_module
class ChannelsLast:
    @R.function
    def main(x: R.Tensor(("batch", 64, "frames"), "float32")):
        with R.dataflow():
            y = R.permute_dims(x, [0, 2, 1])  # [b, c, t] -> [b, t, c]
            R.output(y)
        return y


@I.ir_module
class Buckets:
    @R.function
    def main(x: R.Tensor(("rows", "cols"), "float32")):
        with R.dataflow():
            y = R.minimum(R.log(R.abs(x) + R.const(1.0, "float32")), R.const(2.0, "float32"))
            R.output(y)
        return y


def test_all_symbolic_elementwise_runs_its_rows_in_parallel_in_vectors():
    # Every extent symbolic (T5's relative-position buckets over [sequence, sequence],
    # attention scores masked over [batch, heads, sequence, sequence]): the rows in
    # parallel (left unscheduled before), each in 16-lane vectors and a masked last one
    # (a plain loop before: DeBERTa's masked scores ran 3x their fixed-size time).
    record = cpu_schedule.ScheduleRecord()
    func = _scheduled(Buckets, record)
    assert record.unscheduled == [] and set(record.scheduled.values()) == {"elementwise"}, record
    loops = _loops(func)
    assert [loop.kind for loop in loops] == [
        tvm.tirx.ForKind.PARALLEL,
        tvm.tirx.ForKind.SERIAL,
        tvm.tirx.ForKind.VECTORIZED,
    ]
    assert int(loops[-1].extent) == 16
    vm = _machine(Buckets)
    for shape in [(7, 13), (3, 37), (2, 64), (1, 1)]:  # a tail only, ragged, whole vectors
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 10
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, np.minimum(np.log(np.abs(x) + 1), 2), rtol=1e-6)


@I.ir_module
class Scores:
    @R.function
    def main(x: R.Tensor(("groups", "sequence", "sequence"), "float32")):
        with R.dataflow():
            y = R.permute_dims(x, [0, 2, 1])  # DeBERTa's p2c scores, both axes symbolic
            R.output(y)
        return y


@pytest.mark.parametrize(
    ("module", "shapes"),
    [
        # Both innermost axes symbolic (DeBERTa's p2c scores): 16 x 16 tiles, the output's
        # axis a masked vector loop (the elementwise rule's vectors gathered one column
        # apart: 1.5x a scalar loop).
        (Scores, [(1, 1, 1), (2, 13, 13), (3, 37, 37), (1, 32, 32)]),
        # EnCodec's [batch, 64, frames] -> [batch, frames, 64] at a symbolic length: its
        # 16-channel rows stored as vectors (the last tile's bounds check is the same for
        # every lane); scalar stores before, 3.3x the time.
        (ChannelsLast, [(1, 64, 1), (2, 64, 13), (1, 64, 40), (3, 64, 77)]),
    ],
    ids=["two-symbolic-axes", "static-channels"],
)
def test_transpose_at_symbolic_sizes_is_tiled_in_vectors_and_agrees(module, shapes):
    record = cpu_schedule.ScheduleRecord()
    func = _scheduled(module, record)
    assert set(record.scheduled.values()) == {"transpose"}, record
    loops = _loops(func)
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL
    assert loops[-1].kind == tvm.tirx.ForKind.VECTORIZED and int(loops[-1].extent) == 16, loops
    vm = _machine(module)
    for shape in shapes:
        x = np.random.default_rng(shape[-1]).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x.transpose(0, 2, 1))


@I.ir_module
class Keys:
    @R.function
    def main(x: R.Tensor(("batch", "sequence", 256), "float32")):
        batch = T.int64()
        sequence = T.int64()
        with R.dataflow():
            # RoBERTa's keys transposed for the scores, the heads merged into the batch:
            # [b, s, 4 x 64] -> [b, 4, s, 64] -> [4b, s, 64] -> [4b, 64, s], one function
            heads = R.permute_dims(R.reshape(x, R.shape([batch, sequence, 4, 64])), [0, 2, 1, 3])
            y = R.permute_dims(R.reshape(heads, R.shape([batch * 4, sequence, 64])), [0, 2, 1])
            R.output(y)
        return y


def test_a_transpose_reading_a_merged_axis_split_is_tiled_and_agrees():
    # The output's batch axis is the input's batch and heads (read as v // 4, v % 4): the
    # transpose rule takes it (16 x 16 tiles between the sequence and the head's 64); the
    # elementwise rule's vectors gathered every element 256 floats apart (2.7x the time).
    record = cpu_schedule.ScheduleRecord()
    vm = _machine(Keys, record)
    assert list(record.scheduled.values()) == ["transpose"], record
    for batch, sequence in [(1, 1), (2, 13), (1, 40), (3, 77)]:
        x = np.random.default_rng(sequence).standard_normal((batch, sequence, 256)).astype(np.float32)
        want = x.reshape(batch, sequence, 4, 64).transpose(0, 2, 1, 3).reshape(batch * 4, sequence, 64)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), want.transpose(0, 2, 1))


@I.ir_module
class Frames:
    @R.function
    def main(x: R.Tensor(("batch", "frames", 256), "float32")):
        with R.dataflow():
            y = R.permute_dims(x, [0, 2, 1])  # NWC -> NCW over a symbolic number of frames
            R.output(y)
        return y


def test_transpose_over_a_symbolic_axis_is_tiled_and_agrees():
    # wav2vec2's group norm reads its frames channels-first: walked column by column the
    # copy ran at 12 ns per element; 16 x 16 tiles now, the frames' tiles inside the
    # parallel (batch x channel tiles) loop.
    target = targets.resolve("avx512")
    with target:
        mod = tvm.transform.Sequential(stages.legalize_passes(target))(Frames)
        record = cpu_schedule.ScheduleRecord()
        mod = cpu_schedule.cpu_schedule(target, record)(mod)
    assert set(record.scheduled.values()) == {"transpose"}, record
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    loops = _loops(func)
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL and [
        int(loop.extent) for loop in loops[2:]
    ] == [16, 16]
    vm = _machine(Frames)
    for batch, frames in [(1, 5), (2, 37)]:
        x = np.random.default_rng(frames).standard_normal((batch, frames, 256)).astype(np.float32)
        np.testing.assert_array_equal(
            vm["main"](tvm.runtime.tensor(x)).numpy(), x.transpose(0, 2, 1)
        )


def resize_concat_model(concat: bool = True) -> onnx.ModelProto:
    """SegFormer's decode head in small: a map upsampled to its neighbour's size (bilinear),
    concatenated over channels (or not: the upsampled map alone, twice as wide) and laid
    out channels-last (64 channels: 4 vectors)."""
    channels = 32 if concat else 64
    nodes = [
        helper.make_node("Resize", ["small", "", "scales"], ["up"], mode="linear"),
        helper.make_node("Concat", ["up", "large"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 3, 1]),
    ]
    inputs = [
        helper.make_tensor_value_info("small", TensorProto.FLOAT, [1, channels, 14, 14]),
        helper.make_tensor_value_info("large", TensorProto.FLOAT, [1, 32, 28, 28]),
    ]
    if not concat:
        nodes[1:] = [helper.make_node("Transpose", ["up"], ["y"], perm=[0, 2, 3, 1])]
        inputs = inputs[:1]
    graph = helper.make_graph(
        nodes,
        "resize_concat",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 28, 28, 64])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_elementwise_with_whole_vector_rows_runs_row_by_row():
    # One parallel loop over the 28 x 28 pixels, each a serial loop of 4 vectors: the
    # resize's source pixels and weights computed once per pixel, not once per vector.
    proto = resize_concat_model(concat=False)
    funcs = scheduled(proto)
    (func,) = [f for name, f in funcs.items() if "resize" in name]
    loops = [(loop.kind, int(loop.extent)) for loop in _loops(func)]
    assert loops == [
        (tvm.tirx.ForKind.PARALLEL, 28 * 28),
        (tvm.tirx.ForKind.SERIAL, 4),
        (tvm.tirx.ForKind.VECTORIZED, 16),
    ], loops
    assert_agrees_with_ort(proto)


def test_a_resize_then_concat_runs_per_pixel_a_loop_per_input():
    # Per pixel, the upsampled map's 32 channels, then the other's: the resize's source
    # pixels and weights computed once per pixel (61.7 us a call, against 73.0 as four
    # vectors each loading from both inputs, one thread).
    proto = resize_concat_model()
    (func,) = [f for name, f in scheduled(proto).items() if "resize" in name]
    loops = [(loop.kind, int(loop.extent)) for loop in _all_loops(func)]
    assert sorted(loops) == [
        (tvm.tirx.ForKind.SERIAL, 32),
        (tvm.tirx.ForKind.SERIAL, 32),
        (tvm.tirx.ForKind.PARALLEL, 28 * 28),
    ], loops
    assert_agrees_with_ort(proto)



def blend_then_upsample_twice_model() -> onnx.ModelProto:
    """GLPN's decoder in small: two maps blended by a gate (``a * g + b``), then upsampled
    twice (bilinear, 14 -> 28 -> 56), channels-last after."""
    nodes = [
        helper.make_node("Mul", ["a", "g"], ["ag"]),
        helper.make_node("Add", ["ag", "b"], ["blend"]),
        helper.make_node("Resize", ["blend", "", "scales"], ["up"], mode="linear"),
        helper.make_node("Resize", ["up", "", "scales"], ["up2"], mode="linear"),
        helper.make_node("Transpose", ["up2"], ["y"], perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "blend_upsample",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 32, 14, 14]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 1, 14, 14]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 32, 14, 14]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 56, 56, 32])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_resize_of_a_computed_map_reads_it_written_once():
    # The blend and the first resize each a parallel loop of their own before the second
    # resize: inlined, the blend ran 16 times per output element and the first resize 4
    # times (GLPN's decoder: 17 ms, 1.2 ms apart).
    proto = blend_then_upsample_twice_model()
    (func,) = [f for name, f in scheduled(proto).items() if "resize" in name]
    parallel = [loop for loop in _all_loops(func) if loop.kind == tvm.tirx.ForKind.PARALLEL]
    assert len(parallel) == 3, parallel
    assert_agrees_with_ort(proto)


@I.ir_module
class HalfVectorHeads:
    @R.function
    def main(x: R.Tensor((64, 49, 48), "float32")):
        with R.dataflow():
            # Swin's window attention heads: [windows, tokens, 2 x 24] -> [windows, 2, tokens, 24]
            y = R.permute_dims(R.reshape(x, R.shape([64, 49, 2, 24])), [0, 2, 1, 3])
            R.output(y)
        return y


def test_rows_of_half_vectors_are_not_fused_across_rows():
    # 24 floats a row: fused, a 16-lane vector straddles two rows and gathers; rows of
    # three 8-lane vectors load contiguously.
    loops = [(loop.kind, int(loop.extent)) for loop in _loops(_scheduled(HalfVectorHeads))]
    assert loops == [
        (tvm.tirx.ForKind.PARALLEL, 64 * 2 * 49),
        (tvm.tirx.ForKind.SERIAL, 3),
        (tvm.tirx.ForKind.VECTORIZED, 8),
    ], loops
    vm = _machine(HalfVectorHeads)
    x = np.random.default_rng(0).standard_normal((64, 49, 48)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, x.reshape(64, 49, 2, 24).transpose(0, 2, 1, 3))


def channel_concat_model(widths: list[int]) -> onnx.ModelProto:
    """Channels-last feature maps [1, 14, 14, w] concatenated along the channels, then
    scaled and shifted per channel (a BatchNorm, as DenseNet follows each concat)."""
    total = sum(widths)
    names = [f"x{i}" for i in range(len(widths))]
    graph = helper.make_graph(
        [
            helper.make_node("Concat", names, ["features"], axis=3),
            helper.make_node("Mul", ["features", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "shift"], ["y"]),
        ],
        "channel_concat",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 14, 14, w]) for n, w in zip(names, widths, strict=True)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 14, 14, total])],
        [
            numpy_helper.from_array(np.linspace(0.5, 1.5, total, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.linspace(-1, 1, total, dtype=np.float32), "shift"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("widths", [[128, 32, 32], [58, 58], [64, 40, 24, 8]])
def test_a_concat_along_the_channels_is_a_loop_per_input(widths):
    # Vectorized across the inputs' spans, every vector loaded from every input and
    # selected: DenseNet-121's 13-input concat + BatchNorm took 0.79 ms, 0.045 ms as a loop
    # per input (which LLVM vectorizes). Spans of any width (ShuffleNet's 58 channels).
    proto = channel_concat_model(widths)
    (func,) = scheduled(proto).values()
    loops = _all_loops(func)
    assert [loop.kind for loop in loops].count(tvm.tirx.ForKind.PARALLEL) == 1, loops
    spans = [int(loop.extent) for loop in loops if loop.kind == tvm.tirx.ForKind.SERIAL]
    assert spans == widths, spans
    assert_agrees_with_ort(proto)


def channel_shuffle_model(batch: int | str) -> onnx.ModelProto:
    """ShuffleNetV2's channel shuffle in NCHW: [b, 2 x 116, 14, 14] viewed as two groups,
    swapped and flattened back (``c % 2 * 116 + c // 2`` read for channel ``c``)."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "groups"], ["grouped"]),
            helper.make_node("Transpose", ["grouped"], ["swapped"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", ["swapped", "flat"], ["y"]),
        ],
        "channel_shuffle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 232, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 232, 14, 14])],
        [
            numpy_helper.from_array(np.array([0, 2, 116, 14, 14], np.int64), "groups"),
            numpy_helper.from_array(np.array([0, 232, 14, 14], np.int64), "flat"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_channel_shuffle_runs_a_row_per_channel():
    # Fused into 16-lane vectors across channels of 14 x 14 pixels, every lane decoded
    # its channel (ShuffleNetV2 at batch 8: 1.85 ms a call); a row of 196 pixels per
    # channel, the channel decoded once: 0.05 ms.
    proto = channel_shuffle_model(1)
    (func,) = scheduled(proto).values()
    loops = [(loop.kind, int(loop.extent)) for loop in _loops(func)]
    assert loops == [
        (tvm.tirx.ForKind.PARALLEL, 232),
        (tvm.tirx.ForKind.SERIAL, 49),
        (tvm.tirx.ForKind.VECTORIZED, 4),
    ], loops
    assert_agrees_with_ort(proto)


def _scheduled_and_built(func: tvm.tirx.PrimFunc) -> tuple[tvm.tirx.PrimFunc, tvm.runtime.Module]:
    """``func`` scheduled by our CPU rules for avx512, and built as ``main``."""
    target = targets.resolve("avx512")
    with target:
        scheduled_func = cpu_schedule.cpu_schedule(target)(tvm.IRModule({"main": func}))["main"]
    library = tvm.tirx.build(
        tvm.IRModule({"main": scheduled_func.with_attr("global_symbol", "main")}), target=target
    )
    return scheduled_func, library


def merged_heads(heads: int, symbolic: bool) -> tvm.tirx.PrimFunc:
    """Swin's attention output, its heads of 24 merged back as TVM fuses the transpose
    and the reshape: [windows, heads, 49, 24] -> [windows, 49, heads x 24], 64 windows
    an image (a symbolic count of images, or one)."""
    windows = "images * T.int64(64)" if symbolic else "T.int64(64)"
    source = f"""
@T.prim_func(private=True, s_tir=True)
def main(a: T.handle, b: T.handle{", images: T.int64" if symbolic else ""}):
    x = T.match_buffer(a, ({windows}, {heads}, 49, 24))
    y = T.match_buffer(b, ({windows}, 49, {heads * 24}))
    for w, t, c in T.grid({windows}, 49, {heads * 24}):
        with T.sblock("T_reshape"):
            v0, v1, v2 = T.axis.remap("SSS", [w, t, c])
            y[v0, v1, v2] = x[v0, v2 // 24, v1, v2 % 24]
"""
    return tvm.script.from_source(source)


@pytest.mark.parametrize("symbolic", [False, True])
@pytest.mark.parametrize("heads", [2, 4])
def test_rows_of_merged_heads_are_split_at_the_heads(heads, symbolic):
    # Each output row is `heads` runs of 24 floats; 16-lane vectors over its 48 or 96
    # floats straddled two heads and gathered every element (Swin at a symbolic batch:
    # 316 us at one thread for [64, 2, 49, 24]; split at the heads, three 8-lane vectors
    # a head: 13 us).
    func, library = _scheduled_and_built(merged_heads(heads, symbolic))
    loops = _loops(func)
    assert [(loop.kind, int(loop.extent)) for loop in loops[-2:]] == [
        (tvm.tirx.ForKind.SERIAL, 3),
        (tvm.tirx.ForKind.VECTORIZED, 8),
    ], loops
    x = np.random.default_rng(heads).standard_normal((64, heads, 49, 24)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((64, 49, heads * 24), np.float32))
    library["main"](tvm.runtime.tensor(x), y, *([1] if symbolic else []))
    np.testing.assert_array_equal(y.numpy(), x.transpose(0, 2, 1, 3).reshape(64, 49, -1))


def shuffled_heads() -> tvm.tirx.PrimFunc:
    """A channel shuffle (``c % 2 * 4 + c // 2``) whose rows are 4 heads of 12 floats
    read from ``[.., head, pixel, 12]``: a decoded axis before the last, and a row period."""
    source = """
@T.prim_func(private=True, s_tir=True)
def main(x: T.Buffer((2, 8, 4, 6, 12), "float32"), y: T.Buffer((2, 8, 6, 48), "float32")):
    for n, c, p, r in T.grid(2, 8, 6, 48):
        with T.sblock("T_shuffle"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [n, c, p, r])
            y[v0, v1, v2, v3] = x[v0, v1 % 2 * 4 + v1 // 2, v3 // 12, v2, v3 % 12]
"""
    return tvm.script.from_source(source)


def test_a_decoded_axis_before_a_split_row_ends_the_parallel_rows():
    # The row split at its period (12) is two loops for one block axis: the pixels and
    # the row after the decoded channel are three loops, in vectors that divide the
    # period (one loop short, 16-lane vectors over one row straddled the heads).
    func, library = _scheduled_and_built(shuffled_heads())
    loops = [(loop.kind, int(loop.extent)) for loop in _loops(func)]
    assert loops == [
        (tvm.tirx.ForKind.PARALLEL, 16),
        (tvm.tirx.ForKind.SERIAL, 72),
        (tvm.tirx.ForKind.VECTORIZED, 4),
    ], loops
    x = np.random.default_rng(0).standard_normal((2, 8, 4, 6, 12)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((2, 8, 6, 48), np.float32))
    library["main"](tvm.runtime.tensor(x), y)
    channels = [c % 2 * 4 + c // 2 for c in range(8)]
    expected = x[:, channels].transpose(0, 1, 3, 2, 4).reshape(2, 8, 6, 48)
    np.testing.assert_array_equal(y.numpy(), expected)


@I.ir_module
class HeadKeys:
    @R.function
    def main(x: R.Tensor(("batch", 197, 256), "float32")):
        batch = T.int64()
        with R.dataflow():
            heads = R.reshape(x, R.shape([batch, 197, 4, 64]))
            y = R.permute_dims(heads, [0, 2, 3, 1])  # the keys, transposed per head
            R.output(y)
        return y


def test_a_reshape_fused_before_a_transpose_is_tiled_and_agrees():
    # ViT's keys [b, 197, 4 * 64] -> [b, 4, 64, 197]: the input's last axis is two of the
    # output's merged; the elementwise rule gathered each vector with a division per lane
    # (60 us at batch 1, 140 us at a symbolic batch); 16 x 16 tiles now.
    record = cpu_schedule.ScheduleRecord()
    vm = _machine(HeadKeys, record)
    assert [rule for name, rule in record.scheduled.items() if "transpose" in name] == [
        "transpose"
    ], record
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 197, 256)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, x.reshape(batch, 197, 4, 64).transpose(0, 2, 3, 1))


def rotated_keys(tokens: int) -> tvm.IRModule:
    """Keys [2, tokens, 2 x 64] split into heads, rotated (RoPE: ``k * cos + rotate_half(k)
    * sin``) and transposed per head for ``Q @ K^T``, as Llama's export computes them."""
    bb = relax.BlockBuilder()
    k = relax.Var("k", relax.TensorType((2, tokens, 128), "float32"))
    cos = relax.Var("cos", relax.TensorType((tokens, 64), "float32"))
    sin = relax.Var("sin", relax.TensorType((tokens, 64), "float32"))
    op = relax.op
    with bb.function("main", [k, cos, sin]):
        with bb.dataflow():
            heads = bb.emit(op.permute_dims(op.reshape(k, (2, tokens, 2, 64)), [0, 2, 1, 3]))
            first = bb.emit(op.strided_slice(heads, axes=[3], begin=[0], end=[32]))
            second = bb.emit(op.strided_slice(heads, axes=[3], begin=[32], end=[64]))
            rotated = bb.emit(op.concat([op.negative(second), first], axis=3))
            y = bb.emit(op.add(op.multiply(heads, cos), op.multiply(rotated, sin)))
            keys = bb.emit_output(op.permute_dims(y, [0, 1, 3, 2]))
        bb.emit_func_output(keys)
    return bb.get()


@pytest.mark.parametrize("tokens", [48, 50], ids=["whole-tiles", "ragged-tiles"])
def test_keys_rotated_then_transposed_are_tiled_and_agree(tokens):
    # Llama's keys, rotated (RoPE) and transposed in one fused function: as elementwise
    # vectors along the tokens, each lane read another row of the keys and of the sine and
    # cosine tables (0.99 ms of a 48 ms batch-8 call, Zen 4, one thread); 16 x 16 tiles as
    # a transpose's (0.55 ms).
    record = cpu_schedule.ScheduleRecord()
    vm = _machine(rotated_keys(tokens), record)
    assert list(record.scheduled.values()) == ["transpose"], record
    rng = np.random.default_rng(tokens)
    k, cos, sin = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, tokens, 128), (tokens, 64), (tokens, 64)))
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (k, cos, sin))).numpy()
    heads = k.reshape(2, tokens, 2, 64).transpose(0, 2, 1, 3)
    rotated = np.concatenate([-heads[..., 32:], heads[..., :32]], axis=-1)
    np.testing.assert_allclose(got, (heads * cos + rotated * sin).transpose(0, 1, 3, 2), rtol=1e-6, atol=1e-6)


def test_an_image_row_split_from_flat_pixels_stays_elementwise():
    # [b, c, h, w] -> [b, h * w, c] reads its pixels as ``p // w, p % w``: tiled, 1.5x
    # slower than as vectors along the channels (SegFormer's patch embeddings), so the
    # transposed-read tiling leaves it to the elementwise rule.
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64, 28, 28), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (2, 64, 784)))
            y = bb.emit_output(relax.op.multiply(relax.op.permute_dims(flat, [0, 2, 1]), relax.const(2.0, "float32")))
        bb.emit_func_output(y)
    record = cpu_schedule.ScheduleRecord()
    _scheduled(bb.get(), record)
    assert list(record.scheduled.values()) == ["elementwise"], record


@I.ir_module
class WindowSoftmax:
    @R.function
    def main(x: R.Tensor(("windows", 2, 49, 49), "float32")):
        with R.dataflow():
            y = R.nn.softmax(x, axis=-1)
            R.output(y)
        return y


def test_softmax_over_ragged_rows_of_a_symbolic_count_builds_and_agrees():
    # Swin's window attention compiled without the rewrite: rows of 49 keys (no whole
    # vectors) over a symbolic number of windows. Asked to peel the masked last vector,
    # TVM's LoopPartition mixed int32 and int64 bounds and the build failed; vector_tails
    # splits it off instead.
    record = cpu_schedule.ScheduleRecord()
    vm = _machine(WindowSoftmax, record)
    assert set(record.scheduled.values()) == {"row reduction"}, record
    for windows in (1, 3):
        x = np.random.default_rng(windows).standard_normal((windows, 2, 49, 49)).astype(np.float32)
        expected = np.exp(x - x.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@I.ir_module
class FrameStatistics:
    @R.function
    def main(x: R.Tensor(("batch", 32, "frames"), "float32")):
        with R.dataflow():
            # wav2vec2's group norm over frames: each channel's deviation over its frames.
            y = R.sqrt(R.add(R.variance(x, axis=[2], keepdims=True), R.const(1e-5, "float32")))
            R.output(y)
        return y


def _nests(func: tvm.tirx.PrimFunc) -> list[set[str]]:
    """The names of the blocks in each top-level loop nest of ``func``."""
    nests: list[set[str]] = []
    root = func.body.block if hasattr(func.body, "block") else func.body
    stmt = root.body
    for top in stmt.seq if isinstance(stmt, tvm.tirx.SeqStmt) else [stmt]:
        names: set[str] = set()

        def note(block: tvm.s_tir.SBlock, names: set[str] = names) -> tvm.s_tir.SBlock:
            names.add(block.name_hint)
            return block

        tvm_ffi.structural_map(top, [(tvm.s_tir.SBlock, note)])
        nests.append(names)
    return nests


def test_a_ragged_row_folds_its_partial_sums_in_the_row_loop_that_made_them():
    # Over a symbolic (or ragged) row the partial sums come from their own loop nest; the
    # fold of each row's 16 partials runs in that nest's row loop, so the partials are one
    # vector per row (on the stack, in a register) rather than a heap buffer of every
    # row's, stored and reloaded per vector of the row: the statistics ran at 4x the time
    # of a fixed 3199 frames.
    record = cpu_schedule.ScheduleRecord()
    func = _scheduled(FrameStatistics, record)
    assert set(record.scheduled.values()) == {"row reduction"}, record
    nests = _nests(func)
    partials = [name for nest in nests for name in nest if name.endswith("_rf_update")]
    assert len(partials) == 2, nests  # the mean's and the squared deviations'
    for partial in partials:
        fold = partial.removesuffix("_rf_update")
        assert any({partial, fold} <= nest for nest in nests), (partial, nests)
    vm = _machine(FrameStatistics)
    for batch, frames in [(1, 3199), (2, 37), (3, 16)]:
        x = np.random.default_rng(frames).standard_normal((batch, 32, frames)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, np.sqrt(x.var(-1, keepdims=True) + 1e-5), rtol=1e-5)


def _weighted_sum(rows: list[int | str], points: int) -> onnx.ModelProto:
    """``(a * w).sum(-1)`` with ``w`` broadcast over axis 1 (Deformable DETR's sampled
    values weighted by their attention and summed over the points)."""
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["a", "w"], ["p"]),
            helper.make_node("ReduceSum", ["p", "axes"], ["y"], keepdims=0),
        ],
        "weighted_sum",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, points]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [rows[0], 1, *rows[2:], points]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("rows", "points", "vectorized"),
    [([2, 8, 33], 16, True), ([2, 8, 33], 48, True), (["b", 8, 33], 16, True), ([2, 8, 33], 5, False)],
    ids=["one-vector", "three-vectors", "symbolic", "short"],
)
def test_a_function_ending_in_its_row_reduction_is_scheduled(rows, points, vectorized):
    # TVM's default lowering ran it scalar on one thread (Deformable DETR: 4x ORT).
    proto = _weighted_sum(rows, points)
    funcs = scheduled(proto)
    (name,) = [name for name in funcs if "sum" in name]
    func = funcs[name]
    assert func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))
    kinds = set()

    def loop(node: object, visitor: object) -> None:
        kinds.add(node.kind)  # type: ignore[attr-defined]
        visitor.default_visit(node)  # type: ignore[attr-defined]

    tvm_ffi.structural_visit(func.body, [(tvm.tirx.For, loop)])
    assert tvm.tirx.ForKind.PARALLEL in kinds
    assert (tvm.tirx.ForKind.VECTORIZED in kinds) == vectorized
    shapes = [[2 if isinstance(d, str) else d for d in rows]]
    compiled = backend.compile(proto, "avx512")
    rng = np.random.default_rng(0)
    for shape in shapes:
        feeds = {
            "a": rng.standard_normal([*shape, points]).astype(np.float32),
            "w": rng.standard_normal([shape[0], 1, *shape[2:], points]).astype(np.float32),
        }
        expected = verify.run(proto.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert compiled.schedules.scheduled[name] == "row reduction"


def _instance_norm(channels: int) -> onnx.ModelProto:
    """Conv (1 x 1) -> InstanceNormalization -> Relu over a symbolic batch: channels-last
    after the convolution, the norm's statistics reduce over the pixels, keeping the
    channels innermost."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("InstanceNormalization", ["c", "s", "t"], ["n"], epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((channels, 16, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "t"),
    ]
    graph = helper.make_graph(
        nodes,
        "instance_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 20, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("channels", [32, 24, 8])
def test_channels_last_statistics_are_column_reductions_and_agree(channels):
    # RAFT's feature encoders (instance norms after convolutions): the variance over the
    # pixels of [n, h, w, c] went to dlight's scalar reduction, one channel at a time
    # (16 of RAFT's 81 ms). A vector of channels (16, 8: whatever divides them)
    # accumulates over the pixels instead; each channel's sum in the scalar loop's order.
    model = _instance_norm(channels)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    statistics = [name for name in compiled.schedules.scheduled if "variance" in name]
    assert statistics and all(compiled.schedules.scheduled[name] == "column reduction" for name in statistics)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        feeds = {"x": rng.standard_normal((batch, 16, 20, 24)).astype(np.float32)}
        expected = verify.run(model.SerializeToString(), feeds)["y"]
        got = compiled.run(feeds)["y"]
        # The statistics of 480 pixels in float32 against ORT's: a few ulps of the output.
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@T.prim_func(private=True, s_tir=True)
def _column_sum(x: T.Buffer((8, 64, 32), "float32"), y: T.Buffer((8, 32), "float32")):
    for n, c, k in T.grid(8, 32, 64):
        with T.sblock("sum"):
            vn, vc, vk = T.axis.remap("SSR", [n, c, k])
            with T.init():
                y[vn, vc] = T.float32(0)
            y[vn, vc] = y[vn, vc] + x[vn, vk, vc]


def test_a_column_sum_accumulates_vectors_of_the_kept_axis():
    target = targets.resolve("avx512")
    (rule,) = [r for r in cpu_schedule.cpu_rules(target) if getattr(r, "what", "") == "column reduction"]
    func = rule.apply(_column_sum, target, False).mod["main"].with_attr("global_symbol", "main")
    script = func.script()
    # The update's lanes loop is vectorized inside the loop over the 64 summed rows.
    assert 'T.vectorized(16)' in script.split('T.sblock("sum_update")')[0].rsplit("for ", 1)[-1]
    x = np.random.default_rng(0).standard_normal((8, 64, 32)).astype(np.float32)
    library = tvm.compile(tvm.IRModule({"main": func}), target=target)
    y = tvm.runtime.tensor(np.empty((8, 32), np.float32))
    library["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), x.sum(axis=1, dtype=np.float32))  # each column in order
