"""Packed-weight matmuls and row reductions on CPU: the structure TVM is given, and its numbers.

* :mod:`rewriter.backends.tvm.relax_passes.pack_weights`: a matmul with a constant weight calls a packed
  copy of its PrimFunc, the weight repacked as ``[N / NB, K, NB]``; other matmuls are left.
* :mod:`rewriter.backends.tvm.relax_passes.schedules`: the packed matmul gets the register-tiled
  micro-kernel (zmm FMAs on avx512), row reductions (layer norm) a vectorized rfactor.
* Ragged shapes (N = 197, 1000, 30522; 197 rows): the constant weight is packed
  zero-padded to whole panels, a computed B is padded in the function
  (``pad_einsum``), and the micro-kernel runs on whole tiles; the real columns are kept.
* Every compiled model agrees with ONNX Runtime within
  :data:`rewriter.backends.tvm.verify.COMPILED_TOLERANCE` (float32: 1e-4 of the
  output's scale). Packing is exact (same products, same order); the tiled schedule
  sums ``k`` in order per output, the row reductions in 16 partial sums.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import verify
from rewriter.backends import tvm as backend
from rewriter.backends.tvm import import_onnx, targets
from rewriter.backends.tvm.relax_passes import cpu_schedule, pack_weights, schedules
from rewriter.backends.tvm.verify import COMPILED_TOLERANCE

TOLERANCE = COMPILED_TOLERANCE["float32"]
SEED = 0


def dense_model(
    shape: tuple[int, ...], n: int, epilogue: str = "gelu", *, weight_input: bool = False
) -> onnx.ModelProto:
    """``epilogue(MatMul(x, W) + b)`` as a BERT export writes it.

    ``epilogue``: ``gelu`` (erf form), ``residual`` (``+ r``), ``tanh`` or ``none``;
    ``weight_input`` makes W a graph input instead of a constant.
    """
    rng = np.random.default_rng(SEED)
    k = shape[-1]
    out_shape = [*shape[:-1], n]
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n]))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
    ]
    if epilogue == "gelu":
        for name, value in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        nodes += [
            helper.make_node("Div", ["z", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]),
            helper.make_node("Mul", ["z", "e1"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ]
    elif epilogue == "residual":
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, out_shape))
        nodes.append(helper.make_node("Add", ["z", "r"], ["y"]))
    elif epilogue == "tanh":
        nodes.append(helper.make_node("Tanh", ["z"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "dense",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def layer_norm_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    hidden = shape[-1]
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12)],
        "layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [
            numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "g"),
            numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def attention_model(heads: int, sequence: int, dim: int) -> onnx.ModelProto:
    """``(Q @ K^T * scale) @ V`` (attention's two matmuls, the softmax left out) as an
    export writes it, K^T a Transpose: batched matmuls with a computed B, N = sequence
    and then N = dim."""
    qkv = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, heads, sequence, dim])
        for name in "qkv"
    ]
    scale = numpy_helper.from_array(np.array(dim**-0.5, np.float32), "scale")
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["p"]),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        qkv,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, heads, sequence, dim])],
        [scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds_for(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + 1)
    feeds = {}
    for value in proto.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_agrees_with_ort(proto: onnx.ModelProto, target: str = "avx512") -> backend.Compiled:
    feeds = feeds_for(proto)
    reference = verify.run(proto.SerializeToString(), feeds)["y"]
    compiled = backend.compile(proto, target)
    error = float(np.abs(compiled.run(feeds)["y"] - reference).max())
    scale = float(np.abs(reference).max())
    assert TOLERANCE.allows(error, scale), (error, scale)
    return compiled


def fused(proto: onnx.ModelProto, target: str = "avx512") -> tuple[object, object]:
    """The Relax module after TVM's fusion (``FuseTIR``), as ``pack_matmul_weights`` sees it."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as stages

    tvm_target = targets.resolve(target)
    mod = import_onnx.import_onnx(proto, target=tvm_target)
    with tvm_target:
        mod = tvm.transform.Sequential(stages.legalize_passes(tvm_target))(mod)
    return mod, tvm_target


def prim_funcs(mod: object) -> dict[str, object]:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}  # type: ignore[attr-defined]


def scheduled(proto: onnx.ModelProto, target: str = "avx512") -> dict[str, object]:
    """The PrimFuncs as :func:`backend.compile` schedules them: packed, then our rules."""
    mod, tvm_target = fused(proto, target)
    with tvm_target:
        mod = pack_weights.pack_matmul_weights(tvm_target)(mod)
        mod = cpu_schedule.cpu_schedule(tvm_target)(mod)
    return prim_funcs(mod)


def micro_kernel(func: object) -> list[tuple[object, int]]:
    """``(kind, extent)`` of the loops around the matmul's update block (None: symbolic)."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("matmul_update"))]
    return [
        (loop.kind, int(loop.extent) if isinstance(loop.extent, tvm.tirx.IntImm) else None)
        for loop in loops
    ]


def assert_register_tiled(funcs: dict[str, object], count: int, rows: int = 8) -> None:
    """``count`` matmuls, each scheduled with whole ``rows`` x 32 register tiles (avx512)."""
    import tvm

    matmuls = [f for name, f in funcs.items() if "matmul" in name]
    assert len(matmuls) == count, sorted(funcs)
    for func in matmuls:
        assert func.attrs["tirx.is_scheduled"]  # type: ignore[attr-defined]
        unrolled, vectorized = tvm.tirx.ForKind.UNROLLED, tvm.tirx.ForKind.VECTORIZED
        assert micro_kernel(func)[-2:] == [(unrolled, rows), (vectorized, 32)]


# --- packing ---------------------------------------------------------------------------


def test_pack_lays_out_column_panels():
    weight = np.arange(24, dtype=np.float32).reshape(3, 8)
    packed = pack_weights.pack(weight, 4)
    assert packed.shape == (2, 3, 4) and packed.flags.c_contiguous
    for jb in range(2):
        for k in range(3):
            np.testing.assert_array_equal(packed[jb, k], weight[k, jb * 4 : jb * 4 + 4])


def test_constant_weight_is_packed_and_original_dropped():
    mod, target = fused(dense_model((1, 16, 64), 96))
    before = set(prim_funcs(mod))
    packed = pack_weights.pack_matmul_weights(target)(mod)
    funcs = prim_funcs(packed)
    new = sorted(set(funcs) - before)
    assert len(new) == 1 and new[0].endswith(pack_weights.SUFFIX), new
    assert new[0].removesuffix(pack_weights.SUFFIX) not in funcs  # the unpacked copy is gone
    width = schedules.pack_width(target)
    assert width == 32
    main = str(packed["main"])
    assert f"R.call_tir({new[0]}" in main
    # The weight argument is the packed constant [N / NB, K, NB].
    assert re.search(
        r"param_\d+: T.Buffer\(\(T.int64\(3\), T.int64\(64\), T.int64\(32\)\)",
        funcs[new[0]].script(),
    )


def test_pack_pads_the_last_panel_with_zeros():
    weight = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
    packed = pack_weights.pack(weight, 4)
    assert packed.shape == (2, 3, 4)
    np.testing.assert_array_equal(packed[1, :, :1], weight[:, 4:])
    np.testing.assert_array_equal(packed[1, :, 1:], 0.0)


def test_ragged_weight_is_packed_in_padded_panels():
    mod, target = fused(dense_model((1, 16, 64), 40))
    funcs = prim_funcs(pack_weights.pack_matmul_weights(target)(mod))
    (name,) = [n for n in funcs if n.endswith(pack_weights.SUFFIX)]
    script = funcs[name].script()
    # N = 40: two 32-column panels, the weight parameter itself (no copy in the function).
    panels = r"param_\d+_pad: T.Buffer\(\(T.int64\(2\), T.int64\(64\), T.int64\(32\)\)"
    assert re.search(panels, script)
    assert "if_then_else" not in script
    # The matmul fills 64 columns; the epilogue writes the 40 real ones.
    assert "T.sblock_alloc_buffer((T.int64(1), T.int64(16), T.int64(64)))" in script


def test_pack_pass_is_idempotent():
    import tvm

    mod, target = fused(dense_model((1, 16, 64), 96))
    once = pack_weights.pack_matmul_weights(target)(mod)
    twice = pack_weights.pack_matmul_weights(target)(once)
    tvm.ir.assert_structural_equal(once, twice)


def test_matmul_with_computed_weight_is_left_unpacked():
    mod, target = fused(dense_model((1, 16, 64), 96, weight_input=True))
    packed = pack_weights.pack_matmul_weights(target)(mod)
    assert not any(name.endswith(pack_weights.SUFFIX) for name in prim_funcs(packed))
    assert set(prim_funcs(packed)) == set(prim_funcs(mod))


# --- the micro-kernel -----------------------------------------------------------------


def test_vector_lanes_follow_the_target():
    lanes = {
        name: schedules.vector_lanes(targets.resolve(name)) for name in ("llvm", "avx2", "avx512")
    }
    assert lanes == {"llvm": 4, "avx2": 8, "avx512": 16}
    assert schedules.pack_width(targets.resolve("avx2")) == 16


def test_register_tile_sizes():
    assert schedules.register_tile(128, 1536, 16, packed=32) == (8, 32)  # 16 zmm accumulators
    assert schedules.register_tile(1, 384, 16, packed=32) == (1, 32)  # a GEMV row
    assert schedules.register_tile(12, 128, 8) == (6, 16)  # AVX2: 12 of 16 ymm registers
    assert schedules.register_tile(7, 40, 16) is None  # no vector-multiple column tile


def test_padding_sizes():
    assert schedules.padding(128, 1024, 16) == (1, 1)  # whole tiles already
    assert schedules.padding(128, 1000, 16) == (1, 32)  # 1000 -> 1024 columns
    assert schedules.padding(197, 197, 16) == (8, 32)  # ViT scores: 200 x 224
    assert schedules.padding(197, 64, 16) == (8, 1)  # ViT context: a 1-row tile otherwise
    assert schedules.padding(9, 64, 16) == (1, 1)  # 3-row tiles beat 16 rows for 9
    assert schedules.padding(12, 36, 8) == (1, 16)  # AVX2: 16-column panels
    # ViT-B/16 at batch 8: 1576 = 8 x 197 rows have no L2 row block but 8 rows: 5 x 320.
    assert schedules.padding(1576, 2304, 16, packed=32, depth=768) == (320, 1)
    assert schedules.padding(1680, 2304, 16, packed=32, depth=768) == (1, 1)  # 5 x 336 divide
    # Its MLP's second matmul is cut into 768-deep blocks: 200 rows then fit one block.
    assert schedules.padding(197, 768, 16, packed=32, depth=3072) == (8, 1)


def test_packed_matmul_gets_the_register_tiled_schedule():
    import tvm

    funcs = scheduled(dense_model((1, 16, 64), 96))
    (name,) = [n for n in funcs if n.endswith(pack_weights.SUFFIX)]
    func = funcs[name]
    assert func.attrs["tirx.is_scheduled"]
    kinds, extents = zip(*micro_kernel(func), strict=True)
    # parallel panels, row tiles, k / 4, then k unrolled by 4, 8 rows unrolled, 32 lanes.
    assert kinds[0] == tvm.tirx.ForKind.PARALLEL
    assert list(kinds[-3:]) == [tvm.tirx.ForKind.UNROLLED] * 2 + [tvm.tirx.ForKind.VECTORIZED]
    assert list(extents[-3:]) == [schedules.K_UNROLL, 8, 32]


@pytest.mark.parametrize(
    ("n", "epilogue", "weight_input"),
    [
        (197, "none", False),
        (1000, "gelu", False),  # an ImageNet head
        (30522, "residual", False),  # BERT's MLM head
        (197, "gelu", True),
        (1000, "tanh", True),
    ],
    ids=["197-const", "1000-gelu-const", "30522-residual-const", "197-gelu-input", "1000-input"],
)
def test_ragged_n_gets_whole_tiles_and_agrees(n, epilogue, weight_input):
    # M = 8, K = 64 keep the build and ORT fast; N has no 16-multiple divisor up to 32.
    model = dense_model((1, 8, 64), n, epilogue, weight_input=weight_input)
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1)
    (name,) = [name for name in funcs if "matmul" in name]
    assert name.endswith(pack_weights.SUFFIX) != weight_input  # constant weights are packed
    assert_agrees_with_ort(model)


@pytest.mark.parametrize("weight_input", [False, True], ids=["const", "input"])
def test_ragged_gemv_gets_whole_tiles_and_agrees(weight_input):
    # One row (a batch-1 classifier head): the GEMV path, 1000 columns in 32 panels.
    model = dense_model((1, 64), 1000, "tanh", weight_input=weight_input)
    assert_register_tiled(scheduled(model), 1, rows=1)
    assert_agrees_with_ort(model)


def test_ragged_rows_of_a_packed_matmul_get_whole_tiles_and_agree():
    # ViT's linear layers: 197 rows (a 1-row tile otherwise), padded to 200; N divides.
    model = dense_model((1, 197, 64), 96, "gelu")
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1)
    assert all(name.endswith(pack_weights.SUFFIX) for name in funcs)
    assert_agrees_with_ort(model)


def test_attention_with_197_tokens_gets_whole_tiles_and_agrees():
    # ViT: scores 197 x 197 (rows and columns padded), context 197 x 64 (rows padded).
    model = attention_model(heads=2, sequence=197, dim=64)
    assert_register_tiled(scheduled(model), 2)
    assert_agrees_with_ort(model)


def test_zero_padded_copy_of_k_is_zeros_then_the_rows_without_a_branch():
    # K^T's 50 columns padded to 64: zeros over each padded row, then the 50 real
    # columns copied, both vector loops (one loop with if_then_else(j < 50) was scalar).
    import tvm

    model = attention_model(heads=2, sequence=50, dim=64)
    (scores,) = [f for name, f in scheduled(model).items() if "multiply" in name]
    text = scores.script()  # type: ignore[attr-defined]
    assert "_pad_const" in text and "if_then_else" not in text
    sch = tvm.s_tir.Schedule(scores)
    for name in ("lv_pad_pad_const", "lv_pad"):
        inner = sch.get(sch.get_loops(sch.get_sblock(name))[-1])
        assert inner.kind == tvm.tirx.ForKind.VECTORIZED, name
    assert_agrees_with_ort(model)


def test_scores_past_l2_sweep_every_panel_per_row_tile_and_agree():
    # 600 x 600 scores per head (1.4 MB, past ROW_MAJOR_MIN_OUTPUT_BYTES) from a 64-deep
    # K^T (150 KB): each row tile sweeps the 19 panels, so C is written row by row.
    # The context (600 x 600 x 64, C 150 KB) sweeps its 2 panels too: its V stays in L2
    # and its heads' row tiles are plenty for the threads (ROW_MAJOR_MIN_TILES).
    import tvm

    parallel, serial = tvm.tirx.ForKind.PARALLEL, tvm.tirx.ForKind.SERIAL
    model = attention_model(heads=2, sequence=600, dim=64)
    kernels = {name: micro_kernel(f) for name, f in scheduled(model).items() if "matmul" in name}
    scores = next(loops for name, loops in kernels.items() if "multiply" in name)
    context = next(loops for name, loops in kernels.items() if "multiply" not in name)
    assert scores[:2] == [(parallel, 2 * 600 // 6), (serial, 19)], scores
    assert context[0][0] == parallel and context[1] == (serial, 2), context
    assert_agrees_with_ort(model)


def test_rows_outside_where_a_static_shape_gives_the_threads_row_tiles_to_split():
    # Every B here stays in L2 and every C is under ROW_MAJOR_MIN_OUTPUT_BYTES. Where
    # the batch is static and there are ROW_MAJOR_MIN_TILES row tiles or more, the
    # threads split row tiles (the rows their producer wrote), each sweeping the panels.
    # A symbolic batch counts as SYMBOLIC_BATCH items and is fused into the same parallel
    # loop (one fork, not one per head: Swin's windows took 1.5-3.5x on two threads so).
    # 8 rows are one tile: the panels stay outside, and the threads split them.
    import tvm

    parallel, serial = tvm.tirx.ForKind.PARALLEL, tvm.tirx.ForKind.SERIAL

    def first_loops(proto: onnx.ModelProto, name: str) -> list[tuple[object, int | None]]:
        (func,) = [f for key, f in scheduled(proto).items() if name in key]
        return micro_kernel(func)[:2]

    model = attention_model(heads=2, sequence=50, dim=64)  # 50 x 50 scores, tiles of 5
    assert first_loops(model, "multiply") == [(parallel, 2 * 10), (serial, 2)]
    symbolic = with_symbolic_axes(model, {0: "batch"})
    assert first_loops(symbolic, "multiply") == [(parallel, None), (serial, 2)]
    tall = dense_model((1, 128, 256), 256, "none")  # 16 row tiles of 8, 8 panels
    assert first_loops(tall, "matmul") == [(parallel, 16), (serial, 8)]
    short = dense_model((1, 8, 256), 256, "none")
    assert first_loops(short, "matmul") == [(parallel, 8), (serial, 1)]
    assert_agrees_with_ort(model)
    compiled = backend.compile(symbolic, "avx512")
    for batch in (1, 3):
        assert_agrees_at(symbolic, compiled, {name: (batch, 2, 50, 64) for name in "qkv"})


def test_swept_scores_under_a_symbolic_batch_keep_it_a_serial_loop_and_agree():
    # Fused into the parallel loop with a symbolic batch, the row tiles' index let the
    # register tile's buffer grow past the tile (ConvNeXt's MLP: 51 KB, 2.2x its time).
    import tvm

    parallel, serial = tvm.tirx.ForKind.PARALLEL, tvm.tirx.ForKind.SERIAL
    model = with_symbolic_axes(attention_model(heads=2, sequence=600, dim=64), {0: "batch"})
    kernels = [micro_kernel(f) for name, f in scheduled(model).items() if "multiply" in name]
    assert kernels[0][:3] == [(serial, None), (parallel, 2 * 600 // 6), (serial, 19)], kernels
    compiled = backend.compile(model, "avx512")
    for batch in (1, 2):
        assert_agrees_at(model, compiled, {name: (batch, 2, 600, 64) for name in "qkv"})


def with_symbolic_axes(proto: onnx.ModelProto, axes: dict[int, str]) -> onnx.ModelProto:
    """``proto`` with axes ``axes`` (position: name) of every input and output symbolic."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for value in [*model.graph.input, *model.graph.output]:
        for position, name in axes.items():
            dim = value.type.tensor_type.shape.dim[position]
            dim.ClearField("dim_value")
            dim.dim_param = name
    return model


def assert_agrees_at(
    model: onnx.ModelProto, compiled: backend.Compiled, shapes: dict[str, tuple[int, ...]]
) -> None:
    rng = np.random.default_rng(SEED + 2)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    reference = verify.run(model.SerializeToString(), feeds)["y"]
    error = float(np.abs(compiled.run(feeds)["y"] - reference).max())
    assert TOLERANCE.allows(error, float(np.abs(reference).max())), (shapes, error)


def test_symbolic_rows_of_a_packed_matmul_get_whole_tiles_and_agree():
    # A model compiled for any batch and sequence: batch x tokens rows, padded to whole
    # tiles at run time (a masked last tile branches per row: 1.5-2x slower).
    model = with_symbolic_axes(dense_model((1, 197, 64), 96, "gelu"), {0: "batch", 1: "sequence"})
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1)
    (func,) = funcs.values()
    update = func.script().split('T.sblock("matmul_update")')[1].split("T.reads")[0]  # type: ignore[attr-defined]
    assert "T.where" not in update  # no masked rows in the micro-kernel
    compiled = backend.compile(model, "avx512")
    for batch, sequence in [(1, 1), (2, 13), (1, 197)]:
        assert_agrees_at(model, compiled, {"x": (batch, sequence, 64)})


@pytest.mark.parametrize("n", [32, 16])
def test_a_head_one_panel_wide_is_register_tiled_at_symbolic_rows_and_agrees(n):
    # A head as wide as one packed panel (a CTC or token-classification head of 32
    # symbols): its packed weight reads Bp[0, k, j], the panel index and the column in
    # the panel simplified away; unrecognized, it fell to TVM's generic reduction at
    # symbolic rows, 46x ONNX Runtime's time.
    model = with_symbolic_axes(dense_model((2, 40, 64), n, "none"), {0: "batch", 1: "sequence"})
    assert_register_tiled(scheduled(model), 1)
    compiled = backend.compile(model, "avx512")
    for batch, sequence in [(1, 1), (3, 17)]:
        assert_agrees_at(model, compiled, {"x": (batch, sequence, 64)})


def test_a_product_of_one_batch_wider_than_a_panel_is_not_taken_for_a_packed_weight():
    # Mask2Former's masks at batch 1: [1, 50, 128] x [1, 128, 3136], both computed.
    # B reads B[0, k, j], as a weight packed in one panel does, and was taken for one:
    # one register tile 3136 columns wide (5 GFLOP/s, 22 of the fixed library's 62 ms).
    graph = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["rb"]), helper.make_node("MatMul", ["a", "rb"], ["y"])],
        "masks",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 50, 128]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 128, 3136]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 50, 3136])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    funcs = {name: f for name, f in scheduled(model).items() if "matmul" in name}
    (func,) = funcs.values()
    import tvm

    assert micro_kernel(func)[-1] == (tvm.tirx.ForKind.VECTORIZED, 32)
    compiled = backend.compile(model, "avx512")
    assert_agrees_at(model, compiled, {"a": (1, 50, 128), "b": (1, 128, 3136)})


def test_rows_with_a_constant_factor_get_whole_tiles_and_agree():
    # Rows 2n (XLNet's relative positions: 2 * sequence * batch) padded to (2n + 7) // 8
    # * 8: TVM's analyzer cannot prove that the padded rows cover the 2n the copy back
    # reads, so the copy cannot move into the tile loop; it is a pass of its own after the
    # matmul. The function went to TVM's scalar lowering (XLNet: 32 of 40 ms).
    rng = np.random.default_rng(SEED)
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["xx"], axis=0), helper.make_node("MatMul", ["xx", "w"], ["y"])],
        "doubled_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 96])],
        [numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    funcs = scheduled(model)
    assert_register_tiled({name: f for name, f in funcs.items() if "matmul" in name}, 1)
    compiled = backend.compile(model, "avx512")
    for n in (1, 4, 13):
        assert_agrees_at(model, compiled, {"x": (n, 64)})


def test_the_images_of_a_symbolic_batch_are_one_row_tiles_not_padded():
    # A classifier head, [batch, K] x W: padded to a row tile, batch 1 computed 8 rows
    # (MobileNetV3-small's head: 1.6x its time at a fixed batch of 1, after a cache sweep).
    model = with_symbolic_axes(dense_model((1, 64), 96, "gelu"), {0: "batch"})
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1, rows=1)
    (func,) = funcs.values()
    assert "batch + T.int64(7)" not in func.script()  # type: ignore[attr-defined]
    compiled = backend.compile(model, "avx512")
    for batch in (1, 3, 9):
        assert_agrees_at(model, compiled, {"x": (batch, 64)})


def test_symbolic_tokens_of_a_fixed_batch_keep_whole_tiles():
    # [1, sequence, K]: the tokens of a prompt, not images; a tile of one row would
    # compute a 128-token prefill at half the rate.
    model = with_symbolic_axes(dense_model((1, 40, 64), 96, "gelu"), {1: "sequence"})
    assert_register_tiled(scheduled(model), 1)


def test_sequence_first_rows_tile_the_tokens_not_the_symbolic_batch():
    # torchvision's attention reads X[tokens, batch, k]: the 197 static tokens are the
    # rows (padded to 200), the symbolic batch an outer loop; padding a batch of 1 to a
    # row tile would compute 8 rows for 1.
    model = with_symbolic_axes(dense_model((197, 1, 64), 96, "gelu"), {1: "batch"})
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1)
    (func,) = funcs.values()
    assert "batch + T.int64(7)" not in func.script()  # type: ignore[attr-defined]
    compiled = backend.compile(model, "avx512")
    for batch in (1, 3):
        assert_agrees_at(model, compiled, {"x": (197, batch, 64)})


def test_sequence_first_rows_of_a_fixed_batch_of_one_tile_the_tokens():
    # The same at a fixed batch of 1: one-row tiles along the batch otherwise.
    model = dense_model((197, 1, 64), 96, "gelu")
    assert_register_tiled(scheduled(model), 1)
    assert_agrees_with_ort(model)


def test_sequence_first_rows_of_a_fixed_batch_tile_the_longer_tokens():
    # Tokens x batch 8: the 8 batch rows would each be a whole tile, but every token a
    # batch iteration reading all of W's panels for 8 rows; the tokens are the rows.
    model = dense_model((197, 8, 64), 96, "gelu")
    funcs = scheduled(model)
    assert_register_tiled(funcs, 1)
    (func,) = funcs.values()
    assert row_pad(func) == (200, 8, 96)  # the 197 tokens padded to 25 tiles of 8
    assert_agrees_with_ort(model)


def test_attention_with_a_symbolic_sequence_gets_whole_tiles_and_agrees():
    # Scores: symbolic rows and columns (keys); context: symbolic rows and depth.
    model = with_symbolic_axes(attention_model(heads=2, sequence=8, dim=64), {2: "sequence"})
    assert_register_tiled(scheduled(model), 2)
    compiled = backend.compile(model, "avx512")
    for sequence in [1, 5, 37]:
        assert_agrees_at(model, compiled, {name: (1, 2, sequence, 64) for name in "qkv"})


def test_symbolic_key_panels_are_a_loop_inside_the_parallel_heads():
    # Fused into the parallel loop, the panel index of the scores (keys: symbolic) was a
    # division by a run-time extent, evaluated per element in the epilogue's bounds
    # check: BERT's scores ran at 8x their fixed-size time. Every parallel loop now has a
    # static extent (the heads; the context's heads x panels), the symbolic loops inside.
    import tvm

    model = with_symbolic_axes(attention_model(heads=2, sequence=8, dim=64), {2: "sequence"})
    kernels = [micro_kernel(f) for name, f in scheduled(model).items() if "matmul" in name]
    assert len(kernels) == 2
    parallel = [[e for kind, e in loops if kind == tvm.tirx.ForKind.PARALLEL] for loops in kernels]
    assert sorted(parallel) == [[2], [4]], parallel
    assert any((tvm.tirx.ForKind.SERIAL, None) in loops[:2] for loops in kernels)


def test_avx512_matmul_uses_zmm_fma():
    compiled = assert_agrees_with_ort(dense_model((1, 16, 64), 96))
    asm = compiled.executable.mod.imports[0].inspect_source("asm")
    assert re.search(r"vfmadd231ps\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)
    assert re.search(r"vbroadcastss\s+[^\n]*%zmm", asm)  # A broadcast from memory


@pytest.mark.parametrize(
    "model",
    [
        dense_model((2, 24, 64), 64, "residual"),  # batched rows, residual epilogue
        dense_model((1, 64), 64, "tanh"),  # one row: the pooler's GEMV
        dense_model((1, 16, 30), 32, "none"),  # K not a multiple of the k unroll
    ],
    ids=["residual", "gemv-tanh", "odd-k"],
)
def test_packed_matmuls_agree_with_ort(model):
    assert_agrees_with_ort(model)


def test_row_blocked_matmul_agrees_with_ort(monkeypatch):
    # A row block of 8 rows (8 x 64 floats): the row-block loop is taken, as for long
    # sequences at K = 1536.
    monkeypatch.setattr(schedules, "ROW_BLOCK_BYTES", 8 * 64 * 4)
    assert_agrees_with_ort(dense_model((1, 32, 64), 64, "gelu"))


def row_pad(func: object) -> tuple[int, ...]:
    """The shape of the matmul's padded product; its padded rows read the input's last
    row (clamped, ``T.min``), not a zero-padded copy of it (``x_pad``)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = [sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))]
    assert "x_pad" not in names and "T.min(" in func.script(), names  # type: ignore[attr-defined]
    return tuple(int(d) for d in sch.get(sch.get_sblock("matmul_update")).writes[0].source.shape)


def test_rows_without_a_dividing_row_block_are_padded_to_equal_blocks(monkeypatch):
    # Blocks of at most 32 rows (32 x 64 floats); 248 = 8 x 31 rows divide only into
    # blocks of 8: padded to 8 blocks of 32 (3% more rows), not read in 31 blocks. The
    # threads split the blocks' 4 row tiles of 8 each (rows_outside: the 16 KiB weight
    # stays in L2).
    monkeypatch.setattr(schedules, "ROW_BLOCK_BYTES", 32 * 64 * 4)
    model = dense_model((1, 248, 64), 64, "gelu")
    (func,) = scheduled(model).values()
    assert row_pad(func) == (1, 256, 64)
    assert micro_kernel(func)[0] == (pytest.importorskip("tvm").tirx.ForKind.PARALLEL, 8 * 4)
    assert_agrees_with_ort(model)


@pytest.mark.parametrize(
    ("epilogue", "weight_input"),
    [("gelu", False), ("none", False), ("residual", True)],
    ids=["gelu", "none", "input"],
)
def test_deep_matmul_is_cut_into_k_blocks_and_agrees(monkeypatch, epilogue, weight_input):
    # Scaled down (16 KiB row blocks, 64-deep k blocks): rows x K and K x N both
    # overflow the row block, so in each column block of PANEL_GROUP panels k runs in
    # 256 / 64 = 4 blocks, each register tile adding into C.
    import tvm

    monkeypatch.setattr(schedules, "ROW_BLOCK_BYTES", 16 * 1024)
    monkeypatch.setattr(schedules, "K_CHUNK", 64)
    model = dense_model((1, 40, 256), 256, epilogue, weight_input=weight_input)
    (func,) = [f for name, f in scheduled(model).items() if "matmul" in name]
    from tvm import s_tir

    sch = s_tir.Schedule(func)

    def loops(name: str) -> list[tuple[tvm.tirx.ForKind, int]]:
        nest = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name))]
        return [(loop.kind, int(loop.extent)) for loop in nest]

    serial, parallel = tvm.tirx.ForKind.SERIAL, tvm.tirx.ForKind.PARALLEL
    unrolled, vectorized = tvm.tirx.ForKind.UNROLLED, tvm.tirx.ForKind.VECTORIZED
    # Column blocks (256 / 32 / 4), k blocks, row tiles, the block's 4 panels, k, the tile.
    assert loops("matmul_rf_update") == [
        (parallel, 2),
        (serial, 4),
        (serial, 5),
        (serial, schedules.PANEL_GROUP),
        (serial, 64 // schedules.K_UNROLL),
        (unrolled, schedules.K_UNROLL),
        (unrolled, 8),
        (vectorized, 32),
    ]
    # Each tile adds into C after its k block; C's block is zeroed in the same thread.
    assert loops("matmul_update")[:4] == loops("matmul_rf_update")[:4]
    assert loops("matmul_init")[0] == (parallel, 2)
    assert_agrees_with_ort(model)


def test_deep_matmul_under_a_symbolic_batch_is_cut_into_k_blocks_and_agrees(monkeypatch):
    monkeypatch.setattr(schedules, "ROW_BLOCK_BYTES", 16 * 1024)
    monkeypatch.setattr(schedules, "K_CHUNK", 64)
    model = with_symbolic_axes(dense_model((1, 40, 256), 64, "gelu"), {0: "batch"})
    (func,) = [f for name, f in scheduled(model).items() if "matmul" in name]
    assert 'T.sblock("matmul_rf_update")' in func.script()  # type: ignore[attr-defined]
    compiled = backend.compile(model, "avx512")
    for batch in (1, 3):
        assert_agrees_at(model, compiled, {"x": (batch, 40, 256)})


@pytest.mark.parametrize("target", ["llvm", "avx2"])
def test_narrower_targets_pack_and_agree(target):
    # SSE: 4 lanes, 8-column panels; AVX2: 8 lanes, 16-column panels.
    assert_agrees_with_ort(dense_model((1, 12, 16), 48, "gelu"), target)


# --- row reductions ---------------------------------------------------------------------


def test_layer_norm_gets_vector_partial_sums_and_agrees():
    import tvm
    from tvm import s_tir

    model = layer_norm_model((2, 8, 64))
    mod, target = fused(model)
    with target:
        mod = cpu_schedule.cpu_schedule(target)(mod)
    func = prim_funcs(mod)["layer_norm"]
    sch = s_tir.Schedule(func)
    partials = [
        sch.get(block).name_hint
        for block in sch.get_child_blocks(sch.get_sblock("root"))
        if sch.get(block).name_hint.endswith("_rf_update")
    ]
    assert len(partials) == 2, partials  # the sum and the sum of squared deviations
    for name in partials:
        inner = sch.get(sch.get_loops(sch.get_sblock(name))[-1])
        assert inner.kind == tvm.tirx.ForKind.VECTORIZED and int(inner.extent) == 16
    assert_agrees_with_ort(model)


@pytest.mark.parametrize("width", [1000, 1500])
def test_one_row_softmax_gets_the_row_reduction_and_agrees(width):
    # A classification head's softmax over one row: dlight's Reduction nested the whole
    # softmax in a loop over the row's elements (quadratic: 2.4 ms for 1000 classes).
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(SEED).standard_normal((1, width)).astype(np.float32)
    compiled = backend.compile(model, "avx512")
    expected = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-9)
    assert compiled.schedules is not None
    assert set(compiled.schedules.scheduled.values()) == {"row reduction"}


def test_norm_statistics_run_their_rows_in_parallel_and_agree():
    # InstanceNormalization over 64 channels of 160 frames: the variance's last block
    # (sqrt of variance + eps) has one loop, over the 64 channels, which was taken for
    # one row: all 64 rows ran in one serial iteration of a unit parallel loop.
    import tvm

    rng = np.random.default_rng(SEED)
    graph = helper.make_graph(
        [helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 160])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 160])],
        [
            numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "g"),
            numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    funcs = scheduled(model)
    (variance,) = [f for name, f in funcs.items() if "variance" in name]
    outer = variance.body.block.body if hasattr(variance.body, "block") else variance.body
    while not isinstance(outer, tvm.tirx.For):
        outer = outer.body
    assert outer.kind == tvm.tirx.ForKind.PARALLEL and int(outer.extent) == 64, variance
    assert_agrees_with_ort(model)


@pytest.mark.parametrize("frames", [201, "frames"], ids=["static", "symbolic"])
def test_ragged_norm_statistics_are_vectorized_and_agree(frames):
    # InstanceNormalization over 201 frames (wav2vec2's group norm: 3199), which no
    # vector divides: its sums ran scalar, a loop-carried add per element, at 10x the
    # time of 3200. Now 16 partial sums a row, the last vector's lanes past the row
    # masked, at static and at symbolic lengths (audio of any length); the normalized
    # rows' elementwise loops too.
    import tvm
    from tvm import s_tir

    rng = np.random.default_rng(SEED)
    graph = helper.make_graph(
        [helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, frames])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, frames])],
        [
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "g"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    funcs = scheduled(model)
    (variance,) = [f for name, f in funcs.items() if "variance" in name]
    (normalize,) = [f for name, f in funcs.items() if "subtract" in name]
    # The mean's partial sums and the normalized row, each vectorized, its last vector peeled.
    assert normalize.script().count("pragma_loop_partition_hint") == 2  # type: ignore[attr-defined]
    sch = s_tir.Schedule(variance)
    partials = [
        sch.get(block).name_hint
        for block in sch.get_child_blocks(sch.get_sblock("root"))
        if sch.get(block).name_hint.endswith("_rf_update")
    ]
    assert len(partials) == 2, variance  # the mean's sum and the squared deviations'
    for name in partials:
        inner = sch.get(sch.get_loops(sch.get_sblock(name))[-1])
        assert inner.kind == tvm.tirx.ForKind.VECTORIZED and int(inner.extent) == 16
    assert variance.script().count("pragma_loop_partition_hint") == 2  # type: ignore[attr-defined]
    compiled = backend.compile(model, "avx512")
    for length in (201, 333, 16):  # whole vectors and none: 16 frames
        if frames != "frames" and length != frames:
            continue
        x = rng.standard_normal((1, 8, length)).astype(np.float32) * 3 + 1
        reference = verify.run(model.SerializeToString(), {"x": x})["y"]
        error = float(np.abs(compiled.run({"x": x})["y"] - reference).max())
        assert TOLERANCE.allows(error, float(np.abs(reference).max())), (length, error)


def test_streamed_weight_panels_are_prefetched_and_agree(monkeypatch):
    # Scaled down: a weight of 64 x 512 floats (128 KiB) counts as streamed from memory;
    # 24 rows are 3 row tiles of 8, so each iteration of the k loop prefetches 2 lines of
    # the next panel (32 columns x 4 bytes x 4 k steps / (64 bytes x 3 tiles), rounded down).
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 64 * 512 * 4)
    model = dense_model((1, 24, 64), 512, "gelu")
    (func,) = scheduled(model).values()
    assert func.script().count("llvm.prefetch") == 2  # type: ignore[attr-defined]
    compiled = assert_agrees_with_ort(model)
    assert "prefetcht0" in compiled.executable.mod.imports[0].inspect_source("asm")


def test_streamed_weight_panels_are_prefetched_at_symbolic_rows_and_agree(monkeypatch):
    # A library for any sequence length: the row tiles are counted at run time. The first
    # row tiles prefetch the next panel, where the row tiles are few enough to gain (at
    # most 10 here, Zen 4's limit); the symbolic text models ran 1.10-1.26x their fixed-shape
    # time at batch 1 without it.
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 64 * 512 * 4)
    monkeypatch.setattr(schedules, "PREFETCH_MAX_TILES_BY_CPU", {})  # 10 on any host
    model = dense_model((1, "tokens", 64), 512, "gelu")  # type: ignore[arg-type]
    (func,) = scheduled(model).values()
    script = func.script()  # type: ignore[attr-defined]
    # 32 columns x 4 k steps: 8 lines an iteration, over 5 nominal tiles (half of 10): 1
    assert script.count("llvm.prefetch") == 1, script
    assert "<= T.int64(10)" in script, script  # only where the row tiles at run time are few enough
    compiled = backend.compile(model, "avx512")
    rng = np.random.default_rng(SEED)
    for tokens in (1, 24, 37, 200):  # under, within and past the nominal 5 tiles and the limit
        x = rng.standard_normal((1, tokens, 64)).astype(np.float32)
        reference = verify.run(model.SerializeToString(), {"x": x})["y"]
        error = float(np.abs(compiled.run({"x": x})["y"] - reference).max())
        assert TOLERANCE.allows(error, float(np.abs(reference).max())), (tokens, error)


@pytest.mark.parametrize(
    ("shape", "columns"),
    [((1, 24, 64), 256), ((1, 96, 64), 512), ((1, 1, 64), 512)],
    ids=["weight-in-cache", "many-row-tiles", "one-row"],
)
def test_cached_or_reused_weights_are_not_prefetched(monkeypatch, shape, columns):
    # The same threshold: a smaller weight stays in cache; 96 rows (12 tiles) reuse each
    # panel enough to hide its stream on Zen 4 (the target names the CPU: the tuning does
    # not depend on the host); one row is the hardware prefetcher's stream.
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 64 * 512 * 4)
    (func,) = scheduled(dense_model(shape, columns, "gelu"), "zen4").values()
    assert "llvm.prefetch" not in func.script()  # type: ignore[attr-defined]


def test_code_tuned_for_sapphire_rapids_prefetches_for_more_row_tiles(monkeypatch):
    # 96 rows, 12 tiles: past Zen 4's limit, within Sapphire Rapids' (PREFETCH_MAX_TILES_BY_CPU).
    monkeypatch.setattr(schedules, "PREFETCH_MIN_BYTES", 64 * 512 * 4)
    monkeypatch.setattr(schedules, "ROW_MAJOR_MAX_B_BYTES", 1024)  # nor does it stay in L2
    model = dense_model((1, 96, 64), 512, "gelu")
    for target, prefetched in (("sapphirerapids", True), ("zen4", False)):
        (func,) = scheduled(model, target).values()
        assert ("llvm.prefetch" in func.script()) == prefetched, target  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("shape", "kernel"),
    [
        (
            (1, 7, 7, 64),
            [
                ("PARALLEL", 3),
                ("SERIAL", 7),
                ("SERIAL", 16),
                ("UNROLLED", 4),
                ("UNROLLED", 7),
                ("VECTORIZED", 32),
            ],
        ),
        (
            (2, 4, 6, 64),
            [
                ("PARALLEL", 8),
                ("SERIAL", 3),
                ("SERIAL", 16),
                ("UNROLLED", 4),
                ("UNROLLED", 6),
                ("VECTORIZED", 32),
            ],
        ),
        (
            (1, 3, 10, 64),
            [
                ("PARALLEL", 9),
                ("SERIAL", 2),
                ("SERIAL", 16),
                ("UNROLLED", 4),
                ("UNROLLED", 5),
                ("VECTORIZED", 32),
            ],
        ),
    ],
    ids=["7x7-pixels", "batch-and-image-rows", "tile-of-6-would-straddle-rows-of-10"],
)
def test_batch_loops_sharing_the_weight_join_few_rows(shape, kernel):
    # ConvNeXt's MLP over [1, 7, 7, C]: 7 pixels a row, inside a loop over the image rows,
    # streamed the whole weight once per image row. The image rows (and a static batch)
    # join the rows where they are few: one sweep of 49 rows in 7 tiles of 7 per panel
    # (2 x 4 x 6: 8 tiles of 6, enough for the threads to split: each sweeps the 3
    # panels, rows_outside). Where the fused rows' tile (6 for 3 x 10 = 30 rows) would
    # straddle image rows, they stay apart.
    tvm = pytest.importorskip("tvm")
    model = dense_model(shape, 96, "gelu")
    (func,) = scheduled(model).values()
    assert [(tvm.tirx.ForKind(kind).name, extent) for kind, extent in micro_kernel(func)] == kernel
    assert_agrees_with_ort(model)


def test_the_register_tile_lives_on_the_stack():
    # The 8 x 32 accumulator tile of symbolic rows is 1 KiB, TVM's stack limit: it was a
    # workspace (TVMBackendAllocWorkspace per task, a memset of it per row tile, the
    # accumulators stored and read back). Kept on the stack (stack_tiles), LLVM keeps it
    # in registers: Phi-3's symbolic library at batch 8, 1.08 -> 0.98x ORT (Zen 4).
    model = with_symbolic_axes(dense_model((1, 128, 256), 512, "none"), {0: "batch", 1: "sequence"})
    compiled = backend.compile(model, "avx512")
    asm = "".join(module.inspect_source("asm") for module in compiled.executable.mod.imports)
    assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps %zmm" in asm
    assert "TVMBackendAllocWorkspace" not in asm and "memset" not in asm
    for batch, sequence in [(1, 1), (2, 13), (1, 128)]:
        assert_agrees_at(model, compiled, {"x": (batch, sequence, 256)})


def test_a_matmul_whose_epilogue_pads_its_output_agrees():
    # A pad fused after a matmul (a 1 x 1 convolution's output padded for the next one):
    # the register tiles cover the product only, so the matmul rule wrote the product and
    # left the pad's border unwritten (garbage, 1e37); such a function is not the rule's.
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 3, 0], np.int64), "pads")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Pad", ["m", "pads"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight, pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 28, 64)).astype(np.float32)
    compiled = backend.compile(model, "avx512")
    assert compiled.schedules is not None
    assert any("matmul" in name and "pad" in name for name in compiled.schedules.scheduled), compiled.schedules.scheduled
    expected = np.pad(x @ numpy_helper.to_array(weight), [(0, 0), (0, 3), (0, 0)])
    np.testing.assert_allclose(compiled.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
