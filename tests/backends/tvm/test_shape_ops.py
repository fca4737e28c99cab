"""Shape arithmetic that TVM's importer refused with symbolic input dimensions.

Each model computes a shape operand from ``Shape`` the way an exporter does (DeBERTa's
``Tile``, SegFormer's ``Resize``, Swin's TorchScript ``F.pad``, wav2vec2's sliced
positional convolution and its dynamo export's scalar sizes), is compiled once with its
dimensions symbolic, and run at two sizes against ONNX Runtime on the same model. The
tolerance is :data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE` (float32), as in
``test_compile.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm import import_onnx, shape_values, targets
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE
from rewriter.errors import InputError
from tests.helpers import run

TOLERANCE = COMPILED_TOLERANCE["float32"]
SEED = 0
INT64_MAX = np.iinfo(np.int64).max


def ints(name: str, *values: int, scalar: bool = False) -> onnx.TensorProto:
    array = np.array(values[0] if scalar else list(values), np.int64)
    return numpy_helper.from_array(array, name)


def model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int | str]],
    output: str,
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "shape_arithmetic",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in inputs.items()
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def assert_runs_symbolic(proto: onnx.ModelProto, shapes: list[dict[str, tuple[int, ...]]]) -> None:
    """One library, compiled with the dimensions symbolic, agrees with ONNX Runtime at
    every size in ``shapes``."""
    compiled = backend.compile(proto, "llvm")
    assert any(isinstance(dim, str) for _, shape, _ in compiled.signature.inputs for dim in shape)
    rng = np.random.default_rng(SEED)
    for sizes in shapes:
        feeds = {
            name: rng.standard_normal(shape).astype(np.float32) for name, shape in sizes.items()
        }
        reference, ours = run(proto, feeds), compiled.run(feeds)
        for name, expected in reference.items():
            assert ours[name].shape == expected.shape, (name, sizes)
            comparison = verify.compare(name, expected, ours[name])
            assert TOLERANCE.allows(comparison.max_abs_err, float(np.abs(expected).max())), (
                name,
                sizes,
            )


def test_tile_by_repeats_computed_from_a_dimension():
    # DeBERTa: Tile(x, Concat(Unsqueeze(Shape(x)[1] / 2), [1])); TVM's node loop refused
    # the R.shape of repeats ("cannot handle ShapeExpr inputs").
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["sequence"], axis=0),
        helper.make_node("Div", ["sequence", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "axes"], ["copies"]),
        helper.make_node("Concat", ["copies", "ones"], ["repeats"], axis=0),
        helper.make_node("Tile", ["x", "repeats"], ["out"]),
    ]
    initializers = [
        ints("one", 1, scalar=True),
        ints("two", 2, scalar=True),
        ints("axes", 0),
        ints("ones", 1),
    ]
    proto = model(nodes, {"x": ["batch", "sequence"]}, "out", initializers)
    assert_runs_symbolic(proto, [{"x": (2, 4)}, {"x": (3, 7)}])


def test_a_float_op_of_a_size_at_a_symbolic_length():
    # sigmoid-attention's bias -ln n_k at a run-time key length: Log(Cast(Shape(x)[1])).
    # The Cast of a size is a TIR expression, which TVM's Log converter refused, so the
    # library fell back to the verification inputs' fixed sizes.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Cast", ["length"], ["n"], to=TensorProto.FLOAT),
        helper.make_node("Log", ["n"], ["log_n"]),
        helper.make_node("Neg", ["log_n"], ["bias"]),
        helper.make_node("Add", ["x", "bias"], ["out"]),
    ]
    proto = model(nodes, {"x": ["batch", "sequence"]}, "out", [ints("one", 1, scalar=True)])
    assert_runs_symbolic(proto, [{"x": (2, 4)}, {"x": (3, 13)}])


def test_resize_to_sizes_that_keep_batch_and_channels_from_the_shape():
    # SegFormer: Resize(x, sizes=Concat(Shape(x)[:2], [8, 8])); TVM's converter read
    # every size as a constant, batch too.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], end=2),
        helper.make_node("Concat", ["shape", "spatial"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["out"], mode="linear"),
    ]
    proto = model(nodes, {"x": ["batch", 2, 4, 4]}, "out", [ints("spatial", 8, 8)])
    assert_runs_symbolic(proto, [{"x": (1, 2, 4, 4)}, {"x": (3, 2, 4, 4)}])


def _torch_pad(amount: str) -> list[onnx.NodeProto]:
    """TorchScript's F.pad on a rank-3 ``x``: torch-ordered pads (last axis first, before
    and after), reshaped to pairs, reversed, transposed and flattened to ONNX order."""
    return [
        helper.make_node("Unsqueeze", [amount, "axes"], ["amount_1d"]),
        helper.make_node(
            "Concat", ["zero", "zero", "zero", "amount_1d", "zero", "zero"], ["torch_pads"], axis=0
        ),
        helper.make_node("Reshape", ["torch_pads", "pairs"], ["paired"]),
        helper.make_node(
            "Slice", ["paired", "minus_one", "past_start", "axes", "minus_one"], ["reversed"]
        ),
        helper.make_node("Transpose", ["reversed"], ["onnx_order"], perm=[1, 0]),
        helper.make_node("Reshape", ["onnx_order", "minus_one"], ["pads"]),
        helper.make_node("Pad", ["x", "pads"], ["out"]),
    ]


def _pad_to_multiple(multiple: int, shape: list[int | str]) -> onnx.ModelProto:
    """``x`` padded at the end of axis 1 to a multiple of ``multiple`` (Swin's windows):
    ``(multiple - Shape(x)[1] % multiple) % multiple`` zeros."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Mod", ["length", "multiple"], ["rest"]),
        helper.make_node("Sub", ["multiple", "rest"], ["missing"]),
        helper.make_node("Mod", ["missing", "multiple"], ["amount"]),
        *_torch_pad("amount"),
    ]
    initializers = [
        ints("one", 1, scalar=True),
        ints("multiple", multiple, scalar=True),
        ints("axes", 0),
        ints("zero", 0),
        ints("pairs", -1, 2),
        ints("minus_one", -1),
        ints("past_start", -INT64_MAX),
    ]
    return model(nodes, {"x": shape}, "out", initializers)


def test_pads_computed_from_static_dimensions_fold_to_constants():
    # Swin's TorchScript export: the window padding of a static size, computed from
    # Shape and reordered as F.pad does; only the batch is symbolic.
    proto = _pad_to_multiple(7, ["batch", 5, 3])
    assert_runs_symbolic(proto, [{"x": (1, 5, 3)}, {"x": (4, 5, 3)}])


def test_pads_of_a_symbolic_size_pad_at_every_length():
    # TVM pads by constants only ("Dynamic pads are not supported yet"); the importer's
    # own pad kernel reads the computed amount at run time.
    proto = _pad_to_multiple(8, ["batch", "length", 3])
    assert_runs_symbolic(proto, [{"x": (1, 5, 3)}, {"x": (2, 16, 3)}, {"x": (3, 21, 3)}])


def _computed_pad(mode: str) -> onnx.ModelProto:
    """``x[batch, 4, length]`` padded by ``mode`` at the end of the last axis to a multiple
    of 8 plus 3 (EnCodec's reflect padding of its frames), 2 before."""
    nodes = [
        helper.make_node("Shape", ["x"], ["length"], start=2, end=3),
        helper.make_node("Mod", ["length", "eight"], ["rest"]),
        helper.make_node("Sub", ["eleven", "rest"], ["extra"]),
        helper.make_node("Concat", ["start", "extra"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["out"], mode=mode),
    ]
    initializers = [ints("eight", 8), ints("eleven", 11), ints("start", 0, 0, 2, 0, 0)]
    return model(nodes, {"x": ["batch", 4, "length"]}, "out", initializers)


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_reflect_edge_and_constant_pads_computed_from_the_length(mode):
    assert_runs_symbolic(_computed_pad(mode), [{"x": (1, 4, 13)}, {"x": (2, 4, 30)}])


def _frames_padding(kernel: int, stride: int, padding: int) -> onnx.ModelProto:
    """EnCodec's ``_get_extra_padding_for_conv1d`` before a strided Conv1d, as TorchScript
    exports it: ``frames = ceil(float(n - kernel + padding) / stride + 1)``, the ideal
    length ``(frames - 1) * stride + kernel - padding``, and ``x[batch, 1, n]`` padded by
    ``padding`` before and ``ideal - n`` after (every size computed in floats)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "reach"], ["short"]),
        helper.make_node("Add", ["short", "padding"], ["span"]),
        helper.make_node("Cast", ["span"], ["span_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["span_f", "stride_f"], ["steps_f"]),
        helper.make_node("Add", ["steps_f", "one_f"], ["frames_f"]),
        helper.make_node("Ceil", ["frames_f"], ["whole_f"]),
        helper.make_node("Cast", ["whole_f"], ["frames"], to=TensorProto.INT64),
        helper.make_node("Sub", ["frames", "one"], ["gaps"]),
        helper.make_node("Mul", ["gaps", "stride"], ["covered"]),
        helper.make_node("Add", ["covered", "reach"], ["reached"]),
        helper.make_node("Sub", ["reached", "padding"], ["ideal"]),
        helper.make_node("Sub", ["ideal", "n"], ["extra"]),
        helper.make_node("Add", ["extra", "padding"], ["after"]),
        helper.make_node("Unsqueeze", ["after", "zero_1d"], ["after_1d"]),
        helper.make_node("Concat", ["before", "after_1d"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["out"], strides=[stride]),
    ]
    initializers = [
        ints("two", 2, scalar=True),
        ints("reach", kernel, scalar=True),
        ints("padding", padding, scalar=True),
        ints("one", 1, scalar=True),
        ints("stride", stride, scalar=True),
        ints("zero_1d", 0),
        ints("before", 0, 0, padding, 0, 0),
        numpy_helper.from_array(np.array(float(stride), np.float32), "stride_f"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
        numpy_helper.from_array(
            np.random.default_rng(SEED).standard_normal((4, 1, kernel)).astype(np.float32), "w"
        ),
    ]
    return model(nodes, {"x": ["batch", 1, "n"]}, "out", initializers)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(4, 2, 2), (7, 3, 0), (16, 8, 8)])
def test_padding_computed_in_floats_keeps_the_length_symbolic(kernel, stride, padding):
    # The sizes in floats are read as exact fractions: Ceil is a ceiling division, the
    # cast back a truncating one. TVM took the pads as constants only (the library fell
    # back to the verification inputs' sizes).
    proto = _frames_padding(kernel, stride, padding)
    lengths = [kernel, kernel + 1, 5 * stride + 1, 64]
    assert_runs_symbolic(proto, [{"x": (1 + i % 2, 1, n)} for i, n in enumerate(lengths)])


def test_float_sizes_are_read_as_exact_fractions():
    from tvm import relax

    n = tvm.tirx.Var("n", "int64")
    sizes = shape_values.Sizes({n: 8})
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n], "float32"))
    with bb.function("main", [x]):
        length = bb.emit(relax.op.astype(relax.op.shape_to_tensor(relax.op.shape_of(x)), "float32"))

        def sized(expr: relax.Expr) -> list | None:
            return shape_values.prim_values(bb, bb.emit(expr), sizes=sizes)

        half = relax.op.multiply(length, relax.const(np.array([0.5], np.float32)))
        assert [str(v) for v in sized(relax.op.astype(relax.op.ceil(half), "int64"))] == ["(n + T.int64(1)) // T.int64(2)"]
        assert [str(v) for v in sized(relax.op.astype(relax.op.floor(half), "int64"))] == ["n // T.int64(2)"]
        # The cast truncates: of a nonnegative size, the floor division (as Sizes reads Div).
        thirds = relax.op.divide(length, relax.const(np.array([3.0], np.float32)))
        assert [str(v) for v in sized(relax.op.astype(thirds, "int64"))] == ["n // T.int64(3)"]
        # A float result is not a size; nor is a product by a constant whose exact
        # fraction has a denominator past 1024 (float32's 1/3): float rounding decides.
        assert sized(half) is None
        third = relax.op.multiply(length, relax.const(np.array([1 / 3], np.float32)))
        assert sized(relax.op.astype(relax.op.floor(third), "int64")) is None
        bb.emit_func_output(x)


def test_a_computed_wrap_pad_is_refused_in_one_line():
    with pytest.raises(backend.SymbolicDimsError, match="Dynamic pads") as error:
        backend.compile(_computed_pad("wrap"), "llvm")
    assert len(str(error.value).splitlines()) == 1


def test_a_slice_to_one_before_the_end_keeps_the_size_the_rest_of_the_model_has():
    # wav2vec2's positional convolution gives one position more than the frames and
    # drops the last one: TVM's clamp of n - 1, min(max(n - 1, 0), n), equals no other size
    # where n (here samples - 2) is not known to be positive, so the sum had no shape
    # and Shape of it failed ("shape_of expects a tensor input").
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["frames"]),
        helper.make_node("Pad", ["frames", "pad_end"], ["longer"]),
        helper.make_node("Slice", ["longer", "zero", "minus_one", "two"], ["sliced"]),
        helper.make_node("Add", ["sliced", "frames"], ["total"]),
        helper.make_node("Shape", ["total"], ["shape"]),
        helper.make_node("Gather", ["shape", "two_scalar"], ["length"], axis=0),
        helper.make_node("Range", ["zero_scalar", "length", "one_scalar"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["position_values"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["total", "position_values"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(
            np.random.default_rng(SEED).standard_normal((1, 1, 3)).astype(np.float32), "w"
        ),
        ints("pad_end", 0, 0, 0, 0, 0, 1),
        ints("zero", 0),
        ints("minus_one", -1),
        ints("two", 2),
        ints("two_scalar", 2, scalar=True),
        ints("one_scalar", 1, scalar=True),
        ints("zero_scalar", 0, scalar=True),
    ]
    proto = model(nodes, {"x": ["batch", 1, "samples"]}, "out", initializers)
    assert_runs_symbolic(proto, [{"x": (1, 1, 5)}, {"x": (2, 1, 12)}])


def test_sizes_divided_as_scalars_match_the_convolution_output():
    # wav2vec2's dynamo export: the frame count as scalar arithmetic on Shape, ONNX's
    # truncating Div ((samples - 10) / 5 + 1), reshaped to [1] for a Reshape target,
    # beside the convolution's own count, (samples - 10) // 5 + 1; and a mask comparing
    # positions with half the count (a scalar beside a tensor).
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["frames"], strides=[5]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["samples"], axis=0),
        helper.make_node("Gather", ["shape", "zero_1d"], ["batch"], axis=0),
        helper.make_node("Sub", ["samples", "ten"], ["reach"]),
        helper.make_node("Div", ["reach", "five"], ["steps"]),
        helper.make_node("Add", ["steps", "one"], ["count"]),
        helper.make_node("Reshape", ["count", "one_1d"], ["count_1d"]),
        helper.make_node("Concat", ["batch", "count_1d"], ["target"], axis=0),
        helper.make_node("Reshape", ["frames", "target"], ["flat"]),
        helper.make_node("Squeeze", ["frames", "one_1d"], ["squeezed"]),
        helper.make_node("Add", ["flat", "squeezed"], ["doubled"]),
        helper.make_node("Range", ["zero", "count", "one"], ["positions"]),
        helper.make_node("Div", ["count", "two"], ["half"]),
        helper.make_node("GreaterOrEqual", ["positions", "half"], ["late"]),
        helper.make_node("Cast", ["late"], ["late_values"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["doubled", "late_values"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(
            np.random.default_rng(SEED).standard_normal((1, 1, 10)).astype(np.float32), "w"
        ),
        ints("two", 2, scalar=True),
        ints("zero_1d", 0),
        ints("ten", 10, scalar=True),
        ints("five", 5, scalar=True),
        ints("one", 1, scalar=True),
        ints("one_1d", 1),
        ints("zero", 0, scalar=True),
    ]
    proto = model(nodes, {"x": ["batch", 1, "samples"]}, "out", initializers)
    assert import_onnx.smallest_sizes(proto) == {"samples": 10}
    assert_runs_symbolic(proto, [{"x": (1, 1, 40)}, {"x": (3, 1, 73)}])


def test_division_of_sizes_is_floor_division_only_where_the_dividend_is_nonnegative():
    import tvm

    samples = tvm.tirx.Var("samples", "int64")
    sizes = shape_values.Sizes({samples: 400})
    five = tvm.tirx.const(5, "int64")
    assert isinstance(sizes.divide(samples - 10, five), tvm.tirx.FloorDiv)
    assert isinstance(sizes.divide(samples - 500, five), tvm.tirx.Div)  # negative below 500
    assert isinstance(shape_values.Sizes().divide(samples - 10, five), tvm.tirx.Div)


def gather_expanded(rows: int, cols: int) -> onnx.ModelProto:
    """``GatherElements(x, Expand(idx, [batch, rows, rows]))`` along the last axis, the
    batch read from ``Shape(x)`` (DeBERTa's relative positions, expanded to batch x heads),
    and a plain ``GatherElements`` of an index input along axis 1."""
    index = np.random.default_rng(SEED).integers(-cols, cols, size=(1, rows, rows))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "square"], ["target"], axis=0),
        helper.make_node("Expand", ["index", "target"], ["expanded"]),
        helper.make_node("GatherElements", ["x", "expanded"], ["y"], axis=-1),
        helper.make_node("GatherElements", ["x", "plain"], ["z"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gather_elements",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows, cols]),
            helper.make_tensor_value_info("plain", TensorProto.INT64, ["batch", 3, cols]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", rows, rows]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3, cols]),
        ],
        initializer=[
            numpy_helper.from_array(index.astype(np.int64), "index"),
            ints("zero", 0, scalar=True),
            ints("axes", 0),
            ints("square", rows, rows),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("dims", [None, {"batch": 3}], ids=["symbolic", "fixed"])
def test_gather_elements_reads_an_expanded_index_through_its_broadcast(dims):
    # DeBERTa-v2's c2p/p2c gathers: the [1, n, n] positions are not copied to
    # [batch x heads, n, n] (4 MiB of int64 per gather at batch 8), and negative indices
    # wrap in the kernel (TVM's converter: a shape tensor, less, add and where per call).
    proto = gather_expanded(6, 9)
    compiled = backend.compile(proto, "avx512", dims=dims)
    assert set(compiled.schedules.scheduled) == {"gather_elements", "gather_elements1"}, compiled.schedules
    rng = np.random.default_rng(SEED)
    for batch in (3,) if dims else (1, 3):
        feeds = {
            "x": rng.standard_normal((batch, 6, 9)).astype(np.float32),
            "plain": rng.integers(-6, 6, size=(batch, 3, 9)).astype(np.int64),
        }
        expected = run(proto, feeds)
        got = compiled.run(feeds)
        for name in ("y", "z"):
            np.testing.assert_array_equal(got[name], expected[name])


def test_gather_elements_clamps_an_index_past_the_axis():
    # ONNX Runtime refuses such an index; a deployed library must not read past the data
    # (as Gather's take, mode="clip").
    proto = gather_expanded(2, 4)
    compiled = backend.compile(proto, "avx512", dims={"batch": 1})
    x = np.arange(1 * 2 * 4, dtype=np.float32).reshape(1, 2, 4)
    plain = np.full((1, 3, 4), 7, np.int64)
    np.testing.assert_array_equal(compiled.run({"x": x, "plain": plain})["z"], np.broadcast_to(x[:, 1:2, :], (1, 3, 4)))


def test_a_chunk_of_static_channels_keeps_its_shape_for_a_reshape_by_sizes():
    # ShuffleNetV2's TorchScript export: the channel shuffle reshapes by sizes read from
    # the shape (unknown to ONNX's shape inference), then x.chunk(2, dim=1) slices at
    # bounds computed from its Shape(x)[1] ((c + 1) / 2, times 1 and 2), and the next
    # shuffle reshapes by sizes read from the slice's shape. The bounds stayed tensors,
    # the slice lost its shape, and TVM's Reshape refused the sizes at a symbolic batch.
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "maps"], ["maps_shape"], axis=0),
        helper.make_node("Reshape", ["x", "maps_shape"], ["shuffled"]),
        helper.make_node("Shape", ["shuffled"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["channels"], axis=0),
        helper.make_node("Add", ["channels", "one"], ["rounded"]),
        helper.make_node("Div", ["rounded", "two"], ["half"]),
        helper.make_node("Mul", ["half", "one"], ["start"]),
        helper.make_node("Mul", ["half", "two"], ["end"]),
        helper.make_node("Slice", ["shuffled", "start", "end", "one"], ["right"]),
        helper.make_node("Shape", ["right"], ["right_shape"]),
        helper.make_node("Gather", ["right_shape", "zero"], ["right_batch"], axis=0),
        helper.make_node("Concat", ["right_batch", "groups"], ["target"], axis=0),
        helper.make_node("Reshape", ["right", "target"], ["out"]),
    ]
    initializers = [
        ints("zero", 0),
        ints("one", 1),
        ints("two", 2),
        ints("maps", 12, 5, 5),
        ints("groups", 2, 3, 5, 5),
    ]
    proto = model(nodes, {"x": ["batch", 300]}, "out", initializers)
    assert_runs_symbolic(proto, [{"x": (1, 300)}, {"x": (3, 300)}])


def test_a_chunk_of_a_symbolic_batch_keeps_its_shape_for_the_sizes_read_after_it():
    # RAFT's TorchScript export: both frames go through the feature encoder as one batch
    # (Concat), then torch.chunk(2, dim=0) slices [0, (2b + 1) / 2) and [(2b + 1) / 2, 2b):
    # halves of the size an input defines. TVM's converter sliced them to an unknown
    # shape, and the Gather from the half's Shape failed ("shape_of expects a tensor
    # input"): the symbolic compile was refused.
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["both"], axis=0),
        helper.make_node("Relu", ["both"], ["features"]),
        helper.make_node("Shape", ["features"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
        helper.make_node("Add", ["rows", "one"], ["rounded"]),
        helper.make_node("Div", ["rounded", "two"], ["half"]),
        helper.make_node("Mul", ["half", "two"], ["end"]),
        helper.make_node("Slice", ["features", "zero", "half", "zero"], ["first"]),
        helper.make_node("Slice", ["features", "half", "end", "zero"], ["second"]),
        helper.make_node("Shape", ["first"], ["first_shape"]),
        helper.make_node("Gather", ["first_shape", "zero_scalar"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "flat"], ["target"], axis=0),
        helper.make_node("Mul", ["first", "second"], ["product"]),
        helper.make_node("Reshape", ["product", "target"], ["out"]),
    ]
    initializers = [ints("zero", 0), ints("one", 1), ints("two", 2), ints("zero_scalar", 0, scalar=True), ints("flat", 24)]
    proto = model(nodes, {"a": ["batch", 4, 6], "b": ["batch", 4, 6]}, "out", initializers)
    assert_runs_symbolic(proto, [{"a": (1, 4, 6), "b": (1, 4, 6)}, {"a": (3, 4, 6), "b": (3, 4, 6)}])


def test_a_static_size_through_float_arithmetic_folds_for_a_reshape():
    # MobileViT's TorchScript export: the patched height, int(ceil(h / 2) * 2), computed
    # in floats from Shape(x)[2] (a scalar Gather, which onnxscript's folder leaves), and
    # a Reshape by it; the batch symbolic. TVM's Reshape refused the tensor of sizes.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["height"], axis=0),
        helper.make_node("Cast", ["height"], ["height_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["height_f", "two_f"], ["halves"]),
        helper.make_node("Ceil", ["halves"], ["whole"]),
        helper.make_node("Mul", ["whole", "two_f"], ["padded_f"]),
        helper.make_node("Cast", ["padded_f"], ["padded"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["padded", "axes"], ["padded_1d"]),
        helper.make_node("Concat", ["minus_one", "padded_1d", "width"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["out"]),
    ]
    initializers = [
        ints("two", 2, scalar=True),
        numpy_helper.from_array(np.array(2.0, np.float32), "two_f"),
        ints("axes", 0),
        ints("minus_one", -1),
        ints("width", 3),
    ]
    proto = model(nodes, {"x": ["batch", 4, 6, 3]}, "out", initializers)
    assert_runs_symbolic(proto, [{"x": (1, 4, 6, 3)}, {"x": (2, 4, 6, 3)}])


@pytest.mark.parametrize(
    ("shape", "target"),
    [
        (["batch", 1, "seq"], [1, 4, 1]),  # GPT-J's dynamo export: a mask expanded to heads
        ([1, "seq"], [3, 1, 1]),  # a longer target: new leading axes
        (["batch", 1, 8], [1, 5, 8]),
    ],
)
def test_expand_of_symbolic_dimensions_to_a_constant_shape(shape, target):
    # TVM's converter read every input dimension as a constant ('Var' object has no
    # attribute 'value'): the model refused to compile without dims.
    proto = model(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], {"x": shape}, "y", [ints("shape", *target)]
    )
    sizes = [{"batch": 2, "seq": 5}, {"batch": 1, "seq": 9}]
    assert_runs_symbolic(
        proto, [{"x": tuple(s[d] if isinstance(d, str) else d for d in shape)} for s in sizes]
    )


def test_float_sizes_divided_stay_float32():
    # TVM's converter computes arithmetic on scalar sizes as a Python float: two sizes
    # cast to float32 and divided (TorchScript's MViT scales relative positions by
    # Cast(size_q) / Cast(size_k)) came back a float64 scalar, which no float32 tensor
    # could then be multiplied by. The converter's result is narrowed back.
    from tvm import relax, tirx

    quotient = tirx.const(8.0, "float64")
    sizes = [tirx.const(56.0, "float32"), tirx.const(7.0, "float32")]
    narrowed = import_onnx._narrow_float_scalar(quotient, sizes)
    assert str(narrowed.ty) == "float32" and float(narrowed.value) == 8.0
    # float64 sizes, or a tensor result, are left as they are.
    assert import_onnx._narrow_float_scalar(quotient, [tirx.const(1.0, "float64")]) is quotient
    tensor = relax.const(np.ones(2, np.float32))
    assert import_onnx._narrow_float_scalar(tensor, sizes) is tensor


def _relative_positions(extra: list[onnx.NodeProto], output: str) -> onnx.ModelProto:
    """A conformer's relative positions: a table ``pe[1, 100, 8]`` sliced to ``[50 - n +
    1, 50 + n)`` by the input's length ``n`` (2n - 1 rows), then ``extra``."""
    pe = np.random.default_rng(SEED).standard_normal((1, 100, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["n"], start=1, end=2),
        helper.make_node("Sub", ["centre", "n"], ["low"]),
        helper.make_node("Add", ["low", "one"], ["start"]),
        helper.make_node("Add", ["centre", "n"], ["end"]),
        helper.make_node("Slice", ["pe", "start", "end", "one"], ["positions"]),
        *extra,
    ]
    inits = [numpy_helper.from_array(pe, "pe"), ints("centre", 50), ints("one", 1)]
    inits += [ints("heads", 2, 4)]
    return model(nodes, {"x": ["batch", "n", 8]}, output, inits)


def test_a_slice_by_computed_bounds_has_its_size_for_the_ops_after_it():
    # TVM's converter sliced by tensors to a shape it did not know, and the Reshape into
    # heads after it failed at symbolic sizes (Wav2Vec2-Conformer's exports).
    split = [
        helper.make_node("Shape", ["positions"], ["rows"], start=0, end=2),
        helper.make_node("Concat", ["rows", "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["positions", "target"], ["y"]),
    ]
    proto = _relative_positions(split, "y")
    assert_runs_symbolic(proto, [{"x": (2, 3, 8)}, {"x": (1, 20, 8)}])


def test_a_slice_by_computed_bounds_past_its_table_is_an_error_not_a_wrong_answer():
    # The slice's size is taken as 2n - 1 (the bounds unclamped) and checked on every
    # call: at n = 60 ONNX clamps it to 9 rows, and the run refuses.
    compiled = backend.compile(_relative_positions([], "positions"), "llvm")
    assert compiled.run({"x": np.zeros((1, 20, 8), np.float32)})["positions"].shape == (1, 39, 8)
    with pytest.raises(RuntimeError, match="match_cast"):
        compiled.run({"x": np.zeros((1, 60, 8), np.float32)})


def test_a_reshape_to_sizes_with_minus_one_cancels_the_sizes_both_sides_share():
    # [1, 2n - 1, 256] -> [1, 2n - 1, -1, 64]: -1 is 4, not (512n - 256) // (128n - 64),
    # a quotient TVM's simplifier leaves and a later broadcast could not match (a
    # conformer's 2n - 1 relative positions split into heads).
    nodes = [
        helper.make_node("Slice", ["x", "one", "end", "one"], ["tail"]),
        helper.make_node("Concat", ["x", "tail"], ["rows"], axis=1),
        helper.make_node("Shape", ["rows"], ["sizes"], start=0, end=2),
        helper.make_node("Concat", ["sizes", "split"], ["target"], axis=0),
        helper.make_node("Reshape", ["rows", "target"], ["y"]),
    ]
    inits = [ints("one", 1), ints("end", INT64_MAX), ints("split", -1, 64)]
    proto = model(nodes, {"x": [1, "n", 256]}, "y", inits)
    mod = import_onnx.import_onnx(proto, target=targets.resolve("llvm"))
    dims = mod["main"].ret_ty.shape.values
    assert int(dims[2]) == 4 and int(dims[3]) == 64
    assert_runs_symbolic(proto, [{"x": (1, 3, 256)}, {"x": (1, 8, 256)}])


def test_a_slice_to_the_smaller_of_two_sizes():
    # SEW's dynamo export bounds a length by Min of two sizes (ONNX's variadic Min, which
    # TVM imports as a stack and a reduction): read as min(n, 5), the slice keeps a size.
    nodes = [
        helper.make_node("Shape", ["x"], ["n"], start=1, end=2),
        helper.make_node("Min", ["n", "five"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "one"], ["y"]),
    ]
    proto = model(nodes, {"x": ["batch", "n", 8]}, "y", [ints("five", 5), ints("zero", 0), ints("one", 1)])
    assert_runs_symbolic(proto, [{"x": (2, 3, 8)}, {"x": (1, 9, 8)}])


def test_a_slice_from_a_computed_negative_start_counts_from_the_end():
    # x[:, -(k + 1):] with k the length of a second input: the last k + 1 rows
    # (-(k + 1) < 0 provably, so the slice's size is k + 1, not n + k + 1).
    nodes = [
        helper.make_node("Shape", ["y"], ["k"], start=1, end=2),
        helper.make_node("Add", ["k", "one"], ["rows"]),
        helper.make_node("Neg", ["rows"], ["start"]),
        helper.make_node("Slice", ["x", "start", "end", "one"], ["tail"]),
        helper.make_node("Pad", ["y", "pads"], ["padded"]),  # [batch, k + 1, 8]
        helper.make_node("Add", ["tail", "padded"], ["z"]),
    ]
    inits = [ints("end", INT64_MAX), ints("one", 1), ints("pads", 0, 0, 0, 0, 1, 0)]
    proto = model(nodes, {"x": ["batch", "n", 8], "y": ["batch", "k", 8]}, "z", inits)
    assert_runs_symbolic(proto, [{"x": (2, 5, 8), "y": (2, 3, 8)}, {"x": (1, 9, 8), "y": (1, 8, 8)}])


def test_a_slice_past_the_end_of_a_shorter_axis_is_the_whole_axis():
    # DAC's output, x[..., :n] of its decoder's (n - 312) // 320 * 320 + 312 samples:
    # ONNX clamps the end, so the output is the decoder's length. TVM's converter sliced
    # to n as if in bounds, and the library returned n samples, the last ones read past
    # the decoder's buffer. Here: pairs of samples max-pooled and repeated, (n // 2) * 2
    # samples, sliced to n.
    nodes = [
        helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[2], strides=[2]),
        helper.make_node("Tile", ["pooled", "repeats"], ["even"]),
        helper.make_node("Shape", ["x"], ["n"], start=2, end=3),
        helper.make_node("Slice", ["even", "zero", "n", "axis"], ["out"]),
    ]
    initializers = [ints("repeats", 1, 1, 2), ints("zero", 0), ints("axis", 2)]
    proto = model(nodes, {"x": ["batch", 1, "n"]}, "out", initializers)
    assert_runs_symbolic(proto, [{"x": (1, 1, 9)}, {"x": (2, 1, 16)}, {"x": (1, 1, 31)}])


def _position_table(offset: int) -> onnx.ModelProto:
    """BERT's positions: a table of 16 position ids, ``[:, offset : offset + sequence]``
    (``past : past + sequence`` at offset > 0), embedded and added to ``x``."""
    table = np.arange(16, dtype=np.int64)[None]
    embedding = np.random.default_rng(SEED).standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["sequence"], start=1, end=2),
        helper.make_node("Add", ["sequence", "offset"], ["end"]),
        helper.make_node("Slice", ["table", "offset", "end", "one"], ["ids"]),
        helper.make_node("Gather", ["embedding", "ids"], ["positions"]),
        helper.make_node("Add", ["x", "positions"], ["y"]),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(embedding, "embedding")]
    inits += [ints("offset", offset), ints("one", 1)]
    return model(nodes, {"x": ["batch", "sequence", 8]}, "y", inits)


def _position_range(offset: int) -> onnx.ModelProto:
    """GPT-2's positions: ``arange(sequence)`` gathered from a table of 16 (BART's:
    ``arange(sequence) + offset``)."""
    embedding = np.random.default_rng(SEED).standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["sequence"]),
        helper.make_node("Range", ["zero", "sequence", "one"], ["range"]),
        helper.make_node("Unsqueeze", ["range", "zeros"], ["unshifted"]),
        helper.make_node("Add", ["unshifted", "offset"], ["ids"]),
        helper.make_node("Gather", ["embedding", "ids"], ["positions"]),
        helper.make_node("Add", ["x", "positions"], ["y"]),
    ]
    inits = [numpy_helper.from_array(embedding, "embedding"), ints("zeros", 0), ints("offset", offset)]
    inits += [ints("zero", 0, scalar=True), ints("one", 1, scalar=True)]
    return model(nodes, {"x": ["batch", "sequence", 8]}, "y", inits)


@pytest.mark.parametrize(
    ("positions", "largest"),
    [
        (lambda: _position_table(0), 16),
        (lambda: _position_table(3), 13),
        (lambda: _position_range(0), 16),
        (lambda: _position_range(2), 14),
    ],
    ids=["slice", "slice-from-3", "range", "range-plus-2"],
)
def test_a_table_read_to_the_sequence_bounds_it(positions, largest, tmp_path):
    # TVM's converter sliced the table as if in bounds: past its end the library read
    # position ids past the table (BERT's 512 at 600 tokens), and a gather by positions
    # past it repeated the last row (GPT-2's; BART's, offset by 2), where ONNX Runtime
    # fails. The library
    # now takes the table's length as the sequence's bound and refuses longer inputs.
    proto = positions()
    assert_runs_symbolic(proto, [{"x": (2, 3, 8)}, {"x": (1, largest, 8)}])
    compiled = backend.compile(proto, "llvm")
    assert compiled.signature.max_dims == {"sequence": largest}
    longer = {"x": np.zeros((1, largest + 1, 8), np.float32)}
    with pytest.raises(Exception, match="Incompatible dimensions|Attempting to broadcast|out of data bounds"):
        run(proto, longer)  # ONNX Runtime fails there too
    refusal = rf"axis 1 \(sequence\) is {largest + 1}, over the compiled model's bound sequence <= {largest}"
    with pytest.raises(InputError, match=refusal):
        compiled.run(longer)
    with pytest.raises(InputError, match=refusal):
        backend.load(compiled.export(tmp_path / "positions.so")).session().run(longer)


def test_a_table_bound_and_a_given_bound_the_smaller_holds():
    compiled = backend.compile(_position_table(0), "llvm", max_dims={"sequence": 8})
    assert compiled.signature.max_dims == {"sequence": 8}
    compiled = backend.compile(_position_table(0), "llvm", max_dims={"sequence": 64, "batch": 4})
    assert compiled.signature.max_dims == {"sequence": 16, "batch": 4}


def test_a_size_is_limited_only_where_it_is_an_input_dimension_plus_a_constant():
    n, m = tvm.tirx.Var("n", "int64"), tvm.tirx.Var("m", "int64")
    sizes = shape_values.Sizes({n: 4, m: 0})
    assert not sizes.limit(n * 2, 16)  # not a dimension plus a constant
    assert not sizes.limit(n + 1, 4)  # would leave n no size it runs at (n >= 4)
    assert not sizes.limit(tvm.tirx.Var("k", "int64"), 16)  # not an input dimension
    assert sizes.largest == {}
    assert sizes.limit(n + 1, 16) and sizes.limit(n, 20)
    assert sizes.largest == {"n": 15}  # the tighter bound holds
    assert sizes.can_prove(n <= 15) and not sizes.can_prove(m <= 15)


def test_a_slice_to_its_own_length_keeps_the_size_the_rest_of_the_model_has():
    # A strided convolution's frames, (n - 4) // 2 + 1, sliced to that length read back
    # from the shape (a conformer's rotary table, [:frames]), then multiplied by the
    # frames. Clamped, the slice's size was max(frames, 0), which TVM's legalized product
    # could not match to the frames: the symbolic compile failed (Wav2Vec2-Conformer).
    weight = np.random.default_rng(SEED).standard_normal((8, 1, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["frames"], strides=[2]),
        helper.make_node("Shape", ["frames"], ["length"], start=2, end=3),
        helper.make_node("Slice", ["frames", "zero", "length", "two"], ["head"]),
        helper.make_node("Mul", ["head", "frames"], ["y"]),
    ]
    inits = [numpy_helper.from_array(weight, "w"), ints("zero", 0), ints("two", 2)]
    proto = model(nodes, {"x": ["batch", 1, "n"]}, "y", inits)
    assert_runs_symbolic(proto, [{"x": (2, 1, 20)}, {"x": (1, 1, 9)}])


@pytest.mark.parametrize(
    ("limit", "step", "size"),
    [("minus_length", -1, lambda n: n * 2), ("zero", -3, lambda n: tvm.tirx.floordiv(n + 2, 3))],
)
def test_a_descending_range_of_sizes_has_its_own_length(limit, step, size):
    # XLNet's relative positions: Range(n, -n, -1). TVM sizes a descending arange as if
    # it ascended (2n + 2 elements), and XLNet's Expand to that shape failed to compile.
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Neg", ["length"], ["minus_length"]),
        helper.make_node("Range", ["length", limit, "step"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["out"], to=TensorProto.FLOAT),
    ]
    initializers = [ints("one", 1, scalar=True), ints("zero", 0, scalar=True), ints("step", step, scalar=True)]
    proto = model(nodes, {"x": ["batch", "sequence"]}, "out", initializers)
    mod = import_onnx.import_onnx(proto, target=targets.resolve("llvm"))
    (dim,) = mod["main"].ret_ty.shape.values
    sequence = mod["main"].params[0].ty.shape.values[1]
    assert tvm.sym.Analyzer().can_prove_equal(dim, size(sequence)), dim
    assert_runs_symbolic(proto, [{"x": (1, 5)}, {"x": (2, 8)}])
