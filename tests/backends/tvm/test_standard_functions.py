"""Standard ONNX ops TVM's importer lacks or misreads, compiled from their definitions.

Opset-23 exports write ``Attention`` (which TVM converts as ONNX Runtime's contrib op,
and failed with ``'num_heads'``) and ``RotaryEmbedding`` (no TVM converter); older ops
such as ``Celu`` have none either. Each compiles from its ONNX definition
(:mod:`rewriter.backends.tvm.standard_functions`) and agrees with ONNX Runtime; an
``Attention`` written out by ``two-pass-softmax`` gets the fused kernel; real opset-23
exports compile at fixed and symbolic sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

from rewriter import io, verify  # noqa: E402
from rewriter.backends import tvm as backend  # noqa: E402
from rewriter.backends.tvm import import_onnx, standard_functions  # noqa: E402
from rewriter.backends.tvm.ops.softmax_attention import KERNEL_NAME  # noqa: E402
from rewriter.backends.tvm.targets import resolve  # noqa: E402
from rewriter.registry import create_pass  # noqa: E402
from tests import attention_models as am  # noqa: E402
from tests.helpers import model_from_text, to_proto  # noqa: E402

TOLERANCE = 1e-5  # of the output's scale


def agree(got: np.ndarray, expected: np.ndarray) -> None:
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= TOLERANCE * np.abs(expected).max()


def kernels(proto: onnx.ModelProto) -> list[str]:
    mod = import_onnx.import_onnx(proto, target=resolve("avx512"))
    return sorted({gv.name_hint for gv in mod.get_global_vars()})


@pytest.mark.parametrize("form", sorted(am.OPERATOR_FORMS))
def test_attention_operator_compiles_from_its_definition(form: str) -> None:
    model = am.operator_model(form)
    feeds = am.operator_feeds(model)
    proto = to_proto(model)
    prepared = import_onnx.prepare(proto)
    assert "Attention" not in {node.op_type for node in prepared.graph.node}
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    agree(backend.compile(proto, target="avx512").run(feeds)["y"], expected)


@pytest.mark.parametrize("form", sorted(am.OPERATOR_FORMS))
def test_attention_operator_after_two_pass_softmax_gets_the_fused_kernel(form: str) -> None:
    model = am.operator_model(form)
    feeds = am.operator_feeds(model)
    expected = verify.run(to_proto(model).SerializeToString(), feeds)["y"]
    proto = to_proto(create_pass("two-pass-softmax")(model).model)
    assert any(name.startswith(KERNEL_NAME) for name in kernels(proto))
    agree(backend.compile(proto, target="avx512").run(feeds)["y"], expected)


# RotaryEmbedding: x [B, H, S, D] (or [B, S, H·D] with num_heads), caches [.., S, r/2].
ROTARY = {
    "4-D, caches per batch": ("float[2, 3, 5, 8] x, float[2, 5, 4] c, float[2, 5, 4] s", "x, c, s", ""),
    "4-D, position ids": (
        "float[2, 3, 5, 8] x, float[16, 4] c, float[16, 4] s, int64[2, 5] p",
        "x, c, s, p",
        "",
    ),
    "3-D, num_heads": ("float[2, 5, 24] x, float[2, 5, 4] c, float[2, 5, 4] s", "x, c, s", "num_heads = 3"),
    "interleaved": ("float[2, 3, 5, 8] x, float[2, 5, 4] c, float[2, 5, 4] s", "x, c, s", "interleaved = 1"),
    "partial rotary dim": (
        "float[2, 3, 5, 8] x, float[2, 5, 2] c, float[2, 5, 2] s",
        "x, c, s",
        "rotary_embedding_dim = 4",
    ),
}


@pytest.mark.parametrize("form", sorted(ROTARY))
def test_rotary_embedding_compiles_and_agrees(form: str) -> None:
    inputs, args, attributes = ROTARY[form]
    shape = "[2, 5, 24]" if form.startswith("3-D") else "[2, 3, 5, 8]"
    call = f"RotaryEmbedding<{attributes}>({args})" if attributes else f"RotaryEmbedding({args})"
    model = model_from_text(
        f"""
        <ir_version: 10, opset_import: ["" : 23]>
        g ({inputs}) => (float{shape} y) {{
            y = {call}
        }}
        """
    )
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        dims = [int(d) for d in value.shape]
        if value.dtype == ir.DataType.INT64:
            feeds[value.name] = rng.integers(0, 16, dims).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    proto = to_proto(model)
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    agree(backend.compile(proto, target="avx512").run(feeds)["y"], expected)


def test_celu_compiles_from_its_definition() -> None:
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 33] x) => (float[4, 33] y) {
            y = Celu<alpha = 1.5>(x)
        }
        """
    )
    proto = to_proto(model)
    work = import_onnx.to_ir(proto)
    assert standard_functions.expand(work, import_onnx.converters()) == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32) * 3}
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    agree(backend.compile(proto, target="avx512").run(feeds)["y"], expected)


def test_ops_tvm_converts_are_left_as_they_are() -> None:
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 8] x) => (float[2, 8] y) {
            y = RMSNormalization(x, x)
        }
        """
    )
    work = import_onnx.to_ir(to_proto(model))
    assert standard_functions.expand(work, import_onnx.converters()) == 0
    assert [node.op_type for node in work.graph] == ["RMSNormalization"]


@pytest.mark.parametrize("name", ["bert_sdpa_dynamo_opset23", "llama_sdpa_dynamo_opset23"])
def test_opset23_exports_fuse_every_attention_and_agree(real_model, tmp_path, name: str) -> None:
    model = real_model(name)
    inputs = model.inputs
    if name.startswith("llama"):
        # ONNX Runtime 1.32 refuses the exporter's [1, S, r/2] rotary caches for a batch
        # of more than 1 (its RotaryEmbedding wants them per batch): compare at batch 1.
        inputs = {key: value[:1] for key, value in inputs.items()}
    result = create_pass("two-pass-softmax")(io.load(model.path))
    assert result.stats["attention_expanded"] == 2 and result.stats["skipped"] == 0
    path = tmp_path / f"{name}_tp.onnx"
    io.save(result.model, path)
    expected = verify.run(model.path, inputs)
    for dims in (backend.shape_dims(path, inputs), None):
        compiled = backend.compile(path, "avx512", dims=dims)
        got = compiled.run(inputs)
        for key, value in expected.items():
            assert np.abs(got[key] - value).max() <= 1e-4 * np.abs(value).max(), key
    assert any(name.startswith(KERNEL_NAME) for name in kernels(import_onnx.prepare(path)))


@pytest.mark.parametrize(
    "image,block,strides,dilations,pads",
    [
        ([6, 9], [3, 3], [3, 3], [1, 1], [0, 0, 0, 0]),  # kernel = stride: MobileViTV2's patches
        ([5, 7], [2, 2], [1, 2], [1, 1], [0, 0, 0, 0]),  # overlapping blocks sum
        ([6, 5], [3, 2], [2, 1], [2, 1], [1, 0, 1, 2]),  # dilated, padded
    ],
)
def test_col2im_compiles_and_agrees(image, block, strides, dilations, pads) -> None:
    counts = [
        (image[a] + pads[a] + pads[a + 2] - dilations[a] * (block[a] - 1) - 1) // strides[a] + 1
        for a in (0, 1)
    ]
    rows = 4 * block[0] * block[1]
    model = model_from_text(
        f"""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2, {rows}, {counts[0] * counts[1]}] x) => (float[2, 4, {image[0]}, {image[1]}] y)
        <int64[2] i = {{{image[0]}, {image[1]}}}, int64[2] b = {{{block[0]}, {block[1]}}}> {{
            y = Col2Im<strides = {strides}, dilations = {dilations}, pads = {pads}>(x, i, b)
        }}
        """
    )
    x = np.random.default_rng(0).standard_normal((2, rows, counts[0] * counts[1]))
    feeds = {"x": x.astype(np.float32)}
    proto = to_proto(model)
    expected = verify.run(proto.SerializeToString(), feeds)["y"]
    agree(backend.compile(proto, target="avx512").run(feeds)["y"], expected)
