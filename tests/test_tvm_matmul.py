"""Packed-weight matmuls and row reductions on CPU: the structure TVM is given, and its numbers.

* :mod:`rewriter.backends.pack_weights`: a matmul with a constant weight calls a packed
  copy of its PrimFunc, the weight repacked as ``[N / NB, K, NB]``; other matmuls are left.
* :mod:`rewriter.backends.schedules`: the packed matmul gets the register-tiled
  micro-kernel (zmm FMAs on avx512), row reductions (layer norm) a vectorized rfactor.
* Every compiled model agrees with ONNX Runtime within
  :data:`rewriter.backends.compile_check.COMPILED_TOLERANCE` (float32: 1e-4 of the
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
from rewriter.backends import compile_check, onnx_import, pack_weights, schedules, targets
from rewriter.backends import tvm as backend

TOLERANCE = compile_check.COMPILED_TOLERANCE["float32"]
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
    mod = onnx_import.import_onnx(proto, target=tvm_target)
    with tvm_target:
        mod = tvm.transform.Sequential(stages.legalize_passes(tvm_target))(mod)
    return mod, tvm_target


def prim_funcs(mod: object) -> dict[str, object]:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}  # type: ignore[attr-defined]


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


def test_pack_pass_is_idempotent():
    import tvm

    mod, target = fused(dense_model((1, 16, 64), 96))
    once = pack_weights.pack_matmul_weights(target)(mod)
    twice = pack_weights.pack_matmul_weights(target)(once)
    tvm.ir.assert_structural_equal(once, twice)


@pytest.mark.parametrize(
    "model",
    [
        dense_model((1, 16, 64), 96, weight_input=True),  # W is computed: nothing to pack
        dense_model((1, 16, 64), 40),  # N = 40 is no multiple of the 32-wide panel
    ],
    ids=["weight-input", "n-not-multiple"],
)
def test_matmuls_that_cannot_be_packed_are_left(model):
    mod, target = fused(model)
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


def test_packed_matmul_gets_the_register_tiled_schedule():
    import tvm
    from tvm import s_tir

    mod, target = fused(dense_model((1, 16, 64), 96))
    with target:
        mod = schedules.cpu_schedule(target)(pack_weights.pack_matmul_weights(target)(mod))
    (name,) = [n for n in prim_funcs(mod) if n.endswith(pack_weights.SUFFIX)]
    func = prim_funcs(mod)[name]
    assert func.attrs["tirx.is_scheduled"]
    sch = s_tir.Schedule(func)
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("matmul_update"))]
    kinds = [loop.kind for loop in loops]
    extents = [int(loop.extent) for loop in loops]
    # parallel panels, row tiles, k / 4, then k unrolled by 4, 8 rows unrolled, 32 lanes.
    assert kinds[0] == tvm.tirx.ForKind.PARALLEL
    assert kinds[-3:] == [tvm.tirx.ForKind.UNROLLED] * 2 + [tvm.tirx.ForKind.VECTORIZED]
    assert extents[-3:] == [schedules.K_UNROLL, 8, 32]


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
        mod = schedules.cpu_schedule(target)(mod)
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
