"""1-D convolutions over a symbolic length compute whole tiles of frames (:mod:`rewriter.backends.tvm.relax_passes.conv_frames`).

Each compiled model agrees with ONNX Runtime within
:data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE` (float32: 1e-4 of the output's
scale: the same products summed in another order) at lengths whose frame counts are and
are not multiples of the 7-frame tile; the padded frames are dropped, so the shapes match.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.backends import tvm as backend
from rewriter.backends.tvm import verify
from rewriter.backends.tvm.relax_passes import conv, conv_frames
from tests.backends.tvm.test_conv import conv_model
from tests.backends.tvm.test_reshape_views import shared_names

TOLERANCE = verify.COMPILED_TOLERANCE["float32"]


def _symbolic(model: object, channels: int) -> object:
    model.graph.input[0].CopyFrom(  # type: ignore[attr-defined]
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, "samples"])
    )
    return model


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "stride", "pad", "groups", "lengths"),
    [
        # wav2vec2's first conv (one input channel, kernel 10, stride 5): 12, 19, 7 and
        # 40 frames (40: already whole tiles).
        pytest.param(1, 32, 10, 5, 0, 1, (64, 100, 40, 205), id="kernel10-stride5"),
        # its next ones (kernel 3 and 2, stride 2).
        pytest.param(16, 32, 3, 2, 0, 1, (64, 101, 37, 35), id="kernel3-stride2"),
        pytest.param(16, 32, 2, 2, 0, 1, (64, 99, 18), id="kernel2-stride2"),
        # its positional conv: grouped, padded by half an even kernel (the padding folds
        # into the zero-padded copy).
        pytest.param(32, 32, 8, 1, 4, 4, (21, 64, 9), id="grouped-padded"),
    ],
)
def test_symbolic_conv1d_agrees_at_every_length(channels, out, kernel, stride, pad, groups, lengths):
    model = _symbolic(conv_model([1, channels, 64], out, kernel, stride, pad, groups), channels)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    rules = compiled.schedules.scheduled
    # The slice of the real frames is the convolution's epilogue.
    assert [rule for name, rule in rules.items() if "conv1d" in name] == ["conv"], rules
    assert any("conv1d" in name and "strided_slice" in name for name in rules), rules
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    rng = np.random.default_rng(2)
    for batch, length in zip((1, 3, 2, 1), lengths, strict=False):
        x = rng.standard_normal((batch, channels, length)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, length


def _update_block(kernel: int, stride: int, *, whole_tiles: bool) -> str:
    """The conv rule's scheduled update block (TVMScript) of a channels-last conv1d of 64
    to 64 channels over a symbolic length, with or without :func:`conv_frames.pad_frames`."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm import targets

    samples = tvm.tirx.Var("samples", "int64")
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), samples, 64), "float32"))
    w = relax.Var("w", relax.TensorType((kernel, 64, 64), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        y = relax.op.nn.conv1d(x, w, strides=stride, data_layout="NWC", kernel_layout="WIO")
        bb.emit_func_output(bb.emit(y))
    mod = bb.get()
    if whole_tiles:
        mod = conv_frames.pad_frames(mod, 16)
    mod = relax.transform.LegalizeOps()(mod)
    func = next(f for gv, f in mod.functions.items() if "conv1d" in gv.name_hint)
    sch = conv.rules()["conv"](16).apply(func, targets.resolve("avx512"), False)
    assert sch is not None
    text = str(sch.mod["main"].script())
    start = text.index('T.sblock("conv1d_nwc_update")')
    return text[start : text.index("T.reads(", start)]


@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (10, 5)])
def test_padded_frames_leave_no_mask_in_the_micro_kernel(kernel, stride):
    # Without the padding, the last tile's mask is a T.where in the update block: a
    # bounds test per row in the FMA loop of every tile.
    assert "T.where" in _update_block(kernel, stride, whole_tiles=False)
    update = _update_block(kernel, stride, whole_tiles=True)
    assert "T.where" not in update, update
    assert "* T.int64(7) + yy_1" in update, update  # 7-frame tiles, on the stack


def test_tile_height_follows_the_conv_rules():
    assert conv_frames.tile_height(256, 1, 16) == 7  # 32-wide tiles, 7 rows (on the stack)
    assert conv_frames.tile_height(256, 1, 8) == 6  # AVX2: 16 wide, 12 accumulators
    assert conv_frames.tile_height(256, 16, 16) == 8  # 16 channels per group
    assert conv_frames.tile_height(10, 1, 16) == 1  # no tile: left alone


def _conv1d(length: object, kernel: int = 3, stride: int = 2) -> object:
    """A Relax module of one channels-last conv1d of 16 to 32 channels over ``length`` samples."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, length, 16), "float32"))
    w = relax.Var("w", relax.TensorType((kernel, 16, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        y = relax.op.nn.conv1d(x, w, strides=stride, data_layout="NWC", kernel_layout="WIO")
        bb.emit_func_output(bb.emit(y))
    return bb.get()


def test_frames_whole_tiles_cover_are_left_alone():
    import tvm

    # 32 frames (static), or (16 n + 1 - 3) // 2 + 1 = 8 n (symbolic): whole 8-frame tiles.
    # 35 frames = 5 x 7: tiles of 7, at least half the 8 rows, without a mask.
    n = tvm.tirx.Var("n", "int64")
    for length in (65, 16 * n + 1, 71):
        same = _conv1d(length)
        tvm.ir.assert_structural_equal(conv_frames.pad_frames(same, 16), same)


@pytest.mark.parametrize("length", [pytest.param(63, id="31-frames"), pytest.param("samples", id="symbolic")])
def test_ragged_frames_are_padded_then_sliced(length):
    import tvm

    size = tvm.tirx.Var(length, "int64") if isinstance(length, str) else length
    once = conv_frames.pad_frames(_conv1d(size), 16)
    text = once["main"].script()
    assert "pad_frames" in text and "R.strided_slice" in text, text
    assert shared_names(once) == {}  # the copy's frames in its placeholder's variables
    # Idempotent: the padded convolution's frames are whole tiles.
    tvm.ir.assert_structural_equal(conv_frames.pad_frames(once, 16), once)


def _model(nodes: list[object], inits: list[object]) -> object:
    """An opset-17 model of ``nodes`` from ``x`` [batch, 16, samples] to ``y``."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _two_convs(pads: list[int]) -> object:
    """``Conv(Relu(Conv(x)), pads=pads)`` over a symbolic length: the second one's copy
    reads the first one's output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 16, 3)) / 7).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((32, 32, 3)) / 10).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[3], pads=pads),
    ]
    return _model(nodes, inits)


@pytest.mark.parametrize(("pads", "fused"), [([0, 0], True), ([0, 5], False), ([3, 0], False)])
def test_a_padded_conv_keeps_its_copy_apart(pads, fused):
    # Unpadded, the second conv's copy fuses into the first one's epilogue, which writes
    # only the samples its tiles produce (the real frames read no others). Padded, the
    # real frames read the copy's zeros, which that epilogue would not write (relative
    # errors of 0.25 to 1e30 when it did): the copy is a function of its own.
    model = _two_convs(pads)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    rules = compiled.schedules.scheduled
    assert any("relu_pad_frames" in name for name in rules) == fused, rules
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    rng = np.random.default_rng(3)
    for length in (67, 66, 18, 130):
        x = rng.standard_normal((1, 16, length)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, length


@pytest.mark.parametrize(
    ("groups", "rule"), [pytest.param(1, "conv", id="dense"), pytest.param(32, "channels-last window", id="depthwise")]
)
def test_a_static_batch_keeps_its_images_apart(groups, rule):
    # 3 images of 31 frames (ragged), padded to 32: flattened across the images, the
    # convolution's pixel n * 32 + f and its epilogue's n * 31 + f differ, and the rule
    # refused (wav2vec2 at a fixed batch of 8 ran unscheduled, 59x ORT's time).
    model = conv_model([3, 32, 64], 32, 3, 2, 0, groups)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    rules = compiled.schedules.scheduled
    assert [r for name, r in rules.items() if "conv1d" in name] == [rule], rules
    assert any("conv1d" in name and "strided_slice" in name for name in rules), rules
    x = np.random.default_rng(4).standard_normal((3, 32, 64)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": x})[0]
    got = compiled.run({"x": x})["y"]
    assert got.shape == reference.shape
    assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol


def test_a_static_batch_over_a_symbolic_length_gets_the_implicit_gemm():
    # One image of any length (a library compiled with the batch fixed, ``--dim batch=1``):
    # the rules took a symbolic pixel axis only behind a symbolic batch, and the
    # convolution was left to TVM's default lowering.
    model = conv_model([1, 16, 64], 32, 3, 2, 0, 1)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, "samples"]))
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    rules = compiled.schedules.scheduled
    assert [r for name, r in rules.items() if "conv1d" in name] == ["conv"], rules
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for length in (64, 101, 18):
        x = np.random.default_rng(5).standard_normal((1, 16, length)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, length


@pytest.mark.slow(reason="exports wav2vec2 (small) twice and compiles each (~1 min)")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_wav2vec2_compiled_for_any_length_agrees_at_ragged_lengths(real_model, exporter):
    # The real feature encoder (kernels 10, 3, 2; strides 5, 2, 2) and positional conv,
    # one library for every batch and length: 400 samples give 79, 39 and 19 frames (16
    # channels: 8 x 16 tiles, none a multiple of 8), 1003 give 199, 99 and 49.
    model = real_model(f"wav2vec2_{exporter}")
    compiled = backend.compile(model.path, "avx512")
    assert compiled.schedules is not None
    rules = compiled.schedules.scheduled
    assert all(rule == "conv" for name, rule in rules.items() if "conv1d" in name), rules
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(6)
    for batch, samples in ((2, 400), (1, 1003), (3, 257)):
        feeds = {"input_values": rng.standard_normal((batch, samples)).astype(np.float32)}
        reference = session.run(None, feeds)[0]
        got = next(iter(compiled.run(feeds).values()))
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, samples


def _reflect_padded_conv() -> object:
    """EnCodec's downsampling: ``Conv(Pad(Elu(x), reflect, (0, (samples + 1) % 2)))``, the
    pad's amount computed from the length, so that the stride-2 frames cover it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 16, 4)) / 8).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.zeros(5, np.int64), "zeros"),
    ]
    nodes = [
        helper.make_node("Elu", ["x"], ["e"]),
        helper.make_node("Shape", ["x"], ["length"], start=2),
        helper.make_node("Add", ["length", "one"], ["longer"]),
        helper.make_node("Mod", ["longer", "two"], ["extra"]),
        helper.make_node("Concat", ["zeros", "extra"], ["pads"], axis=0),
        helper.make_node("Pad", ["e", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[4], strides=[2]),
    ]
    return _model(nodes, inits)


def test_a_copy_after_a_computed_pad_stays_apart_and_everything_is_scheduled():
    # Fused with the pad (and the transposes around it), the copy of the frames made one
    # function; EnCodec's first such function no rule could schedule (scalar: 2 ms of its
    # 27 at symbolic sizes). The copy is a function of its own after such a pad.
    model = _reflect_padded_conv()
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    rules, unscheduled = compiled.schedules.scheduled, compiled.schedules.unscheduled
    assert not unscheduled, unscheduled
    assert any(name == "pad_frames" or name.startswith("pad_frames") for name in rules), rules
    assert not any("reflect_pad" in name and "pad_frames" in name for name in rules), rules
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    rng = np.random.default_rng(4)
    for batch, length in ((1, 67), (2, 66), (1, 18), (1, 131)):
        x = rng.standard_normal((batch, 16, length)).astype(np.float32)
        reference = session.run(None, {"x": x})[0]
        got = compiled.run({"x": x})["y"]
        assert got.shape == reference.shape
        assert float(np.abs(got - reference).max() / np.abs(reference).max()) < TOLERANCE.rtol, length
